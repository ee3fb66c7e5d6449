"""One fault run from start to verdict: network, cluster, load, nemesis, heal, final read.

:func:`run` is what both the CI suite (tests/fault) and the long-running command
(``python -m tests.fault.run``) call. Everything it started is stopped and the
network it built is deleted in ``finally``, whatever happened. The history file and
every process log stay in ``root`` for a post-mortem.

Replication (issue 5) changes what the nemesis may do: without it a killed broker's
partitions are offline until it returns, so killed processes come back at once and
the run measures availability, not failover. :func:`replication_available` detects it
(``tidemq.core.replica`` exists) and ``TIDE_FAULT_REPLICATION=0|1`` overrides.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import urllib.error
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.fault.harness.checker import check
from tests.fault.harness.cluster import FaultCluster
from tests.fault.harness.history import HistoryWriter, decode_value, read_history
from tests.fault.harness.load import ConsumerWorker, ProducerWorker
from tests.fault.harness.nemesis import Nemesis, NemesisConfig
from tests.fault.harness.network import create_network
from tests.fault.harness.replica_logs import replica_records
from tidemq import Admin
from tidemq.errors import TideError

POLL_S = 0.1


def replication_available() -> bool:
    forced = os.environ.get("TIDE_FAULT_REPLICATION")
    if forced in ("0", "1"):
        return forced == "1"
    return importlib.util.find_spec("tidemq.core.replica") is not None


def strict_duplicates() -> bool:
    """Do the tests fail on duplicates? Yes: brokers recognise a retried batch, also
    across restarts and failovers (idempotent producer state, rebuilt from the log and
    replicated). ``TIDE_FAULT_STRICT_DUPLICATES=0`` only reports them."""
    return os.environ.get("TIDE_FAULT_STRICT_DUPLICATES", "1") == "1"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int


@dataclass(frozen=True)
class RunConfig:
    brokers: int = 3
    network: str = "auto"  # auto | netns | loopback
    topics: tuple[TopicSpec, ...] = (TopicSpec("rf2", 6, 2), TopicSpec("rf3", 6, 3))
    producers_per_topic: int = 2
    rate_per_producer: float = 80.0
    consumers: int = 2
    session_timeout_ms: int = 3000
    nemesis: NemesisConfig = field(default_factory=NemesisConfig)
    replication: bool | None = None  # None: replication_available()
    recover_timeout_s: float = 60.0


def _say(message: str) -> None:
    print(f"[fault {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _wait_for(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(POLL_S)
    return bool(condition())


def _nemesis_config(config: RunConfig, replicated: bool) -> NemesisConfig:
    if not replicated:
        return config.nemesis
    # with replication a killed broker stays down past its session: real failovers
    session_s = config.session_timeout_ms / 1000
    return replace(config.nemesis, down_s=(0.5, session_s + 1.0))


def run(root: Path, config: RunConfig) -> dict[str, Any]:
    """Runs one fault session in ``root``; returns the checker's verdict plus context."""
    root.mkdir(parents=True, exist_ok=True)
    replicated = replication_available() if config.replication is None else config.replication
    network = create_network(FaultCluster.host_names(config.brokers), config.network)
    _say(network.describe())
    history = HistoryWriter(root / "history.jsonl")
    cluster = FaultCluster(
        root / "cluster", network, config.brokers, session_timeout_ms=config.session_timeout_ms
    )
    started = time.monotonic()
    try:
        cluster.start()
        nemesis = Nemesis(cluster, history, _nemesis_config(config, replicated))
        _run_load_under_faults(cluster, history, config, nemesis, replicated)
        final_read(cluster, history, config.topics, config.recover_timeout_s)
    except BaseException:
        _say("run failed; process log tails:\n" + cluster.log_tails())
        raise
    finally:
        cluster.close()
        network.destroy()
        try:
            record_replica_logs(cluster, history, config.topics)
        finally:
            history.close()
    verdict = check(read_history(root / "history.jsonl"))
    verdict["network"] = network.kind
    verdict["replication"] = replicated
    verdict["nemesis_errors"] = nemesis.errors[:5]
    verdict["seconds"] = round(time.monotonic() - started, 1)
    (root / "verdict.json").write_text(json.dumps(verdict) + "\n")
    return verdict


def _full_isr(cluster: FaultCluster, topics: tuple[TopicSpec, ...]) -> bool:
    try:
        return all(
            sorted(partition["isr"]) == sorted(partition["replicas"])
            for topic in topics
            for partition in cluster.topic(topic.name)["partitions"]
        )
    except (OSError, urllib.error.URLError, ValueError, KeyError):
        return False


