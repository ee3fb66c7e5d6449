"""The ``tide`` click group: local cluster commands here, the rest registered below.

The service commands (``tide coordinator``, ``tide broker``) are imported only when
invoked, so ``tide --help`` and the client commands work even if a service module
fails to import.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tidemq.cli import cluster as cluster_ops
from tidemq.cli.control import (
    DEFAULT_DATA_DIR,
    ConfigError,
    ControlPlane,
    Target,
    resolve_target,
    with_local_processes,
)
from tidemq.cli.launch import ServiceOptions
from tidemq.cli.model import ClusterFileError, ClusterInfo, env_lines, read_cluster_file
from tidemq.cli.processes import ProbeError
from tidemq.cli.render import (
    brokers_table,
    partitions_table,
    reassignments_table,
    topics_summary,
)

_F = TypeVar("_F", bound=Callable[..., Any])

_LAZY_COMMANDS = {
    "coordinator": ("tidemq.coordinator.main", "Run the coordinator service."),
    "broker": ("tidemq.broker.main", "Run a broker service."),
    "proxy": ("tidemq.client.proxy.main", "Run the REST proxy (HTTP API for any language)."),
}


class _TideGroup(click.Group):
    """A group whose service commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS and cmd_name not in self.commands:
            module_name, summary = _LAZY_COMMANDS[cmd_name]
            if ctx.resilient_parsing:
                return click.Command(cmd_name, help=summary, short_help=summary)
            try:
                module = importlib.import_module(module_name)
                command: click.Command = module.command
            except Exception as error:  # a broken service must not break `tide --help`
                return _broken(cmd_name, module_name, error)
            return command
        return super().get_command(ctx, cmd_name)


def _broken(name: str, module_name: str, error: Exception) -> click.Command:
    def fail() -> None:
        raise click.ClickException(f"cannot load {module_name}: {type(error).__name__}: {error}")

    return click.Command(
        name,
        callback=fail,
        help=f"(unavailable: {error})",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@click.group(cls=_TideGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tidemq")
def cli() -> None:
    """tidemq: a replicated, partitioned message queue over HTTPS."""


def say(message: str) -> None:
    click.echo(message, err=True)


def data_dir_option(default: str | None = DEFAULT_DATA_DIR) -> Callable[[_F], _F]:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=default,
        show_default=default is not None,
        help="Local cluster directory (holds cluster.json).",
    )


@cli.command()
@click.option("--brokers", type=click.IntRange(1, 64), default=3, show_default=True)
@data_dir_option()
@click.option("--detach", is_flag=True, help="Return once the cluster is healthy.")
@click.option(
    "--fsync",
    type=click.Choice(["always", "interval", "never"]),
    default=None,
    help="Broker durability (broker default: always).",
)
@click.option("--plain-http", is_flag=True, help="No TLS (only for a new cluster).")
@click.option(
    "--timeout-s",
    type=click.FloatRange(min=0.1),
    default=20.0,
    show_default=True,
    help="How long to wait for the cluster to become healthy.",
)
@click.option("--session-timeout-ms", type=click.IntRange(min=1), default=None)
@click.option(
    "--replica-replacement-ms",
    type=click.IntRange(min=0),
    default=None,
    help="Re-create a dead broker's replicas elsewhere after this long (default 60000).",
)
@click.option("--default-partitions", type=click.IntRange(min=1), default=None)
@click.option("--default-replication-factor", type=click.IntRange(min=1), default=None)
@click.option("--segment-bytes", type=click.IntRange(min=1), default=None)
@click.option("--retention-ms", type=click.IntRange(min=-1), default=None)
@click.option("--retention-bytes", type=click.IntRange(min=-1), default=None)
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=None)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Services' log lines (service default: text).",
)
def up(
    brokers: int,
    data_dir: str,
    detach: bool,
    timeout_s: float,
    **service_options: Any,
) -> None:
    """Start a local cluster: a coordinator and N brokers, with TLS.

    Idempotent: on a running cluster it starts only what is missing (processes
    listed in cluster.json that died, and new brokers up to --brokers).
    """
    options = ServiceOptions(**service_options)
    try:
        info = cluster_ops.up(Path(data_dir), brokers, options, timeout_s, say=say)
    except cluster_ops.ClusterError as error:
        raise click.ClickException(str(error)) from error
    say(f"cluster healthy: coordinator {info.coordinator.url}, {len(info.brokers)} brokers")
    say(f'configure clients with: eval "$(tide env --data-dir {data_dir})"')
    if detach:
        return
    cluster_ops.run_foreground(Path(data_dir), info, _status_line, say)


