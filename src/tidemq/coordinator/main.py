"""``tide coordinator``: runs the coordinator service.

Owns: the command-line options, opening ``DATA_DIR/coordinator.sqlite``, TLS setup,
and one ``asyncio.TaskGroup`` holding the HTTP server and the background tick. When
either ends (a signal, or a failure of the tick) the other is stopped and the store
closed; a failure surfaces as the process's error.

Must always hold: the service never listens on plain HTTP unless ``--plain-http``
asked for it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from tidemq import eventloop
from tidemq.coordinator.server import Coordinator, CoordinatorConfig
from tidemq.coordinator.store import CommandStore
from tidemq.logs import LOG_FORMATS
from tidemq.logs import configure as configure_logging
from tidemq.service.app import serve
from tidemq.tls import TlsFiles, server_context

__all__ = ["CoordinatorConfig", "command", "run_coordinator"]

log = logging.getLogger(__name__)
STORE_FILE = "coordinator.sqlite"


async def run_coordinator(config: CoordinatorConfig) -> None:
    """Serves until SIGTERM/SIGINT or cancellation; the store is closed on the way out."""
    if not config.plain_http and not (config.tls.cert_file and config.tls.key_file):
        raise ValueError("TLS needs a certificate and key (or ask for --plain-http)")
    ssl_context = None if config.plain_http else server_context(config.tls)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store, state = await CommandStore.open(config.data_dir / STORE_FILE, config.snapshot_every)
    try:
        coordinator = Coordinator(config, state, store)
        await coordinator.start()
        log.info("coordinator %s serving cluster %s", config.url, state.cluster_id)
        async with asyncio.TaskGroup() as tasks:
            ticker = tasks.create_task(coordinator.tick_forever(), name="coordinator-tick")
            await serve(coordinator.app(), config.host, config.port, ssl_context)
            ticker.cancel()
    finally:
        await store.close()


@click.command("coordinator")
@click.option("--data-dir", type=click.Path(path_type=Path), required=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, required=True)
@click.option("--advertised-url", default=None, help="default: https://{host}:{port}")
@click.option("--ca-file", type=click.Path(path_type=Path), default=None)
@click.option("--cert-file", type=click.Path(path_type=Path), default=None)
@click.option("--key-file", type=click.Path(path_type=Path), default=None)
@click.option("--plain-http", is_flag=True, help="serve without TLS (tests, local only)")
@click.option("--session-timeout-ms", type=int, default=6000, show_default=True)
@click.option("--heartbeat-interval-ms", type=int, default=1000, show_default=True)
@click.option("--default-partitions", type=int, default=12, show_default=True)
@click.option("--default-replication-factor", type=int, default=2, show_default=True)
@click.option(
    "--rebalance-moves-max",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="Partition moves in flight at once (0: no rebalancing, no draining).",
)
@click.option(
    "--rebalance-moves-per-broker-max",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Moves adding to or removing from one broker at once.",
)
@click.option(
    "--replica-replacement-ms",
    type=click.IntRange(min=0),
    default=60_000,
    show_default=True,
    help="A broker dead this long past its session has its replicas re-created elsewhere.",
)
@click.option(
    "--no-group-commit",
    is_flag=True,
    hidden=True,
    help="one transaction per offset commit (to measure what group commit buys)",
)
@click.option("--log-level", default="info", show_default=True)
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True)
def command(
    data_dir: Path,
    host: str,
    port: int,
    advertised_url: str | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    plain_http: bool,
    session_timeout_ms: int,
    heartbeat_interval_ms: int,
    default_partitions: int,
    default_replication_factor: int,
    rebalance_moves_max: int,
    rebalance_moves_per_broker_max: int,
    replica_replacement_ms: int,
    no_group_commit: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Run the coordinator: cluster metadata, failover, consumer groups."""
    if not plain_http and not (cert_file and key_file and ca_file):
        raise click.UsageError("give --cert-file, --key-file and --ca-file, or --plain-http")
    _check_positive(
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms,
        default_partitions=default_partitions,
        default_replication_factor=default_replication_factor,
    )
    configure_logging("coordinator", log_level, log_format)
    config = CoordinatorConfig(
        data_dir=data_dir,
        port=port,
        host=host,
        advertised_url=advertised_url,
        tls=TlsFiles(
            str(ca_file) if ca_file else None,
            str(cert_file) if cert_file else None,
            str(key_file) if key_file else None,
        ),
        plain_http=plain_http,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms,
        default_partitions=default_partitions,
        default_replication_factor=default_replication_factor,
        rebalance_moves_max=rebalance_moves_max,
        rebalance_moves_per_broker_max=rebalance_moves_per_broker_max,
        replica_replacement_ms=replica_replacement_ms,
        offset_group_commit=not no_group_commit,
    )
    eventloop.run(run_coordinator(config))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise click.BadParameter(
                f"must be >= 1, got {value}", param_hint=f"--{name.replace('_', '-')}"
            )
