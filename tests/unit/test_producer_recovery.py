"""The real Producer (its sender and recovery on its loop thread) against an in-memory
broker that uses the broker's own idempotence code, with seeded faults: lost answers,
lost requests, reordered requests, retriable and non-retriable errors, and a broker
that forgets every producer. Afterwards the log holds every acknowledged record at
the offset its future gave, no record twice, and the records of each key in send
order (except records whose future failed, which are absent).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.producer_fakes import MemoryReplica, StaticMetadata, led_by

from tidemq.client import producer as producer_module
from tidemq.core.producers import ProducerStateTable
from tidemq.errors import (
    ConnectionFailed,
    NotLeader,
    OutcomeUnknown,
    OutOfOrderSequence,
    RequestTooLarge,
    TideError,
    error_for_code,
)
from tidemq.wire.batch import decode_records
from tidemq.wire.produce import decode_produce

PARTITIONS = 2
TOPIC = "t"


class FaultyBroker:
    def __init__(self, seed: int, faults: dict[str, float]) -> None:
        self.random = random.Random(seed)
        self.faults = faults
        self.replicas = [MemoryReplica(TOPIC, p) for p in range(PARTITIONS)]
        self.requests = 0
        self.refused: set[bytes] = set()  # values of resends refused as too large

    def roll(self, name: str) -> bool:
        return self.random.random() < self.faults.get(name, 0.0)

    async def handle(self, url: str, data: bytes) -> Any:
        self.requests += 1
        await asyncio.sleep(self.random.uniform(0, 0.003))  # requests overtake each other
        if self.roll("lose_request"):
            raise ConnectionFailed("request lost")
        if url.endswith("/v1/produce"):
            results = []
            for entry in decode_produce(data):
                try:
                    answer = await self.append(entry.partition, bytes(entry.batches), False)
                    results.append({"topic": TOPIC, "partition": entry.partition, **answer})
                except TideError as error:
                    results.append(
                        {"topic": TOPIC, "partition": entry.partition, **error.to_json()}
                    )
            answer_body: Any = {"results": results}
        else:
            partition = int(url.split("/partitions/")[1].split("/")[0])
            answer_body = await self.append(partition, data, True)
        if self.roll("lose_answer"):
            raise ConnectionFailed("answer lost")
        return answer_body

    async def append(self, partition: int, body: bytes, resend: bool) -> dict[str, Any]:
        if self.roll("not_leader"):
            raise NotLeader("moving")
        if self.roll("too_large"):
            if resend:  # a resend is the producer's last try: it gives these records up
                self.refused.update(m.value or b"" for m in decode_records(body))
            raise RequestTooLarge("no")
        if self.roll("forget"):
            self.replicas[partition].producers = ProducerStateTable()
        return await self.replicas[partition].produce(body)


class FakeTransport:
    def __init__(self, broker: FaultyBroker) -> None:
        self.broker = broker

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            return await self.broker.handle(url, kwargs["data"])
        except TideError as error:
            if isinstance(error, ConnectionFailed):
                raise
            raise error_for_code(error.code, error.message) from None

    async def coordinator(self, method: str, path: str, **kwargs: Any) -> Any:
        return {"producer_id": 42, "producer_epoch": 0}

    async def close(self) -> None:
        pass


def open_with(broker: FaultyBroker) -> Callable[[producer_module.Producer], Any]:
    async def _open(self: producer_module.Producer) -> None:
        self._transport = FakeTransport(broker)  # type: ignore[assignment]
        self._metadata = StaticMetadata(  # type: ignore[assignment]
            TOPIC, PARTITIONS, led_by("https://broker.invalid")
        )
        self._wake_event = asyncio.Event()

    return _open


def run_producer(seed: int, faults: dict[str, float], count: int) -> None:
    broker = FaultyBroker(seed, faults)
    sent = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(producer_module.Producer, "_open", open_with(broker))
        producer = producer_module.Producer(
            bootstrap="https://coordinator.invalid",
            batch_size=300,
            linger_ms=1,
            retry_backoff_ms=1,
            retry_backoff_max_ms=5,
            delivery_timeout_ms=60_000,
        )
    with producer:
        rng = random.Random(seed)
        for i in range(count):
            key = rng.randrange(6)
            sent.append((key, i, producer.send(TOPIC, f"{key}:{i}", key=str(key))))
        producer.flush(timeout=60)
    check_log(broker, sent, faults)


def check_log(
    broker: FaultyBroker, sent: list[tuple[int, int, Any]], faults: dict[str, float]
) -> None:
    stored: dict[tuple[int, int], bytes] = {}
    for replica in broker.replicas:
        for message in decode_records(b"".join(replica.batches)):
            assert message.value is not None
            stored[(replica.partition, message.offset)] = message.value
    values = list(stored.values())
    forgetful = faults.get("forget", 0) > 0  # then only at-least-once is promised
    assert forgetful or len(values) == len(set(values)), "a record was appended twice"
    acknowledged = set()
    for key, i, future in sent:
        assert future.done()
        if future.exception() is None:
            metadata = future.result()
            assert stored[(metadata.partition, metadata.offset)] == f"{key}:{i}".encode()
            acknowledged.add(f"{key}:{i}".encode())
        elif forgetful:  # Kafka's rule: a broker behind the oldest batch is reported
            assert isinstance(future.exception(), OutOfOrderSequence | OutcomeUnknown), (
                future.exception()
            )
        elif isinstance(future.exception(), OutcomeUnknown):
            # In the log or not (never twice, checked above): a group whose first answer
            # was lost, then refused; or one behind a gap such groups left, which a
            # late copy of theirs could still fill (the client cannot tell).
            pass
        else:  # any other error says "not written": it must be a refusal, and true
            assert f"{key}:{i}".encode() in broker.refused, future.exception()
            assert f"{key}:{i}".encode() not in values, future.exception()
    assert acknowledged <= set(values)
    if forgetful:
        return
    for replica in broker.replicas:
        last: dict[int, int] = {}
        for message in decode_records(b"".join(replica.batches)):
            assert message.value is not None
            key, i = map(int, message.value.decode().split(":"))
            assert i > last.get(key, -1), f"key {key}: {i} after {last.get(key)}"
            last[key] = i


fault_sets = st.fixed_dictionaries(
    {
        "lose_request": st.sampled_from([0.0, 0.1]),
        "lose_answer": st.sampled_from([0.0, 0.1, 0.3]),
        "not_leader": st.sampled_from([0.0, 0.05]),
        "too_large": st.sampled_from([0.0, 0.0, 0.03]),
    }
)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), faults=fault_sets)
def test_any_faults_leave_no_duplicate_and_keep_order(seed: int, faults: dict[str, float]) -> None:
    run_producer(seed, faults, count=600)


def test_lost_answers_with_five_batches_in_flight() -> None:
    run_producer(7, {"lose_answer": 0.3, "lose_request": 0.1}, count=3000)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_broker_that_forgets_producers_loses_nothing_silently(seed: int) -> None:
    """unknown_producer_id for the oldest held batch: a new epoch, renumbered, resent.
    A forgetful broker may append a retried batch twice (then expect a lower sequence
    than the producer's oldest held batch: out_of_order_sequence, which fails that
    batch, as Kafka does); every acknowledged record is where its future says."""
    run_producer(seed, {"forget": 0.05, "lose_answer": 0.1}, count=1000)
