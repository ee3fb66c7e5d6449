"""A stand-in for the producer's metadata cache, shared by the producer tests: one
topic whose partitions are led as the test says, with no coordinator behind it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tidemq.client.metadata import PartitionInfo, TopicInfo


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
