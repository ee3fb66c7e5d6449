"""How a local cluster is laid out on disk and how its processes are started.

Layout of a data directory (docs/OPERATIONS.md)::

    DIR/cluster.json           what runs and how to start it again (model.py)
    DIR/tls/                   cluster CA and one certificate per service + "client"
    DIR/coordinator/           the coordinator's store
    DIR/broker-<id>/           one broker's partition logs
    DIR/logs/<name>.log        each process's stdout and stderr

Everything here is pure except :func:`pick_free_ports`, which asks the kernel for
ports (bind to port 0, read it, close). Every argv holds absolute paths and a fixed
port: running it again restarts the same process on the same data.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tidemq.tls import TlsFiles

HOST = "127.0.0.1"
COORDINATOR = "coordinator"
CLIENT = "client"


def broker_name(broker_id: int) -> str:
    return f"broker-{broker_id}"


@dataclass(frozen=True)
class Layout:
    """The paths of one local cluster; ``root`` is absolute."""

    root: Path

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def process_dir(self, name: str) -> Path:
        return self.root / name

    def log_file(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"


@dataclass(frozen=True)
class ServiceOptions:
    """Options ``tide up`` passes through to the services it starts; None = their default."""

    plain_http: bool = False
    fsync: str | None = None
    segment_bytes: int | None = None
    retention_ms: int | None = None
    retention_bytes: int | None = None
    max_request_bytes: int | None = None
    session_timeout_ms: int | None = None
    replica_replacement_ms: int | None = None
    default_partitions: int | None = None
    default_replication_factor: int | None = None
    log_format: str | None = None
    extra_broker_args: tuple[str, ...] = field(default=())


def url_for(port: int, plain_http: bool, host: str = HOST) -> str:
    return f"{'http' if plain_http else 'https'}://{host}:{port}"


def _module_argv(python: str, role: str) -> list[str]:
    return [python, "-m", "tidemq", role]


def _tls_args(tls: TlsFiles | None, plain_http: bool) -> list[str]:
    args: list[str] = []
    if plain_http:
        args.append("--plain-http")
    if tls is not None and not plain_http:
        for flag, value in (
            ("--ca-file", tls.ca_file),
            ("--cert-file", tls.cert_file),
            ("--key-file", tls.key_file),
        ):
            if value:
                args += [flag, value]
    return args


def _optional(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def coordinator_argv(
    layout: Layout,
    port: int,
    tls: TlsFiles | None,
    options: ServiceOptions,
    broker_count: int,
    python: str = sys.executable,
    host: str = HOST,
    advertised_host: str = HOST,
) -> list[str]:
    """The coordinator's argv. With fewer than 2 brokers the default replication
    factor drops to the broker count so that topics can be created at all.
    ``host`` / ``advertised_host``: where it listens and the name others reach it by
    (the compose stack: 0.0.0.0 and the service name; docker-compose.yml is tested
    to run exactly these argvs)."""
    replication_factor = options.default_replication_factor
    if replication_factor is None and broker_count < 2:
        replication_factor = max(1, broker_count)
    return [
        *_module_argv(python, "coordinator"),
        "--data-dir", str(layout.process_dir(COORDINATOR)),
        "--host", host,
        "--port", str(port),
        "--advertised-url", url_for(port, options.plain_http, advertised_host),
        *_tls_args(tls, options.plain_http),
        *_optional("--session-timeout-ms", options.session_timeout_ms),
        *_optional("--replica-replacement-ms", options.replica_replacement_ms),
        *_optional("--default-partitions", options.default_partitions),
        *_optional("--default-replication-factor", replication_factor),
        *_optional("--log-format", options.log_format),
    ]  # fmt: skip


def broker_argv(
    layout: Layout,
    broker_id: int,
    port: int,
    coordinator_url: str,
    tls: TlsFiles | None,
    options: ServiceOptions,
    python: str = sys.executable,
    host: str = HOST,
    advertised_host: str = HOST,
) -> list[str]:
    return [
        *_module_argv(python, "broker"),
        "--id", str(broker_id),
        "--data-dir", str(layout.process_dir(broker_name(broker_id))),
        "--host", host,
        "--port", str(port),
        "--advertised-url", url_for(port, options.plain_http, advertised_host),
        "--coordinator", coordinator_url,
        *_tls_args(tls, options.plain_http),
        *_optional("--fsync", options.fsync),
        *_optional("--segment-bytes", options.segment_bytes),
        *_optional("--retention-ms", options.retention_ms),
        *_optional("--retention-bytes", options.retention_bytes),
        *_optional("--max-request-bytes", options.max_request_bytes),
        *_optional("--log-format", options.log_format),
        *options.extra_broker_args,
    ]  # fmt: skip


def pick_free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports that were free a moment ago.

    All sockets stay open until every port is read, so the kernel cannot hand out
    the same port twice. Another program may still take one before our service
    binds it: ``tide up`` then reports the failed start (docs/OPERATIONS.md).
    """
    ports: list[int] = []
    with ExitStack() as stack:
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
    return ports


def argv_option(argv: Sequence[str], flag: str) -> str | None:
    """The value following ``flag`` in ``argv`` (e.g. ``--data-dir``), or None."""
    for index, part in enumerate(argv[:-1]):
        if part == flag:
            return argv[index + 1]
    return None


def cmdline_matches(cmdline: Sequence[str], argv: Sequence[str]) -> bool:
    """Is the process with this /proc cmdline the one started from ``argv``?

    Guards against signalling a stranger that reused a PID: it must be a tidemq
    process of the same role on the same data directory.
    """
    if not cmdline or not any("tidemq" in part for part in cmdline):
        return False
    if list(cmdline) == list(argv):
        return True
    role = argv[3] if len(argv) > 3 else None
    data_dir = argv_option(argv, "--data-dir")
    return (
        role is not None
        and role in cmdline
        and data_dir is not None
        and argv_option(cmdline, "--data-dir") == data_dir
    )
