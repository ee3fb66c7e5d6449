"""Jepsen-style fuzz of the idempotent producer (written by the fourth review of the
in-turn sends, helper-71; it found an unknown_producer_id reset that wrote a record
twice): the real Producer against the broker's own append_in_sequence, two topics,
metadata lookups that fail, wait or name no leader, requests that time out on the
client and land later, lost answers, refusals; optional forced close. Checks: no
record twice; an acknowledged record is in the log, and one failed with anything but
OutcomeUnknown is not.
FUZZ_SEEDS=n runs more seeds (2 by default)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from typing import Any

import pytest
from tests.unit.producer_fakes import MemoryReplica

from tidemq.client import producer as producer_module
from tidemq.client.metadata import PartitionInfo, TopicInfo
from tidemq.errors import (
    BrokerBusy,
    ConnectionFailed,
    NotLeader,
    OutcomeUnknown,
    RequestTimedOut,
    TideError,
    error_for_code,
)
from tidemq.wire.batch import decode_records
from tidemq.wire.produce import decode_produce

TOPICS = ("t", "u")
PARTITIONS = 2
URL = "https://broker.invalid"


class Broker:
    def __init__(self, rng: random.Random, faults: dict[str, float]) -> None:
        self.random = rng
        self.faults = faults
        self.replicas = {(t, p): MemoryReplica(t, p) for t in TOPICS for p in range(PARTITIONS)}
        self.pid = 42

    def roll(self, name: str) -> bool:
        return self.random.random() < self.faults.get(name, 0.0)

    async def handle(self, url: str, data: bytes) -> Any:
        await asyncio.sleep(self.random.uniform(0, self.faults.get("latency", 0.003)))
        if self.roll("lose_request"):
            raise ConnectionFailed("request lost")
        if url.endswith("/v1/produce"):
            results = []
            for entry in decode_produce(data):
                try:
                    answer = await self.append(entry.topic, entry.partition, bytes(entry.batches))
                    results.append({"topic": entry.topic, "partition": entry.partition, **answer})
                except TideError as error:
                    results.append(
                        {"topic": entry.topic, "partition": entry.partition, **error.to_json()}
                    )
            body: Any = {"results": results}
        else:
            path = url.split("/v1/topics/")[1]
            topic, rest = path.split("/partitions/")
            body = await self.append(topic, int(rest.split("/")[0]), data)
        if self.roll("lose_answer"):
            raise ConnectionFailed("answer lost")
        return body

    async def append(self, topic: str, partition: int, body: bytes) -> dict[str, Any]:
        if self.roll("not_leader"):
            raise NotLeader("moving")
        if self.roll("busy"):
            raise BrokerBusy("busy")
        return await self.replicas[(topic, partition)].produce(body)


class Transport:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.late: set[asyncio.Task[Any]] = set()

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        broker = self.broker
        if broker.roll("late"):  # the client times out; the request lands later
            task = asyncio.get_running_loop().create_task(self._late(url, kwargs["data"]))
            self.late.add(task)
            task.add_done_callback(self.late.discard)
            await asyncio.sleep(broker.random.uniform(0, 0.005))
            raise RequestTimedOut("timed out (the request goes on)")
        try:
            return await broker.handle(url, kwargs["data"])
        except TideError as error:
            if isinstance(error, ConnectionFailed):
                raise
            raise error_for_code(error.code, error.message) from None

    async def _late(self, url: str, data: bytes) -> None:
        await asyncio.sleep(self.broker.random.uniform(0.005, 0.08))
        with contextlib.suppress(Exception):
            await self.broker.handle(url, data)

    async def coordinator(self, method: str, path: str, **kwargs: Any) -> Any:
        self.broker.pid += 1
        return {"producer_id": self.broker.pid, "producer_epoch": 0}

    async def close(self) -> None:
        pass


class Metadata:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.partition_counts = dict.fromkeys(TOPICS, PARTITIONS)

    def cached(self, name: str) -> TopicInfo:
        return TopicInfo(name, tuple(PartitionInfo(p, URL, 0) for p in range(PARTITIONS)), 0.0)

    async def topic(self, name: str) -> TopicInfo:
        return self.cached(name)

    async def leader(self, topic: str, partition: int) -> PartitionInfo:
        broker = self.broker
        if broker.roll("slow_lookup"):
            await asyncio.sleep(broker.random.uniform(0, 0.02))
        if broker.roll("lookup_fails"):
            raise ConnectionFailed("metadata lookup failed")
        if broker.roll("leaderless"):
            return PartitionInfo(partition, None, 0)
        return PartitionInfo(partition, URL, 0)

    def invalidate(self, topic: str) -> None:
        pass


def run(
    seed: int, faults: dict[str, float], count: int, close_after: float | None, **options: Any
) -> None:
    rng = random.Random(seed)
    broker = Broker(rng, faults)

    async def _open(self: producer_module.Producer) -> None:
        self._transport = Transport(broker)  # type: ignore[assignment]
        self._metadata = Metadata(broker)  # type: ignore[assignment]
        self._wake_event = asyncio.Event()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(producer_module.Producer, "_open", _open)
        producer = producer_module.Producer(
            bootstrap="https://coordinator.invalid",
            batch_size=120,
            linger_ms=1,
            retry_backoff_ms=1,
            retry_backoff_max_ms=3,
            delivery_timeout_ms=60_000,
            **options,
        )
    sent = []
    srng = random.Random(seed + 1)
    for i in range(count):
        topic = srng.choice(TOPICS)
        partition = srng.randrange(PARTITIONS)
        value = f"{topic}{partition}:{i}"
        sent.append((value, producer.send(topic, value, partition=partition)))
        if i % 7 == 0:
            time.sleep(0.002)
    if close_after is None:
        producer.flush(timeout=60)
        producer.close()
    else:
        time.sleep(close_after)
        producer.close(timeout=0)
    stored: list[bytes] = []
    for replica in broker.replicas.values():
        for message in decode_records(b"".join(replica.batches)):
            stored.append(message.value)
    dupes = {v for v in stored if stored.count(v) > 1}
    assert not dupes, f"seed {seed}: written twice: {sorted(dupes)[:5]}"
    store = set(stored)
    for value, future in sent:
        assert future.done()
        error = future.exception()
        if error is None:  # acknowledged: in the log
            assert value.encode() in store, f"seed {seed}: {value} acknowledged, not written"
        elif not isinstance(error, OutcomeUnknown):
            assert value.encode() not in store, f"{value} reported {error!r} but written"


FAULTS = [
    {"late": 0.15, "leaderless": 0.1, "lookup_fails": 0.1, "slow_lookup": 0.3},
    {"late": 0.2, "lose_answer": 0.1, "busy": 0.1, "leaderless": 0.1, "slow_lookup": 0.3},
    {"late": 0.1, "not_leader": 0.1, "lookup_fails": 0.2, "busy": 0.05, "slow_lookup": 0.5},
    {"late": 0.3, "lose_request": 0.1, "leaderless": 0.2},
    {"late": 0.2, "leaderless": 0.2, "slow_lookup": 0.5, "latency": 0.02, "busy": 0.05},
    {"late": 0.3, "lookup_fails": 0.2, "slow_lookup": 0.5, "latency": 0.03, "lose_answer": 0.1},
]


@pytest.mark.parametrize("seed", range(int(os.environ.get("FUZZ_SEEDS", "2"))))
@pytest.mark.parametrize("faults", range(len(FAULTS)))
@pytest.mark.parametrize("retries", [0, 1, 3])
def test_fuzz(seed: int, faults: int, retries: int) -> None:
    run(seed, FAULTS[faults], 300, None, retries=retries)


@pytest.mark.parametrize("seed", range(int(os.environ.get("FUZZ_SEEDS", "2"))))
@pytest.mark.parametrize("faults", range(len(FAULTS)))
def test_fuzz_close(seed: int, faults: int) -> None:
    run(seed, FAULTS[faults], 300, 0.05, retries=2)
