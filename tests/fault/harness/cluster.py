"""A tidemq cluster as real processes, one host each, that a nemesis can hurt.

:class:`FaultCluster` starts one coordinator and N brokers with the same argv ``tide
up`` would build (:mod:`tidemq.cli.launch`), each listening on and advertising its
own host's address, and writes ``cluster.json`` (DESIGN.md's contract, so ``tide
down --data-dir`` also stops it). Under :class:`NamespaceNetwork` each process runs
as ``ip netns exec <namespace> python -m tidemq ...``; ``ip netns exec`` execs, so
the PID we hold is the service itself and signals reach it directly. Certificates
are issued for every host address as well as localhost.

Every process the cluster ever started is remembered; :meth:`close` SIGKILLs the
ones still running (SIGCONT first, a stopped process cannot die of SIGTERM) and
reaps them. Nothing sleeps a fixed time: readiness is polled against deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fault.harness.network import Network
from tidemq.cli.launch import (
    CLIENT,
    COORDINATOR,
    Layout,
    ServiceOptions,
    broker_argv,
    broker_name,
    coordinator_argv,
    pick_free_ports,
    url_for,
)
from tidemq.cli.model import BrokerEntry, ClusterInfo, CoordinatorEntry, write_cluster_file
from tidemq.tls import TlsFiles, client_context, ensure_cluster_pki

COORDINATOR_PORT = 9000
BROKER_PORT = 9100
POLL_S = 0.1


class ClusterError(Exception):
    pass


@dataclass
class Service:
    """One process of the cluster: what runs it and whether it runs now."""

    name: str
    host_address: str
    url: str
    argv: list[str]
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    history: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class FaultCluster:
    def __init__(
        self,
        root: Path,
        network: Network,
        brokers: int = 3,
        session_timeout_ms: int = 3000,
        heartbeat_interval_ms: int = 500,
    ) -> None:
        self.root = root.resolve()
        self.network = network
        self.broker_ids = list(range(1, brokers + 1))
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.layout = Layout(self.root)
        self.services: dict[str, Service] = {}
        self._tls: dict[str, TlsFiles] = {}
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()  # nemesis lanes start processes concurrently

    @staticmethod
    def host_names(brokers: int) -> list[str]:
        return [COORDINATOR] + [broker_name(i) for i in range(1, brokers + 1)]

    # -- building ----------------------------------------------------------------------

    def _ports(self) -> dict[str, int]:
        names = self.host_names(len(self.broker_ids))
        if self.network.kind == "netns":  # one port space per namespace
            return {n: COORDINATOR_PORT if n == COORDINATOR else BROKER_PORT for n in names}
        return dict(zip(names, pick_free_ports(len(names)), strict=True))

    def _build(self) -> None:
        names = self.host_names(len(self.broker_ids))
        addresses = sorted({self.network.address(n) for n in names})
        self._tls = ensure_cluster_pki(
            self.layout.tls_dir,
            [*names, CLIENT],
            hosts=["localhost", "127.0.0.1", *addresses],
        )
        self._ssl = client_context(self._tls[CLIENT])
        ports = self._ports()
        options = ServiceOptions(session_timeout_ms=self.session_timeout_ms)
        python = sys.executable
        address = self.network.address(COORDINATOR)
        argv = coordinator_argv(
            self.layout, ports[COORDINATOR], self._tls[COORDINATOR], options,
            len(self.broker_ids), python=python, host=address, advertised_host=address,
        )  # fmt: skip
        argv += ["--heartbeat-interval-ms", str(self.heartbeat_interval_ms)]
        coordinator_url = url_for(ports[COORDINATOR], False, address)
        self._add(COORDINATOR, address, coordinator_url, argv)
        for broker_id in self.broker_ids:
            name = broker_name(broker_id)
            address = self.network.address(name)
            argv = broker_argv(
                self.layout, broker_id, ports[name], coordinator_url, self._tls[name], options,
                python=python, host=address, advertised_host=address,
            )  # fmt: skip
            self._add(name, address, url_for(ports[name], False, address), argv)

    def _add(self, name: str, address: str, url: str, argv: list[str]) -> None:
        full = [*self.network.exec_prefix(name), *argv]
        self.services[name] = Service(name, address, url, full, self.layout.log_file(name))

    def start(self, timeout_s: float = 60.0) -> FaultCluster:
        self._build()
        for name in self.services:
            self.launch(name)
        self.wait_healthy(timeout_s)
        return self

    # -- processes ---------------------------------------------------------------------

    def launch(self, name: str) -> None:
        with self._lock:
            self._launch(name)
            self._write_cluster_file()

    def _launch(self, name: str) -> None:
        service = self.services[name]
        if service.running():
            raise ClusterError(f"{name} is already running (pid {service.pid})")
        service.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(service.log_file, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting {name}\n".encode())
            log.flush()
            service.process = subprocess.Popen(
                service.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                start_new_session=True,
            )
        service.paused = False
        service.history.append(service.process)

    def signal(self, name: str, signum: int) -> None:
        service = self.services[name]
        if not service.running() or service.process is None:
            raise ClusterError(f"{name} is not running")
        service.process.send_signal(signum)
        if signum == signal.SIGSTOP:
            service.paused = True
        elif signum == signal.SIGCONT:
            service.paused = False

    def kill(self, name: str, timeout_s: float = 10.0) -> None:
        """SIGKILL and reap."""
        service = self.services[name]
        if service.process is None:
            return
        if service.process.poll() is None:
            service.process.kill()
        service.process.wait(timeout_s)
        service.paused = False

    def terminate(self, name: str, timeout_s: float = 15.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL when it does not end in time."""
        service = self.services[name]
        if service.process is None or service.process.poll() is not None:
            return
        if service.paused:
            service.process.send_signal(signal.SIGCONT)
        service.process.terminate()
        try:
            service.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait(timeout_s)
        service.paused = False

    def close(self) -> None:
        for service in self.services.values():
            for process in service.history:
                if process.poll() is None:
                    try:
                        process.send_signal(signal.SIGCONT)
                        process.kill()
                    except ProcessLookupError:
                        pass
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    pass

    def _write_cluster_file(self) -> None:
        coordinator = self.services[COORDINATOR]
        info = ClusterInfo(
            coordinator=CoordinatorEntry(
                coordinator.url, coordinator.pid or 0, tuple(coordinator.argv)
            ),
            brokers=tuple(
                BrokerEntry(i, s.url, s.pid or 0, tuple(s.argv))
                for i, s in ((i, self.services[broker_name(i)]) for i in self.broker_ids)
                if s.pid is not None
            ),
            ca_file=self._tls[CLIENT].ca_file,
            client_cert_file=self._tls[CLIENT].cert_file,
            client_key_file=self._tls[CLIENT].key_file,
        )
        write_cluster_file(self.root, info)

    # -- HTTP --------------------------------------------------------------------------

    @property
    def coordinator_url(self) -> str:
        return self.services[COORDINATOR].url

    @property
    def client_config(self) -> dict[str, Any]:
        files = self._tls[CLIENT]
        return {
            "bootstrap": self.coordinator_url,
            "ca_file": files.ca_file,
            "cert_file": files.cert_file,
            "key_file": files.key_file,
        }

    def get_json(self, url: str, timeout_s: float = 5.0) -> Any:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s, context=self._ssl) as answer:
            return json.loads(answer.read())

    def is_ready(self, name: str) -> bool:
        service = self.services[name]
        if not service.running() or service.paused:
            return False
        try:
            self.get_json(f"{service.url}/readyz", timeout_s=2.0)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_ready(self, name: str, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready(name):
                return True
            if not self.services[name].running():
                return False
            time.sleep(POLL_S)
        return False

    def alive_brokers(self) -> set[int]:
        answer = self.get_json(f"{self.coordinator_url}/v1/brokers", timeout_s=3.0)
        return {int(b["id"]) for b in answer["brokers"] if b["alive"]}

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Every process ready and every broker alive at the coordinator."""
        deadline = time.monotonic() + timeout_s
        for name in self.services:
            if not self.wait_ready(name, max(0.1, deadline - time.monotonic())):
                raise ClusterError(f"{name} is not ready; see {self.services[name].log_file}")
        while time.monotonic() < deadline:
            try:
                if self.alive_brokers() >= set(self.broker_ids):
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(POLL_S)
        raise ClusterError("not every broker is alive at the coordinator")

    def topic(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.get_json(f"{self.coordinator_url}/v1/topics/{name}")
        return answer

    def broker_url(self, broker_id: int) -> str:
        return self.services[broker_name(broker_id)].url

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for service in self.services.values():
            try:
                text = service.log_file.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {service.name} ({service.log_file}):\n" + "\n".join(text))
        return "\n".join(out)
