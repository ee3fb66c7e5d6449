"""Stand-ins shared by the producer tests: a metadata cache for one topic whose
partitions are led as the test says, and brokers that answer at once, with no
coordinator or network behind them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from tidemq.broker.idempotence import append_in_sequence
from tidemq.client import producer as producer_module
from tidemq.client.metadata import PartitionInfo, TopicInfo
from tidemq.core.producers import ProducerStateTable
from tidemq.core.replica import Acks
from tidemq.wire.batch import check_batches, iter_headers, patch_batch
from tidemq.wire.produce import decode_produce


class StaticMetadata:
    """The producer's view of one topic of ``partitions``: partition p is led as
    ``leader_of(p)`` says, asked on every lookup (so a test may move a leader)."""

    def __init__(
        self, topic: str, partitions: int, leader_of: Callable[[int], PartitionInfo]
    ) -> None:
        self.partition_counts = {topic: partitions}
        self._partitions = partitions
        self._leader_of = leader_of

    def cached(self, name: str) -> TopicInfo:
        return TopicInfo(name, tuple(map(self._leader_of, range(self._partitions))), 0.0)

    async def topic(self, name: str) -> TopicInfo:
        return self.cached(name)

    async def leader(self, topic: str, partition: int) -> PartitionInfo:
        return self._leader_of(partition)

    def invalidate(self, topic: str) -> None:
        pass


class AlwaysLeader:
    """A leader whose checks always pass (append_in_sequence asks it)."""

    def check_produce(self, acks: Acks) -> None:
        pass


class MemoryReplica:
    """What append_in_sequence needs of a PartitionReplica, over a list of bytes."""

    def __init__(self, topic: str, partition: int) -> None:
        self.core = AlwaysLeader()
        self.topic, self.partition = topic, partition
        self.producers = ProducerStateTable()
        self.leader_epoch = 0
        self.closed = False
        self.batches: list[bytes] = []
        self.end = 0

    def append(self, body: bytes, acks: Acks, now_ms: int) -> tuple[int, int]:
        first = self.end
        position = 0
        for header in check_batches(body):
            batch = bytearray(body[position : position + header.size])
            patch_batch(batch, 0, self.end, 0)
            self.batches.append(bytes(batch))
            self.end += header.record_count
            position += header.size
        return first, self.end - 1

    async def produce(self, body: bytes) -> dict[str, Any]:
        """The broker's answer to a produce of ``body`` (acks=all), through its own
        append_in_sequence."""
        outcome = await append_in_sequence(
            self,  # type: ignore[arg-type]
            body,
            check_batches(body),
            Acks.ALL,
            lambda: 0,
            wait_s=0.02,
        )
        return {
            "base_offset": outcome.base_offset,
            "last_offset": outcome.last_offset,
            "batch_base_offsets": outcome.batch_base_offsets,
        }


def led_by(url: str) -> Callable[[int], PartitionInfo]:
    """Every partition led by ``url``, in epoch 0."""
    return lambda partition: PartitionInfo(partition, url, 0)


def metadata_class(
    topic: str, partitions: int, leader_of: Callable[[int], PartitionInfo]
) -> Callable[..., StaticMetadata]:
    """What to put in place of ``MetadataCache`` (built as ``(transport, max_age_ms)``)."""

    def build(*_: Any) -> StaticMetadata:
        return StaticMetadata(topic, partitions, leader_of)

    return build


class InstantBroker:
    """The producer's transport: every leader answers a produce after ``delay_s`` (one
    loop turn when 0) with consecutive offsets per partition. ``sent`` lists (leader,
    topic, partition, base sequence) of each batch in the order the requests were made,
    and
    ``requests`` counts them."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.ends: dict[int, int] = {}
        self.sent: list[tuple[str, str, int, int]] = []
        self.requests = 0

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        self.requests += 1
        leader = url.rsplit("/v1/", 1)[0]
        entries = list(decode_produce(kwargs["data"]))
        for entry in entries:
            for header in iter_headers(entry.batches):
                self.sent.append((leader, entry.topic, entry.partition, header.base_sequence))
        await asyncio.sleep(self.delay_s)
        results = []
        for entry in entries:
            base = end = self.ends.get(entry.partition, 0)
            offsets = []
            for header in iter_headers(entry.batches):
                offsets.append(end)
                end += header.record_count
            self.ends[entry.partition] = end
            results.append({"base_offset": base, "batch_base_offsets": offsets})
        return {"results": results}

    async def coordinator(self, method: str, path: str, **kwargs: Any) -> Any:
        return {"producer_id": 42, "producer_epoch": 0}

    async def close(self) -> None:
        pass


class HangingBroker(InstantBroker):
    """A leader that takes every produce request and never answers."""

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        self.requests += 1
        await asyncio.Event().wait()


def fake_producer(
    transport: Any, metadata: StaticMetadata, **options: Any
) -> producer_module.Producer:
    """A real Producer whose transport and metadata cache are the given stand-ins."""

    async def _open(self: producer_module.Producer) -> None:
        self._transport = transport
        self._metadata = metadata  # type: ignore[assignment]
        self._wake_event = asyncio.Event()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(producer_module.Producer, "_open", _open)
        return producer_module.Producer(bootstrap="https://coordinator.invalid", **options)


def wait_until(
    condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition not met"
) -> None:
    """Polls ``condition`` (every 5 ms) until it holds; fails the test after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.005)
