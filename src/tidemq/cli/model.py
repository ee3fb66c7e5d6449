"""``DIR/cluster.json``: what ``tide up`` started, and how to start it again.

The shape is a public contract (docs/OPERATIONS.md, DESIGN.md "Public contracts"),
exactly::

    {"coordinator": {"url", "pid", "argv"},
     "brokers": [{"id", "url", "pid", "argv"}, ...],
     "ca_file", "client_cert_file", "client_key_file"}

Invariants: ``argv`` holds absolute paths and a fixed port, so running it again
restarts the same process with its data; broker ids are unique; the cert fields are
all strings or all null (null when the cluster serves plain HTTP).

Everything here is pure except :func:`write_cluster_file` / :func:`read_cluster_file`,
which write atomically (temporary file, fsync, rename) and read-and-validate.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

CLUSTER_FILE = "cluster.json"
CLUSTER_FILE_BYTES_MAX = 1 << 20  # a cluster of hundreds of brokers takes ~100 KiB
PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT: no process has a larger PID
# What json.loads raises for bytes it does not read: JSONDecodeError and
# UnicodeDecodeError are ValueErrors (so is a too-long integer); deep nesting is a
# RecursionError. For every JSON the CLI reads (cluster.json, a service's answer).
JSON_ERRORS = (ValueError, RecursionError)


class ClusterFileError(Exception):
    """cluster.json is missing, unreadable or not of the contract's shape."""


@dataclass(frozen=True)
class CoordinatorEntry:
    url: str
    pid: int
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "pid": self.pid, "argv": list(self.argv)}


@dataclass(frozen=True)
class BrokerEntry:
    id: int
    url: str
    pid: int
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "pid": self.pid, "argv": list(self.argv)}


@dataclass(frozen=True)
class ClusterInfo:
    coordinator: CoordinatorEntry
    brokers: tuple[BrokerEntry, ...]
    ca_file: str | None
    client_cert_file: str | None
    client_key_file: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "coordinator": self.coordinator.to_json(),
            "brokers": [broker.to_json() for broker in self.brokers],
            "ca_file": self.ca_file,
            "client_cert_file": self.client_cert_file,
            "client_key_file": self.client_key_file,
        }

    def broker(self, broker_id: int) -> BrokerEntry | None:
        for broker in self.brokers:
            if broker.id == broker_id:
                return broker
        return None

    def with_broker(self, entry: BrokerEntry) -> ClusterInfo:
        """This cluster with ``entry`` added, or replacing the broker of the same id."""
        others = [broker for broker in self.brokers if broker.id != entry.id]
        brokers = tuple(sorted([*others, entry], key=lambda broker: broker.id))
        return replace(self, brokers=brokers)

    def client_config(self) -> dict[str, str | None]:
        """Keyword arguments for tidemq.Producer / Consumer / Admin."""
        return {
            "bootstrap": self.coordinator.url,
            "ca_file": self.ca_file,
            "cert_file": self.client_cert_file,
            "key_file": self.client_key_file,
        }


