"""The consumer: a group member that fetches its partitions in the background.

Loop thread (one per consumer), inside one TaskGroup:

* the *membership* task heartbeats ``POST /v1/groups/{group}/heartbeat`` every
  ``heartbeat_interval_ms`` (the coordinator may change it) with the partitions it
  owns, and reconciles towards the returned assignment. Revoke first: stop the
  partition's fetcher, drop its buffered records, commit its position, and only then
  leave it out of ``owned`` (heartbeating again at once, so the coordinator can hand it
  on). Then assign: start a fetcher per new partition.
* a *fetcher* per owned partition: find the start (committed offset, else
  ``log_start_offset`` / ``high_watermark`` per ``auto_offset_reset``), then long-poll
  ``GET {leader}/v1/topics/{t}/partitions/{p}/records?offset=N&max_bytes&wait_ms``
  for binary batches, decode them (skipping offsets below N) and put the messages
  into the :class:`~tidemq.client.fetch_buffer.FetchBuffer`; it pauses while the
  partition holds ``max_partition_buffer_bytes`` or more there. not_leader / fenced /
  connection errors refresh metadata and back off; offset_out_of_range resets.

User thread: ``poll`` takes from the buffer; ``commit`` sends the positions of
everything returned so far; ``subscribe`` loops ``handler(message)`` and commits what
it has processed after each polled chunk. Delivery is at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from tidemq.client.config import ConsumerOptions, resolve
from tidemq.client.fetch_buffer import FetchBuffer, Message, TopicPartition
from tidemq.client.metadata import MetadataCache
from tidemq.client.transport import (
    BATCH_TYPE,
    LoopThread,
    Transport,
    backoff_seconds,
    sleep_or,
)
from tidemq.errors import (
    ClientClosed,
    InvalidRequest,
    OffsetOutOfRange,
    TideError,
    Unavailable,
)
from tidemq.wire.batch import decode_records, iter_headers

log = logging.getLogger("tidemq.client")


def decode_messages(
    topic: str, partition: int, body: bytes, offset: int
) -> tuple[list[Message], int]:
    """Messages at or after ``offset`` in a fetch answer, and the next offset to fetch."""
    messages = decode_records(body, offset, topic, partition)
    next_offset = offset
    for header in iter_headers(body):
        next_offset = max(next_offset, header.next_offset)
    return messages, next_offset


class Consumer:
    """A member of consumer group ``group`` reading ``topics``. See the module doc.

    Options: ``auto_offset_reset="earliest"`` ("latest"), ``enable_auto_commit=True``
    with ``auto_commit_interval_ms=5000`` (commits records already returned, at the next
    ``poll``), ``heartbeat_interval_ms=1000``, ``session_timeout_ms=10000``,
    ``fetch_max_bytes=1 MiB``, ``fetch_wait_ms=500``, ``max_partition_buffer_bytes=4 MiB``,
    ``close_timeout_ms=30000``, plus the connection settings.
    """

    def __init__(self, *topics: str, group: str, **config: Any) -> None:
        if not topics:
            raise InvalidRequest("a consumer needs at least one topic")
        if not group:
            raise InvalidRequest("a consumer needs a group")
        self._connection, self._options = resolve(ConsumerOptions, config)
        self.topics = tuple(dict.fromkeys(topics))
        self.group = group
        self._closed = False
        self._closing_event: asyncio.Event | None = None
        self._thread = LoopThread(f"tidemq-consumer-{group}")
        self._buffer = FetchBuffer(self._options.max_partition_buffer_bytes, self._space_freed)
        self._member_id: str | None = None
        self._member_epoch = 0
        self._owned: set[TopicPartition] = set()
        self._fetchers: dict[TopicPartition, asyncio.Task[None]] = {}
        self._space: dict[TopicPartition, asyncio.Event] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._fetched_once: set[TopicPartition] = set()
        self._joined = threading.Event()
        self._last_auto_commit = time.monotonic()
        self._auto_commit_future: Any = None
        self._subscriber: threading.Thread | None = None
        self._subscriber_idle = threading.Event()
        self._subscriber_idle.set()
        self._background_error: TideError | None = None
        try:
            self._thread.call(self._open(), 10.0)
        except BaseException:
            self._thread.stop()
            raise
        self._main = self._thread.submit(self._run())

    async def _open(self) -> None:
        self._transport = Transport(self._connection)
        self._metadata = MetadataCache(self._transport, self._connection.metadata_max_age_ms)
        self._closing_event = asyncio.Event()
        self._heartbeat_now = asyncio.Event()

    # -- public API -------------------------------------------------------------------

    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Message]:
        """Up to ``max_records`` messages, waiting up to ``timeout`` s for the first."""
        self._check_open()
        if self._options.enable_auto_commit:
            self._maybe_auto_commit()
        return self._buffer.take(max_records, timeout)

    def commit(self) -> None:
        """Commits the position after every record returned so far; synchronous."""
        self._check_open()
        self._thread.call(self._commit(self._buffer.positions()), self._request_timeout_s)

    def position(self, topic: str, partition: int) -> int | None:
        """The next offset ``poll`` returns for an owned partition (None: not known)."""
        return self._buffer.position((topic, partition))

    def assignment(self) -> set[TopicPartition]:
        """The (topic, partition) pairs this member owns now."""
        return self._buffer.assignment()

    def subscribe(self, handler: Callable[[Message], object], max_records: int = 500) -> None:
        """Calls ``handler(message)`` for every message until ``close()`` (from another
        thread) or KeyboardInterrupt. A message counts as processed when the handler
        returns; processed positions are committed after each polled chunk, so a crash
        redelivers at most that chunk (at-least-once). An exception from the handler
        commits what was processed before it and propagates.
        """
        self._check_open()
        self._subscriber = threading.current_thread()
        self._subscriber_idle.clear()
        try:
            while not self._closed:
                messages = self._buffer.take(max_records, 0.5, advance=False)
                processed = False
                try:
                    for message in messages:
                        if self._closed:
                            break
                        tp = (message.topic, message.partition)
                        if not self._buffer.owns(tp):
                            continue  # revoked meanwhile: its new owner will deliver it
                        handler(message)
                        self._buffer.advance(tp, message.offset + 1)
                        processed = True
                finally:
                    if processed and not self._closed:
                        self.commit()
        except KeyboardInterrupt:
            return
        finally:
            self._subscriber = None
            self._subscriber_idle.set()

    def close(self, timeout: float | None = None) -> None:
        """Commits, leaves the group and stops. Idempotent; safe from any thread."""
        if self._closed:
            return
        self._closed = True
        self._buffer.close()
        limit = self._options.close_timeout_ms / 1000 if timeout is None else timeout
        if self._subscriber is not None and self._subscriber is not threading.current_thread():
            self._subscriber_idle.wait(limit)
        try:
            self._thread.call(self._shutdown(), limit)
        except TideError as error:
            log.warning("consumer close: %s", error)
        finally:
            try:
                self._main.result(timeout=5.0)
            except Exception as exc:
                log.debug("consumer loop ended with %r", exc)
            self._thread.stop()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def wait_until_ready(self, timeout: float) -> bool:
        """True once the member has joined and fetched each owned partition once."""
        deadline = time.monotonic() + timeout
        if not self._joined.wait(timeout):
            return False
        while time.monotonic() < deadline:
            owned = self._buffer.assignment()
            if owned and owned <= self._fetched_once:
                return True
            time.sleep(0.01)
        return False

    @property
    def _request_timeout_s(self) -> float:
        return self._connection.request_timeout_ms / 1000 + 1

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the consumer is closed")
        error = self._background_error
        if error is not None:
            self._background_error = None
            raise error

    def _maybe_auto_commit(self) -> None:
        now = time.monotonic()
        if now - self._last_auto_commit < self._options.auto_commit_interval_ms / 1000:
            return
        previous = self._auto_commit_future
        if previous is not None and not previous.done():
            return
        self._last_auto_commit = now
        self._auto_commit_future = self._thread.submit(
            self._commit_logged(self._buffer.positions())
        )

    def _space_freed(self, partitions: list[TopicPartition]) -> None:
        self._thread.call_soon(self._signal_space, partitions)

    def _signal_space(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            event = self._space.get(tp)
            if event is not None:
                event.set()

    # -- loop thread: lifecycle -------------------------------------------------------

    async def _run(self) -> None:
        """The consumer's life: membership and fetchers, then the final commit and leave."""
        self._run_task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                await self._membership()
            await self._commit_and_leave()
        except Exception:
            log.exception("the consumer's membership task stopped")
            raise
        finally:
            await self._transport.close()

    async def _shutdown(self) -> None:
        """Asks ``_run`` to finish and waits for it (errors are logged there)."""
        closing = self._closing_event
        if closing is not None:
            closing.set()
            self._heartbeat_now.set()
        task = getattr(self, "_run_task", None)
        if task is not None:
            await asyncio.wait([task])

    async def _commit_and_leave(self) -> None:
        try:
            await self._commit(self._buffer.positions())
        except TideError as error:
            log.warning("final commit failed: %s", error)
        if self._member_id is not None:
            try:
                await self._transport.coordinator(
                    "POST",
                    f"/v1/groups/{self.group}/leave",
                    json_body={"member_id": self._member_id},
                    timeout_ms=5_000,
                )
            except TideError as error:
                log.warning("leaving group %s failed: %s", self.group, error)
            self._member_id = None

    # -- loop thread: membership ------------------------------------------------------

    async def _membership(self) -> None:
        closing = self._closing_event
        if closing is None:  # pragma: no cover - set by _open
            return
        interval_ms = self._options.heartbeat_interval_ms
        attempt = 0
        while not closing.is_set():
            try:
                answer = await self._heartbeat()
                attempt = 0
            except TideError as error:
                attempt += 1
                if not error.retriable:
                    log.warning("group %s heartbeat rejected (%s): rejoining", self.group, error)
                    await self._lose_everything()
                delay = backoff_seconds(
                    attempt, self._connection.retry_backoff_ms, max(interval_ms, 1_000)
                )
                await sleep_or(closing, delay)
                continue
            interval_ms = int(answer.get("heartbeat_interval_ms") or interval_ms)
            revoked_any = await self._reconcile(answer)
            self._joined.set()
            if revoked_any:
                continue  # tell the coordinator at once, so the partitions can move on
            self._heartbeat_now.clear()
            await sleep_or(self._heartbeat_now, interval_ms / 1000)
        await self._stop_fetchers(set(self._fetchers))

    async def _heartbeat(self) -> Any:
        body = {
            "member_id": self._member_id,
            "member_epoch": self._member_epoch,
            "topics": list(self.topics),
            "owned": [{"topic": t, "partition": p} for t, p in sorted(self._owned)],
            "session_timeout_ms": self._options.session_timeout_ms,
        }
        answer = await self._transport.coordinator(
            "POST", f"/v1/groups/{self.group}/heartbeat", json_body=body
        )
        self._member_id = str(answer["member_id"])
        self._member_epoch = int(answer.get("member_epoch", 0))
        return answer

    async def _reconcile(self, answer: Any) -> bool:
        target = {
            (str(item["topic"]), int(item["partition"])) for item in answer.get("assignment", [])
        }
        revoked = self._owned - target
        added = target - self._owned
        if revoked:
            await self._revoke(revoked)
        if added:
            await self._assign(added)
        return bool(revoked)

    async def _revoke(self, partitions: set[TopicPartition]) -> None:
        await self._stop_fetchers(partitions)
        positions = {}
        for tp in partitions:
            position = self._buffer.revoke(tp)
            if position is not None:
                positions[tp] = position
        try:
            await self._commit(positions)
        except TideError as error:
            log.warning("commit on revocation failed: %s", error)
        for tp in partitions:
            self._committed.pop(tp, None)
            self._fetched_once.discard(tp)
        self._owned -= partitions

    async def _lose_everything(self) -> None:
        """Fenced or expired: drop all partitions without committing, rejoin as new."""
        await self._stop_fetchers(set(self._fetchers))
        for tp in self._owned:
            self._buffer.revoke(tp)
        self._owned.clear()
        self._committed.clear()
        self._fetched_once.clear()
        self._member_id = None
        self._member_epoch = 0

    async def _assign(self, partitions: set[TopicPartition]) -> None:
        committed = await self._committed_offsets({topic for topic, _ in partitions})
        closing = self._closing_event
        if closing is not None and closing.is_set():
            return
        for tp in sorted(partitions):
            self._owned.add(tp)
            self._buffer.assign(tp)
            self._space[tp] = asyncio.Event()
            start = committed.get(tp) if committed is not None else None
            self._fetchers[tp] = self._group.create_task(self._fetch_loop(tp, start))

    async def _stop_fetchers(self, partitions: Iterable[TopicPartition]) -> None:
        tasks = [self._fetchers.pop(tp) for tp in list(partitions) if tp in self._fetchers]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for tp in partitions:
            self._space.pop(tp, None)

    # -- loop thread: offsets ---------------------------------------------------------

    async def _committed_offsets(self, topics: set[str]) -> dict[TopicPartition, int] | None:
        """Committed offsets of the group for ``topics``; None if the lookup failed."""
        try:
            answer = await self._transport.coordinator(
                "GET",
                f"/v1/groups/{self.group}/offsets",
                params={"topics": ",".join(sorted(topics))},
            )
        except TideError as error:
            log.debug("committed offsets of %s: %s", self.group, error)
            return None
        out = {}
        for item in answer.get("offsets", []):
            tp = (str(item["topic"]), int(item["partition"]))
            out[tp] = int(item["offset"])
            self._committed[tp] = out[tp]
        return out

    async def _start_position(self, tp: TopicPartition, committed: int | None) -> int:
        attempt = 0
        while True:
            try:
                if committed is None:
                    offsets = await self._committed_offsets({tp[0]})
                    if offsets is None:
                        raise Unavailable("committed offsets not available yet")
                    committed = offsets.get(tp, -1)
                if committed >= 0:
                    return committed
                return await self._reset_position(tp)
            except TideError as error:
                attempt += 1
                log.debug("start position of %s/%s: %s", *tp, error)
                await asyncio.sleep(
                    backoff_seconds(
                        attempt,
                        self._connection.retry_backoff_ms,
                        self._connection.retry_backoff_max_ms,
                    )
                )

    async def _reset_position(self, tp: TopicPartition) -> int:
        topic, partition = tp
        info = await self._metadata.leader(topic, partition)
        answer = await self._transport.request_json(
            "GET", f"{info.leader_url}/v1/topics/{topic}/partitions/{partition}/offsets"
        )
        field = (
            "log_start_offset"
            if self._options.auto_offset_reset == "earliest"
            else "high_watermark"
        )
        return int(answer[field])

    async def _commit(self, positions: dict[TopicPartition, int]) -> None:
        changed = {
            tp: position
            for tp, position in positions.items()
            if self._committed.get(tp) != position
        }
        if not changed:
            return
        body: dict[str, Any] = {
            "offsets": [
                {"topic": t, "partition": p, "offset": offset}
                for (t, p), offset in sorted(changed.items())
            ]
        }
        if self._member_id is not None:
            body["member_id"] = self._member_id
            body["member_epoch"] = self._member_epoch
        await self._transport.coordinator(
            "POST", f"/v1/groups/{self.group}/offsets", json_body=body
        )
        self._committed.update(changed)

    async def _commit_logged(self, positions: dict[TopicPartition, int]) -> None:
        try:
            await self._commit(positions)
        except TideError as error:
            log.warning("auto-commit for group %s failed: %s", self.group, error)

    # -- loop thread: fetching --------------------------------------------------------

    async def _fetch_loop(self, tp: TopicPartition, committed: int | None) -> None:
        topic, partition = tp
        offset = await self._start_position(tp, committed)
        self._buffer.seek(tp, offset)
        options = self._options
        params = {
            "max_bytes": str(options.fetch_max_bytes),
            "wait_ms": str(options.fetch_wait_ms),
        }
        attempt = 0
        while True:
            await self._wait_for_space(tp)
            try:
                info = await self._metadata.leader(topic, partition)
                params["offset"] = str(offset)
                body, _ = await self._transport.request(
                    "GET",
                    f"{info.leader_url}/v1/topics/{topic}/partitions/{partition}/records",
                    params=params,
                    headers={"Accept": BATCH_TYPE},
                    timeout_ms=self._connection.request_timeout_ms + options.fetch_wait_ms,
                )
                messages, offset = decode_messages(topic, partition, body, offset)
            except OffsetOutOfRange as error:
                log.info(
                    "%s/%s offset %d out of range (%s): resetting", topic, partition, offset, error
                )
                offset = await self._start_position(tp, -1)
                self._buffer.seek(tp, offset)
                continue
            except TideError as error:
                attempt += 1
                self._metadata.invalidate(topic)
                log.debug("fetch %s/%s: %s; retry %d", topic, partition, error, attempt)
                await asyncio.sleep(
                    backoff_seconds(
                        attempt,
                        self._connection.retry_backoff_ms,
                        self._connection.retry_backoff_max_ms,
                    )
                )
                continue
            attempt = 0
            self._fetched_once.add(tp)
            if messages:
                self._buffer.put(tp, messages, len(body))

    async def _wait_for_space(self, tp: TopicPartition) -> None:
        event = self._space.get(tp)
        if event is None:
            return
        while True:
            event.clear()
            if self._buffer.has_space(tp):
                return
            await event.wait()
