"""The producer's batching core: records -> per-partition batches -> requests.

No I/O and no event loop: user threads call :meth:`RecordAccumulator.append`
(``Producer.send``), the sender task calls ``ready`` / ``drain`` / ``complete``.
One lock guards everything; ``append`` holds it for one dict lookup and one
``BatchBuilder.append``.

Per partition (a ``(topic, partition)`` pair) there is at most one *open* batch,
taking appends, and a FIFO of *sealed* batches. A batch is sealed when the next
record would take it past ``batch_size`` (a single larger record gets a batch of its
own) or when the sender drains it.

When to send (Nagle's algorithm per leader broker, as Kafka's sender drains per
node): the sender passes ``ready`` a ``node_of(tp)`` (the leader broker it believes
in, None if unknown). A broker is *ready* when nothing drained for it is in flight
(a lone record goes at once: no linger at low load), or a request to it completed
since its partitions were last drained, or one of its partitions has a full batch,
or an open batch older than ``linger_ms`` (so linger is an upper bound on the wait,
never a fixed delay), or during ``flush``/``close`` or
while a ``send`` waits for buffer memory. While a broker has requests in flight its
partitions accumulate, and when one completes (``complete`` wakes the sender) every
partition of a ready broker is drained together, its open batch sealed, into one
multi-partition request: under load requests carry many records, and the number of
requests follows the round trips instead of the records. Per broker rather than per
partition because the producer sends one request per leader: 12 partitions led by
one broker then cost one request per round trip, not up to 12. After a pass that finds
a broker ready (its requests go next) the sender looks in again within a linger
(``ready`` arms the timer), so a batch opened behind them needs no wake from the
user's thread (``_sender_will_look``).

Invariants:

* ordering: ``drain`` takes a partition's batches oldest first. Without idempotence
  (``in_flight_batches_max`` None) a partition has at most one request in flight, so
  a retry never overtakes later records. With idempotence its *window* (the batches
  drained since its oldest unsettled one, settled or not) holds at most
  ``in_flight_batches_max`` batches, in one or several requests, and the producer
  keeps order with sequence numbers. The window is counted from the oldest unsettled
  batch, not as the unsettled ones, because requests complete out of order: were the
  oldest still out while 5 younger ones settled and more were sent, the broker (which
  remembers a producer's last 5 batches) could no longer recognise its resend. On a
  failure the producer pauses the partition (no new drain), lets the requests in
  flight finish, resends in sequence order, then resumes it (client/producer.py).
  Many partitions are in flight in parallel.
* bytes in flight: the batches drained for one broker and not yet completed total at
  most ``max_in_flight_bytes`` (a single larger batch may go alone when nothing else
  is in flight to it); beyond that the sender waits for completions instead of piling
  up requests behind a slow link (which would time out and be resent).
* memory: ``used`` counts the record bytes (batch headers aside) of every batch not
  yet completed and
  never exceeds ``buffer_memory`` (``append`` waits up to ``max_block_ms``, then
  raises ResultTimeout); a record larger than the whole buffer is rejected.
* futures: each record gets a :class:`RecordFuture` = (batch, index); its offset is
  the batch's base offset + index. No per-record Future or Event is created: the
  completion state (a ``threading.Event`` and optional callbacks) is per batch.

Keyless records stick to one partition per topic until that partition's open batch
is sealed or drained, then move to the next partition (round robin, one partition
per batch, as docs/PROTOCOL.md requires).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from tidemq.client.config import ResultTimeout
from tidemq.errors import ClientClosed, RequestTooLarge, TideError
from tidemq.wire.batch import HEADER_SIZE, RECORD_HEADER_SIZE, BatchBuilder

log = logging.getLogger("tidemq.client")

TopicPartition = tuple[str, int]
_CALLBACK_LOCK = threading.Lock()  # guards ProducerBatch outcome, waiter Event, callbacks
HeaderList = Sequence[tuple[str, bytes]]


class RecordMetadata(NamedTuple):
    """Where an acknowledged record landed. ``offset`` is -1 with ``acks=0``."""

    topic: str
    partition: int
    offset: int


class ProducerBatch:
    """One batch: its builder while open, its bytes once drained, its outcome."""

    __slots__ = (
        "_callbacks",
        "_done",
        "_event",
        "base_offset",
        "builder",
        "count",
        "created",
        "error",
        "node",
        "partition",
        "payload",
        "settled",
        "size",
        "topic",
    )

    def __init__(self, topic: str, partition: int, timestamp_ms: int, created: float) -> None:
        self.topic = topic
        self.partition = partition
        self.builder: BatchBuilder | None = BatchBuilder(timestamp_ms)
        self.size = HEADER_SIZE
        self.count = 0
        self.created = created  # monotonic seconds
        self.payload: bytes | None = None
        self.base_offset = -1
        self.error: TideError | None = None
        self.node: str | None = None  # the broker it was drained for (bytes in flight)
        self.settled = False  # its request is over (accumulator.complete)
        self._done = False
        # Made by the first wait: most batches are never waited for (callbacks, flush
        # waits for the last one), and an Event is three locks' worth of objects.
        self._event: threading.Event | None = None
        self._callbacks: list[tuple[RecordFuture, Callable[[RecordFuture], object]]] | None = None

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None) -> bool:
        if self._done:
            return True
        with _CALLBACK_LOCK:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def seal(self, producer_id: int, producer_epoch: int, base_sequence: int) -> bytes:
        """Builds the wire bytes once (retries resend the same bytes) and drops the builder."""
        if self.payload is None:
            builder = self.builder
            if builder is None:  # pragma: no cover - payload and builder are exclusive
                raise ClientClosed("batch has neither builder nor payload")
            self.payload = builder.build(producer_id, producer_epoch, base_sequence)
            self.builder = None
        return self.payload

    def complete(self, base_offset: int, error: TideError | None) -> None:
        """Records the outcome, wakes waiters, runs callbacks (the caller's thread)."""
        with _CALLBACK_LOCK:
            if self._done:
                return
            self.base_offset = base_offset
            self.error = error
            self.builder = None
            self.payload = None
            self._done = True
            event = self._event
            callbacks, self._callbacks = self._callbacks, None
        if event is not None:
            event.set()
        for future, callback in callbacks or ():
            _run_callback(callback, future)

    def add_callback(
        self, future: RecordFuture, callback: Callable[[RecordFuture], object]
    ) -> None:
        with _CALLBACK_LOCK:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append((future, callback))
                return
        _run_callback(callback, future)


def _run_callback(callback: Callable[[RecordFuture], object], future: RecordFuture) -> None:
    try:
        callback(future)
    except Exception:
        log.exception("a send() done-callback raised")


class RecordFuture:
    """What ``Producer.send`` returns: quacks like ``concurrent.futures.Future``.

    ``result(timeout)`` -> RecordMetadata or raises the delivery's TideError (or
    ResultTimeout, also a TimeoutError, if ``timeout`` passes first); ``exception``,
    ``done``, ``add_done_callback(fn)`` (``fn(future)``, run on the client's thread or
    at once if done), ``cancel()`` (always False: a record in a batch cannot be
    taken back), ``cancelled()``, ``running()``. Two slots, no lock, no Event.
    """

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: ProducerBatch, index: int) -> None:
        self._batch = batch
        self._index = index

    def result(self, timeout: float | None = None) -> RecordMetadata:
        batch = self._batch
        if not batch.wait(timeout):
            raise ResultTimeout(f"record not acknowledged within {timeout} s")
        if batch.error is not None:
            raise batch.error
        base = batch.base_offset
        return RecordMetadata(batch.topic, batch.partition, base + self._index if base >= 0 else -1)

    def exception(self, timeout: float | None = None) -> TideError | None:
        if not self._batch.wait(timeout):
            raise ResultTimeout(f"record not acknowledged within {timeout} s")
        return self._batch.error

    def done(self) -> bool:
        return self._batch.done

    def running(self) -> bool:
        return not self._batch.done

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def add_done_callback(self, callback: Callable[[RecordFuture], object]) -> None:
        self._batch.add_callback(self, callback)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._batch.error else "done")
        return f"<RecordFuture {self._batch.topic}/{self._batch.partition}#{self._index} {state}>"