def _status_line(info: ClusterInfo) -> str:
    problems = cluster_ops.unhealthy(info)
    healthy = len(info.brokers) - sum(1 for name in problems if name.startswith("broker-"))
    state = (
        "healthy"
        if not problems
        else "degraded: " + ", ".join(f"{name} {why}" for name, why in sorted(problems.items()))
    )
    return f"{time.strftime('%H:%M:%S')} {healthy}/{len(info.brokers)} brokers ok, {state}"


@cli.command()
@data_dir_option()
@click.option(
    "--grace-s",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="How long to wait after SIGTERM before SIGKILL.",
)
def down(data_dir: str, grace_s: float) -> None:
    """Stop the local cluster (its `tide monitor`, the brokers, then the coordinator).
    Keeps the data."""
    try:
        cluster_ops.down(Path(data_dir), grace_s, say=say)
    except cluster_ops.ClusterError as error:
        raise click.ClickException(str(error)) from error


@cli.command()
@data_dir_option()
def env(data_dir: str) -> None:
    """Print shell exports for clients: eval "$(tide env --data-dir DIR)"."""
    try:
        info = read_cluster_file(Path(data_dir))
    except ClusterFileError as error:
        raise click.ClickException(str(error)) from error
    for line in env_lines(info):
        click.echo(line)


@cli.command()
@data_dir_option(default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(data_dir: str | None, as_json: bool) -> None:
    """Brokers, topics and partitions (leaders, ISR) of a cluster."""
    target = with_local_processes(_target(data_dir))  # the PIDs, if the cluster runs here
    report = _status_report(target)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(_status_text(report))
    if report["coordinator"]["error"]:
        sys.exit(1)


def _target(data_dir: str | None) -> Target:
    try:
        return resolve_target(data_dir)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error


def _status_report(target: Target) -> dict[str, Any]:
    local = cluster_ops.local_processes(target.info) if target.info else []
    coordinator: dict[str, Any] = {"url": target.bootstrap_urls, "error": None}
    if target.info:
        coordinator.update(pid=target.info.coordinator.pid, running=local[0]["running"])
    brokers: list[dict[str, Any]] = []
    topics: list[dict[str, Any]] = []
    moves: dict[str, Any] = {"draining": [], "reassignments": []}
    try:
        control = ControlPlane(target)
        brokers = control.brokers()
        topics = control.topics()
        moves = control.reassignments()
    except (ProbeError, ConfigError) as error:
        coordinator["error"] = str(error)
    return {
        "coordinator": coordinator,
        "brokers": brokers,
        "topics": topics,
        "processes": local,
        "moves": moves,
    }


def _status_text(report: dict[str, Any]) -> str:
    coordinator = report["coordinator"]
    head = f"coordinator {','.join(coordinator['url'])}"
    if "pid" in coordinator:
        head += f"  pid {coordinator['pid']} {'running' if coordinator['running'] else 'stopped'}"
    if coordinator["error"]:
        head += f"\n  unreachable: {coordinator['error']}"
    alive = sum(1 for broker in report["brokers"] if broker.get("alive"))
    parts = [
        head,
        f"{alive}/{len(report['brokers'])} brokers alive\n"
        + brokers_table(report["brokers"], report["processes"]),
    ]
    if "moves" in report:
        parts.append(reassignments_table(report["moves"]))
    if report["topics"]:
        parts.append(topics_summary(report["topics"]))
        parts.append(partitions_table(report["topics"]))
    else:
        parts.append("no topics")
    return "\n\n".join(parts)


def _register_subcommands() -> None:
    from tidemq.cli.bench import bench
    from tidemq.cli.brokers import brokers
    from tidemq.cli.client_commands import consume, groups, produce, topics
    from tidemq.cli.ops_commands import certs, health, monitor

    for command in (topics, produce, consume, groups, bench, brokers, monitor, certs, health):
        cli.add_command(command)


_register_subcommands()


def main() -> None:
    cli(prog_name="tide")
