"""Leader-kill measurement: how long a killed leader's partitions refuse writes.

Under load, :func:`measure_leader_kills` repeatedly picks the broker leading the most
partitions of ``topic``, SIGKILLs it at ``t0`` and, at once, sends one probe record to
each partition it led (one probe producer, short back-off, explicit partition). A kill's
sample is the time from ``t0`` until the last of those probes is acknowledged: until
*all* its partitions accept writes again. A probe not acknowledged within
``give_up_s`` ends the measurement (a sample of ``None``: the partitions stayed
offline). The killed broker is then started again and, before the next kill, must be
back in every ISR it had left (with replication) so each kill starts from a healthy
cluster. Probe acknowledgements go to the history like any other, so the checker
proves them durable too.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fault.harness.checker import check, percentile
from tests.fault.harness.cluster import FaultCluster
from tests.fault.harness.history import HistoryWriter, encode_value, read_history
from tests.fault.harness.load import ProducerWorker
from tests.fault.harness.network import create_network
from tests.fault.harness.runner import (
    TopicSpec,
    final_read,
    record_replica_logs,
    replication_available,
)
from tidemq import Admin, Producer
from tidemq.cli.launch import broker_name
from tidemq.errors import TideError

POLL_S = 0.1


@dataclass
class FailoverReport:
    samples_ms: list[float | None] = field(default_factory=list)

    @property
    def measured(self) -> list[float]:
        return [s for s in self.samples_ms if s is not None]

    def summary(self) -> dict[str, Any]:
        measured = self.measured

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "kills": len(self.samples_ms),
            "recovered": len(measured),
            "stayed_offline": len(self.samples_ms) - len(measured),
            "p50_ms": rounded(percentile(measured, 0.5)),
            "p99_ms": rounded(percentile(measured, 0.99)),
            "max_ms": rounded(max(measured) if measured else None),
        }


def _leaders(cluster: FaultCluster, topic: str) -> dict[int, list[int]]:
    led: dict[int, list[int]] = {}
    for partition in cluster.topic(topic)["partitions"]:
        if partition.get("leader_id") is not None:
            led.setdefault(int(partition["leader_id"]), []).append(int(partition["partition"]))
    return led


def _wait_rejoined(cluster: FaultCluster, topic: str, broker_id: int, timeout_s: float) -> bool:
    """The restarted broker is alive and in the ISR of every partition it replicates."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            partitions = cluster.topic(topic)["partitions"]
            if broker_id in cluster.alive_brokers() and all(
                broker_id in p["isr"] and p.get("leader_id") is not None
                for p in partitions
                if broker_id in p["replicas"]
            ):
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(POLL_S)
    return False


def measure_leader_kills(
    cluster: FaultCluster,
    history: HistoryWriter,
    topic: str,
    kills: int,
    give_up_s: float,
    rejoin_timeout_s: float = 60.0,
) -> FailoverReport:
    report = FailoverReport()
    config: dict[str, Any] = dict(cluster.client_config)
    config.update(retry_backoff_ms=20, retry_backoff_max_ms=100, request_timeout_ms=2000,
                  metadata_max_age_ms=1000, linger_ms=0)  # fmt: skip
    with Producer(**config) as probe:
        probe.partitions_for(topic)
        for kill in range(kills):
            led = _leaders(cluster, topic)
            victim = Counter({b: len(p) for b, p in led.items()}).most_common(1)[0][0]
            name = broker_name(victim)
            history.write("fault", kind="leader_kill", target=name, phase="start",
                          partitions=led[victim])  # fmt: skip
            started = time.time()
            cluster.kill(name)
            sample = _probe(probe, history, topic, led[victim], kill, started, give_up_s)
            report.samples_ms.append(sample)
            cluster.launch(name)
            ready = cluster.wait_ready(name, rejoin_timeout_s)
            history.write("fault", kind="leader_kill", target=name, phase="end",
                          recovered_ms=sample, ready=ready)  # fmt: skip
            if sample is None:
                break  # offline partitions: no point killing more
            if not _wait_rejoined(cluster, topic, victim, rejoin_timeout_s):
                raise RuntimeError(f"{name} did not rejoin the ISR after its restart")
        try:
            probe.flush(give_up_s)
        except TideError as error:  # a probe of a partition that stayed offline
            history.write("note", what="probe flush failed", error=repr(error))
    return report


def _probe(
    probe: Producer,
    history: HistoryWriter,
    topic: str,
    partitions: list[int],
    kill: int,
    started: float,
    give_up_s: float,
) -> float | None:
    futures = {
        p: probe.send(topic, encode_value("probe", f"p{p}", kill), key=None, partition=p)
        for p in partitions
    }
    last = started
    for partition, future in futures.items():
        remaining = started + give_up_s - time.time()
        try:
            metadata = future.result(max(0.0, remaining))
        except TideError:
            return None
        last = max(last, time.time())
        history.write("ack", producer="probe", key=f"p{partition}", seq=kill, topic=topic,
                      partition=partition, offset=metadata.offset)  # fmt: skip
    return (last - started) * 1000.0


def run_leader_kills(
    root: Path,
    kills: int,
    session_timeout_ms: int = 3000,
    network_mode: str = "auto",
    topic: TopicSpec = TopicSpec("failover", 6, 3),
) -> dict[str, Any]:
    """A 3-broker cluster, two producers on ``topic``, ``kills`` leader kills, a final
    read, the checker. Returns ``{"leader_kill": summary, "verdict": ..., "network"}``;
    the bound the issue asks for is ``session_timeout_ms + 2000`` on the p99."""
    root.mkdir(parents=True, exist_ok=True)
    network = create_network(FaultCluster.host_names(3), network_mode)
    history = HistoryWriter(root / "history.jsonl")
    cluster = FaultCluster(root / "cluster", network, 3, session_timeout_ms)
    producers: list[ProducerWorker] = []
    try:
        cluster.start()
        config = cluster.client_config
        with Admin(**config) as admin:
            admin.create_topic(topic.name, topic.partitions, topic.replication_factor)
        producers = [
            ProducerWorker(f"p{i}", topic.name, config, history, rate_per_s=100.0) for i in range(2)
        ]
        for producer in producers:
            producer.start()
        give_up_s = session_timeout_ms / 1000 + 2.0 + 3.0  # the bound plus room to measure
        report = measure_leader_kills(cluster, history, topic.name, kills, give_up_s)
        for producer in producers:
            producer.stop(flush_timeout_s=30.0)
        producers = []
        final_read(cluster, history, (topic,), 30.0)
    finally:
        for producer in producers:
            producer.stop(flush_timeout_s=5.0)
        cluster.close()
        network.destroy()
        try:
            record_replica_logs(cluster, history, (topic,))
        finally:
            history.close()
    verdict = check(read_history(root / "history.jsonl"))
    return {
        "leader_kill": report.summary(),
        "bound_ms": session_timeout_ms + 2000,
        "replication": replication_available(),
        "network": network.kind,
        "verdict": verdict,
    }
