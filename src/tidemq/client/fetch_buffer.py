"""The consumer's hand-off between fetchers (loop thread) and the application.

Fetchers ``put`` decoded chunks of messages per partition; ``take`` hands out up to
``max_records`` in arrival order (so in offset order per partition). Per owned
partition the buffer keeps two positions:

* ``handed``: the next offset to hand out (everything below went to the application);
* ``done``: the application is finished with everything below it. It moves up to
  ``handed`` when the application polls again or commits (``mark_done``) and per
  message when a ``subscribe`` handler returns (``processed``).

What is *committed* derives from these (the consumer's delivery mode decides): at
least once commits ``done``; at most once makes ``done = handed`` before handing out.

A partition is *active* or *revoking*. Revoking (the coordinator took it away) hands
out nothing more and drops what is buffered; the consumer releases it once
``done == handed`` (the application finished what it got), so a record in the
application's hands is never handed to the partition's next owner while this
member is alive.

Invariants:

* bounded: a partition's buffered bytes are reported by ``has_space``; its fetcher
  does not fetch while it is at ``max_partition_bytes`` or above, and ``take`` calls
  ``on_space(partitions)`` for partitions that drop back under it (backpressure).
* only owned, active partitions are handed out, and only while the member's session
  is surely alive (``set_session_deadline``): after that deadline ``take`` and
  ``hand_out`` return nothing, whatever the loop thread is doing.
* a chunk ``put`` with an error (an undecodable record) is an error marker: ``take``
  hands out everything before it, then raises the error, and raises it again on
  every call until ``seek`` moves the partition past it.
* ``fail`` (the background died) makes every later ``take`` raise.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from tidemq.errors import TideError
from tidemq.wire.batch import Message

TopicPartition = tuple[str, int]

__all__ = ["FetchBuffer", "Message", "TopicPartition"]


class _Chunk:
    __slots__ = ("error", "index", "messages", "size", "tp")

    def __init__(
        self,
        tp: TopicPartition,
        messages: list[Message],
        size: int,
        error: TideError | None = None,
    ) -> None:
        self.tp = tp
        self.messages = messages
        self.index = 0
        self.size = size
        self.error = error


class _Partition:
    __slots__ = ("buffered_bytes", "done", "handed", "revoking")

    def __init__(self) -> None:
        self.handed: int | None = None
        self.done: int | None = None
        self.buffered_bytes = 0
        self.revoking = False


class FetchBuffer:
    def __init__(
        self,
        max_partition_bytes: int,
        on_space: Callable[[list[TopicPartition]], None],
        on_done: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_partition_bytes = max_partition_bytes
        self._on_space = on_space
        self._on_done = on_done
        self._clock = clock
        self._condition = threading.Condition()
        self._chunks: deque[_Chunk] = deque()
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._closed = False
        self._wakeups = 0
        self._error: BaseException | None = None
        self._session_deadline = float("inf")
        self._revoking = 0

    # -- the loop thread: fetchers and membership ---------------------------------------

    def assign(self, tp: TopicPartition) -> None:
        with self._condition:
            self._partitions.setdefault(tp, _Partition())

    def seek(self, tp: TopicPartition, position: int) -> bool:
        """Sets both positions of an active partition and drops what is buffered."""
        with self._condition:
            state = self._partitions.get(tp)
            if state is None or state.revoking:
                return False
            self._drop_locked(tp, state)
            state.handed = state.done = position
            return True

    def put(self, tp: TopicPartition, messages: list[Message], size: int) -> bool:
        with self._condition:
            state = self._partitions.get(tp)
            if state is None or state.revoking or not messages:
                return False
            self._chunks.append(_Chunk(tp, messages, size))
            state.buffered_bytes += size
            self._condition.notify_all()
            return True

    def put_many(
        self, chunks: Iterable[tuple[TopicPartition, list[Message], int, TideError | None]]
    ) -> None:
        """One fetch answer at once, under one lock and one wake-up: ``(tp, messages,
        size, error)`` per chunk, in order; an ``error`` chunk is an error marker.
        Chunks of partitions not owned or being revoked are dropped."""
        with self._condition:
            added = False
            for tp, messages, size, error in chunks:
                state = self._partitions.get(tp)
                if state is None or state.revoking or (error is None and not messages):
                    continue
                self._chunks.append(_Chunk(tp, messages, size, error))
                state.buffered_bytes += size
                added = True
            if added:
                self._condition.notify_all()

    def put_error(self, tp: TopicPartition, error: TideError) -> bool:
        """Queues an error marker after what is buffered for ``tp``."""
        with self._condition:
            state = self._partitions.get(tp)
            if state is None or state.revoking:
                return False
            self._chunks.append(_Chunk(tp, [], 0, error))
            self._condition.notify_all()
            return True

    def has_space(self, tp: TopicPartition) -> bool:
        state = self._partitions.get(tp)
        return state is None or state.buffered_bytes < self.max_partition_bytes

    def begin_revoke(self, tp: TopicPartition) -> None:
        """Hands out nothing more of ``tp`` and drops what is buffered for it."""
        with self._condition:
            state = self._partitions.get(tp)
            if state is None or state.revoking:
                return
            state.revoking = True
            self._revoking += 1
            self._drop_locked(tp, state)

    def revocation_ready(self, tp: TopicPartition) -> bool:
        """True when the application has finished everything of ``tp`` it was given."""
        with self._condition:
            state = self._partitions.get(tp)
            return state is None or state.done == state.handed

    def remove(self, tp: TopicPartition) -> int | None:
        """Forgets ``tp``; returns its ``done`` position (None if it never had one)."""
        with self._condition:
            state = self._partitions.pop(tp, None)
            if state is None:
                return None
            if state.revoking:
                self._revoking -= 1
            self._drop_locked(tp, state)
            return state.done

    def set_session_deadline(self, deadline: float) -> None:
        """Nothing is handed out at or after ``deadline`` (the clock's seconds)."""
        with self._condition:
            self._session_deadline = deadline
            self._condition.notify_all()

    def session_expired(self) -> bool:
        return self._clock() >= self._session_deadline

    def fail(self, error: BaseException) -> None:
        """The background died: every later ``take`` raises ``error``."""
        with self._condition:
            self._error = error
            self._condition.notify_all()

    def _drop_locked(self, tp: TopicPartition, state: _Partition) -> None:
        if any(chunk.tp == tp for chunk in self._chunks):
            self._chunks = deque(chunk for chunk in self._chunks if chunk.tp != tp)
        state.buffered_bytes = 0

    # -- the application (user threads) -----------------------------------------------

    def take(self, max_records: int, timeout: float | None, advance: bool = True) -> list[Message]:
        """Up to ``max_records`` messages, waiting up to ``timeout`` s for the first.

        ``advance`` moves ``handed`` past them (poll); subscribe passes False and
        calls ``hand_out`` per message instead. Raises the error of an error marker
        at the head, or the background's error.
        """
        out: list[Message] = []
        freed: list[TopicPartition] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            wakeups = self._wakeups
            while True:
                if self._error is not None:
                    raise self._error
                if self._chunks and not self.session_expired():
                    break
                if self._closed or self._wakeups != wakeups:
                    return out
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return out
                if self._chunks:  # held back by an expired session: look again soon
                    remaining = 0.1 if remaining is None else min(remaining, 0.1)
                self._condition.wait(remaining)
            while self._chunks and len(out) < max_records:
                chunk = self._chunks[0]
                if chunk.error is not None:
                    if out:
                        break
                    raise chunk.error
                state = self._partitions[chunk.tp]
                wanted = max_records - len(out)
                part = chunk.messages[chunk.index : chunk.index + wanted]
                out.extend(part)
                chunk.index += len(part)
                if advance:
                    state.handed = part[-1].offset + 1
                if chunk.index >= len(chunk.messages):
                    self._chunks.popleft()
                    before = state.buffered_bytes
                    state.buffered_bytes = before - chunk.size
                    if before >= self.max_partition_bytes > state.buffered_bytes:
                        freed.append(chunk.tp)
        if freed:
            self._on_space(freed)
        return out

    def hand_out(self, message: Message) -> bool:
        """Subscribe: may ``message`` go to the handler now? If so it counts as handed.

        Only the next offset of an active partition of a live session qualifies, so a
        message taken before a revocation, a seek or a rewind is never handed out.
        """
        with self._condition:
            state = self._partitions.get((message.topic, message.partition))
            if state is None or state.revoking or state.handed != message.offset:
                return False
            if self.session_expired():
                return False
            state.handed = message.offset + 1
            return True

    def processed(self, tp: TopicPartition, position: int) -> None:
        """Subscribe: the handler returned for everything below ``position``."""
        with self._condition:
            state = self._partitions.get(tp)
            if state is None:
                return
            state.done = position
            revoking = state.revoking
        if revoking and self._on_done is not None:
            self._on_done()

    def mark_done(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """The application is finished with everything handed out so far."""
        with self._condition:
            revoking = False
            chosen = self._partitions if partitions is None else partitions
            for tp in chosen:
                state = self._partitions.get(tp)
                if state is not None:
                    state.done = state.handed
                    revoking = revoking or state.revoking
        if revoking and self._on_done is not None:
            self._on_done()

    def rewind(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Forgets what was handed out but not done: ``handed = done``; drops buffered
        records. Returns the positions to fetch again from (active partitions only)."""
        out: dict[TopicPartition, int] = {}
        revoking = False
        with self._condition:
            for tp in partitions:
                state = self._partitions.get(tp)
                if state is None or state.done is None:
                    continue
                state.handed = state.done
                self._drop_locked(tp, state)
                revoking = revoking or state.revoking
                if not state.revoking:
                    out[tp] = state.done
        if revoking and self._on_done is not None:
            self._on_done()
        return out

    def positions(self) -> dict[TopicPartition, int]:
        """The ``done`` position of every partition that has one (what to commit)."""
        with self._condition:
            return {tp: s.done for tp, s in self._partitions.items() if s.done is not None}

    def handed_positions(self) -> dict[TopicPartition, int]:
        with self._condition:
            return {tp: s.handed for tp, s in self._partitions.items() if s.handed is not None}

    def position(self, tp: TopicPartition) -> int | None:
        """The next offset to hand out for ``tp``."""
        with self._condition:
            state = self._partitions.get(tp)
            return None if state is None else state.handed

    def owns(self, tp: TopicPartition) -> bool:
        with self._condition:
            state = self._partitions.get(tp)
            return state is not None and not state.revoking

    def assignment(self) -> set[TopicPartition]:
        """Partitions owned and not being revoked."""
        with self._condition:
            return {tp for tp, state in self._partitions.items() if not state.revoking}

    def buffered_bytes(self, tp: TopicPartition) -> int:
        state = self._partitions.get(tp)
        return 0 if state is None else state.buffered_bytes

    def wakeup(self) -> None:
        """Makes a waiting ``take`` return (empty) now."""
        with self._condition:
            self._wakeups += 1
            self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
