"""Idempotent produce end to end: produce answers are dropped and retried.

A one-broker TLS cluster; the broker is restarted with ``--advertised-url`` pointing
at a fault-injecting proxy (fault_proxy.py) that forwards every request but drops a
fifth of the produce answers after the broker appended the batches. The producer
keeps up to 5 batches of a partition in flight. Reading the partitions back: every
message once, in order per key, each acknowledged one at the offset it was told.
The same run without idempotence writes duplicates (so the injection really bites).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from fault_proxy import DroppingProxy

from tidemq import Admin, Consumer, Message, Producer
from tidemq.tls import TlsFiles, client_context, server_context

PARTITIONS = 3
KEYS = 60


@pytest.fixture
def proxied_cluster(cluster_factory: Any) -> Iterator[tuple[Any, DroppingProxy]]:
    cluster = cluster_factory(brokers=1)
    broker = cluster.broker_entry(1)
    argv = list(broker["argv"])

    def option(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    ca_file = option("--ca-file")
    server_tls = server_context(
        TlsFiles(ca_file, option("--cert-file"), option("--key-file")), require_client_cert=False
    )
    upstream_tls = client_context(
        TlsFiles(ca_file, cluster.info["client_cert_file"], cluster.info["client_key_file"])
    )
    proxy = DroppingProxy(broker["url"], server_tls, upstream_tls, drop_fraction=0.2, seed=6)
    proxy.start()
    try:
        # Restart the broker so that the coordinator hands the proxy's URL to clients.
        cluster.kill_broker(1)
        argv[argv.index("--advertised-url") + 1] = proxy.url
        path = cluster.data_dir / "cluster.json"
        info = json.loads(path.read_text())
        info["brokers"][0]["argv"] = argv
        path.write_text(json.dumps(info))
        cluster.up()
        with Admin(**cluster.config) as admin:
            deadline = time.monotonic() + 30
            while admin.describe_cluster()["brokers"][0]["url"] != proxy.url:
                assert time.monotonic() < deadline, "the broker never advertised the proxy"
                time.sleep(0.1)  # polling interval
        yield cluster, proxy
    finally:
        proxy.stop()


def produce(
    cluster: Any, topic: str, count: int, flush_every: int = 0, **options: Any
) -> list[tuple[str, Any]]:
    """Sends ``count`` keyed messages; returns (value, future) in send order."""
    with Admin(**cluster.config) as admin:
        admin.create_topic(topic, partitions=PARTITIONS, replication_factor=1)
    sent = []
    per_key: dict[int, int] = defaultdict(int)
    with Producer(
        **cluster.config,
        batch_size=2048,
        linger_ms=2,
        retry_backoff_ms=10,
        retry_backoff_max_ms=100,
        request_timeout_ms=10_000,
        **options,
    ) as producer:
        for i in range(count):
            key = i % KEYS
            value = f"{key}:{per_key[key]}"
            per_key[key] += 1
            sent.append((value, producer.send(topic, value, key=f"k{key}")))
            if flush_every and i % flush_every == flush_every - 1:
                producer.flush(timeout=60)
            elif i % 100 == 99:
                time.sleep(0.003)  # more, smaller requests: several overlap per partition
        producer.flush(timeout=120)
    return sent


def read_all(cluster: Any, topic: str, at_least: int) -> list[Message]:
    received: list[Message] = []
    with Consumer(topic, group=f"{topic}-reader", **cluster.config) as consumer:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            chunk = consumer.poll(timeout=1.0, max_records=5000)
            received.extend(chunk)
            if not chunk and len(received) >= at_least:
                break
    return received


def test_dropped_produce_answers_leave_no_duplicate_and_keep_order(
    proxied_cluster: tuple[Any, DroppingProxy],
) -> None:
    cluster, proxy = proxied_cluster
    count = 15_000
    sent = produce(cluster, "idempotent", count, max_in_flight=5)
    print(
        f"produce requests {proxy.produce_requests}, answers dropped {proxy.dropped}, "
        f"most batches of a partition in flight {proxy.max_in_flight_batches}"
    )
    assert proxy.dropped >= 5, f"only {proxy.dropped} answers dropped"
    assert 2 <= proxy.max_in_flight_batches <= 5, proxy.max_in_flight_batches

    acknowledged = {}
    for value, future in sent:
        metadata = future.result(timeout=0)  # every message acknowledged
        acknowledged[(metadata.partition, metadata.offset)] = value
    messages = read_all(cluster, "idempotent", count)
    values = [m.value.decode() for m in messages if m.value is not None]
    assert len(values) == len(set(values)), "a retried batch was written twice"
    assert sorted(values) == sorted(value for value, _ in sent), "a message is missing"
    for message in messages:
        assert acknowledged[(message.partition, message.offset)] == message.value.decode()
    last: dict[str, int] = {}
    for message in sorted(messages, key=lambda m: (m.partition, m.offset)):
        key, position = message.value.decode().split(":")
        assert int(position) == last.get(key, -1) + 1, f"order of key {key}"
        last[key] = int(position)


def test_without_idempotence_the_same_faults_write_duplicates(
    proxied_cluster: tuple[Any, DroppingProxy],
) -> None:
    cluster, proxy = proxied_cluster
    proxy.drop_fraction = 0.3
    sent = produce(cluster, "plain", 5_000, flush_every=100, enable_idempotence=False)
    assert proxy.dropped >= 3, f"{proxy.dropped} of {proxy.produce_requests} answers dropped"
    messages = read_all(cluster, "plain", len(sent))
    values = [m.value for m in messages]
    assert len(values) > len(set(values)), "dropped answers should have caused duplicates"


def test_a_producer_forgotten_by_a_restarted_broker_starts_a_new_epoch(
    cluster_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker rebuilds producer state from its last two segments only: after other
    producers rolled several segments and the broker restarted, it no longer knows the
    first producer, answers unknown_producer_id, and the producer renumbers from 0 in a
    new epoch. Nothing is lost, duplicated or reordered."""
    caplog.set_level(logging.INFO, logger="tidemq.client")
    cluster = cluster_factory(brokers=1, segment_bytes=4096)
    topic = "forgotten"
    with Admin(**cluster.config) as admin:
        admin.create_topic(topic, partitions=1, replication_factor=1)
    with Producer(**cluster.config, retry_backoff_ms=10, retry_backoff_max_ms=200) as first:
        for i in range(50):
            first.send(topic, f"first:{i}", key="a")
        first.flush(timeout=60)
        with Producer(**cluster.config, linger_ms=0) as other:
            for i in range(400):
                other.send(topic, f"other:{i}" + "x" * 100, key="b").result(timeout=30)
        cluster.kill_broker(1)
        cluster.up()
        futures = [first.send(topic, f"first:{i}", key="a") for i in range(50, 100)]
        first.flush(timeout=60)
        for future in futures:
            future.result(timeout=0)
    messages = read_all(cluster, topic, 500)
    firsts = [m.value.decode() for m in messages if m.value and m.value.startswith(b"first")]
    assert firsts == [f"first:{i}" for i in range(100)]
    assert len(messages) == 500
    assert "unknown_producer_id" in caplog.text or "unknown to this partition" in caplog.text
    assert "starting a new producer epoch" in caplog.text
