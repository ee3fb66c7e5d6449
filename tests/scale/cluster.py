"""A tidemq cluster for the scalability benchmark: one coordinator and N brokers, each
in its own network namespace of a :class:`~tests.scale.network.CappedNetwork`.

The processes are started with the argv ``tide up`` builds (:mod:`tidemq.cli.launch`),
listening on and advertising their namespace's address (each namespace has its own
port space, so the ports are fixed). Certificates name every namespace address.
``ip netns exec`` execs, so the PID we hold is the service itself. :meth:`close`
SIGKILLs and reaps every process it started, by PID; readiness is polled against
deadlines.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.scale.network import CappedNetwork, signals_held
from tidemq.cli.launch import (
    CLIENT,
    COORDINATOR,
    Layout,
    ServiceOptions,
    broker_argv,
    broker_name,
    coordinator_argv,
    url_for,
)
from tidemq.tls import TlsFiles, client_context, ensure_cluster_pki

COORDINATOR_PORT = 9000
BROKER_PORT = 9100
POLL_S = 0.1


class ClusterError(Exception):
    pass


class BenchCluster:
    def __init__(self, root: Path, network: CappedNetwork, brokers: int) -> None:
        self.root = root.resolve()
        self.network = network
        self.broker_ids = list(range(1, brokers + 1))
        self.layout = Layout(self.root)
        self.urls: dict[str, str] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.tls: dict[str, TlsFiles] = {}
        self._ssl: ssl.SSLContext | None = None

    @staticmethod
    def host_names(brokers: int) -> list[str]:
        return [COORDINATOR] + [broker_name(i) for i in range(1, brokers + 1)]

    def start(self, timeout_s: float = 60.0) -> BenchCluster:
        names = self.host_names(len(self.broker_ids))
        addresses = [self.network.address(name) for name in names]
        self.tls = ensure_cluster_pki(
            self.layout.tls_dir, [*names, CLIENT], hosts=["localhost", "127.0.0.1", *addresses]
        )
        self._ssl = client_context(self.tls[CLIENT])
        options = ServiceOptions()
        address = self.network.address(COORDINATOR)
        argv = coordinator_argv(
            self.layout, COORDINATOR_PORT, self.tls[COORDINATOR], options,
            len(self.broker_ids), python=sys.executable, host=address, advertised_host=address,
        )  # fmt: skip
        self._launch(COORDINATOR, url_for(COORDINATOR_PORT, False, address), argv)
        for broker_id in self.broker_ids:
            name = broker_name(broker_id)
            address = self.network.address(name)
            argv = broker_argv(
                self.layout, broker_id, BROKER_PORT, self.coordinator_url, self.tls[name],
                options, python=sys.executable, host=address, advertised_host=address,
            )  # fmt: skip
            self._launch(name, url_for(BROKER_PORT, False, address), argv)
        self.wait_healthy(timeout_s)
        return self

    def _launch(self, name: str, url: str, argv: list[str]) -> None:
        log_file = self.layout.log_file(name)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log, signals_held():
            self.processes[name] = subprocess.Popen(
                [*self.network.exec_prefix(name), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                start_new_session=True,
            )
        self.urls[name] = url

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> BenchCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP --------------------------------------------------------------------------

    @property
    def coordinator_url(self) -> str:
        return self.urls[COORDINATOR]

    @property
    def client_config(self) -> dict[str, Any]:
        files = self.tls[CLIENT]
        return {
            "bootstrap": self.coordinator_url,
            "ca_file": files.ca_file,
            "cert_file": files.cert_file,
            "key_file": files.key_file,
        }

    def call(self, method: str, url: str, body: Any = None, timeout_s: float = 10.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url,
            data=data,
            method=method,
            headers={"Accept": "application/json", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s, context=self._ssl) as answer:
            return json.loads(answer.read())

    def _ready(self, name: str) -> bool:
        if self.processes[name].poll() is not None:
            raise ClusterError(f"{name} exited; see {self.layout.log_file(name)}")
        try:
            self.call("GET", f"{self.urls[name]}/readyz", timeout_s=2.0)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        """Every process ready and every broker alive at the coordinator."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.processes)
        while time.monotonic() < deadline:
            pending = {name for name in pending if not self._ready(name)}
            if not pending and self._alive_brokers() >= set(self.broker_ids):
                return
            time.sleep(POLL_S)
        raise ClusterError(f"cluster not healthy within {timeout_s} s (waiting for {pending})")

    def _alive_brokers(self) -> set[int]:
        try:
            answer = self.call("GET", f"{self.coordinator_url}/v1/brokers", timeout_s=3.0)
        except (OSError, urllib.error.URLError, ValueError):
            return set()
        return {int(b["id"]) for b in answer["brokers"] if b["alive"]}

    def create_topic(
        self, name: str, partitions: int, replication_factor: int, timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """Creates the topic and waits until every partition has a leader and a full ISR;
        returns its partitions."""
        body = {"name": name, "partitions": partitions, "replication_factor": replication_factor}
        self.call("POST", f"{self.coordinator_url}/v1/topics", body)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            topic = self.call("GET", f"{self.coordinator_url}/v1/topics/{name}")
            rows: list[dict[str, Any]] = topic["partitions"]
            if all(r.get("leader_id") and len(r["isr"]) == replication_factor for r in rows):
                return rows
            time.sleep(POLL_S)
        raise ClusterError(f"topic {name} not fully led and in sync within {timeout_s} s")

    def delete_topic(self, name: str) -> None:
        self.call("DELETE", f"{self.coordinator_url}/v1/topics/{name}")
