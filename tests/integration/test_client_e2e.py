"""The client library against a real cluster (processes, TLS, loopback).

Produce 20,000 keyed messages to a 12-partition topic, consume them all with one
Consumer: none lost, none duplicated, order per key kept. Admin calls; simple
push/pull; keyless round robin; two consumers of one group share the partitions.
Skipped when tests/integration/conftest.py does not provide the ``cluster`` fixture.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tidemq import Admin, Consumer, Message, Producer, TopicExists, UnknownTopic
from tidemq.wire.partitioner import partition_for_key

_CONFTEST = Path(__file__).with_name("conftest.py")
if not _CONFTEST.exists() or "def cluster(" not in _CONFTEST.read_text():
    pytest.skip("no `cluster` fixture in tests/integration/conftest.py", allow_module_level=True)

MESSAGES = 20_000
KEYS = 500
PARTITIONS = 12


def _consume(consumer: Consumer, count: int, deadline_s: float = 120.0) -> list[Message]:
    received: list[Message] = []
    deadline = time.monotonic() + deadline_s
    while len(received) < count and time.monotonic() < deadline:
        received.extend(consumer.poll(timeout=0.5, max_records=2000))
    return received


def test_keyed_messages_arrive_once_in_order_per_key(cluster: Any) -> None:
    topic = "client-e2e"
    with Admin(**cluster.config) as admin:
        created = admin.create_topic(topic, partitions=PARTITIONS, replication_factor=1)
        assert len(created["partitions"]) == PARTITIONS
    sequence: dict[int, int] = defaultdict(int)
    with Producer(**cluster.config) as producer:
        futures = []
        for i in range(MESSAGES):
            key_number = i % KEYS
            futures.append(
                producer.send(topic, f"{key_number}:{sequence[key_number]}", key=f"k{key_number}")
            )
            sequence[key_number] += 1
        producer.flush(timeout=60)
        metadata = [future.result(timeout=1) for future in futures]
    assert len({(m.partition, m.offset) for m in metadata}) == MESSAGES
    for i, meta in enumerate(metadata):
        assert meta.topic == topic
        assert meta.partition == partition_for_key(f"k{i % KEYS}".encode(), PARTITIONS)

    with Consumer(topic, group="client-e2e", **cluster.config) as consumer:
        messages = _consume(consumer, MESSAGES)
        consumer.commit()
        extra = consumer.poll(timeout=1.0)
        assert len(consumer.assignment()) == PARTITIONS
    messages += extra
    assert len(messages) == MESSAGES, f"got {len(messages)} of {MESSAGES}"
    assert len({(m.partition, m.offset) for m in messages}) == MESSAGES, "no duplicates"
    last: dict[bytes, int] = {}
    for message in messages:
        assert message.key is not None and message.value is not None
        number, position = message.value.decode().split(":")
        assert message.key == f"k{number}".encode()
        assert int(position) == last.get(message.key, -1) + 1, "order per key"
        last[message.key] = int(position)

    with Admin(**cluster.config) as admin:
        group = admin.describe_group("client-e2e")
        assert sum(entry["committed"] for entry in group["offsets"]) == MESSAGES
        assert "client-e2e" in str(admin.list_groups())
    # A second run of the same group starts from the commits: nothing new.
    with Consumer(topic, group="client-e2e", **cluster.config) as consumer:
        assert consumer.poll(timeout=3.0) == []


def test_admin_calls(cluster: Any) -> None:
    with Admin(**cluster.config) as admin:
        admin.create_topic("admin-topic", partitions=3, replication_factor=1)
        with pytest.raises(TopicExists):
            admin.create_topic("admin-topic", partitions=3, replication_factor=1)
        described = admin.describe_topic("admin-topic")
        assert [p["partition"] for p in described["partitions"]] == [0, 1, 2]
        assert "admin-topic" in [t["name"] for t in admin.list_topics()["topics"]]
        cluster_info = admin.describe_cluster()
        assert cluster_info["brokers"] and "admin-topic" in cluster_info["topics"]
        admin.delete_topic("admin-topic")
        with pytest.raises(UnknownTopic):
            admin.describe_topic("admin-topic")


def test_keyless_auto_created_headers_and_subscribe(cluster: Any) -> None:
    topic = "client-keyless"
    with Producer(**cluster.config, linger_ms=1) as producer:
        futures = [producer.send(topic, b"v%d" % i, headers={"h": "x"}) for i in range(200)]
        producer.flush(timeout=30)
        partitions = {future.result().partition for future in futures}
    assert partitions  # spread round robin, one partition per batch
    seen: list[Message] = []
    consumer = Consumer(topic, group="keyless", **cluster.config)

    def handler(message: Message) -> None:
        seen.append(message)
        if len(seen) == 200:
            threading.Thread(target=consumer.close).start()

    worker = threading.Thread(target=consumer.subscribe, args=(handler,))
    worker.start()
    worker.join(60)
    consumer.close()
    assert not worker.is_alive()
    assert sorted(m.value for m in seen) == sorted(b"v%d" % i for i in range(200))
    assert all(list(m.headers) == [("h", b"x")] for m in seen)


def test_two_members_share_a_group(cluster: Any) -> None:
    topic = "client-shared"
    with Admin(**cluster.config) as admin:
        admin.create_topic(topic, partitions=4, replication_factor=1)
    first = Consumer(topic, group="shared", heartbeat_interval_ms=200, **cluster.config)
    second = Consumer(topic, group="shared", heartbeat_interval_ms=200, **cluster.config)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            first.poll(timeout=0.1)
            second.poll(timeout=0.1)
            a, b = first.assignment(), second.assignment()
            if a and b and not a & b and len(a | b) == 4:
                break
        assert first.assignment() and second.assignment()
        assert not first.assignment() & second.assignment()
    finally:
        first.close()
        second.close()


def test_simple_push_pull(cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    from tidemq import simple

    try:
        simple.push("k", "hello")
        assert simple.pull(timeout=10.0) == (b"k", b"hello")
        assert simple.pull(timeout=0.5) is None
    finally:
        simple.close()
