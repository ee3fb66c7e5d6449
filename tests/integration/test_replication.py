"""Replication over real processes and TLS: failover without loss, a returning broker
that catches up, and identity (cluster id, topic id) that keeps data from being
deleted or served by mistake."""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tidemq import Admin, Consumer, Producer
from tidemq.cli import processes
from tidemq.errors import ConnectionFailed

SESSION_TIMEOUT_MS = 2000


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def wait_for(what: str, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = _deadline(timeout_s)
    while True:
        try:
            result = check()
        except ConnectionFailed:  # a process (re)starting
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # the polling interval, not a wait for a condition


def produce(config: dict[str, Any], topic: str, prefix: str, count: int) -> dict[str, str]:
    """Sends ``count`` keyed messages; returns value -> key of every acknowledged one."""
    acknowledged: dict[str, str] = {}
    with Producer(**config) as producer:
        futures = []
        for number in range(count):
            key, value = f"k{number % 50}", f"{prefix}:{number % 50}:{number // 50}"
            futures.append((key, value, producer.send(topic, value, key=key)))
        producer.flush()
        for key, value, future in futures:
            future.result(timeout=60)
            acknowledged[value] = key
    return acknowledged


def consume(config: dict[str, Any], topic: str, group: str, expected: int) -> list[Any]:
    received: list[Any] = []
    deadline = _deadline(60)
    with Consumer(topic, group=group, **config) as consumer:
        while len(received) < expected and time.monotonic() < deadline:
            received.extend(consumer.poll(timeout=0.5, max_records=5000))
        received.extend(consumer.poll(timeout=0.5, max_records=5000))
    return received


def check(acknowledged: dict[str, str], received: list[Any]) -> None:
    values = [m.value.decode() for m in received]
    missing = set(acknowledged) - set(values)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert len(values) == len(set(values)), "a message was delivered twice"
    last: dict[tuple[str, str], int] = {}
    for value in values:
        prefix, key, sequence = value.split(":")
        previous = last.get((prefix, key), -1)
        assert int(sequence) > previous, f"order broken for {prefix}/{key}"
        last[(prefix, key)] = int(sequence)


def leaders(admin: Admin, topic: str) -> dict[int, int | None]:
    return {p["partition"]: p["leader_id"] for p in admin.describe_topic(topic)["partitions"]}


def fully_in_sync(admin: Admin, topic: str) -> bool:
    partitions = admin.describe_topic(topic)["partitions"]
    return all(sorted(p["isr"]) == sorted(p["replicas"]) for p in partitions)


def test_a_killed_leader_loses_no_acknowledged_message_and_comes_back_in_sync(
    cluster_factory: Any,
) -> None:
    cluster = cluster_factory(brokers=3, session_timeout_ms=SESSION_TIMEOUT_MS)
    admin = Admin(**cluster.config)
    admin.create_topic("replicated", partitions=6, replication_factor=2)
    acknowledged = produce(cluster.config, "replicated", "a", 3000)

    victim = leaders(admin, "replicated")[0]
    assert victim is not None
    cluster.kill_broker(victim)
    killed_at = time.monotonic()
    wait_for(
        "new leaders for the dead broker's partitions",
        lambda: (
            victim not in leaders(admin, "replicated").values()
            and None not in leaders(admin, "replicated").values()
        ),
    )
    failover_s = time.monotonic() - killed_at
    assert failover_s < SESSION_TIMEOUT_MS / 1000 + 5, f"failover took {failover_s:.1f} s"
    acknowledged |= produce(cluster.config, "replicated", "b", 3000)
    check(acknowledged, consume(cluster.config, "replicated", "first", len(acknowledged)))

    # The broker returns, truncates what it must, catches up and rejoins every ISR.
    cluster.up()
    wait_for("the restarted broker back in every ISR", lambda: fully_in_sync(admin, "replicated"))
    # ... for real: kill the other replica of what it now holds, and read everything.
    second = next(b for b in leaders(admin, "replicated").values() if b != victim)
    assert second is not None
    cluster.kill_broker(second)
    wait_for(
        "leaders without the second victim",
        lambda: (
            second not in leaders(admin, "replicated").values()
            and None not in leaders(admin, "replicated").values()
        ),
    )
    acknowledged |= produce(cluster.config, "replicated", "c", 1000)
    check(acknowledged, consume(cluster.config, "replicated", "second", len(acknowledged)))


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): path.stat().st_size
        for path in root.rglob("*.log")
        if path.is_file()
    }


def test_a_coordinator_with_an_empty_store_deletes_nothing_and_says_so(
    cluster_factory: Any,
) -> None:
    cluster = cluster_factory(brokers=2, session_timeout_ms=SESSION_TIMEOUT_MS)
    Admin(**cluster.config).create_topic("kept", partitions=4, replication_factor=2)
    produce(cluster.config, "kept", "k", 500)
    brokers = {b["id"]: cluster.data_dir / f"broker-{b['id']}" for b in cluster.info["brokers"]}
    wait_for(
        "both replicas hold every record",
        lambda: all(sum(_file_sizes(d).values()) > 0 for d in brokers.values()),
    )
    before = {broker: _file_sizes(directory) for broker, directory in brokers.items()}

    coordinator = cluster.info["coordinator"]
    processes.kill([(coordinator["pid"], tuple(coordinator["argv"]))])
    shutil.rmtree(cluster.data_dir / "coordinator")
    (cluster.data_dir / "coordinator").mkdir()
    # The coordinator starts again from its argv, with an empty store: a new cluster id.
    # (Not `tide up`: it would wait for brokers that rightly refuse to become ready.)
    argv = tuple(coordinator["argv"])
    log_file = cluster.data_dir / "logs" / "coordinator-again.log"
    cluster._seen[processes.spawn(argv, log_file, cluster.data_dir)] = argv

    admin = Admin(**cluster.config)
    rejected = wait_for(
        "the coordinator to report both brokers' cluster id mismatch",
        lambda: (
            len(admin.describe_cluster().get("rejected_brokers", [])) == 2
            and admin.describe_cluster()["rejected_brokers"]
        ),
    )
    assert {row["broker_id"] for row in rejected} == set(brokers)
    for broker, directory in brokers.items():
        after = _file_sizes(directory)
        for name, size in before[broker].items():
            assert after.get(name, -1) >= size, f"broker {broker} lost bytes of {name}"
        log_text = (cluster.data_dir / "logs" / f"broker-{broker}.log").read_text()
        assert "refusing the coordinator" in log_text


