"""Operations commands: ``tide monitor``, ``tide certs`` and ``tide health``.

``monitor`` runs a local Prometheus for a ``tide up`` cluster (cli/monitor.py);
``certs`` issues the cluster CA and service certificates for hosts other than
localhost (the compose stack's one-shot certificate service); ``health`` probes a
service's ``/healthz`` with the ``TIDE_*`` TLS settings (the container healthcheck).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from tidemq.cli import monitor as monitor_ops
from tidemq.cli.control import DEFAULT_DATA_DIR
from tidemq.cli.model import ClusterFileError, read_cluster_file
from tidemq.cli.processes import ProbeError, http_json
from tidemq.tls import TlsFiles, ensure_cluster_pki


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Local cluster directory (holds cluster.json).",
)
@click.option("--listen", default=None, help="HOST:PORT for Prometheus (default: a free port).")
@click.option(
    "--scrape-interval-s",
    type=click.FloatRange(min=0.1, max=3600),
    default=5.0,
    show_default=True,
    help="Scrape and rule evaluation interval.",
)
@click.option(
    "--rules",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Alert rules file (default: the rules shipped with tidemq).",
)
@click.option("--prometheus", default=None, help="Prometheus binary (default: from PATH).")
@click.option("--timeout-s", type=click.FloatRange(min=0.1), default=30.0, show_default=True)
def monitor(
    data_dir: str,
    listen: str | None,
    scrape_interval_s: float,
    rules: Path | None,
    prometheus: str | None,
    timeout_s: float,
) -> None:
    """Start a local Prometheus scraping the `tide up` cluster; `tide down` stops it."""
    root = Path(data_dir)
    try:
        info = read_cluster_file(root)
        entry = monitor_ops.start(
            root, info, listen, scrape_interval_s, rules, prometheus, timeout_s
        )
    except (ClusterFileError, monitor_ops.MonitorError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    directory = monitor_ops.monitor_dir(root.resolve())
    _say(f"prometheus running (pid {entry.pid}) at {entry.url}")
    _say(f"  alerts:  {entry.url}/alerts")
    _say(f"  targets: {entry.url}/targets")
    _say(f"  config:  {directory / monitor_ops.CONFIG_FILE} (rules: {directory / 'rules.yml'})")
    _say("  dashboards: import src/tidemq/monitoring/grafana/dashboards/*.json into Grafana")
    _say(f"stop it with: tide down --data-dir {data_dir}")
    click.echo(entry.url)


@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--name", "names", multiple=True, required=True, help="Certificate name (repeat).")
@click.option("--host", "hosts", multiple=True, help="Host name or IP to be valid for.")
def certs(directory: Path, names: tuple[str, ...], hosts: tuple[str, ...]) -> None:
    """Create the cluster CA (once) and a certificate per --name, valid for --host."""
    every_host = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    issued = ensure_cluster_pki(directory, list(names), every_host)
    for name, files in issued.items():
        click.echo(f"{name}: {files.cert_file}")


@click.command()
@click.option("--url", default=None, help="Service URL (default: $TIDE_HEALTH_URL).")
def health(url: str | None) -> None:
    """Exit 0 when the service at URL answers /healthz (TLS from TIDE_* variables)."""
    url = url or os.environ.get("TIDE_HEALTH_URL")
    if not url:
        raise click.ClickException("give --url or set TIDE_HEALTH_URL")
    tls = TlsFiles(
        os.environ.get("TIDE_CA_FILE"),
        os.environ.get("TIDE_CERT_FILE"),
        os.environ.get("TIDE_KEY_FILE"),
    )
    try:
        http_json("GET", url.rstrip("/") + "/healthz", tls)
    except ProbeError as error:
        raise click.ClickException(f"unhealthy: {error}") from error
    click.echo("ok")
