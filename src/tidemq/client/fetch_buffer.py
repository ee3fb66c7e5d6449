"""The consumer's hand-off between fetchers (loop thread) and ``poll`` (user thread).

Fetchers ``put`` decoded chunks of messages per partition; ``take`` hands out up to
``max_records`` in arrival order (so in offset order per partition) and, unless told
otherwise, advances the partition's *position*: the next offset the application has
not seen, which is what ``commit`` sends.

Invariants:

* bounded: a partition's buffered bytes are reported by ``has_space``; its fetcher
  does not fetch while it is at ``max_partition_bytes`` or above, and ``take`` calls
  ``on_space(partitions)`` for partitions that drop back under it (backpressure).
* only owned partitions: ``put`` ignores partitions that are not assigned, and
  ``revoke`` drops a partition's chunks and returns its final position under the same
  lock that ``take`` uses, so nothing of a revoked partition is handed out afterwards
  and the position committed on revocation is exact.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from tidemq.wire.batch import Message

TopicPartition = tuple[str, int]

__all__ = ["FetchBuffer", "Message", "TopicPartition"]


class _Chunk:
    __slots__ = ("index", "messages", "size", "tp")

    def __init__(self, tp: TopicPartition, messages: list[Message], size: int) -> None:
        self.tp = tp
        self.messages = messages
        self.index = 0
        self.size = size


class FetchBuffer:
    def __init__(
        self,
        max_partition_bytes: int,
        on_space: Callable[[list[TopicPartition]], None],
    ) -> None:
        self.max_partition_bytes = max_partition_bytes
        self._on_space = on_space
        self._condition = threading.Condition()
        self._chunks: deque[_Chunk] = deque()
        self._bytes: dict[TopicPartition, int] = {}
        self._positions: dict[TopicPartition, int | None] = {}
        self._closed = False
        self._wakeups = 0

    # -- fetchers (loop thread) -------------------------------------------------------

    def assign(self, tp: TopicPartition) -> None:
        with self._condition:
            self._positions.setdefault(tp, None)
            self._bytes.setdefault(tp, 0)

    def seek(self, tp: TopicPartition, position: int) -> None:
        """Sets the position of an owned partition and drops what is buffered for it."""
        with self._condition:
            if tp in self._positions:
                self._drop_locked(tp)
                self._positions[tp] = position

    def put(self, tp: TopicPartition, messages: list[Message], size: int) -> bool:
        with self._condition:
            if tp not in self._positions or not messages:
                return False
            self._chunks.append(_Chunk(tp, messages, size))
            self._bytes[tp] = self._bytes.get(tp, 0) + size
            self._condition.notify_all()
            return True

    def has_space(self, tp: TopicPartition) -> bool:
        return self._bytes.get(tp, 0) < self.max_partition_bytes

    def revoke(self, tp: TopicPartition) -> int | None:
        """Forgets ``tp``; returns its final position (None if it never had one)."""
        with self._condition:
            self._drop_locked(tp)
            self._bytes.pop(tp, None)
            return self._positions.pop(tp, None)

    def _drop_locked(self, tp: TopicPartition) -> None:
        if any(chunk.tp == tp for chunk in self._chunks):
            self._chunks = deque(chunk for chunk in self._chunks if chunk.tp != tp)
        if tp in self._bytes:
            self._bytes[tp] = 0

    # -- the application (user threads) -----------------------------------------------

    def take(self, max_records: int, timeout: float | None, advance: bool = True) -> list[Message]:
        """Up to ``max_records`` messages, waiting up to ``timeout`` s for the first."""
        out: list[Message] = []
        freed: list[TopicPartition] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            wakeups = self._wakeups
            while not self._chunks:
                if self._closed or self._wakeups != wakeups:
                    return out
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return out
                self._condition.wait(remaining)
            while self._chunks and len(out) < max_records:
                chunk = self._chunks[0]
                wanted = max_records - len(out)
                part = chunk.messages[chunk.index : chunk.index + wanted]
                out.extend(part)
                chunk.index += len(part)
                if advance:
                    self._positions[chunk.tp] = part[-1].offset + 1
                if chunk.index >= len(chunk.messages):
                    self._chunks.popleft()
                    before = self._bytes.get(chunk.tp, 0)
                    after = before - chunk.size
                    self._bytes[chunk.tp] = after
                    if before >= self.max_partition_bytes > after:
                        freed.append(chunk.tp)
        if freed:
            self._on_space(freed)
        return out

    def advance(self, tp: TopicPartition, position: int) -> bool:
        """Marks ``position`` as processed (subscribe mode); False if ``tp`` is not owned."""
        with self._condition:
            if tp not in self._positions:
                return False
            self._positions[tp] = position
            return True

    def owns(self, tp: TopicPartition) -> bool:
        return tp in self._positions

    def positions(self) -> dict[TopicPartition, int]:
        with self._condition:
            return {tp: pos for tp, pos in self._positions.items() if pos is not None}

    def position(self, tp: TopicPartition) -> int | None:
        with self._condition:
            return self._positions.get(tp)

    def assignment(self) -> set[TopicPartition]:
        with self._condition:
            return set(self._positions)

    def buffered_bytes(self, tp: TopicPartition) -> int:
        return self._bytes.get(tp, 0)

    def wakeup(self) -> None:
        """Makes a waiting ``take`` return (empty) now."""
        with self._condition:
            self._wakeups += 1
            self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