def test_a_topic_recreated_while_a_replica_was_down_never_serves_old_records(
    cluster_factory: Any,
) -> None:
    cluster = cluster_factory(brokers=2, session_timeout_ms=SESSION_TIMEOUT_MS)
    admin = Admin(**cluster.config)
    admin.create_topic("reborn", partitions=1, replication_factor=2)
    produce(cluster.config, "reborn", "old", 200)
    old_id = admin.describe_topic("reborn")["topic_id"]
    follower = next(
        b for b in admin.describe_topic("reborn")["partitions"][0]["replicas"]
        if b != leaders(admin, "reborn")[0]
    )  # fmt: skip
    old_directory = cluster.data_dir / f"broker-{follower}" / f"reborn-0-{old_id}"
    wait_for("the follower's copy", lambda: sum(_file_sizes(old_directory).values()) > 0)
    cluster.kill_broker(follower)
    wait_for(
        "the follower declared dead",
        lambda: (
            not next(b["alive"] for b in admin.describe_cluster()["brokers"] if b["id"] == follower)
        ),
    )
    admin.delete_topic("reborn")
    admin.create_topic("reborn", partitions=1, replication_factor=1)
    new = produce(cluster.config, "reborn", "new", 100)
    cluster.up()  # the follower returns, still holding the old incarnation's log
    wait_for("the old incarnation's directory removed", lambda: not old_directory.exists())
    received = consume(cluster.config, "reborn", "readers", len(new))
    assert {m.value.decode() for m in received} == set(new)
    grouped: dict[str, int] = defaultdict(int)
    for message in received:
        grouped[message.value.decode().split(":")[0]] += 1
    assert set(grouped) == {"new"}


def test_a_broker_lost_for_good_has_its_replicas_recreated_on_live_brokers(
    cluster_factory: Any,
) -> None:
    cluster = cluster_factory(
        brokers=3, session_timeout_ms=SESSION_TIMEOUT_MS, replica_replacement_ms=1000
    )
    admin = Admin(**cluster.config)
    admin.create_topic("replaced", partitions=6, replication_factor=2)
    acknowledged = produce(cluster.config, "replaced", "a", 2000)
    victim = leaders(admin, "replaced")[0]
    assert victim is not None
    cluster.kill_broker(victim)  # and never started again

    def replaced() -> bool:
        partitions = admin.describe_topic("replaced")["partitions"]
        return all(
            victim not in p["replicas"] and len(p["replicas"]) == 2 and len(p["isr"]) == 2
            for p in partitions
        )

    wait_for("every replica of the lost broker re-created and in sync", replaced, 90)
    # The new copies are real: lose the other original replica too and read everything.
    acknowledged |= produce(cluster.config, "replaced", "b", 500)
    survivors = {b["id"] for b in cluster.info["brokers"]} - {victim}
    second = min(survivors)
    cluster.kill_broker(second)
    wait_for(
        "leaders on the last broker",
        lambda: set(leaders(admin, "replaced").values()) == survivors - {second},
    )
    check(acknowledged, consume(cluster.config, "replaced", "readers", len(acknowledged)))


def test_an_acknowledged_rest_write_to_a_recreated_topic_is_never_lost(
    cluster_factory: Any,
) -> None:
    """A write over the REST endpoint without leader_epoch (as clients in other
    languages send it) right after the topic was deleted and created again: the
    broker, not yet told of the deletion, appended it to the deleted incarnation's log
    (offset 50 on a brand-new topic), answered 200, then deleted that log. The
    coordinator now creates the topic again only once no broker holds the old one."""
    cluster = cluster_factory(brokers=1)
    with Admin(**cluster.config) as admin:
        transport, thread = admin._transport, admin._thread
        (url,) = [str(b["url"]) for b in admin.list_brokers()["brokers"]]
        admin.create_topic("reborn", partitions=1, replication_factor=1)
        produce(cluster.config, "reborn", "old", 50)
        admin.delete_topic("reborn")
        admin.create_topic("reborn", partitions=1, replication_factor=1)
        answer = thread.call(
            transport.request_json(
                "POST",
                f"{url}/v1/topics/reborn/partitions/0/records",
                params={"acks": "all"},
                json_body={"records": [{"key": None, "value": "new"}]},
            ),
            30,
        )
    assert answer["base_offset"] == 0, answer  # the new topic's first record
    received: list[Any] = []
    deadline = time.monotonic() + 30
    with Consumer("reborn", group="reader", auto_offset_reset="earliest", **cluster.config) as c:
        while not received and time.monotonic() < deadline:
            received += c.poll(timeout=0.5)
    assert [m.value for m in received] == [b"new"]