class _PartitionQueue:
    __slots__ = ("in_flight_requests", "open", "paused", "sealed", "window")

    def __init__(self) -> None:
        self.open: ProducerBatch | None = None
        self.sealed: deque[ProducerBatch] = deque()
        self.in_flight_requests = 0
        # Drained batches from the oldest unsettled one on (see "ordering" above).
        self.window: deque[ProducerBatch] = deque()
        self.paused = False

    def idle(self) -> bool:
        return (
            self.open is None
            and not self.sealed
            and not self.in_flight_requests
            and not self.paused
        )


class Readiness(NamedTuple):
    partitions: list[TopicPartition]  # have something to send and room in flight
    next_check: float | None  # monotonic time when an open batch's linger ends


def _unknown_node(tp: TopicPartition) -> str | None:
    return None


def record_size(key: bytes | None, value: bytes | None, headers: HeaderList | None) -> int:
    """Bytes a record takes in a batch (exact for key and value, headers included)."""
    size = RECORD_HEADER_SIZE + (len(key) if key else 0) + (len(value) if value else 0)
    if headers:
        for name, header_value in headers:
            size += 6 + len(name.encode()) + len(header_value)
    return size


class RecordAccumulator:
    def __init__(
        self,
        batch_size: int,
        buffer_memory: int,
        linger_ms: int,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        max_in_flight_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.batch_size = batch_size
        self.buffer_memory = buffer_memory
        self.linger_s = linger_ms / 1000
        self.max_in_flight_bytes = max_in_flight_bytes
        self._wake = wake
        self._clock = clock
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._queues: dict[TopicPartition, _PartitionQueue] = {}
        self._incomplete: set[ProducerBatch] = set()
        # Per broker (node): batches drained for it and not completed, and their bytes.
        self._node_batches: dict[str, int] = {}
        self._node_bytes: dict[str, int] = {}
        self._rotation = 0
        # Brokers a request to which completed since their partitions were last drained.
        self._node_answered: set[str] = set()
        # When the sender runs ``ready`` again unwoken (its timer; inf: only when woken),
        # and the leader lookup it passed (read by append: a dict lookup, any thread).
        self._sender_timer = math.inf
        self._node_of: Callable[[TopicPartition], str | None] = _unknown_node
        self._sticky: dict[str, int] = {}
        self._partition_counts: dict[str, int] = {}
        self.used = 0
        self._memory_waiters = 0
        self._flushing = 0
        self._closed = False
        self._closed_reason = "the producer is closed"
        # None: one request in flight per partition; n: up to n batches (idempotence).
        self.in_flight_batches_max: int | None = None

    # -- user threads -----------------------------------------------------------------

    def append(
        self,
        topic: str,
        partition: int,
        partition_count: int,
        key: bytes | None,
        value: bytes | None,
        headers: HeaderList | None,
        timestamp_ms: int,
        max_block_s: float,
    ) -> RecordFuture:
        """Adds a record; ``partition`` -1 means "keyless: the sticky partition"."""
        size = RECORD_HEADER_SIZE + (len(key) if key else 0) + (len(value) if value else 0)
        if headers:
            size = record_size(key, value, headers)
        wake = False
        with self._lock:
            if self._closed:
                raise ClientClosed(self._closed_reason)
            if self.used + size > self.buffer_memory:
                self._wait_for_memory(size, max_block_s)
            keyless = partition < 0
            if keyless:
                partition = self._sticky_partition(topic, partition_count)
            tp = (topic, partition)
            queue = self._queues.get(tp)
            if queue is None:
                queue = self._queues[tp] = _PartitionQueue()
            batch = queue.open
            if batch is not None and batch.size + size > self.batch_size and batch.count:
                self._seal_locked(tp, queue)
                wake = True  # a full batch is ready now (even if the record goes elsewhere)
                if keyless:  # the sticky partition moved on with the sealed batch
                    partition = self._sticky_partition(topic, partition_count)
                    tp = (topic, partition)
                    queue = self._queues.get(tp)
                    if queue is None:
                        queue = self._queues[tp] = _PartitionQueue()
                batch = queue.open
            if batch is None:
                batch = queue.open = ProducerBatch(topic, partition, timestamp_ms, self._clock())
                self._incomplete.add(batch)
                wake = wake or not self._sender_will_look(tp, batch.created)
            builder = batch.builder
            if builder is None:  # pragma: no cover - open batches always have a builder
                raise ClientClosed("batch already sealed")
            index = builder.append(key, value, timestamp_ms, headers)
            batch.size += size
            batch.count = index + 1
            self.used += size
        if wake:
            self._wake()
        return RecordFuture(batch, index)

    def _sender_will_look(self, tp: TopicPartition, created: float) -> bool:
        """Whether the sender runs ``ready`` in time for a new batch of ``tp`` without
        a wake: its broker (the leader ``ready`` will use) has a request in flight and no
        answer since (an answer wakes the sender), and the sender's timer ends no later
        than the batch's linger. Under load most new batches are such, and waking the
        sender's thread for each would cost a cross-thread call and a ``ready`` pass per
        record that change nothing."""
        node = self._node_of(tp)
        return (
            node is not None
            and node in self._node_batches
            and node not in self._node_answered
            and self._sender_timer <= created + self.linger_s
            and not (self._flushing or self._closed or self._memory_waiters)
        )

    def _sticky_partition(self, topic: str, partition_count: int) -> int:
        partition = self._sticky.get(topic, -1)
        if partition < 0 or partition >= partition_count:
            partition = random.randrange(partition_count)
            self._sticky[topic] = partition
        self._partition_counts[topic] = partition_count
        return partition

    def _wait_for_memory(self, size: int, max_block_s: float) -> None:
        if size > self.buffer_memory:
            raise RequestTooLarge(
                f"a record of {size} bytes is larger than buffer_memory={self.buffer_memory}"
            )
        deadline = time.monotonic() + max_block_s
        self._memory_waiters += 1
        try:
            self._wake()  # the sender drains open batches at once while we wait
            while self.used + size > self.buffer_memory:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ResultTimeout(
                        f"buffer_memory ({self.buffer_memory} bytes) full for max_block_ms"
                    )
                self._space.wait(remaining)
                if self._closed:
                    raise ClientClosed(self._closed_reason)
        finally:
            self._memory_waiters -= 1

    def _seal_locked(self, tp: TopicPartition, queue: _PartitionQueue) -> None:
        batch = queue.open
        if batch is None:
            return
        queue.sealed.append(batch)
        queue.open = None
        topic, partition = tp
        if self._sticky.get(topic) == partition:
            self._sticky[topic] = (partition + 1) % self._partition_counts.get(topic, 1)

    def begin_flush(self) -> list[ProducerBatch]:
        """Every batch not yet complete; linger is ignored until ``end_flush``."""
        with self._lock:
            self._flushing += 1
            batches = list(self._incomplete)
        self._wake()
        return batches

    def end_flush(self) -> None:
        with self._lock:
            self._flushing -= 1

    def close(self, reason: str | None = None) -> None:
        """No more appends; the sender drains what is left without lingering. An
        append refused from now on raises ClientClosed with the first ``reason``."""
        with self._lock:
            if not self._closed and reason is not None:
                self._closed_reason = reason
            self._closed = True
            self._space.notify_all()
        self._wake()

    # -- the sender -------------------------------------------------------------------

    def ready(
        self, now: float, node_of: Callable[[TopicPartition], str | None] = _unknown_node
    ) -> Readiness:
        """Partitions to drain now (every partition with something to send and room in
        flight whose broker is ready), and when to look again for lingering batches."""
        candidates: dict[str | None, list[TopicPartition]] = {}
        ready_nodes: set[str | None] = set()
        deadlines: dict[str | None, float] = {}
        with self._lock:
            hurry = self._flushing > 0 or self._closed or self._memory_waiters > 0
            for tp, queue in self._queues.items():
                batch = queue.open
                if (batch is None and not queue.sealed) or not self._room(queue):
                    continue
                node = node_of(tp)
                if node is not None and self._node_bytes.get(node, 0) >= self.max_in_flight_bytes:
                    continue  # a completion frees bytes and wakes the sender
                candidates.setdefault(node, []).append(tp)
                if node in ready_nodes:
                    continue
                if (
                    batch is None
                    or queue.sealed
                    or hurry
                    or node not in self._node_batches
                    or node in self._node_answered
                ):
                    ready_nodes.add(node)  # full batches, nothing in flight, or an answer
                    continue
                deadline = batch.created + self.linger_s
                if now >= deadline:
                    ready_nodes.add(node)
                elif deadline < deadlines.get(node, deadline + 1):
                    deadlines[node] = deadline
            self._node_answered.difference_update(ready_nodes)
            waiting = [deadline for node, deadline in deadlines.items() if node not in ready_nodes]
            next_check = min(waiting) if waiting else None
            if next_check is None and self.linger_s > 0 and ready_nodes:
                # Requests about to go (the ready nodes are drained next), nothing
                # lingering: look again one linger from now anyway. A batch opened behind
                # those requests then needs no wake (its linger ends after this timer, see
                # _sender_will_look): without the timer, each such batch cost a
                # cross-thread wake and a sender pass that only armed it (a third of all
                # passes at 2,000 msg/s). Under load an answer's pass drains and re-arms
                # it before it fires. Not armed by a pass that finds no broker ready,
                # requests in flight or not: behind a request that hangs (a broker that
                # stopped answering, for up to request_timeout_ms) it would fire once a
                # linger and scan every queue for nothing; the next record then wakes the
                # sender. Open: a broker "ready" whose drain takes nothing (its next batch
                # does not fit the bytes in flight or max_request_bytes) still re-arms it
                # on every pass (ARCHITECTURE, "Waking the sender").
                next_check = now + self.linger_s
            # Set with the scan, under the lock: a batch appended after the scan sees
            # the timer the sender is about to sleep with (see _sender_will_look).
            self._sender_timer = math.inf if next_check is None else next_check
            self._node_of = node_of
        partitions: list[TopicPartition] = []
        for node in ready_nodes:
            partitions.extend(candidates[node])
        if len(partitions) > 1:  # rotate, so no partition starves at the bytes bound
            self._rotation = start = (self._rotation + 1) % len(partitions)
            partitions = partitions[start:] + partitions[:start]
        return Readiness(partitions, next_check)

    def _room(self, queue: _PartitionQueue) -> int:
        """How many more batches of this partition may go in flight now."""
        if queue.paused:
            return 0
        limit = self.in_flight_batches_max
        if limit is None:
            return 0 if queue.in_flight_requests else 1 << 30
        return max(0, limit - len(queue.window))

    def drain(
        self, tp: TopicPartition, max_bytes: int, now: float, node: str | None = None
    ) -> list[ProducerBatch]:
        """Oldest batches of ``tp`` (its open batch sealed first) up to ``max_bytes`` (at
        least one), the in-flight limit and ``node``'s bytes in flight; counts them in
        flight until ``complete``. ``now`` is unused: the caller asked ``ready`` first."""
        with self._lock:
            queue = self._queues.get(tp)
            room = 0 if queue is None else self._room(queue)
            if queue is None or not room:
                return []
            node_bytes = 0 if node is None else self._node_bytes.get(node, 0)
            budget = max_bytes
            if node is not None:
                budget = min(max_bytes, self.max_in_flight_bytes - node_bytes)
                if budget <= 0 and node_bytes:
                    return []
            if queue.open is not None:
                self._seal_locked(tp, queue)
            batches: list[ProducerBatch] = []
            total = 0
            while queue.sealed and len(batches) < room:
                if total + queue.sealed[0].size > budget and (batches or node_bytes):
                    break  # the first batch goes alone when nothing else is in flight
                batch = queue.sealed.popleft()
                batch.node = node
                batches.append(batch)
                total += batch.size
            if batches:
                queue.in_flight_requests += 1
                queue.window.extend(batches)
                if node is not None:
                    self._node_batches[node] = self._node_batches.get(node, 0) + len(batches)
                    self._node_bytes[node] = node_bytes + total
            elif queue.idle():
                del self._queues[tp]
            return batches

    def complete(self, tp: TopicPartition, batches: list[ProducerBatch]) -> None:
        """The request for ``batches`` is over (each already completed): free memory."""
        with self._lock:
            for batch in batches:
                self.used -= batch.size - HEADER_SIZE
                self._incomplete.discard(batch)
                batch.settled = True
                if batch.node is not None:
                    self._release_node(batch.node, batch.size)
                    self._node_answered.add(batch.node)
                    batch.node = None
            queue = self._queues.get(tp)
            if queue is not None:
                queue.in_flight_requests -= 1
                window = queue.window
                while window and window[0].settled:
                    window.popleft()
                if queue.idle():
                    del self._queues[tp]
            if self._memory_waiters:  # counted under this lock before they wait
                self._space.notify_all()
        self._wake()

    def _release_node(self, node: str, size: int) -> None:
        remaining = self._node_batches[node] - 1
        if remaining:
            self._node_batches[node] = remaining
            self._node_bytes[node] -= size
        else:
            del self._node_batches[node]
            del self._node_bytes[node]

    def in_flight_bytes(self, node: str) -> int:
        """Bytes of the batches drained for ``node`` and not completed yet."""
        with self._lock:
            return self._node_bytes.get(node, 0)

    def pause(self, tp: TopicPartition) -> None:
        """No new drains of ``tp`` until ``resume`` (the producer is resending)."""
        with self._lock:
            queue = self._queues.get(tp)
            if queue is None:
                queue = self._queues[tp] = _PartitionQueue()
            queue.paused = True

    def resume(self, tp: TopicPartition) -> None:
        with self._lock:
            queue = self._queues.get(tp)
            if queue is not None:
                queue.paused = False
                if queue.idle():
                    del self._queues[tp]
        self._wake()

    def abort(self, error: TideError) -> None:
        """Fails every batch that is not in flight (used when close gives up)."""
        with self._lock:
            failed: list[ProducerBatch] = []
            for tp, queue in list(self._queues.items()):
                if queue.open is not None:
                    self._seal_locked(tp, queue)
                failed.extend(queue.sealed)  # never sent: what is in flight is not here
                queue.sealed.clear()
                if queue.idle():
                    del self._queues[tp]
            for batch in failed:
                self.used -= batch.size - HEADER_SIZE
                self._incomplete.discard(batch)
            self._space.notify_all()
        for batch in failed:
            batch.complete(-1, error)

    def fail_incomplete(self, error: TideError) -> None:
        """The sender is gone: fails every batch not completed yet, wherever it is
        (queued, drained but in no request, or one whose request was never settled).
        The queues' accounting is left as it is: nothing sends from them again, and a
        loop that was blocked may still settle a batch (a no-op once it is complete)."""
        with self._lock:
            left = list(self._incomplete)
            self._incomplete.clear()
            self._space.notify_all()
        for batch in left:
            batch.complete(-1, error)  # no-op for a batch already completed

    @property
    def closed_reason(self) -> str:
        with self._lock:
            return self._closed_reason

    def is_empty(self) -> bool:
        with self._lock:
            return not self._queues

    @property
    def incomplete_count(self) -> int:
        with self._lock:
            return len(self._incomplete)
