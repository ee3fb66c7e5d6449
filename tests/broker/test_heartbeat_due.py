"""The broker heartbeats early when a request names what it does not know
(``Broker._heartbeat_due``): a new topic, partition or leader epoch that the
coordinator knows and this broker has not heard of yet (client/admin.py's
create_topic relies on it).

What must hold: that is one early heartbeat per thing named, not one every
``EARLY_HEARTBEAT_GAP_S`` for as long as clients keep naming it. A producer still
retrying records of a deleted topic, a consumer or a script asking about a topic
that does not exist, a client with stale metadata sending to a broker that no longer
hosts a partition: each such request set the flag again, so the broker heartbeated
(its whole partition report, and the coordinator's whole answer) up to 100 times a
second instead of once a second, for as long as the requests went on.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tidemq.broker.server import Broker, BrokerConfig
from tidemq.errors import NotLeader, UnknownTopic
from tidemq.transport import HttpTransport
from tidemq.wire import control

TOPIC_ID = "0123456789abcdef0123456789abcdef"


def heartbeat_answer() -> control.HeartbeatAnswer:
    """The coordinator's answer: topic "orders" with 2 partitions, this broker hosts
    neither (another broker does)."""
    body = {
        "cluster_id": "c1",
        "topics": {"orders": {"topic_id": TOPIC_ID, "partitions": 2}},
        "deleted_topic_ids": [],
        "heartbeat_interval_ms": 1000,
        "assignments": [],
    }
    return control.decode(json.dumps(body).encode(), control.HeartbeatAnswer)


@pytest.mark.parametrize(("topic", "error"), [("deleted", UnknownTopic), ("orders", NotLeader)])
def test_a_name_asked_about_again_and_again_causes_no_heartbeat_storm(
    tmp_path: Path, topic: str, error: type[Exception]
) -> None:
    async def scenario() -> None:
        config = BrokerConfig(
            broker_id=1,
            data_dir=tmp_path,
            coordinator_url="http://127.0.0.1:1",
            advertised_url="http://127.0.0.1:1",
            heartbeat_interval_ms=1000,
        )
        broker = Broker(config, lambda: HttpTransport(False, {}, 4, 1000), CollectorRegistry())
        broker.registered = True
        beats: list[float] = []

        async def heartbeat() -> None:  # the coordinator answers at once, always the same
            beats.append(asyncio.get_running_loop().time())
            broker.reconcile(heartbeat_answer())

        broker.heartbeat = heartbeat  # type: ignore[method-assign]
        loop_task = asyncio.create_task(broker.coordinator_loop())
        try:
            while not beats:
                await asyncio.sleep(0.001)
            # Clients keep naming the same thing for 0.6 s (less than one interval).
            deadline = asyncio.get_running_loop().time() + 0.6
            asked = 0
            while asyncio.get_running_loop().time() < deadline:
                with pytest.raises(error):
                    broker.replica_for(topic, 0)
                asked += 1
                await asyncio.sleep(0.002)
            assert asked > 50
            # The first beat, at most one early beat for the name: the coordinator's
            # answer did not change, so asking again cannot help before the next
            # regular heartbeat.
            assert len(beats) <= 2, f"{len(beats)} heartbeats in 0.6 s"
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
            await broker.close()

    asyncio.run(scenario())


def test_a_new_topic_still_makes_the_broker_heartbeat_at_once(tmp_path: Path) -> None:
    """The promise the early heartbeat exists for: a request naming a topic this broker
    has not heard of makes it ask the coordinator within milliseconds."""

    async def scenario() -> None:
        config = BrokerConfig(
            broker_id=1,
            data_dir=tmp_path,
            coordinator_url="http://127.0.0.1:1",
            advertised_url="http://127.0.0.1:1",
            heartbeat_interval_ms=10_000,
        )
        broker = Broker(config, lambda: HttpTransport(False, {}, 4, 1000), CollectorRegistry())
        broker.registered = True
        beats: list[float] = []

        async def heartbeat() -> None:
            beats.append(asyncio.get_running_loop().time())
            broker.reconcile(heartbeat_answer())

        broker.heartbeat = heartbeat  # type: ignore[method-assign]
        loop_task = asyncio.create_task(broker.coordinator_loop())
        try:
            while not beats:
                await asyncio.sleep(0.001)
            for name in ("new-1", "new-2"):
                before = len(beats)
                asked_at = asyncio.get_running_loop().time()
                with pytest.raises(UnknownTopic):
                    broker.replica_for(name, 0)
                while len(beats) == before:
                    assert asyncio.get_running_loop().time() - asked_at < 2.0, name
                    await asyncio.sleep(0.001)
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
            await broker.close()

    asyncio.run(scenario())
