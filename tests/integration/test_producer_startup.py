"""No start-up stall: once ``Admin.create_topic`` returns, every partition takes writes
(replication factor 2, acks=all), so the first sends are acknowledged at once instead
of after the brokers' next heartbeat (up to heartbeat_interval_ms, 1 s by default)."""

from __future__ import annotations

import time
from typing import Any

from tidemq import Admin, Producer

PARTITIONS = 12
BOUND_S = 0.2  # measured ~10-30 ms here; before: 0.5-1.2 s


def test_sends_right_after_create_topic_are_acknowledged_at_once(cluster_factory: Any) -> None:
    cluster = cluster_factory(brokers=2)
    admin = Admin(**cluster.config)
    with Producer(**cluster.config) as producer:
        admin.create_topic("warm-up", partitions=1, replication_factor=2)
        producer.send("warm-up", b"x").result(timeout=30)  # producer id, connections
        for attempt in range(3):
            topic = f"fresh-{attempt}"
            admin.create_topic(topic, partitions=PARTITIONS, replication_factor=2)
            started = time.monotonic()
            futures = [
                producer.send(topic, b"first", partition=partition)
                for partition in range(PARTITIONS)
            ]
            offsets = [future.result(timeout=30).offset for future in futures]
            elapsed = time.monotonic() - started
            assert offsets == [0] * PARTITIONS
            assert elapsed < BOUND_S, f"{topic}: first sends took {elapsed * 1000:.0f} ms"
    admin.close()
