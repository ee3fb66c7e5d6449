"""The producer: ``send`` on the user's thread, delivery on the client's loop thread.

``send`` encodes, picks the partition (``crc32(key) mod partitions``, or the topic's
sticky partition when keyless), appends into the accumulator and returns a
:class:`~tidemq.client.accumulator.RecordFuture`. It crosses to the loop thread only
the first time a topic is seen (to learn its partition count, creating the topic)
and to wake the sender when a batch opens or seals, never per message.

The sender task (one per producer) drains ready partitions and sends one
multi-partition request per leader (``POST {leader}/v1/produce``): at once when nothing
is in flight to that leader, else when a request completes, a batch fills or
``linger_ms`` passes (client/accumulator.py, Nagle per broker). With idempotence
(the default) each batch carries the producer id and per-partition sequence numbers,
stamped at drain time (client/sequencing.py), and up to ``max_in_flight`` batches of a
partition may be unacknowledged at once; the leader appends in sequence only and
answers a retried batch with its original offsets. Without a producer id, one request
per partition is in flight. Any failure pauses the partition; once its requests in
flight end, ``_recover`` resends the unresolved groups oldest first, one at a time
(``POST {leader}/v1/topics/{t}/partitions/{p}/records``). Retriable failures
(not_leader, fenced or unknown leader epoch, connection failed, 503, 504) refresh the
metadata, back off (exponential, capped, jittered; none when the fresh metadata names
another leader or epoch, a short one while the broker is behind the coordinator, see
``_retry_delay``) and resend the same bytes until
``retries`` or ``delivery_timeout_ms`` runs out; a group refused before any append,
or an ``unknown_producer_id`` or ``out_of_order_sequence`` for the oldest group when
none of its attempts may have been appended, starts a new producer epoch for the
partition and renumbers what it still holds from sequence 0 (a group that may have
been appended fails OutcomeUnknown instead, and the next one starts the epoch).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from zlib import crc32

from tidemq.client.accumulator import (
    RecordAccumulator,
    RecordFuture,
    TopicPartition,
)
from tidemq.client.config import ProducerOptions, ResultTimeout, resolve
from tidemq.client.metadata import MetadataCache, PartitionInfo
from tidemq.client.sequencing import EPOCH_MAX, PartitionSequencer, RequestGroup
from tidemq.client.transport import (
    BATCH_TYPE,
    LoopThread,
    Transport,
    UnrecognizedRefusal,
    backoff_seconds,
)
from tidemq.errors import (
    BrokerBusy,
    ClientClosed,
    FencedLeaderEpoch,
    Forbidden,
    InternalError,
    InvalidRequest,
    NotLeader,
    OutcomeUnknown,
    OutOfOrderSequence,
    ProducerFenced,
    RequestTimedOut,
    RequestTooLarge,
    TideError,
    UnknownLeaderEpoch,
    UnknownPartition,
    UnknownProducerId,
    UnknownTopic,
    error_for_code,
)
from tidemq.wire.produce import PRODUCE_TYPE, encode_produce

log = logging.getLogger("tidemq.client")
_PRODUCE_HEADERS = {"Content-Type": PRODUCE_TYPE}  # read only (HTTP when no channel)

# A broker learns of a new topic or partition from its next coordinator heartbeat, so a
# produce right after the topic was created may meet these: retry like not_leader.
_BROKER_NOT_READY = (UnknownTopic, UnknownPartition)
# The broker is behind the coordinator (it has not heard of the topic, partition, epoch
# or its leadership yet). It heartbeats at once when a request shows it, so it catches
# up within a coordinator round trip: the first backoff is short, not retry_backoff_ms.
_BROKER_BEHIND = (UnknownTopic, UnknownPartition, UnknownLeaderEpoch, NotLeader)
_BROKER_BEHIND_BACKOFF_MS = 5
# Errors that say the request went to the wrong place: refresh the metadata, and retry
# at once if it names another leader or epoch than the attempt that failed.
_MISROUTED = (NotLeader, FencedLeaderEpoch, UnknownLeaderEpoch, UnknownTopic, UnknownPartition)
# Refusals that come before the broker appends anything. Anything else (a timeout, a
# lost connection, not_leader or not_enough_replicas after the append, a 4xx whose code
# this client does not know: UnrecognizedRefusal, see _refused) leaves the outcome of a
# batch unknown.
_NOT_APPENDED = (
    InvalidRequest,
    RequestTooLarge,
    FencedLeaderEpoch,
    UnknownLeaderEpoch,
    OutOfOrderSequence,
    ProducerFenced,
    UnknownProducerId,
    UnknownTopic,
    UnknownPartition,
    BrokerBusy,
    Forbidden,
)


def to_bytes(value: object, what: str) -> bytes | None:
    """bytes stay, str is UTF-8 encoded, bytearray/memoryview are copied, None stays."""
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise InvalidRequest(f"{what} must be bytes or str, not {type(value).__name__}")


def normalize_headers(
    headers: Mapping[str, object] | Sequence[tuple[str, object]] | None,
) -> list[tuple[str, bytes]] | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: list[tuple[str, bytes]] = []
    for name, value in items:
        if not isinstance(name, str):
            raise InvalidRequest("header names must be str")
        encoded = to_bytes(value, "a header value")
        out.append((name, encoded if encoded is not None else b""))
    return out


class Producer:
    """Sends records to tidemq topics. Thread-safe; one background thread per producer.

    Options (keyword arguments; see docs/ARCHITECTURE.md): ``linger_ms=20``,
    ``batch_size=65536``, ``acks="all"`` (or 1, 0), ``retries``,
    ``delivery_timeout_ms=120000``, ``buffer_memory=32 MiB``, ``max_block_ms=60000``,
    ``request_timeout_ms=30000``, ``max_request_bytes=1 MiB``,
    ``enable_idempotence=True``, ``max_in_flight=5`` (batches of a partition
    unacknowledged at once, at most 5: what the broker remembers; without a producer
    id one request per partition is in flight), ``max_in_flight_bytes_per_broker=4 MiB``
    (batch bytes unacknowledged by one leader broker), plus the connection
    settings ``bootstrap``, ``ca_file``, ``cert_file``, ``key_file``, ``token``.
    """

    def __init__(self, **config: Any) -> None:
        self._connection, self._options = resolve(ProducerOptions, config)
        options = self._options
        self._closed = False
        self._thread = LoopThread("tidemq-producer")
        self._wake_event: asyncio.Event | None = None
        self._accumulator = RecordAccumulator(
            options.batch_size,
            options.buffer_memory,
            options.linger_ms,
            self._wake,
            max_in_flight_bytes=options.max_in_flight_bytes_per_broker,
        )
        self._max_block_s = options.max_block_ms / 1000
        self._produce_params = {"acks": options.acks_parameter}  # read only, every request
        self._producer_id = -1
        self._producer_epoch = -1
        self._identity_known = not options.enable_idempotence
        self._sequencers: dict[TopicPartition, PartitionSequencer] = {}
        self._recoveries: set[TopicPartition] = set()  # paused, waiting for in-flight to end
        self._closing = False
        self._stop_reason = _CLOSED  # what records the sender leaves behind are told
        self._records_failed = threading.Event()  # set once the sender's cleanup ran
        self._run_ended = threading.Event()  # set once _run ended, transport closed
        self._close_lock = threading.RLock()
        self._closing_thread: int | None = None  # the thread running close()
        self._close_done = threading.Event()
        self._run_task: asyncio.Task[None] | None = None
        try:
            self._thread.call(self._open(), 10.0)
        except BaseException:
            self._thread.stop()
            raise
        self._main = self._thread.submit(self._run())
        self._partition_counts = self._metadata.partition_counts

    async def _open(self) -> None:
        self._transport = Transport(self._connection)
        self._metadata = MetadataCache(self._transport, self._connection.metadata_max_age_ms)
        self._wake_event = asyncio.Event()

    def _wake(self) -> None:
        """Makes the sender run ``ready`` again. From a user thread it costs a
        cross-thread call (a write to the loop's wake-up pipe, and often a GIL handoff),
        so none is made while the event is still set: the sender clears it and only
        then scans the accumulator, so it sees what the caller appended before looking.
        (Not also "while an earlier wake is on its way": a flag saying so, raised
        before the cross-thread call, stayed up for ever when a signal's exception
        interrupted that call, and every later wake was skipped.)"""
        event = self._wake_event
        if event is None:
            return
        if self._thread.in_loop_thread:  # a completion: no cross-thread call needed
            event.set()
        elif not event.is_set():
            self._thread.call_soon(event.set)

    # -- public API -------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        headers: Mapping[str, object] | Sequence[tuple[str, object]] | None = None,
        partition: int | None = None,
    ) -> RecordFuture:
        """Queues one record; returns a future of its RecordMetadata. May block up to
        ``max_block_ms`` when the buffer is full or the topic is not known yet.
        """
        if type(value) is not bytes:
            value = to_bytes(value, "value")
        if key is not None and type(key) is not bytes:
            key = to_bytes(key, "key")
        count = self._partition_counts.get(topic)
        if count is None:
            count = self._learn_topic(topic)
        if partition is None:
            partition = -1 if key is None else crc32(key) % count  # type: ignore[arg-type]
        elif not 0 <= partition < count:
            raise UnknownPartition(f"{topic} has {count} partitions, not {partition}")
        return self._accumulator.append(
            topic,
            partition,
            count,
            key,  # type: ignore[arg-type]
            value,
            normalize_headers(headers) if headers else None,
            time.time_ns() // 1_000_000,
            self._max_block_s,
        )

    def _learn_topic(self, topic: str) -> int:
        if self._closed or self._main.done():  # closed, or the sender stopped
            raise ClientClosed(self._accumulator.closed_reason)
        info = self._thread.call(self._metadata.topic(topic), self._max_block_s)
        return len(info.partitions)

    def partitions_for(self, topic: str) -> int:
        """The topic's partition count (creating the topic if it does not exist)."""
        count = self._partition_counts.get(topic)
        return count if count is not None else self._learn_topic(topic)

    def flush(self, timeout: float | None = None) -> None:
        """Sends everything queued now (ignoring linger) and waits until each record is
        acknowledged or failed. Raises ResultTimeout if ``timeout`` seconds pass first.
        Not from a record's callback (it runs on the thread that completes records).
        """
        self._refuse_in_callback("flush")
        self._flush(timeout)

    def _flush(self, timeout: float | None) -> None:
        batches = self._accumulator.begin_flush()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            for batch in batches:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not batch.wait(remaining):
                    raise ResultTimeout(f"flush did not finish within {timeout} s")
        finally:
            self._accumulator.end_flush()

    def close(self, timeout: float | None = None) -> None:
        """Flushes (up to ``timeout``), then stops, within ``timeout`` plus a few
        seconds at most for the cleanup. After the timeout, records still queued fail
        with ClientClosed and those sent and not yet answered with OutcomeUnknown (a
        forced close: nothing more is waited for). Idempotent: while one close runs,
        another thread's waits for it (up to its own ``timeout``), and one from a
        callback or signal handler on the closing thread returns at once.
        """
        if self._thread.in_loop_thread:  # it would wait for itself
            raise InvalidRequest("close() cannot run inside a record callback")
        me = threading.get_ident()
        with self._close_lock:  # reentrant: a signal handler may close during close
            if self._closing_thread == me and not self._close_done.is_set():
                return  # a callback or signal handler inside this thread's close
            first = not self._closed
            if first:
                self._closing_thread = me  # before _closed: see the line above
            self._closed = True
        if not first:
            if self._closing_thread != me:
                self._close_done.wait(timeout)
            return
        try:
            self._close_now(timeout)
        finally:
            self._close_done.set()

    def _close_now(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        flushed = False
        try:
            self._flush(timeout)
            flushed = True
        except ResultTimeout:
            log.warning("producer closed with records still unacknowledged")
        finally:
            self._accumulator.close()
            self._accumulator.abort(ClientClosed(_CLOSED))  # callbacks: on this thread
            self._closing = True
            self._wake()
            # With nothing left the sender returns within a loop turn; it may still
            # wait for a producer id, or for a record another thread sent during the
            # flush: at most until the deadline (5 s without one), then forced.
            left = 5.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if flushed and self._sender_ended(left):
                self._thread.stop()
            else:
                self._force_stop()
                self._thread.stop(timeout_s=FORCED_STOP_S)

    def _sender_ended(self, timeout_s: float) -> bool:
        """Has _run ended, cleanup included? (Not ``_main``: a cancelled future of
        run_coroutine_threadsafe says so at once, before the task has run its cleanup.)"""
        return self._run_ended.wait(timeout_s)

    def _force_stop(self) -> None:
        """Cancels the sender on its loop, unless its cleanup (_stop_taking_records)
        already failed the records and only closes the transport. The cleanup fails
        what is in flight OutcomeUnknown and the rest ClientClosed, with callbacks on
        the loop thread. If the loop does not get there within FORCED_STOP_S (a
        callback blocks it), the records are failed from here, all OutcomeUnknown
        (conservative: some may never have been sent). Then the transport's close
        gets up to FORCED_STOP_S more."""
        self._thread.call_soon(self._cancel_sender)
        if not self._records_failed.wait(FORCED_STOP_S):
            log.warning("producer loop blocked; failing its records from close()")
            self._accumulator.fail_incomplete(
                OutcomeUnknown("the producer closed while its loop was blocked")
            )
        self._sender_ended(FORCED_STOP_S)

    def _cancel_sender(self) -> None:
        """On the loop thread, so that it cannot land inside the cleanup's transport
        close (which starts once the records are failed)."""
        task = self._run_task
        if task is not None and not self._records_failed.is_set():
            task.cancel()

    def _refuse_in_callback(self, what: str) -> None:
        """A callback runs on the loop thread, or on the closing thread while close()
        fails records: a flush there would wait for itself."""
        if self._thread.in_loop_thread or (
            self._closing_thread == threading.get_ident() and not self._close_done.is_set()
        ):
            raise InvalidRequest(f"{what}() cannot run inside a record callback")

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the sender (loop thread) -----------------------------------------------------

    async def _run(self) -> None:
        self._run_task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as group:
                try:
                    await self._sender(group)
                except Exception as exc:  # named before the group cancels the deliveries
                    self._stop_reason = _sender_stopped(exc)
                    raise
        except Exception as exc:
            log.exception("the producer's sender stopped")
            if self._stop_reason == _CLOSED:  # a delivery task's bug
                self._stop_reason = _sender_stopped(exc)
            raise
        finally:
            try:
                await self._stop_taking_records()
            finally:
                self._run_ended.set()

    async def _stop_taking_records(self) -> None:
        """The sender is gone (close, or a bug): no record may wait for ever. Each step
        runs even if an earlier one fails (a bug in shared bookkeeping can fail them)."""
        reason = self._stop_reason
        accumulator = self._accumulator
        accumulator.close(f"{reason}; the producer is closed")  # send() refuses now
        settled = False
        try:
            self._fail_unsettled()
            settled = True
        finally:
            try:
                # Queued, never sent. After close() this finds nothing left.
                accumulator.abort(ClientClosed(f"{reason}; the record was not sent"))
            finally:
                try:
                    # Drained but never stamped into a request (a bug between the two):
                    # not sent either, unless settling the requests above failed part
                    # way, when what is left may include sent records.
                    accumulator.fail_incomplete(
                        ClientClosed(f"{reason}; the record was not sent")
                        if settled
                        else OutcomeUnknown(f"{reason}; the record may have been written")
                    )
                finally:
                    self._records_failed.set()
                    await self._transport.close()

    def _stopped_error(self) -> ClientClosed:
        return ClientClosed(self._stop_reason)

    def _fail_unsettled(self) -> None:
        """The loop stops (close, or the sender died): every group no handler settled
        fails, so that no record's future waits for ever. A group that may have been
        sent (in flight, or an attempt's outcome unknown) fails with OutcomeUnknown,
        one only held back with ClientClosed (see _give_up)."""
        self._closing = True  # no recovery task starts from here on
        closed = self._stopped_error()
        for tp, sequencer in list(self._sequencers.items()):
            for request in sequencer.groups:
                if request.in_flight:
                    request.maybe_appended = True
            self._give_up_all(tp, sequencer, closed)

    async def _sender(self, group: asyncio.TaskGroup) -> None:
        accumulator = self._accumulator
        wake = self._wake_event
        if wake is None:  # pragma: no cover - set by _open
            raise InternalError("producer not opened")
        self._tasks = group
        loop = asyncio.get_running_loop()
        max_bytes = self._options.max_request_bytes
        identity_attempt = 0
        identity_since = time.monotonic()
        while True:
            wake.clear()
            if not self._identity_known and not self._closing:
                identity_attempt += 1
                if not await self._acquire_identity(identity_attempt):
                    if time.monotonic() - identity_since > self._options.delivery_timeout_ms / 1000:
                        # No producer id within delivery_timeout_ms: fail what waits.
                        accumulator.abort(RequestTimedOut("no producer id from the coordinator"))
                        identity_since = time.monotonic()
                    continue
            now = time.monotonic()
            ready = accumulator.ready(now, self._leader_of)
            drained: list[tuple[TopicPartition, RequestGroup]] = []
            for tp in ready.partitions:
                batches = accumulator.drain(tp, max_bytes, now, self._leader_of(tp))
                if batches:
                    # Stamped here, in drain order, with no await since the drain:
                    # sequence order is record order.
                    drained.append((tp, self._sequencer(tp).start(batches)))
            if drained:
                group.create_task(self._deliver_grouped(drained))
            if self._closing and accumulator.is_empty():
                return
            if ready.next_check is None:
                await wake.wait()
            elif not wake.is_set():
                # The linger timer just sets the event (cleared at the top of the loop):
                # a timer handle costs half of an asyncio.timeout, and this runs on
                # most turns.
                timer = loop.call_later(max(0.0, ready.next_check - now), wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()

    def _leader_of(self, tp: TopicPartition) -> str | None:
        """The leader broker the cache names for ``tp`` (None if unknown): the
        accumulator's unit of "in flight" (Nagle per broker) and of bytes in flight."""
        info = self._metadata.cached(tp[0])
        if info is None or tp[1] >= len(info.partitions):
            return None
        return info.partitions[tp[1]].leader_url

    def _sequencer(self, tp: TopicPartition) -> PartitionSequencer:
        sequencer = self._sequencers.get(tp)
        if sequencer is None:
            sequencer = PartitionSequencer(self._producer_epoch, self._producer_id)
            self._sequencers[tp] = sequencer
        return sequencer

    async def _deliver_grouped(self, drained: list[tuple[TopicPartition, RequestGroup]]) -> None:
        """First attempt: one multi-partition request per leader broker (wire/produce.py).

        A partition whose leader is unknown, whose entry failed, or whose whole request
        failed goes to ``_failed``: it is paused and resent in order by ``_recover``.
        A partition with an earlier group not sent yet (an earlier delivery waits for
        another topic's metadata) is sent after it, by ``_deliver_in_turn``.
        """
        by_leader: dict[str, list[tuple[TopicPartition, RequestGroup, int]]] = {}
        in_turn: list[tuple[TopicPartition, RequestGroup]] = []
        looked = 0
        try:
            for tp, request in drained:
                looked += 1
                try:
                    info = await self._metadata.leader(*tp)
                except TideError as error:
                    self._lookup_failed(tp, request, error)
                    continue
                self._place(by_leader, tp, request, info)
            # Each leader's request in a task of its own, created in drain order, and
            # none sent inline: tasks start in the order they were made, so a
            # partition's batches reach its leader in drain order even when two
            # deliveries resume in one loop turn (both waited for one metadata lookup).
            # Sending one request inline let a later delivery's batch overtake an
            # earlier one's (the leader then holds it back up to its reorder wait). The
            # tasks belong to the producer's group: a failure still stops the producer,
            # and one cancelled before its first step leaves its groups to
            # _fail_unsettled, as gather's children did.
            for url, items in by_leader.items():
                now = []
                for item in items:
                    tp, request, _ = item
                    if self._sequencer(tp).undispatched_before(request):
                        in_turn.append((tp, request))
                    else:
                        now.append(item)
                if now:
                    self._send_or_join(url, now)
            if in_turn:
                self._tasks.create_task(self._deliver_in_turn(in_turn))
        except asyncio.CancelledError:  # close() while a leader lookup waits: none sent
            unsent = [(tp, request) for items in by_leader.values() for tp, request, _ in items]
            unsent += drained[looked - 1 :]
            closed = self._stopped_error()
            for tp, request in unsent:
                if request in self._sequencer(tp).groups:
                    self._give_up(tp, request, closed)
            raise
        finally:
            # Every group this delivery is done with counts as sent (its request task
            # is made), gone to recovery or given up; not those handed to the send in
            # turn, which marks its own.
            handed_on = {id(request) for _, request in in_turn}
            for _, request in drained:
                if id(request) not in handed_on:
                    request.mark_dispatched()

    def _place(
        self,
        by_leader: dict[str, list[tuple[TopicPartition, RequestGroup, int]]],
        tp: TopicPartition,
        request: RequestGroup,
        info: PartitionInfo,
    ) -> None:
        """Adds the group to its leader's request, or sends it to recovery (no leader)."""
        if info.leader_url is None:
            self._lookup_failed(tp, request, None)
        else:
            by_leader.setdefault(info.leader_url, []).append((tp, request, info.leader_epoch))

    def _lookup_failed(
        self, tp: TopicPartition, request: RequestGroup, error: TideError | None
    ) -> None:
        """No leader for a group not sent yet (``error`` None) or its lookup failed: it
        goes to recovery, never sent, and no longer holds later groups back."""
        if error is None:
            error = NotLeader(f"{tp[0]}/{tp[1]} has no leader")
        self._failed(tp, request, error, sent=False)
        request.mark_dispatched()

    async def _deliver_in_turn(self, in_turn: list[tuple[TopicPartition, RequestGroup]]) -> None:
        """Sends a delivery's groups whose partitions have earlier groups not sent yet
        (an earlier delivery waits for another topic's metadata), each once those are
        sent: sent first, a later group would reach the leader before them, which
        holds it up to its reorder wait (or the partition is resent). Only these
        partitions wait, each only for its own earlier groups; those that become free
        together go together, one request per leader."""
        pending = in_turn
        try:
            while pending:
                free, waits, held = [], [], []
                for tp, request in pending:
                    sequencer = self._sequencer(tp)
                    if request not in sequencer.groups:
                        continue  # given up meanwhile
                    earlier = sequencer.undispatched_before(request)
                    if earlier:
                        waits.append(earlier[-1].sent())
                        held.append((tp, request))
                    else:
                        free.append((tp, request))
                pending = held
                if not free:
                    if waits:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    continue
                by_leader: dict[str, list[tuple[TopicPartition, RequestGroup, int]]] = {}
                for tp, request in free:
                    if request not in self._sequencer(tp).groups:
                        continue
                    try:
                        info = await self._metadata.leader(*tp)
                    except TideError as error:
                        self._lookup_failed(tp, request, error)
                        continue
                    self._place(by_leader, tp, request, info)
                for url, items in by_leader.items():
                    self._send_or_join(url, items)
        except asyncio.CancelledError:
            for tp, request in in_turn:
                if request in self._sequencer(tp).groups and not request.dispatched:
                    self._give_up(tp, request, self._stopped_error())
            raise
        finally:
            for _, request in in_turn:
                request.mark_dispatched()

    def _send_or_join(
        self, url: str, items: list[tuple[TopicPartition, RequestGroup, int]]
    ) -> None:
        """Makes the first request of ``items`` (marked dispatched). A group whose
        partition is being recovered with an earlier group waiting for its resend joins
        that recovery instead, to be resent after it in order: sent now it would reach
        the leader first and be held up to its reorder wait, then refused."""
        send = []
        for item in items:
            tp, request, _ = item
            sequencer = self._sequencer(tp)
            if sequencer.recovering and any(
                not group.in_flight for group in sequencer.groups if group is not request
            ):
                request.in_flight = False
                request.mark_dispatched()
                self._maybe_recover(tp, sequencer)
            else:
                send.append(item)
        if send:
            self._tasks.create_task(self._deliver_to_leader(url, send))
            for _, request, _ in send:
                request.attempted = True
                request.mark_dispatched()

    async def _deliver_to_leader(
        self, leader_url: str, items: list[tuple[TopicPartition, RequestGroup, int]]
    ) -> None:
        try:
            entries = [(tp[0], tp[1], epoch, request.payload()) for tp, request, epoch in items]
            answer = await self._transport.request_json(
                "POST",
                leader_url + "/v1/produce",
                params=self._produce_params,
                data=encode_produce(entries),
                headers=_PRODUCE_HEADERS,
            )
            results = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(results, list) or len(results) != len(items):
                raise InternalError("malformed multi-partition produce answer")
        except asyncio.CancelledError:
            for _, request, _ in items:  # every one first: the request may have landed
                request.maybe_appended = True
            for tp, request, _ in items:
                if request in self._sequencer(tp).groups:
                    self._give_up(tp, request, self._stopped_error())
            raise
        except TideError as error:
            log.debug("produce to %s failed (%s); resending per partition", leader_url, error)
            for tp, request, _ in items:
                self._failed(tp, request, error)
            return
        except Exception as exc:  # a bug: resend (recovery fails the records if it recurs)
            log.exception("produce to %s failed unexpectedly", leader_url)
            for tp, request, _ in items:
                self._failed(tp, request, InternalError(f"client error: {exc!r}"))
            return
        for (tp, request, _), result in zip(items, results, strict=True):
            outcome = _entry_outcome(result)
            if not isinstance(outcome, TideError):
                try:
                    offsets = _batch_offsets(outcome, request, self._producer_id >= 0)
                except InternalError as error:  # appended or not: resend to learn it
                    outcome = error
            if isinstance(outcome, TideError):
                self._failed(tp, request, outcome)
            else:
                self._succeeded(tp, request, offsets)

    def _succeeded(self, tp: TopicPartition, request: RequestGroup, offsets: list[int]) -> None:
        for batch, base_offset in zip(request.batches, offsets, strict=True):
            batch.complete(base_offset, None)
        self._settle(tp, request)

    def _give_up(self, tp: TopicPartition, request: RequestGroup, error: TideError) -> None:
        """The group fails for good: its records get ``error``.

        If the broker definitely did not append it (it refused the request before
        appending), later groups of the partition cannot have been appended either (the
        broker appends strictly in sequence): they are renumbered in a new epoch. If the
        outcome is unknown (a timeout, a lost answer, a failure after the append), it may
        have landed, and so may the later groups already sent: renumbering them would
        write them twice. Then they fail with the same error, and new groups continue the
        sequence; should the given-up group not have landed after all, the broker answers
        the next one with a gap, a definite refusal, and only then the epoch moves on.

        "Definitely not appended" needs every attempt of the group refused before the
        append: a group whose first attempt lost its answer and whose last resend was
        refused (broker busy, an epoch not known yet during a failover) may be in the
        log, and so may the groups sent after it."""
        sequencer = self._sequencer(tp)
        not_appended = _refused(error) and not request.maybe_appended
        held = [request]
        if not not_appended:
            held += [
                g for g in sequencer.groups if g is not request and not g.in_flight and g.attempted
            ]
        for group in held:
            outcome = _outcome_of(group, error, request.maybe_appended)
            for batch in group.batches:
                batch.complete(-1, outcome)
        if not_appended:
            sequencer.reset_needed = True
        for group in held:
            self._settle(tp, group)

    def _settle(self, tp: TopicPartition, request: RequestGroup) -> None:
        sequencer = self._sequencer(tp)
        request.in_flight = False
        sequencer.settle(request)
        self._accumulator.complete(tp, request.batches)
        self._maybe_recover(tp, sequencer)

    def _failed(
        self, tp: TopicPartition, request: RequestGroup, error: TideError, sent: bool = True
    ) -> None:
        """A first attempt failed: pause the partition; resend once nothing is in flight."""
        log.debug("produce to %s/%s: %s; resending in order", tp[0], tp[1], error)
        if sent and not _refused(error):
            request.maybe_appended = True
        if not isinstance(error, OutOfOrderSequence | UnknownProducerId):
            self._metadata.invalidate(tp[0])
        request.in_flight = False
        sequencer = self._sequencer(tp)
        if not sequencer.recovering:
            sequencer.recovering = True
            self._accumulator.pause(tp)
            self._recoveries.add(tp)
        self._maybe_recover(tp, sequencer)

    def _maybe_recover(self, tp: TopicPartition, sequencer: PartitionSequencer) -> None:
        if self._closing:  # the task group may be shutting down: _fail_unsettled settles
            return
        if tp in self._recoveries and sequencer.in_flight == 0:
            self._recoveries.discard(tp)
            recover = self._recover(tp, sequencer)
            try:
                self._tasks.create_task(recover)
            except RuntimeError:  # the task group is shutting down (a bug elsewhere)
                recover.close()
                self._closing = True  # _fail_unsettled settles the partition

    async def _recover(self, tp: TopicPartition, sequencer: PartitionSequencer) -> None:
        """Resends the partition's held groups one at a time, oldest first."""
        try:
            while True:
                if sequencer.reset_needed:
                    await self._reset(sequencer)
                if not sequencer.groups:
                    return
                request = sequencer.groups[0]
                request.in_flight = True
                request.attempted = True
                try:
                    await self._resend(tp, request, sequencer)
                except asyncio.CancelledError:
                    request.maybe_appended = True  # cancelled while a resend was out
                    raise
                finally:
                    request.in_flight = False
        except asyncio.CancelledError:
            self._give_up_all(tp, sequencer, self._stopped_error())
            raise
        except Exception as exc:  # a bug: fail the records rather than the producer
            log.exception("resending to %s/%s failed unexpectedly", *tp)
            self._give_up_all(tp, sequencer, InternalError(f"client error: {exc!r}"))
        finally:
            sequencer.recovering = False
            self._accumulator.resume(tp)

    async def _reset(self, sequencer: PartitionSequencer) -> None:
        """A new producer epoch for the partition; once its epochs (an i16) are used
        up, a new producer id from the coordinator (a TideError if it gives none)."""
        if not sequencer.epochs_exhausted:
            sequencer.reset()
            return
        answer = await self._transport.coordinator("POST", "/v1/producers", json_body={})
        try:
            producer_id, epoch = _producer_identity(answer)
        except ValueError as exc:
            raise InternalError(str(exc)) from exc
        log.info("producer epochs used up on a partition: continuing as producer %d", producer_id)
        sequencer.reset(producer_id, epoch)

    def _give_up_all(
        self, tp: TopicPartition, sequencer: PartitionSequencer, error: TideError
    ) -> None:
        """Every held group fails with ``error``. One give-up with an unknown outcome
        settles the later held groups too: skip those already gone."""
        for request in list(sequencer.groups):
            if request in sequencer.groups:
                self._give_up(tp, request, error)

    async def _resend(
        self, tp: TopicPartition, request: RequestGroup, sequencer: PartitionSequencer
    ) -> None:
        """Sends one group alone until it settles (or needs a reset first)."""
        topic, partition = tp
        options = self._options
        deadline = request.batches[0].created + options.delivery_timeout_ms / 1000
        attempt = 0
        reset_done = False
        route: tuple[str | None, int] | None = None  # where the last attempt went
        while True:
            sent = False
            try:
                info = await self._metadata.leader(topic, partition)
                route = (info.leader_url, info.leader_epoch)
                sent = True
                answer = await self._transport.request_json(
                    "POST",
                    f"{info.leader_url}/v1/topics/{topic}/partitions/{partition}/records",
                    params={"acks": options.acks_parameter, "leader_epoch": str(info.leader_epoch)},
                    data=request.payload(),
                    headers={"Content-Type": BATCH_TYPE},
                )
                # InternalError if malformed
                offsets = _batch_offsets(answer, request, self._producer_id >= 0)
            except (UnknownProducerId, OutOfOrderSequence) as error:
                # Nothing earlier is outstanding. unknown_producer_id: the broker forgot
                # this producer. out_of_order_sequence: a gap left by groups given up
                # with an unknown outcome that did not land; only if no attempt of this
                # group can land later either. Then a new epoch from sequence 0 (once;
                # a second time is a real failure); else it fails.
                if not reset_done and not request.maybe_appended:
                    log.info("%s/%s: %s; starting a new producer epoch", topic, partition, error)
                    request.in_flight = False
                    await self._reset(sequencer)
                    request.in_flight = True
                    reset_done = True
                    continue
                self._give_up(tp, request, error)
                return
            except TideError as error:
                if sent and not _refused(error):
                    request.maybe_appended = True
                attempt += 1
                self._metadata.invalidate(topic)
                delay = await self._retry_delay(tp, error, route, attempt)
                if (
                    not (error.retriable or isinstance(error, _BROKER_NOT_READY))
                    or attempt > options.retries
                    or time.monotonic() + delay > deadline
                    or self._closing
                ):
                    self._give_up(tp, request, error)
                    return
                log.debug("produce to %s/%s: %s; retry %d", topic, partition, error, attempt)
                if delay:
                    await asyncio.sleep(delay)
                continue
            self._succeeded(tp, request, offsets)
            return

    async def _retry_delay(
        self,
        tp: TopicPartition,
        error: TideError,
        route: tuple[str | None, int] | None,
        attempt: int,
    ) -> float:
        """No wait when fresh metadata names another leader or epoch than the failed
        attempt used (the leader moved: the new one is worth trying now); else the
        backoff, short while the broker is only behind the coordinator."""
        if isinstance(error, _MISROUTED) and route is not None:
            try:
                info = await self._metadata.leader(*tp)  # refreshes: invalidated
            except TideError:
                pass
            else:
                if (info.leader_url, info.leader_epoch) != route:
                    return 0.0
        connection = self._connection
        base_ms = connection.retry_backoff_ms
        if isinstance(error, _BROKER_BEHIND):
            base_ms = min(base_ms, _BROKER_BEHIND_BACKOFF_MS)
        return backoff_seconds(attempt, base_ms, connection.retry_backoff_max_ms)

    async def _acquire_identity(self, attempt: int) -> bool:
        """A producer id for idempotence; without one (old coordinator) send plain.
        False: not yet (retriable error; backed off), try again."""
        try:
            answer = await self._transport.coordinator("POST", "/v1/producers", json_body={})
            self._producer_id, self._producer_epoch = _producer_identity(answer)
        except TideError as error:
            if error.retriable:
                connection = self._connection
                log.debug("no producer id yet (%s); retrying", error)
                await asyncio.sleep(
                    backoff_seconds(
                        attempt, connection.retry_backoff_ms, connection.retry_backoff_max_ms
                    )
                )
                return False
            log.warning("no producer id (%s): sending without idempotence", error)
        except ValueError as exc:
            log.warning("%s: sending without idempotence", exc)
        if self._producer_id >= 0:
            self._accumulator.in_flight_batches_max = self._options.max_in_flight
        self._identity_known = True
        return True


_CLOSED = "the producer closed before delivery"
# How long a forced close waits for the loop to fail the records, and then to stop.
FORCED_STOP_S = 1.0


def _sender_stopped(exc: BaseException) -> str:
    """The reason a sender's bug gives: the first error inside any exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"the producer's sender stopped ({repr(exc)[:200]})"


def _refused(error: TideError) -> bool:
    """Did the broker refuse the request before appending anything?"""
    return isinstance(error, _NOT_APPENDED) and not isinstance(error, UnrecognizedRefusal)


def _producer_identity(answer: Any) -> tuple[int, int]:
    """(producer id, epoch) of a ``POST /v1/producers`` answer; ValueError unless the
    id is >= 0 and the epoch fits a batch header's (0 to EPOCH_MAX: a larger one would
    fail every batch it stamps)."""
    try:
        producer_id = int(answer["producer_id"])
        epoch = int(answer.get("producer_epoch", 0))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed producer id answer: {exc!r}") from exc
    if producer_id < 0 or not 0 <= epoch <= EPOCH_MAX:
        raise ValueError(f"malformed producer id answer: id {producer_id}, epoch {epoch}")
    return producer_id, epoch


def _entry_outcome(result: object) -> dict[str, Any] | TideError:
    """One entry of a multi-partition produce answer: its offsets or its error."""
    if not isinstance(result, dict):
        return InternalError("malformed produce entry")
    if isinstance(result.get("base_offset"), int):
        return result
    error = result.get("error")
    if isinstance(error, dict):
        return error_for_code(str(error.get("code")), str(error.get("message")))
    return InternalError("malformed produce entry")


def _batch_offsets(answer: object, request: RequestGroup, idempotent: bool) -> list[int]:
    """Each batch's base offset: ``batch_base_offsets`` when the broker gives them
    (idempotent brokers: a retried batch keeps its original offsets), else
    consecutive from ``base_offset``; -1 when unknown (acks=0 to an old broker, or a
    batch appended before that the broker no longer places). InternalError for an
    answer whose offsets are not integers >= -1, and, for an ``idempotent`` producer,
    for one that places no batch at all (an empty body, a null or negative
    ``base_offset``): nothing says it was written, so the outcome is unknown and the
    batch is resent (a duplicate is answered with its offsets)."""
    if isinstance(answer, dict):
        listed = answer.get("batch_base_offsets")
        if isinstance(listed, list) and len(listed) == len(request.batches):
            if not all(type(offset) is int and offset >= -1 for offset in listed):
                raise InternalError(f"malformed produce answer: batch_base_offsets {listed!r}")
            return listed
        base = answer.get("base_offset")
        if isinstance(base, int) and base >= 0:
            offsets = []
            for batch in request.batches:
                offsets.append(base)
                base += batch.count
            return offsets
    if idempotent:
        raise InternalError(f"malformed produce answer: no offsets in {answer!r:.200}")
    return [-1] * len(request.batches)


def _outcome_of(group: RequestGroup, error: TideError, given_up_maybe: bool) -> TideError:
    """What a group failed with ``error`` by a give-up reports. Whatever the error says
    (a refusal says "not written", a timeout only of itself, ClientClosed "closed
    before delivery"), the group may be in the log when an attempt of it, or of the
    group given up (``given_up_maybe``: the held groups after it may have landed with
    it), had an unknown outcome: the application must not take it for unwritten and
    send it again. A held group marked maybe appended used to get the raw error when
    the group given up was not (ClientClosed at close: a duplicate if resent)."""
    if not (group.maybe_appended or given_up_maybe) or isinstance(error, OutcomeUnknown):
        return error
    outcome = OutcomeUnknown(
        f"{len(group.batches)} batch(es) may have been appended (an earlier attempt's "
        f"outcome is unknown); then {error.code}: {error.message}"
    )
    outcome.__cause__ = error
    return outcome
