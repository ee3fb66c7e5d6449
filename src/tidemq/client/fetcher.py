"""The consumer's fetching: one long-poll per leader broker, not one per partition.

Every owned, active partition has a :class:`PartitionFetch` (its next offset, its
leader and leader epoch as the metadata last said). A partition is either

* *placed*: ``leader_url`` is set, and the :class:`BrokerFetcher` of that broker
  fetches it; or
* *being placed*: a short *placer* task finds its start offset (committed offset,
  else ``auto_offset_reset``) and its leader, after a back-off when it comes from an
  error, then hands it to its broker's fetcher.

A broker fetcher loops: take every placed partition of its broker that is not parked
(an undecodable record) and whose buffer is below ``max_partition_buffer_bytes``,
send ``POST {broker}/v1/fetch`` with each one's offset, leader epoch and byte budget,
wait for the answer, and hand each partition's records to the
:class:`~tidemq.client.fetch_buffer.FetchBuffer` in one locked step. An error entry
moves only its partition out (``not_leader``, fenced or unknown epoch, anything
retriable: refresh metadata, back off, place again, possibly under another broker;
``offset_out_of_range``: reset), so the broker's other partitions are fetched again
at once. A failed request moves every partition of that request out the same way.

Promptness. A partition that becomes fetchable while its broker's long-poll is in
flight without it (assigned, placed after a leader move, sought, resumed after
back-pressure) *kicks* the fetcher, which cancels the long-poll and sends a new one
that includes it. Cancelling closes that HTTP connection (HTTP/1.1 cannot take a
request back), which costs a new TLS handshake: cheap next to waiting out
``fetch_wait_ms``, and these events are rare next to records. A partition resumed
after back-pressure waits up to ``RESUME_GRACE_S`` for the request in flight first
(see :meth:`Fetchers.resume`). A partition that
stops being fetchable (revoked, sought, paused) does not cancel anything: the
answer for it is dropped, because each answer entry is applied only if the
partition's ``PartitionFetch`` is still the very one the request was made for and
its offset has not moved.

Invariants: only the loop thread touches this state; at most one request in flight
per broker; nothing is put into the buffer for a partition that was stopped (the
check and the put happen without an ``await`` between them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import msgspec

from tidemq.client.config import ConnectionConfig, ConsumerOptions
from tidemq.client.fetch_buffer import FetchBuffer, Message, TopicPartition
from tidemq.client.metadata import MetadataCache, PartitionInfo
from tidemq.client.transport import Transport, backoff_seconds
from tidemq.errors import (
    CorruptBatch,
    CorruptRecord,
    Forbidden,
    InvalidRequest,
    OffsetOutOfRange,
    TideError,
    Unavailable,
    error_for_code,
)
from tidemq.wire.batch import FetchedRecords
from tidemq.wire.batch import decode_fetch as decode_records
from tidemq.wire.fetch import FETCH_TYPE, FetchEntry, FetchPartition, FetchRequest
from tidemq.wire.fetch import decode_fetch as decode_entries

log = logging.getLogger("tidemq.client")

PARTITION_MAX_BYTES = 8 * 1024 * 1024  # FetchPartition.max_bytes limit (protocol)
REQUEST_MAX_BYTES = 64 * 1024 * 1024  # FetchRequest.max_bytes limit (protocol)
RESUME_GRACE_S = 0.05  # see Fetchers.resume

StartPosition = Callable[[TopicPartition, int | None], Awaitable[int]]
Chunk = tuple[TopicPartition, list[Message], int, TideError | None]


class PartitionFetch:
    """Where one owned partition's fetching stands (loop thread only)."""

    __slots__ = ("attempt", "leader_epoch", "leader_url", "offset", "parked", "tp")

    def __init__(self, tp: TopicPartition, offset: int | None) -> None:
        self.tp = tp
        self.offset = offset  # next offset to fetch; None until the start is known
        self.leader_url: str | None = None  # None: being placed
        self.leader_epoch = -1
        self.attempt = 0  # consecutive failures, for the back-off
        self.parked = False  # an undecodable record: nothing more until a seek


