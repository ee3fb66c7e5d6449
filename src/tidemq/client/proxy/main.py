"""``tide proxy --listen HOST:PORT [--plain-http]``: runs the REST proxy.

Cluster and TLS settings for talking to the cluster come from the TIDE_* environment
like every client (``eval "$(tide env --data-dir DIR)"``). The proxy's own server
serves HTTPS with ``--cert-file``/``--key-file`` (default: the client certificate in
TIDE_CERT_FILE / TIDE_KEY_FILE, which ``tide up`` issues for localhost and
127.0.0.1) and checks its callers' certificates against ``--client-ca-file``
(default TIDE_CA_FILE) as ``--client-auth`` says. It never listens on plain HTTP
unless ``--plain-http`` asks for it.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl

import click
from prometheus_client import CollectorRegistry

from tidemq import eventloop
from tidemq.client.proxy.codec import parse_listen
from tidemq.client.proxy.server import Proxy, ProxyConfig
from tidemq.client.proxy.sessions import SessionLimits
from tidemq.errors import TideError
from tidemq.service.app import serve
from tidemq.tls import TlsFiles, server_context

__all__ = ["command", "run_proxy"]

log = logging.getLogger("tidemq.proxy")


async def run_proxy(
    config: ProxyConfig, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> None:
    """Serves until SIGTERM/SIGINT; sessions are closed (their members leave their
    groups) and the producer is flushed on the way out."""
    registry = CollectorRegistry()
    proxy = Proxy(config, registry)
    await proxy.open()
    await serve(proxy.app(registry), host, port, ssl_context, until=proxy.background)


def _server_tls(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None, client_auth: str
) -> ssl.SSLContext:
    if not (cert_file and key_file):
        raise click.UsageError(
            "HTTPS needs --cert-file and --key-file (default: TIDE_CERT_FILE and "
            "TIDE_KEY_FILE, see `tide env`), or pass --plain-http"
        )
    if client_auth != "none" and not client_ca_file:
        raise click.UsageError(
            f"--client-auth {client_auth} needs --client-ca-file (default: TIDE_CA_FILE), "
            "or pass --client-auth none"
        )
    ca = None if client_auth == "none" else client_ca_file
    try:
        return server_context(TlsFiles(ca, cert_file, key_file), client_auth == "required")
    except (OSError, ssl.SSLError) as error:
        raise click.UsageError(f"cannot load the proxy's TLS files: {error}") from error


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("proxy")
@click.option("--listen", required=True, metavar="HOST:PORT", help="Address to serve on.")
@click.option(
    "--plain-http", is_flag=True, help="Serve plain HTTP (no TLS), e.g. for the seed's client."
)
@click.option(
    "--cert-file",
    envvar="TIDE_CERT_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="The proxy's server certificate.",
)
@click.option(
    "--key-file",
    envvar="TIDE_KEY_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="Its private key.",
)
@click.option(
    "--client-ca-file",
    envvar="TIDE_CA_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="CA that signs callers' certificates.",
)
@click.option(
    "--client-auth",
    type=click.Choice(["required", "optional", "none"]),
    default="required",
    show_default=True,
    help="Whether callers must present a certificate.",
)
@click.option("--max-sessions", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-sessions-per-client", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--session-idle-timeout-ms",
    type=click.IntRange(min=1),
    default=60_000,
    show_default=True,
    help="Close a session unused this long.",
)
@click.option(
    "--max-pushes-per-client",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Push requests in flight per client.",
)
@click.option(
    "--max-request-bytes", type=click.IntRange(min=1024), default=8 * 1024 * 1024, show_default=True
)
@click.option(
    "--keepalive-ms",
    type=click.IntRange(min=100, max=60_000),
    default=15_000,
    show_default=True,
    help="Event streams send a comment this often when idle.",
)
@click.option("--log-level", default="info", show_default=True)
def command(
    listen: str,
    plain_http: bool,
    cert_file: str | None,
    key_file: str | None,
    client_ca_file: str | None,
    client_auth: str,
    max_sessions: int,
    max_sessions_per_client: int,
    session_idle_timeout_ms: int,
    max_pushes_per_client: int,
    max_request_bytes: int,
    keepalive_ms: int,
    log_level: str,
) -> None:
    """Run the REST proxy: push, pull, subscribe (Server-Sent Events) and commit over
    HTTP(S) for programs in any language, plus the seed's /api/python/ API."""
    try:
        host, port = parse_listen(listen)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--listen") from error
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s proxy %(levelname)s %(name)s: %(message)s"
    )
    ssl_context = None
    if plain_http:
        if not _is_loopback(host):
            log.warning("serving plain HTTP on %s: anyone on the network can use it", host)
    else:
        ssl_context = _server_tls(cert_file, key_file, client_ca_file, client_auth)
    config = ProxyConfig(
        limits=SessionLimits(max_sessions, max_sessions_per_client, session_idle_timeout_ms),
        max_request_bytes=max_request_bytes,
        max_pushes_per_client=max_pushes_per_client,
        keepalive_ms=keepalive_ms,
    )
    try:
        eventloop.run(run_proxy(config, host, port, ssl_context))
    except TideError as error:  # e.g. no TIDE_BOOTSTRAP
        raise click.ClickException(str(error)) from error
