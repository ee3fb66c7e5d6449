"""The client's cache of topic metadata: partition counts, leaders and leader epochs.

Filled from ``GET /v1/metadata?topics=...&auto_create=true`` (topics are created with
the cluster's defaults on first use), refreshed when an entry is older than
``metadata_max_age_ms`` and on demand after a routing error (``invalidate``).
Concurrent refreshes of the same topic share one request. Lives in the loop thread;
``partition_counts`` is a plain dict that user threads may read (a dict read is
atomic under the GIL), which keeps ``Producer.send`` free of any cross-thread call
once a topic is known.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from tidemq.client.transport import Transport
from tidemq.errors import InternalError, Unavailable, UnknownPartition


class PartitionInfo(NamedTuple):
    partition: int
    leader_url: str | None
    leader_epoch: int


class TopicInfo(NamedTuple):
    name: str
    partitions: tuple[PartitionInfo, ...]
    fetched_at: float  # monotonic seconds


def parse_topic(raw: Any, now: float) -> TopicInfo:
    """A ``Topic`` JSON object from the coordinator -> TopicInfo (partitions in order)."""
    try:
        partitions = sorted(
            (
                PartitionInfo(
                    int(item["partition"]),
                    item.get("leader_url") or None,
                    _int_or(item.get("leader_epoch"), -1),
                )
                for item in raw["partitions"]
            ),
            key=lambda info: info.partition,
        )
        return TopicInfo(str(raw["name"]), tuple(partitions), now)
    except (KeyError, TypeError, ValueError) as exc:
        raise InternalError(f"malformed topic metadata: {exc!r}") from exc


def _int_or(value: Any, default: int) -> int:
    return default if value is None else int(value)


class MetadataCache:
    def __init__(
        self,
        transport: Transport,
        max_age_ms: int,
        auto_create: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._max_age_s = max_age_ms / 1000
        self._auto_create = auto_create
        self._clock = clock
        self._topics: dict[str, TopicInfo] = {}
        self._stale: set[str] = set()
        self._refreshing: dict[str, asyncio.Future[None]] = {}
        self.partition_counts: dict[str, int] = {}

    def cached(self, topic: str) -> TopicInfo | None:
        return self._topics.get(topic)

    def invalidate(self, topic: str) -> None:
        """The next lookup of ``topic`` asks the coordinator again."""
        self._stale.add(topic)

    async def topic(self, name: str) -> TopicInfo:
        info = self._topics.get(name)
        if info is None or name in self._stale or self._clock() - info.fetched_at > self._max_age_s:
            await self.refresh([name])
            info = self._topics.get(name)
            if info is None:
                raise InternalError(f"the coordinator did not describe topic {name!r}")
        return info

    async def leader(self, topic: str, partition: int) -> PartitionInfo:
        """The partition's leader; Unavailable (retriable) while it has none."""
        info = await self.topic(topic)
        if not 0 <= partition < len(info.partitions):
            raise UnknownPartition(
                f"{topic} has {len(info.partitions)} partitions, not {partition}"
            )
        entry = info.partitions[partition]
        if entry.leader_url is None:
            self.invalidate(topic)
            raise Unavailable(f"{topic}/{partition} has no leader right now")
        return entry

    async def refresh(self, names: Iterable[str]) -> None:
        """Fetches ``names``; joins a refresh already running for all of them."""
        wanted = sorted(set(names))
        running = [self._refreshing[name] for name in wanted if name in self._refreshing]
        missing = [name for name in wanted if name not in self._refreshing]
        if not missing:
            await asyncio.gather(*[asyncio.shield(future) for future in running])
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for name in missing:
            self._refreshing[name] = future
        try:
            await self._fetch(missing)
            future.set_result(None)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            for name in missing:
                self._refreshing.pop(name, None)
        if running:
            await asyncio.gather(*[asyncio.shield(item) for item in running])

    async def _fetch(self, names: list[str]) -> None:
        params = {"topics": ",".join(names)}
        if self._auto_create:
            params["auto_create"] = "true"
        answer = await self._transport.coordinator("GET", "/v1/metadata", params=params)
        now = self._clock()
        for raw in answer.get("topics", []):
            info = parse_topic(raw, now)
            self._topics[info.name] = info
            self._stale.discard(info.name)
            self.partition_counts[info.name] = len(info.partitions)
