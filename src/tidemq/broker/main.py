"""`tide broker`: runs one broker process."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from prometheus_client import CollectorRegistry, ProcessCollector

from tidemq import eventloop
from tidemq.broker.server import LAG_TIME_MAX_MS_MIN, Broker, BrokerConfig, create_app
from tidemq.logs import LOG_FORMATS
from tidemq.logs import configure as configure_logging
from tidemq.service.app import serve
from tidemq.storage import FsyncPolicy, LogConfig
from tidemq.tls import TlsFiles, client_context, server_context
from tidemq.transport import HttpTransport

log = logging.getLogger(__name__)


async def run_broker(config: BrokerConfig, host: str, port: int, tls: TlsFiles | None) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, fds
    ssl_client = client_context(tls) if tls else False

    def transport_factory() -> HttpTransport:
        # Followers hold one long-poll per followed partition and leader: the bound.
        return HttpTransport(
            ssl_client, {"User-Agent": f"tidemq-broker-{config.broker_id}"}, 256, 30_000
        )

    broker = Broker(config, transport_factory, registry)
    app = create_app(broker, registry)
    ssl_server = server_context(tls) if tls else None
    try:
        await serve(app, host, port, ssl_server, until=broker.run)
    finally:
        await broker.close()


@click.command("broker")
@click.option(
    "--id", "broker_id", type=int, required=True, help="Broker id (stable across restarts)."
)
@click.option("--data-dir", type=click.Path(path_type=Path), required=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, required=True)
@click.option("--advertised-url", default=None, help="URL clients use; default from host and port.")
@click.option("--coordinator", "coordinator_url", required=True, help="Coordinator URL.")
@click.option("--ca-file", type=click.Path(exists=True), default=None)
@click.option("--cert-file", type=click.Path(exists=True), default=None)
@click.option("--key-file", type=click.Path(exists=True), default=None)
@click.option("--plain-http", is_flag=True, help="Serve plain HTTP (no TLS). Only on request.")
@click.option(
    "--fsync",
    type=click.Choice([p.value for p in FsyncPolicy]),
    default="always",
    show_default=True,
)
@click.option("--fsync-interval-ms", type=int, default=1000, show_default=True)
@click.option(
    "--journal/--no-journal",
    default=True,
    show_default=True,
    envvar="TIDE_BROKER_JOURNAL",
    help="Under --fsync always: one broker-wide journal fsync makes every partition's "
    "appends durable (segment files fsynced behind it); --no-journal fsyncs each "
    "partition log.",
)
@click.option("--segment-bytes", type=int, default=128 * 1024 * 1024, show_default=True)
@click.option("--segment-ms", type=int, default=7 * 24 * 3600 * 1000, show_default=True)
@click.option("--retention-ms", type=int, default=7 * 24 * 3600 * 1000, show_default=True)
@click.option("--retention-bytes", type=int, default=-1, show_default=True)
@click.option("--max-request-bytes", type=int, default=8 * 1024 * 1024, show_default=True)
@click.option(
    "--replica-lag-time-max-ms",
    type=click.IntRange(min=LAG_TIME_MAX_MS_MIN),
    default=10_000,
    show_default=True,
    help="A follower that has not caught up for this long leaves the ISR (a replica "
    "fetch waits at most half of it).",
)
@click.option("--log-level", default="info", show_default=True)
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True)
def command(
    broker_id: int,
    data_dir: Path,
    host: str,
    port: int,
    advertised_url: str | None,
    coordinator_url: str,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    plain_http: bool,
    fsync: str,
    fsync_interval_ms: int,
    journal: bool,
    segment_bytes: int,
    segment_ms: int,
    retention_ms: int,
    retention_bytes: int,
    max_request_bytes: int,
    replica_lag_time_max_ms: int,
    log_level: str,
    log_format: str,
) -> None:
    """Run a broker: stores, serves and replicates partition logs."""
    configure_logging(f"broker-{broker_id}", log_level, log_format)
    tls: TlsFiles | None = None
    if not plain_http:
        if not (cert_file and key_file and ca_file):
            raise click.UsageError(
                "TLS needs --cert-file, --key-file and --ca-file (or pass --plain-http)"
            )
        tls = TlsFiles(ca_file, cert_file, key_file)
    scheme = "http" if plain_http else "https"
    log_config = LogConfig(
        segment_bytes_max=segment_bytes,
        segment_ms_max=segment_ms,
        retention_ms=retention_ms,
        retention_bytes=retention_bytes,
        fsync=FsyncPolicy(fsync),
        fsync_interval_ms=fsync_interval_ms,
    )
    config = BrokerConfig(
        broker_id=broker_id,
        data_dir=data_dir.resolve(),
        coordinator_url=coordinator_url,
        advertised_url=advertised_url or f"{scheme}://{host}:{port}",
        log_config=log_config,
        max_request_bytes=max_request_bytes,
        replica_lag_time_max_ms=replica_lag_time_max_ms,
        journal=journal,
    )
    eventloop.run(run_broker(config, host, port, tls))
