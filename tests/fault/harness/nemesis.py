"""The nemesis: injects faults into a :class:`FaultCluster` and logs each one.

Fault kinds (each a start event when it begins and an end event when it is healed):

=====================  ========================================================
broker_kill            SIGKILL a broker; restart it from its argv after a pause
broker_pause           SIGSTOP a broker; SIGCONT it after a while
broker_restart         SIGTERM a broker (clean shutdown); start it again
coordinator_restart    SIGKILL the coordinator; start it again on its store
link_down              ``ip link set eth0 down`` in a broker's namespace; then up
isolate                iptables DROP all of a broker's traffic; then flush
packet_loss            iptables ``-m statistic --mode random`` DROP both ways
=====================  ========================================================

The last three need :class:`NamespaceNetwork`; on loopback they are not offered.

Scheduling: ``lanes`` threads run side by side; each picks the kind injected least so
far (ties broken by the seeded RNG) and a target no other lane holds, so at most
``lanes`` hosts are hurt at a time and every kind reaches ``per_kind`` quickly.
Whatever a fault did is undone before its lane moves on: a killed process is always
started again (``replication=False`` restarts at once; with replication the downtime
can outlast the session timeout so that failover really happens). :meth:`heal_all`
is the final safety net before the final read.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tests.fault.harness.cluster import FaultCluster
from tests.fault.harness.history import HistoryWriter
from tests.fault.harness.network import NamespaceNetwork
from tidemq.cli.launch import COORDINATOR, broker_name

PROCESS_KINDS = ("broker_kill", "broker_pause", "broker_restart", "coordinator_restart")
NETWORK_KINDS = ("link_down", "isolate", "packet_loss")
ALL_KINDS = PROCESS_KINDS + NETWORK_KINDS


@dataclass(frozen=True)
class NemesisConfig:
    kinds: tuple[str, ...] = ALL_KINDS
    per_kind: int = 20  # stop once every kind was injected this often ...
    max_duration_s: float = 180.0  # ... or when this much time has passed
    lanes: int = 2
    seed: int = 0
    fault_s: tuple[float, float] = (0.5, 2.0)  # how long a pause / cut / loss lasts
    down_s: tuple[float, float] = (0.1, 1.0)  # how long a killed process stays dead
    quiet_s: tuple[float, float] = (0.2, 0.8)  # a lane's rest between two faults
    loss_probability: float = 0.3
    ready_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        if self.lanes < 1 or self.per_kind < 1 or self.max_duration_s <= 0:
            raise ValueError("lanes and per_kind must be >= 1, max_duration_s > 0")


class Nemesis:
    def __init__(
        self, cluster: FaultCluster, history: HistoryWriter, config: NemesisConfig
    ) -> None:
        self.cluster = cluster
        self.history = history
        self.config = config
        kinds = config.kinds
        if not cluster.network.supports_network_faults:
            kinds = tuple(k for k in kinds if k not in NETWORK_KINDS)
        self.kinds = kinds
        self.injected: Counter[str] = Counter()
        self.errors: list[str] = []
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._deadline = 0.0

    # -- scheduling --------------------------------------------------------------------

    def start(self) -> None:
        self._deadline = time.monotonic() + self.config.max_duration_s
        for lane in range(self.config.lanes):
            thread = threading.Thread(target=self._lane, name=f"nemesis-{lane}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def done(self) -> bool:
        return all(self.injected[k] >= self.config.per_kind for k in self.kinds)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits for every lane to finish; True when they did within the timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        self._stop.set()
        self.wait(120.0)

    def _lane(self) -> None:
        while not self._stop.is_set() and not self.done() and time.monotonic() < self._deadline:
            choice = self._pick()
            if choice is None:
                self._stop.wait(0.05)
                continue
            kind, target = choice
            try:
                self._inject(kind, target)
            except Exception as error:
                self.errors.append(f"{kind} on {target}: {error!r}")
                self.history.write("note", what="nemesis error", kind=kind, target=target,
                                   error=repr(error))  # fmt: skip
            finally:
                with self._lock:
                    self._busy.discard(target)
            self._stop.wait(self._random.uniform(*self.config.quiet_s))

    def _pick(self) -> tuple[str, str] | None:
        with self._lock:
            order = sorted(self.kinds, key=lambda k: (self.injected[k], self._random.random()))
            for kind in order:
                targets = self._targets(kind)
                self._random.shuffle(targets)
                for target in targets:
                    if target not in self._busy:
                        self._busy.add(target)
                        self.injected[kind] += 1
                        return kind, target
        return None

    def _targets(self, kind: str) -> list[str]:
        if kind == "coordinator_restart":
            return [COORDINATOR]
        return [broker_name(i) for i in self.cluster.broker_ids]

    # -- faults ------------------------------------------------------------------------

    def _inject(self, kind: str, target: str) -> None:
        actions: dict[str, Callable[[str], dict[str, object]]] = {
            "broker_kill": self._kill,
            "coordinator_restart": self._kill,
            "broker_pause": self._pause,
            "broker_restart": self._restart,
            "link_down": self._link_down,
            "isolate": self._isolate,
            "packet_loss": self._packet_loss,
        }
        self.history.write("fault", kind=kind, target=target, phase="start")
        details = actions[kind](target)
        self.history.write("fault", kind=kind, target=target, phase="end", **details)

    def _duration(self) -> float:
        return self._random.uniform(*self.config.fault_s)

    def _bring_back(self, target: str) -> dict[str, object]:
        self.cluster.launch(target)
        ready = self.cluster.wait_ready(target, self.config.ready_timeout_s)
        if not ready:
            raise RuntimeError(f"{target} did not become ready after a restart")
        return {"ready": ready}

    def _kill(self, target: str) -> dict[str, object]:
        self.cluster.kill(target)
        self._stop.wait(self._random.uniform(*self.config.down_s))
        return self._bring_back(target)

    def _restart(self, target: str) -> dict[str, object]:
        self.cluster.terminate(target)
        return self._bring_back(target)

    def _pause(self, target: str) -> dict[str, object]:
        duration = self._duration()
        self.cluster.signal(target, signal.SIGSTOP)
        try:
            self._stop.wait(duration)
        finally:
            self.cluster.signal(target, signal.SIGCONT)
        return {"seconds": round(duration, 3)}

    def _namespaces(self) -> NamespaceNetwork:
        network = self.cluster.network
        if not isinstance(network, NamespaceNetwork):
            raise RuntimeError("network faults need network namespaces")
        return network

    def _network(self, target: str, hurt: Callable[[NamespaceNetwork], None]) -> dict[str, object]:
        network = self._namespaces()
        duration = self._duration()
        try:
            hurt(network)
            self._stop.wait(duration)
        finally:
            network.heal(target)
        return {"seconds": round(duration, 3)}

    def _link_down(self, target: str) -> dict[str, object]:
        return self._network(target, lambda network: network.link_down(target))

    def _isolate(self, target: str) -> dict[str, object]:
        return self._network(target, lambda network: network.isolate(target))

    def _packet_loss(self, target: str) -> dict[str, object]:
        probability = self.config.loss_probability
        return self._network(target, lambda network: network.lossy(target, probability))

    def heal_all(self, timeout_s: float = 60.0) -> None:
        """Everything back: paused processes continued, dead ones started, links healed."""
        cluster = self.cluster
        for name, service in cluster.services.items():
            if service.running() and service.paused:
                cluster.signal(name, signal.SIGCONT)
            if not service.running():
                cluster.launch(name)
            if isinstance(cluster.network, NamespaceNetwork) and name != COORDINATOR:
                cluster.network.heal(name)
        cluster.wait_healthy(timeout_s)
        self.history.write("note", what="healed")
