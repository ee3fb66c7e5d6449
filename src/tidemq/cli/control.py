"""Where ``tide`` finds a cluster, and a small synchronous coordinator client.

Client configuration comes from, in order: ``--data-dir DIR`` (its cluster.json),
the ``TIDE_*`` environment variables (DESIGN.md "Public contracts"), or
``./data/cluster.json`` (where ``scripts/up`` puts the local cluster).

:class:`ControlPlane` speaks the coordinator's JSON API exactly as docs/PROTOCOL.md
specifies it, for read-mostly operator commands (status, topics, groups). It is
synchronous (urllib) so those commands start fast and need no event loop; data
flows (produce, consume, bench) go through the tidemq client library.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidemq.cli.model import ClusterFileError, ClusterInfo, config_from_env, read_cluster_file
from tidemq.cli.processes import ProbeError, http_json, is_running
from tidemq.tls import TlsFiles

DEFAULT_DATA_DIR = "data"


class ConfigError(Exception):
    """No cluster to talk to: neither --data-dir, TIDE_BOOTSTRAP nor ./data/cluster.json."""


@dataclass(frozen=True)
class Target:
    """A resolved cluster: client config, and cluster.json when we have one."""

    config: dict[str, str | None]
    info: ClusterInfo | None = None

    @property
    def bootstrap_urls(self) -> list[str]:
        return [url.strip() for url in (self.config["bootstrap"] or "").split(",") if url.strip()]

    @property
    def tls(self) -> TlsFiles | None:
        if not any(self.config.get(key) for key in ("ca_file", "cert_file", "key_file")):
            return None
        return TlsFiles(self.config["ca_file"], self.config["cert_file"], self.config["key_file"])

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for tidemq.Producer / Consumer / Admin (None left out)."""
        return {key: value for key, value in self.config.items() if value is not None}


def resolve_target(
    data_dir: str | None, environ: dict[str, str] | None = None, cwd: Path | None = None
) -> Target:
    environ = dict(os.environ) if environ is None else environ
    if data_dir is not None:
        return _from_dir(Path(data_dir))
    from_env = config_from_env(environ)
    if from_env is not None:
        return Target(from_env)
    default = (cwd or Path.cwd()) / DEFAULT_DATA_DIR
    if (default / "cluster.json").exists():
        return _from_dir(default)
    raise ConfigError(
        "no cluster configured: pass --data-dir DIR, set TIDE_BOOTSTRAP "
        '(eval "$(tide env --data-dir DIR)"), or run scripts/up to create ./data'
    )


def with_local_processes(target: Target, cwd: Path | None = None) -> Target:
    """``target`` with ./data/cluster.json attached when the TIDE_* variables named the
    cluster and that file describes it running here: its coordinator's URL among the
    bootstrap URLs (same scheme, host and port) and one of its processes alive, so
    that ``tide status`` can show the local PIDs. A stale file, another cluster's, or
    anything wrong with it (unreadable, not a regular file, not cluster.json's shape)
    leaves ``target`` as it is: the variables alone still say where to connect."""
    if target.info is not None:
        return target
    try:
        info = read_cluster_file((cwd or Path.cwd()) / DEFAULT_DATA_DIR)
    except ClusterFileError:
        return target
    coordinator = _endpoint(info.coordinator.url)
    if coordinator is None or coordinator not in map(_endpoint, target.bootstrap_urls):
        return target
    processes = [(info.coordinator.pid, info.coordinator.argv)]
    processes += [(broker.pid, broker.argv) for broker in info.brokers]
    if not any(is_running(pid, argv) for pid, argv in processes):
        return target  # stale: none of its processes runs (a crashed coordinator may)
    return Target(target.config, info)


def _endpoint(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``url`` for comparing URLs (an IP address in its
    canonical form); None if it is not one."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        port = {"https": 443, "http": 80}.get(scheme) if parts.port is None else parts.port
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    host = parts.hostname.lower()
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return scheme, host, port


def _from_dir(data_dir: Path) -> Target:
    try:
        info = read_cluster_file(data_dir)
    except ClusterFileError as error:
        raise ConfigError(str(error)) from error
    return Target(info.client_config(), info)


class ControlPlane:
    """The coordinator's JSON API. Raises ProbeError with the wire error's code."""

    def __init__(self, target: Target, timeout_s: float = 10.0) -> None:
        if not target.bootstrap_urls:
            raise ConfigError("TIDE_BOOTSTRAP is empty")
        self._urls = target.bootstrap_urls
        self._tls = target.tls
        self._timeout_s = timeout_s

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        failure: ProbeError | None = None
        for url in self._urls:
            try:
                return http_json(method, url + path, self._tls, body, self._timeout_s)
            except ProbeError as error:
                if error.status is not None:
                    raise  # the coordinator answered: do not ask another one
                failure = error
        raise failure or ProbeError("no coordinator URL")

    def brokers(self) -> list[dict[str, Any]]:
        answer = self._call("GET", "/v1/brokers")
        return list(answer.get("brokers", [])) if isinstance(answer, dict) else []

    def drain(self, broker_id: int) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", f"/v1/brokers/{broker_id}/drain")
        return answer

    def undrain(self, broker_id: int) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", f"/v1/brokers/{broker_id}/undrain")
        return answer

    def reassignments(self) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("GET", "/v1/reassignments")
        return answer

    def topics(self) -> list[dict[str, Any]]:
        answer = self._call("GET", "/v1/topics")
        return list(answer.get("topics", [])) if isinstance(answer, dict) else []

    def topic(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("GET", f"/v1/topics/{_quote(name)}")
        return answer

    def create_topic(
        self, name: str, partitions: int | None, replication_factor: int | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if partitions is not None:
            body["partitions"] = partitions
        if replication_factor is not None:
            body["replication_factor"] = replication_factor
        answer: dict[str, Any] = self._call("POST", "/v1/topics", body)
        return answer

    def wait_topic_ready(self, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Polls until every partition has a leader that serves it (GET .../offsets).

        A new topic reaches its brokers with their next heartbeat; producing before
        that would meet unknown_topic. Raises ProbeError at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            topic = self.topic(name)
            waiting = [p for p in topic.get("partitions", []) if not self._serves(name, p)]
            if not waiting:
                return topic
            if time.monotonic() >= deadline:
                numbers = [p.get("partition") for p in waiting]
                raise ProbeError(f"topic {name}: partitions {numbers} have no serving leader")
            time.sleep(0.05)

    def _serves(self, topic: str, partition: dict[str, Any]) -> bool:
        leader_url = partition.get("leader_url")
        if not leader_url:
            return False
        path = f"/v1/topics/{_quote(topic)}/partitions/{partition.get('partition')}/offsets"
        try:
            http_json("GET", leader_url + path, self._tls, timeout_s=self._timeout_s)
        except ProbeError:
            return False
        return True

    def delete_topic(self, name: str) -> None:
        self._call("DELETE", f"/v1/topics/{_quote(name)}")

    def groups(self) -> list[str]:
        answer = self._call("GET", "/v1/groups")
        return [str(name) for name in answer.get("groups", [])] if isinstance(answer, dict) else []

    def delete_group(self, name: str) -> None:
        self._call("DELETE", f"/v1/groups/{_quote(name)}")

    def group(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("GET", f"/v1/groups/{_quote(name)}")
        return answer


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