def _run_load_under_faults(
    cluster: FaultCluster,
    history: HistoryWriter,
    config: RunConfig,
    nemesis: Nemesis,
    replicated: bool,
) -> None:
    client = cluster.client_config
    with Admin(**client) as admin:
        for topic in config.topics:
            admin.create_topic(topic.name, topic.partitions, topic.replication_factor)
    consumers = [
        ConsumerWorker(f"c{i}", [t.name for t in config.topics], "fault-readers", client,
                       history, session_timeout_ms=max(config.session_timeout_ms, 3000))
        for i in range(config.consumers)
    ]  # fmt: skip
    producers = [
        ProducerWorker(f"p{topic.name}x{i}", topic.name, client, history,
                       rate_per_s=config.rate_per_producer)
        for topic in config.topics
        for i in range(config.producers_per_topic)
    ]  # fmt: skip
    workers: list[Any] = [*consumers, *producers]
    for worker in workers:
        worker.start()
    try:
        if not _wait_for(lambda: all(p.acked > 0 for p in producers), 30.0):
            raise RuntimeError("producers got no acknowledgement before any fault")
        # the first fault meets a healthy cluster: with replication, every replica in sync
        if replicated and not _wait_for(lambda: _full_isr(cluster, config.topics), 60.0):
            raise RuntimeError("the ISRs never filled up before the first fault")
        _say(f"load running; nemesis starts: {nemesis.kinds}, {nemesis.config.per_kind} each")
        nemesis.start()
        nemesis.wait(nemesis.config.max_duration_s + 120.0)
        nemesis.stop()
        _say(f"nemesis done: {dict(nemesis.injected)}; healing")
        nemesis.heal_all(config.recover_timeout_s)
        healed = time.time()
        _wait_for_acks_after(history, producers, healed, config.recover_timeout_s)
    finally:
        for producer in producers:
            producer.stop(flush_timeout_s=config.recover_timeout_s)
        acked = sum(p.acked for p in producers)
        _wait_for(lambda: _all_received(producers, consumers), config.recover_timeout_s)
        for consumer in consumers:
            consumer.stop()
    _say(f"load stopped: {sum(p.sent for p in producers)} sent, {acked} acknowledged")


def record_replica_logs(
    cluster: FaultCluster, history: HistoryWriter, topics: tuple[TopicSpec, ...]
) -> None:
    """Every broker's logs as ``replica_record`` events (call once every process stopped)."""
    for fields in replica_records(cluster.root, {topic.name for topic in topics}):
        history.write("replica_record", **fields)


def _all_received(producers: list[ProducerWorker], consumers: list[ConsumerWorker]) -> bool:
    received: set[tuple[str, str, int]] = set()
    for consumer in consumers:
        received |= consumer.received_ids
    return all(
        (p.producer_name, key, seq) in received for p in producers for key, seq in p.acked_ids
    )


def _wait_for_acks_after(
    history: HistoryWriter, producers: list[ProducerWorker], since: float, timeout_s: float
) -> None:
    """After healing, every producer keeps sending until it got fresh acknowledgements,
    so the last windows of unavailability close."""
    counts = [p.acked for p in producers]
    _wait_for(
        lambda: all(p.acked > c + 20 for p, c in zip(producers, counts, strict=True)), timeout_s
    )
    history.write("note", what="acknowledged after healing", since=since)


def final_read(
    cluster: FaultCluster, history: HistoryWriter, topics: tuple[TopicSpec, ...], timeout_s: float
) -> None:
    """Reads every partition from its leader, offset 0 to the high watermark."""
    for topic in topics:
        for partition in range(topic.partitions):
            deadline = time.monotonic() + timeout_s
            complete, high_watermark = False, -1
            records: list[dict[str, Any]] = []
            while not complete and time.monotonic() < deadline:
                try:
                    records, high_watermark = _read_partition(cluster, topic.name, partition)
                    complete = True
                except (OSError, urllib.error.URLError, ValueError, KeyError, TideError) as error:
                    history.write("note", what="final read retry", topic=topic.name,
                                  partition=partition, error=repr(error))  # fmt: skip
                    time.sleep(0.5)
            for record in records:
                decoded = decode_value(record["value"] or "")
                if decoded is not None:
                    history.write(
                        "final", topic=topic.name, partition=partition,
                        offset=record["offset"], producer=decoded[0], key=decoded[1],
                        seq=decoded[2],
                    )  # fmt: skip
            history.write("final_partition", topic=topic.name, partition=partition,
                          complete=complete, high_watermark=high_watermark)  # fmt: skip


def _read_partition(
    cluster: FaultCluster, topic: str, partition: int
) -> tuple[list[dict[str, Any]], int]:
    described = cluster.topic(topic)["partitions"][partition]
    leader_url = described.get("leader_url")
    if not leader_url:
        raise ValueError(f"{topic}/{partition} has no leader")
    # A leader elected moments ago knows the high watermark only once its followers
    # fetched from it (Kafka's rule too): what every replica holds can sit above it for
    # a heartbeat or two. The load has stopped: wait until everything is committed.
    offsets = cluster.get_json(
        f"{leader_url}/v1/topics/{topic}/partitions/{partition}/offsets", timeout_s=10.0
    )
    if int(offsets["high_watermark"]) < int(offsets["log_end_offset"]):
        raise ValueError(f"{topic}/{partition}: high watermark below log end, not settled yet")
    records: list[dict[str, Any]] = []
    offset = 0
    while True:
        answer = cluster.get_json(
            f"{leader_url}/v1/topics/{topic}/partitions/{partition}/records"
            f"?offset={offset}&max_bytes=1048576&wait_ms=0",
            timeout_s=10.0,
        )
        batch = answer["records"]
        records += batch
        high_watermark = int(answer["high_watermark"])
        offset = int(answer["next_offset"])
        if offset >= high_watermark or not batch:
            if offset < high_watermark:
                raise ValueError(f"{topic}/{partition}: no records below {high_watermark}")
            return records, high_watermark