def _field(data: dict[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in data:
        raise ClusterFileError(f"{where}: missing field {name!r}")
    value = data[name]
    if kind is int and isinstance(value, bool):
        raise ClusterFileError(f"{where}.{name}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ClusterFileError(f"{where}.{name}: expected {kind.__name__}, got {value!r}")
    return value


def _exact_keys(data: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ClusterFileError(f"{where}: expected an object")
    extra = set(data) - keys
    if extra:
        raise ClusterFileError(f"{where}: unexpected fields {sorted(extra)}")
    return data


def _argv(data: dict[str, Any], where: str) -> tuple[str, ...]:
    argv = _field(data, "argv", list, where)
    if not argv or not all(isinstance(part, str) for part in argv):
        raise ClusterFileError(f"{where}.argv: expected a non-empty list of strings")
    return tuple(argv)


def _pid(data: dict[str, Any], where: str) -> int:
    pid: int = _field(data, "pid", int, where)
    if not 0 < pid <= PID_MAX:
        raise ClusterFileError(f"{where}.pid: expected a PID from 1 to {PID_MAX}, got {pid}")
    return pid


def _optional_path(data: dict[str, Any], name: str) -> str | None:
    if name not in data:
        raise ClusterFileError(f"cluster: missing field {name!r}")
    value = data[name]
    if value is not None and not isinstance(value, str):
        raise ClusterFileError(f"cluster.{name}: expected a string or null, got {value!r}")
    return value


def parse_cluster_info(data: Any) -> ClusterInfo:
    """Validates a decoded cluster.json; raises ClusterFileError naming the bad field."""
    top = _exact_keys(
        data,
        {"coordinator", "brokers", "ca_file", "client_cert_file", "client_key_file"},
        "cluster",
    )
    raw_coordinator = _exact_keys(top.get("coordinator"), {"url", "pid", "argv"}, "coordinator")
    coordinator = CoordinatorEntry(
        url=_field(raw_coordinator, "url", str, "coordinator"),
        pid=_pid(raw_coordinator, "coordinator"),
        argv=_argv(raw_coordinator, "coordinator"),
    )
    raw_brokers = _field(top, "brokers", list, "cluster")
    brokers: list[BrokerEntry] = []
    for index, raw in enumerate(raw_brokers):
        where = f"brokers[{index}]"
        raw = _exact_keys(raw, {"id", "url", "pid", "argv"}, where)
        brokers.append(
            BrokerEntry(
                id=_field(raw, "id", int, where),
                url=_field(raw, "url", str, where),
                pid=_pid(raw, where),
                argv=_argv(raw, where),
            )
        )
    ids = [broker.id for broker in brokers]
    if len(set(ids)) != len(ids):
        raise ClusterFileError(f"brokers: duplicate ids in {ids}")
    return ClusterInfo(
        coordinator=coordinator,
        brokers=tuple(brokers),
        ca_file=_optional_path(top, "ca_file"),
        client_cert_file=_optional_path(top, "client_cert_file"),
        client_key_file=_optional_path(top, "client_key_file"),
    )


def cluster_file(data_dir: Path) -> Path:
    return data_dir / CLUSTER_FILE


def read_cluster_file(data_dir: Path) -> ClusterInfo:
    path = cluster_file(data_dir)
    try:
        text = _read_regular_file(path, CLUSTER_FILE_BYTES_MAX).decode("utf-8")
    except FileNotFoundError as error:
        raise ClusterFileError(f"{path} not found: is a cluster set up there (tide up)?") from error
    except OSError as error:
        raise ClusterFileError(f"cannot read {path}: {error}") from error
    except UnicodeDecodeError as error:
        raise ClusterFileError(f"{path} is not UTF-8 text: {error}") from error
    try:
        data = json.loads(text)
    except JSON_ERRORS as error:
        raise ClusterFileError(f"{path} is not JSON: {str(error)[:200]}") from error
    try:
        return parse_cluster_info(data)
    except ClusterFileError as error:
        raise ClusterFileError(f"{path}: {error}") from error


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if, once open, it is a regular file of at most
    ``max_bytes``: a FIFO (opened without blocking), a device or a /proc file swapped
    in raises ClusterFileError instead of blocking or reading without end."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ClusterFileError(f"{path} is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(descriptor, max_bytes + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ClusterFileError(f"{path} is larger than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def write_cluster_file(data_dir: Path, info: ClusterInfo) -> None:
    """Atomically: write a temporary file, fsync it, rename it over, fsync the directory."""
    path = cluster_file(data_dir)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    body = json.dumps(info.to_json(), indent=2) + "\n"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


ENV_NAMES = {
    "bootstrap": "TIDE_BOOTSTRAP",
    "ca_file": "TIDE_CA_FILE",
    "cert_file": "TIDE_CERT_FILE",
    "key_file": "TIDE_KEY_FILE",
}


def env_lines(info: ClusterInfo) -> list[str]:
    """Shell lines for ``eval "$(tide env)"``: export what is set, unset what is null."""
    lines = []
    for key, value in info.client_config().items():
        name = ENV_NAMES[key]
        lines.append(f"export {name}={shlex.quote(value)}" if value else f"unset {name}")
    return lines


def config_from_env(environ: dict[str, str]) -> dict[str, str | None] | None:
    """Client config from TIDE_* variables, or None when TIDE_BOOTSTRAP is unset."""
    if not environ.get("TIDE_BOOTSTRAP"):
        return None
    return {key: environ.get(name) or None for key, name in ENV_NAMES.items()}