class BrokerFetcher:
    """One broker's fetch loop: its task, what it has in flight, its kick."""

    __slots__ = ("changed", "in_flight", "kicked", "rotation", "task", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.changed = asyncio.Event()  # wakes the loop while it has nothing to fetch
        self.in_flight: dict[TopicPartition, PartitionFetch] = {}  # non-empty: awaiting
        self.kicked = False  # the loop task was cancelled to re-issue its request
        self.rotation = 0  # which partition leads the next request (fair byte budget)
        self.task: asyncio.Task[None] | None = None


def corrupt_record_error(topic: str, partition: int, fetched: FetchedRecords) -> CorruptRecord:
    bad = fetched.undecodable
    if bad is None:  # pragma: no cover - callers check
        raise ValueError("nothing undecodable")
    return CorruptRecord(
        f"{topic}/{partition} offset {bad.offset}: the record cannot be decoded "
        f"({bad.reason}); skip it with consumer.seek({topic!r}, {partition}, "
        f"{bad.offset + 1}), or its batch with seek to {bad.next_batch_offset}",
        topic=topic,
        partition=partition,
        offset=bad.offset,
        next_batch_offset=bad.next_batch_offset,
    )


def fetch_request(
    partitions: list[PartitionFetch], wait_ms: int, partition_max_bytes: int
) -> FetchRequest:
    """The body of one broker's ``POST /v1/fetch``."""
    per_partition = min(partition_max_bytes, PARTITION_MAX_BYTES)
    return FetchRequest(
        partitions=[
            FetchPartition(
                state.tp[0], state.tp[1], state.offset or 0, state.leader_epoch, per_partition
            )
            for state in partitions
        ],
        wait_ms=wait_ms,
        max_bytes=min(per_partition * len(partitions), REQUEST_MAX_BYTES),
    )


def decode_answer(body: bytes) -> list[FetchEntry]:
    """The entries of a fetch answer; a framing that does not fit is the broker's
    fault, retriable (it is not the application's bad request)."""
    try:
        return decode_entries(body)
    except CorruptBatch as error:
        raise Unavailable(f"malformed fetch answer: {error}") from error


class Fetchers:
    """Every fetch of one consumer: partition states, placers, one loop per broker."""

    def __init__(
        self,
        *,
        transport: Transport,
        metadata: MetadataCache,
        buffer: FetchBuffer,
        options: ConsumerOptions,
        connection: ConnectionConfig,
        group: asyncio.TaskGroup,
        closing: asyncio.Event,
        session_alive: asyncio.Event,
        start_position: StartPosition,
        fetched_once: set[TopicPartition],
    ) -> None:
        self._transport = transport
        self._metadata = metadata
        self._buffer = buffer
        self._options = options
        self._connection = connection
        self._group = group
        self._closing = closing
        self._session_alive = session_alive
        self._start_position = start_position
        self._fetched_once = fetched_once
        self.partitions: dict[TopicPartition, PartitionFetch] = {}
        self._placers: dict[TopicPartition, asyncio.Task[None]] = {}
        self.brokers: dict[str, BrokerFetcher] = {}
        self._routes_seen: dict[str, float] = {}  # topic -> metadata fetched_at applied
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        # topic -> (failed refreshes in a row, monotonic time before which none is tried)
        self._refresh_backoff: dict[str, tuple[int, float]] = {}
        self._request_headers = {"Accept": FETCH_TYPE, "Content-Type": "application/json"}

    # -- what the consumer calls --------------------------------------------------------

    def start(self, tp: TopicPartition, committed: int | None, offset: int | None) -> None:
        """Fetches ``tp`` from ``offset`` (a seek), else from its start position."""
        state = PartitionFetch(tp, offset)
        self.partitions[tp] = state
        self._place(state, committed, 0.0)

    async def stop(self, partitions: Iterable[TopicPartition]) -> None:
        """Nothing more is fetched or buffered for ``partitions`` once this returns."""
        tasks = []
        for tp in list(partitions):
            self.partitions.pop(tp, None)
            task = self._placers.pop(tp, None)
            if task is not None:
                task.cancel()
                tasks.append(task)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        """Their buffers dropped below the bound: fetch them again. At once if their
        broker has no request in flight; else with its next request, or after
        ``RESUME_GRACE_S`` if that request is still out (then it is a parked long-poll:
        cancel it). Why the grace: a busy broker answers within it anyway, and
        cancelling an answer that is on its way would throw it away and cost a new
        connection each time back-pressure lets go (the partition still holds nearly
        ``max_partition_buffer_bytes`` for the application meanwhile)."""
        loop = asyncio.get_running_loop()
        for tp in partitions:
            state = self.partitions.get(tp)
            if state is None or state.leader_url is None:
                continue
            fetcher = self.brokers.get(state.leader_url)
            if fetcher is None or not fetcher.in_flight:
                self._kick(state)
            else:
                loop.call_later(RESUME_GRACE_S, self._kick_if_current, state)

    def _kick_if_current(self, state: PartitionFetch) -> None:
        if self.partitions.get(state.tp) is state:
            self._kick(state)

    async def finish(self) -> None:
        """Closing: lets each broker's long-poll end (so its TLS connection closes
        cleanly with the session), then cancels what is left."""
        self._session_alive.set()
        for fetcher in self.brokers.values():
            fetcher.changed.set()
        tasks = [f.task for f in self.brokers.values() if f.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self._options.fetch_wait_ms / 1000 + 1)
        await self.stop(list(self.partitions))
        tasks += self._refreshing.values()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- placing: start offset and leader -----------------------------------------------

    def _place(self, state: PartitionFetch, committed: int | None, delay_s: float) -> None:
        state.leader_url = None
        previous = self._placers.pop(state.tp, None)
        if previous is not None:  # pragma: no cover - a placed partition has no placer
            previous.cancel()
        self._placers[state.tp] = self._group.create_task(self._placer(state, committed, delay_s))

    async def _placer(self, state: PartitionFetch, committed: int | None, delay_s: float) -> None:
        tp = state.tp
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            if state.offset is None:
                state.offset = await self._start_position(tp, committed)
                self._buffer.seek(tp, state.offset)
            info = await self._leader(tp)
        finally:
            if self._placers.get(tp) is asyncio.current_task():
                del self._placers[tp]
        if self.partitions.get(tp) is not state or info.leader_url is None:
            return
        state.leader_url = info.leader_url
        state.leader_epoch = info.leader_epoch
        self._kick(state)

    async def _leader(self, tp: TopicPartition) -> PartitionInfo:
        topic, partition = tp
        attempt = 0
        while True:
            try:
                info = await self._metadata.leader(topic, partition)
                if info.leader_url is None:  # pragma: no cover - leader() raises
                    raise Unavailable(f"{topic}/{partition} has no leader")
                return info
            except TideError as error:
                if isinstance(error, Forbidden | InvalidRequest):
                    raise  # retrying cannot help: poll() raises it (background failure)
                attempt += 1
                self._metadata.invalidate(topic)
                log.debug("leader of %s/%s: %s; retry %d", topic, partition, error, attempt)
                await asyncio.sleep(self._backoff_s(attempt))

    def _backoff_s(self, attempt: int) -> float:
        connection = self._connection
        return backoff_seconds(
            attempt, connection.retry_backoff_ms, connection.retry_backoff_max_ms
        )

    def _retry_elsewhere(self, state: PartitionFetch, error: TideError) -> None:
        """A routing or connection error: refresh metadata, back off, place again."""
        if isinstance(error, Forbidden | InvalidRequest):
            raise error  # retrying cannot help: poll() raises it (background failure)
        state.attempt += 1
        self._metadata.invalidate(state.tp[0])
        log.debug("fetch %s/%s: %s; retry %d", *state.tp, error, state.attempt)
        self._place(state, None, self._backoff_s(state.attempt))

    # -- one loop per broker ------------------------------------------------------------

    def _kick(self, state: PartitionFetch) -> None:
        """``state`` may be fetched now: wake its broker's loop, which cancels a
        long-poll in flight that does not include it."""
        url = state.leader_url
        if url is None or self._closing.is_set():
            return
        fetcher = self.brokers.get(url)
        if fetcher is None:
            fetcher = self.brokers[url] = BrokerFetcher(url)
            fetcher.task = self._group.create_task(self._broker_loop(fetcher))
        if not fetcher.in_flight:
            fetcher.changed.set()
        elif fetcher.in_flight.get(state.tp) is not state and not fetcher.kicked:
            # The loop awaits the request itself (no extra task on the hot path), so
            # a kick cancels the loop task; it tells this from a real cancel by
            # ``kicked`` and carries on.
            fetcher.kicked = True
            if fetcher.task is not None:
                fetcher.task.cancel()

    def _follow_metadata(self) -> None:
        """Moves placed partitions whose leader changed in newer metadata (looking only
        at topics whose metadata changed since the last look), and refreshes metadata
        older than ``metadata_max_age_ms`` in the background: a deposed leader that
        does not know it yet answers no error, only no new data."""
        max_age_s = self._connection.metadata_max_age_ms / 1000
        for topic in {state.tp[0] for state in self.partitions.values()}:
            info = self._metadata.cached(topic)
            if info is None:
                continue
            if time.monotonic() - info.fetched_at > max_age_s:
                self._refresh_soon(topic)
            if self._routes_seen.get(topic) == info.fetched_at:
                continue
            self._routes_seen[topic] = info.fetched_at
            for state in list(self.partitions.values()):
                if state.tp[0] == topic and state.leader_url is not None:
                    self._reroute(state, info.partitions)

    def _reroute(self, state: PartitionFetch, partitions: tuple[PartitionInfo, ...]) -> None:
        if state.tp[1] >= len(partitions):
            return
        entry = partitions[state.tp[1]]
        if entry.leader_url is None or entry.leader_epoch < state.leader_epoch:
            return  # no leader right now, or older news: an error will tell
        state.leader_epoch = entry.leader_epoch
        if entry.leader_url != state.leader_url:
            state.leader_url = entry.leader_url
            self._kick(state)

    def _refresh_soon(self, topic: str) -> None:
        """A background refresh, unless one runs or the last ones failed and their
        back-off is not over (else every broker loop round, so every fetch answer,
        asked a failing coordinator again at once)."""
        backoff = self._refresh_backoff.get(topic)
        if topic in self._refreshing or (backoff and time.monotonic() < backoff[1]):
            return
        self._refreshing[topic] = self._group.create_task(self._refresh(topic))

    async def _refresh(self, topic: str) -> None:
        try:
            await self._metadata.refresh([topic])
            self._refresh_backoff.pop(topic, None)
        except TideError as error:
            failures = self._refresh_backoff.get(topic, (0, 0.0))[0] + 1
            retry_at = time.monotonic() + self._backoff_s(failures)
            self._refresh_backoff[topic] = (failures, retry_at)
            log.debug("metadata of %s: %s; retry %d", topic, error, failures)
        finally:
            del self._refreshing[topic]
        self._follow_metadata()

    def _fetchable(self, url: str) -> list[PartitionFetch]:
        has_space = self._buffer.has_space
        return [
            state
            for state in self.partitions.values()
            if state.leader_url == url and not state.parked and has_space(state.tp)
        ]

    async def _broker_loop(self, fetcher: BrokerFetcher) -> None:
        closing = self._closing
        while not closing.is_set():
            while self._buffer.session_expired() and not closing.is_set():
                self._session_alive.clear()
                await self._session_alive.wait()
            self._follow_metadata()  # first: what it moves here joins this request
            fetcher.changed.clear()
            wanted = self._fetchable(fetcher.url)
            if not wanted:
                await fetcher.changed.wait()
                continue
            start = fetcher.rotation % len(wanted)
            fetcher.rotation += 1
            wanted = wanted[start:] + wanted[:start]
            fetcher.in_flight = {state.tp: state for state in wanted}
            sent = {state.tp: state.offset for state in wanted}
            try:
                body = await self._post_fetch(fetcher.url, wanted)
                entries = decode_answer(body)
            except TideError as error:
                for state in wanted:
                    if self._current(fetcher, state, sent):
                        self._retry_elsewhere(state, error)
                continue
            except asyncio.CancelledError:
                if not self._kick_cancelled(fetcher):
                    raise
                continue  # kicked: send again with the new partition
            finally:
                fetcher.in_flight = {}
            self._take(fetcher, wanted, sent, entries)

    @staticmethod
    def _kick_cancelled(fetcher: BrokerFetcher) -> bool:
        """Was this cancel a kick only (not also the task group's)?"""
        if not fetcher.kicked:
            return False
        fetcher.kicked = False
        task = asyncio.current_task()
        return task is None or task.uncancel() == 0

    async def _post_fetch(self, url: str, wanted: list[PartitionFetch]) -> bytes:
        options = self._options
        body = msgspec.json.encode(
            fetch_request(wanted, options.fetch_wait_ms, options.fetch_max_bytes)
        )
        answer, _ = await self._transport.request(
            "POST",
            f"{url}/v1/fetch",
            data=body,
            headers=self._request_headers,
            timeout_ms=self._connection.request_timeout_ms + options.fetch_wait_ms,
        )
        return answer

    def _current(
        self, fetcher: BrokerFetcher, state: PartitionFetch, sent: dict[TopicPartition, int | None]
    ) -> bool:
        """Is ``state`` still what the request was for (not stopped, sought, moved)?"""
        return (
            self.partitions.get(state.tp) is state
            and state.leader_url == fetcher.url
            and state.offset == sent[state.tp]
        )

    def _take(
        self,
        fetcher: BrokerFetcher,
        wanted: list[PartitionFetch],
        sent: dict[TopicPartition, int | None],
        entries: list[FetchEntry],
    ) -> None:
        """Applies one answer: records to the buffer in one step, errors per partition.
        Partitions left out of the answer had nothing new."""
        live = {state.tp: state for state in wanted if self._current(fetcher, state, sent)}
        chunks: list[Chunk] = []
        for entry in entries:
            state = live.pop((entry.topic, entry.partition), None)
            if state is None:
                continue  # stopped, sought or moved meanwhile (or a duplicate entry)
            if entry.error is not None:
                self._entry_failed(state, entry.error)
                continue
            state.attempt = 0
            self._fetched_once.add(state.tp)
            self._decode(state, entry, chunks)
        for state in live.values():
            state.attempt = 0
            self._fetched_once.add(state.tp)
        if chunks:
            self._buffer.put_many(chunks)

    @staticmethod
    def _decode(state: PartitionFetch, entry: FetchEntry, chunks: list[Chunk]) -> None:
        topic, partition = state.tp
        fetched = decode_records(entry.batches, state.offset or 0, topic, partition)
        state.offset = fetched.next_offset
        if fetched.messages:
            chunks.append((state.tp, fetched.messages, len(entry.batches), None))
        if fetched.undecodable is not None:
            corrupt = corrupt_record_error(topic, partition, fetched)
            log.error("%s", corrupt)
            chunks.append((state.tp, [], 0, corrupt))
            state.parked = True  # until a seek starts the partition over

    def _entry_failed(self, state: PartitionFetch, error_json: dict[str, str]) -> None:
        error = error_for_code(str(error_json.get("code")), str(error_json.get("message", "")))
        if isinstance(error, OffsetOutOfRange):
            log.info("%s/%s offset %s out of range (%s): resetting", *state.tp, state.offset, error)
            state.offset = None
            self._place(state, -1, 0.0)
            return
        self._retry_elsewhere(state, error)


__all__ = ["BrokerFetcher", "Fetchers", "PartitionFetch", "decode_answer", "fetch_request"]
