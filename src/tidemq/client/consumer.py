"""The consumer: a group member that fetches its partitions in the background.

Loop thread (one per consumer), inside one TaskGroup:

* the *membership* task heartbeats ``POST /v1/groups/{group}/heartbeat`` every
  ``heartbeat_interval_ms`` (the coordinator may change it) with the partitions it
  owns, and reconciles towards the returned assignment. Assign: start fetching each
  new partition. Revoke in two steps, so that a record in the application's hands
  is never handed to the next owner: *begin* (stop fetching it, drop the partition's
  buffered records, hand out nothing more of it) and, once the application has
  finished what it was given (it polled again, committed, or its handler returned;
  or ``max_poll_interval_ms`` passed), *release* (commit, leave the partition out of
  ``owned`` and heartbeat at once, so the coordinator can hand it on).
* *fetching* (:mod:`tidemq.client.fetcher`): one long-poll ``POST {leader}/v1/fetch``
  per leader broker for all the partitions it leads, each with its next offset,
  leader epoch and byte budget (start: committed offset, else ``log_start_offset`` /
  ``high_watermark`` per ``auto_offset_reset``); each answer's records go into the
  :class:`~tidemq.client.fetch_buffer.FetchBuffer` in one step. A partition is left
  out while it holds ``max_partition_buffer_bytes`` or more there. not_leader /
  fenced / connection errors move only that partition: refresh metadata, back off,
  fetch it again under its (new) leader; offset_out_of_range resets. An undecodable
  record becomes an error marker in the buffer (``poll`` raises
  :class:`~tidemq.errors.CorruptRecord` when it reaches it) and parks the partition
  until the application seeks past it.

The session promise. The coordinator expires a member ``session_timeout_ms`` after
it *received* its last heartbeat, which is after we *sent* it. So the member stops
fetching and handing out at ``sent + session_timeout_ms - margin`` (margin: a fifth
of the session) of its last successful heartbeat: the buffer refuses to hand out
past that instant whatever the loop is doing, fetchers wait, and the membership
task drops every partition without committing. A later successful heartbeat starts
over from the committed offsets.

Delivery modes (``delivery=``): ``at_least_once`` (default: commits what is done,
where a record is done when the application polls again, commits, or its handler
returns), ``at_most_once`` (commits what ``poll`` returns before returning it) and
``manual`` (only ``commit()`` commits). A background failure is raised by the next
``poll`` / ``subscribe`` call, and by every later one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from tidemq.client.config import ConsumerOptions, resolve
from tidemq.client.fetch_buffer import FetchBuffer, Message, TopicPartition
from tidemq.client.fetcher import Fetchers, corrupt_record_error
from tidemq.client.metadata import MetadataCache
from tidemq.client.transport import (
    LoopThread,
    Transport,
    backoff_seconds,
    sleep_or,
)
from tidemq.errors import (
    ClientClosed,
    FencedMember,
    InternalError,
    InvalidRequest,
    StaleMemberEpoch,
    TideError,
    Unavailable,
)
from tidemq.wire.batch import decode_fetch

log = logging.getLogger("tidemq.client")

# A commit refused as stale (a grant moved our epoch on meanwhile) is resent at most
# this often under the epoch the next heartbeat brings.
STALE_COMMIT_RESENDS = 3
SESSION_MARGIN_FRACTION = 5  # stop handing out 1/5 of the session before it can expire


def decode_messages(
    topic: str, partition: int, body: bytes, offset: int
) -> tuple[list[Message], int]:
    """Messages at or after ``offset`` in a fetch answer, and the next offset to fetch;
    raises CorruptRecord at an undecodable record."""
    fetched = decode_fetch(body, offset, topic, partition)
    if fetched.undecodable is not None:
        raise corrupt_record_error(topic, partition, fetched)
    return fetched.messages, fetched.next_offset


class Consumer:
    """A member of consumer group ``group`` reading ``topics``. See the module doc.

    Options: ``delivery="at_least_once"`` ("at_most_once", "manual"),
    ``auto_offset_reset="earliest"`` ("latest"), ``enable_auto_commit=True`` with
    ``auto_commit_interval_ms=5000`` (at least once: commits done records at the next
    ``poll``), ``heartbeat_interval_ms=1000``, ``session_timeout_ms=10000``,
    ``max_poll_interval_ms=300000`` (how long a revocation waits for the application),
    ``fetch_max_bytes=1 MiB``, ``fetch_wait_ms=500``,
    ``max_partition_buffer_bytes=4 MiB``, ``close_timeout_ms=30000``, plus the
    connection settings.
    """

    def __init__(self, *topics: str, group: str, **config: Any) -> None:
        if not topics:
            raise InvalidRequest("a consumer needs at least one topic")
        if not group:
            raise InvalidRequest("a consumer needs a group")
        self._connection, self._options = resolve(ConsumerOptions, config)
        self.topics = tuple(dict.fromkeys(topics))
        self.group = group
        self._delivery = self._options.delivery
        session_ms = self._options.session_timeout_ms
        self._session_limit_s = (session_ms - session_ms // SESSION_MARGIN_FRACTION) / 1000
        self._closed = False
        self._close_done = threading.Event()
        self._closing_event: asyncio.Event | None = None
        self._thread = LoopThread(f"tidemq-consumer-{group}")
        self._buffer = FetchBuffer(
            self._options.max_partition_buffer_bytes, self._space_freed, self._done_signal
        )
        # Chosen here, not by the coordinator: a join whose answer is lost and is sent
        # again names the same member instead of creating a ghost that holds partitions.
        self._member_id: str | None = uuid.uuid4().hex
        self._member_epoch = 0
        self._owned: set[TopicPartition] = set()
        self._revoking: dict[TopicPartition, float] = {}  # -> when the revocation began
        self._committed: dict[TopicPartition, int] = {}
        self._fetched_once: set[TopicPartition] = set()
        self._joined = threading.Event()
        self._last_auto_commit = time.monotonic()
        # One auto-commit runs at a time; a poll that finds one running asks it to
        # commit once more (the done positions then), so records done meanwhile are
        # committed without waiting for yet another poll.
        self._auto_commit_lock = threading.Lock()
        self._auto_commit_running = False
        self._auto_commit_again = False
        self._subscriber: threading.Thread | None = None
        self._subscriber_idle = threading.Event()
        self._subscriber_idle.set()
        self._background_error: TideError | None = None
        self.last_heartbeat_sent: float | None = None  # monotonic s of the last success
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
        self._wake = asyncio.Event()
        self._session_alive = asyncio.Event()

    # -- public API -------------------------------------------------------------------

    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Message]:
        """Up to ``max_records`` messages, waiting up to ``timeout`` s for the first.

        Calling ``poll`` again means the records of the previous call are done. Raises
        :class:`~tidemq.errors.CorruptRecord` at an undecodable record (after handing
        out everything before it) until ``seek`` moves past it, and the background's
        error if it died.
        """
        self._check_open()
        self._buffer.mark_done()
        if self._delivery == "at_least_once" and self._options.enable_auto_commit:
            self._maybe_auto_commit()
        messages = self._buffer.take(max_records, timeout)
        if messages and self._delivery == "at_most_once":
            self._commit_before_handing_over(messages)
        return messages

    def commit(self) -> None:
        """Commits the position after every record returned so far; synchronous."""
        self._check_open()
        self._buffer.mark_done()
        self._thread.call(self._commit(self._buffer.positions()), self._request_timeout_s)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """The next record of an owned partition is ``offset``; what was handed out
        before counts as done. Skips an undecodable record::

            except CorruptRecord as error:
                consumer.seek(error.topic, error.partition, error.offset + 1)
        """
        self._check_open()
        if offset < 0:
            raise InvalidRequest(f"offset must be >= 0, not {offset}")
        self._thread.call(self._seek({(topic, partition): offset}), self._request_timeout_s)

    def position(self, topic: str, partition: int) -> int | None:
        """The next offset ``poll`` returns for an owned partition (None: not known)."""
        return self._buffer.position((topic, partition))

    def assignment(self) -> set[TopicPartition]:
        """The (topic, partition) pairs this member owns now (not being revoked)."""
        return self._buffer.assignment()

    def subscribe(self, handler: Callable[[Message], object], max_records: int = 500) -> None:
        """Calls ``handler(message)`` for every message until ``close()`` (from another
        thread) or KeyboardInterrupt. At least once: a message is done when the handler
        returns; done positions are committed after each polled chunk. A handler that
        raises stops ``subscribe`` with its exception: what was done before is
        committed, and that message and the ones after it are delivered again by the
        next ``poll`` or ``subscribe``. At most once: each chunk is committed before its
        first message goes to the handler.
        """
        self._check_open()
        self._subscriber = threading.current_thread()
        self._subscriber_idle.clear()
        try:
            while not self._closed:
                self._check_open()
                messages = self._buffer.take(max_records, 0.5, advance=False)
                if not messages:
                    continue
                if self._delivery == "at_most_once":
                    self._handle_at_most_once(handler, messages)
                else:
                    self._handle_chunk(handler, messages)
        except KeyboardInterrupt:
            return
        except ClientClosed:
            if not self._closed:
                raise
        finally:
            self._subscriber = None
            self._subscriber_idle.set()

    def close(self, timeout: float | None = None) -> None:
        """Commits what is done, leaves the group and stops. Idempotent; any thread.

        In poll mode the records of the last ``poll`` count as done, as if the
        application polled again (not when a ``with`` block ends with an exception).
        """
        self._close(timeout, finished=True)

    def _close(self, timeout: float | None, finished: bool) -> None:
        limit = self._options.close_timeout_ms / 1000 if timeout is None else timeout
        if self._closed:
            if threading.current_thread() is not self._subscriber:
                self._close_done.wait(limit)  # another thread is closing: wait for it
            return
        self._closed = True
        try:
            self._close_now(limit, finished)
        finally:
            self._close_done.set()

    def _close_now(self, limit: float, finished: bool) -> None:
        self._buffer.close()
        subscriber = self._subscriber
        if subscriber is not None and subscriber is not threading.current_thread():
            self._subscriber_idle.wait(limit)
        elif finished and subscriber is None:
            self._buffer.mark_done()
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
        self._close(None, finished=exc_type is None)

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
    def member_id(self) -> str | None:
        return self._member_id

    @property
    def background_error(self) -> TideError | None:
        """Why the background task stopped (then every call raises it), or None."""
        return self._background_error

    @property
    def _request_timeout_s(self) -> float:
        return self._connection.request_timeout_ms / 1000 + 1

    def _check_open(self) -> None:
        error = self._background_error
        if error is not None:
            raise error
        if self._closed:
            raise ClientClosed("the consumer is closed")

    # -- user thread: delivery --------------------------------------------------------

    def _handle_chunk(self, handler: Callable[[Message], object], messages: list[Message]) -> None:
        """At least once / manual: hand out one message at a time, done when it returns."""
        buffer = self._buffer
        handled = False
        skipped: set[TopicPartition] = set()
        try:
            for index, message in enumerate(messages):
                if self._closed:
                    break
                if not buffer.hand_out(message):
                    # revoked, rewound or the session lapsed: not ours to give now; what
                    # follows it in this chunk must be fetched again (a session that
                    # comes back must not find the partition stalled past a gap)
                    skipped.add((message.topic, message.partition))
                    continue
                try:
                    handler(message)
                except BaseException:
                    self._rewind({(m.topic, m.partition) for m in messages[index:]})
                    raise
                buffer.processed((message.topic, message.partition), message.offset + 1)
                handled = True
        finally:
            if skipped and not self._closed:
                self._rewind(skipped)  # revoked partitions are left alone by the buffer
            elif handled and self._delivery == "at_least_once" and not self._closed:
                self._commit_logged_sync()

    def _handle_at_most_once(
        self, handler: Callable[[Message], object], messages: list[Message]
    ) -> None:
        given = [message for message in messages if self._buffer.hand_out(message)]
        if not given:
            return
        self._commit_before_handing_over(given)
        for index, message in enumerate(given):
            tp = (message.topic, message.partition)
            if not self._buffer.owns(tp) or self._buffer.session_expired():
                # released (its next owner may be at the next offsets already) or the
                # session lapsed: at most once means these are simply not delivered
                continue
            try:
                handler(message)
            except BaseException:
                self._give_back(given[index + 1 :])
                raise

    def _commit_before_handing_over(self, messages: list[Message]) -> None:
        """At most once: commit past ``messages`` or hand none of them out."""
        self._buffer.mark_done()
        try:
            self._thread.call(self._commit(self._buffer.positions()), self._request_timeout_s)
        except TideError:
            self._give_back(messages, commit=False)
            raise

    def _give_back(self, messages: list[Message], commit: bool = True) -> None:
        """Makes ``messages`` (not given to the application) be fetched again and, if
        ``commit``, moves the commit back to them (they were committed unseen)."""
        first: dict[TopicPartition, int] = {}
        for message in messages:
            first.setdefault((message.topic, message.partition), message.offset)
        if first and not self._closed:
            self._thread.call(
                self._seek(first, commit=commit, strict=False), self._request_timeout_s
            )

    def _rewind(self, partitions: set[TopicPartition]) -> None:
        """Handed out but not done records of ``partitions`` are delivered again."""
        positions = self._buffer.rewind(partitions)
        if positions and not self._closed:
            self._thread.call(self._seek(positions, strict=False), self._request_timeout_s)
        if self._delivery == "at_least_once" and not self._closed:
            self._commit_logged_sync()

    def _commit_logged_sync(self) -> None:
        try:
            self._thread.call(self._commit(self._buffer.positions()), self._request_timeout_s)
        except TideError as error:
            log.warning("commit for group %s failed: %s", self.group, error)

    def _maybe_auto_commit(self) -> None:
        now = time.monotonic()
        if now - self._last_auto_commit < self._options.auto_commit_interval_ms / 1000:
            return
        self._last_auto_commit = now
        with self._auto_commit_lock:
            if self._auto_commit_running:
                self._auto_commit_again = True
                return
            self._auto_commit_running = True
        try:
            self._thread.submit(self._auto_commit())
        except BaseException:
            with self._auto_commit_lock:
                self._auto_commit_running = False
            raise

    async def _auto_commit(self) -> None:
        """Commits the done positions (taken now, on the loop thread), and again while a
        poll asked for it during the commit. Before, that poll's request was dropped:
        records it marked done stayed uncommitted until the application polled again,
        however long it processed (a flaky test found it)."""
        finished = False
        try:
            while True:
                await self._commit_logged(self._buffer.positions())
                with self._auto_commit_lock:
                    if not self._auto_commit_again:
                        self._auto_commit_running = False
                        finished = True
                        return
                    self._auto_commit_again = False
        finally:
            if not finished:  # cancelled (closing) or failed: a later poll may start one
                with self._auto_commit_lock:
                    self._auto_commit_running = False

    def _space_freed(self, partitions: list[TopicPartition]) -> None:
        self._thread.call_soon(self._signal_space, partitions)

    def _signal_space(self, partitions: list[TopicPartition]) -> None:
        fetchers = getattr(self, "_fetchers", None)
        if fetchers is not None:
            fetchers.resume(partitions)

    def _done_signal(self) -> None:
        """From the buffer: a revoking partition's records may all be done now."""
        self._thread.call_soon(self._wake.set)

    # -- loop thread: lifecycle -------------------------------------------------------

    async def _run(self) -> None:
        """The consumer's life: membership and fetchers, then the final commit and leave."""
        self._run_task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._fetchers = Fetchers(
                    transport=self._transport,
                    metadata=self._metadata,
                    buffer=self._buffer,
                    options=self._options,
                    connection=self._connection,
                    group=group,
                    closing=self._closing_event or asyncio.Event(),
                    session_alive=self._session_alive,
                    start_position=self._start_position,
                    fetched_once=self._fetched_once,
                )
                await self._membership()
            await self._commit_and_leave()
        except BaseException as exc:
            self._background_failed(exc)
            raise
        finally:
            await self._transport.close()

    def _background_failed(self, exc: BaseException) -> None:
        """Hands a background failure to the application's next poll / subscribe."""
        cause = exc
        while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        if isinstance(cause, asyncio.CancelledError) and self._closed:
            return
        if isinstance(cause, TideError):
            error = cause
        else:
            error = InternalError(f"the consumer's background task failed: {cause!r}")
            error.__cause__ = cause
        log.error("consumer of group %s stopped: %s", self.group, error, exc_info=exc)
        self._background_error = error
        self._buffer.fail(error)

    async def _shutdown(self) -> None:
        """Asks ``_run`` to finish and waits for it (errors are logged there)."""
        closing = self._closing_event
        if closing is not None:
            closing.set()
            self._wake.set()
        task = getattr(self, "_run_task", None)
        if task is not None:
            await asyncio.wait([task])

    async def _commit_and_leave(self) -> None:
        if self._delivery != "manual" and not self._buffer.session_expired():
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
        interval_s = self._options.heartbeat_interval_ms / 1000
        attempt = 0
        next_heartbeat = 0.0
        while not closing.is_set():
            self._wake.clear()
            if self._owned and self._buffer.session_expired():
                await self._session_lapsed()
            released = await self._release_finished()
            now = time.monotonic()
            if released or now >= next_heartbeat:
                sent = now
                try:
                    answer = await self._heartbeat()
                except TideError as error:
                    attempt += 1
                    if isinstance(error, FencedMember):
                        log.warning(
                            "group %s heartbeat rejected (%s): rejoining", self.group, error
                        )
                        await self._lose_everything()
                    elif not error.retriable:
                        # Forbidden, a bad session timeout...: rejoining cannot fix it,
                        # and poll() must not return [] for ever. Raise it there.
                        raise
                    else:
                        log.debug("group %s heartbeat failed: %s", self.group, error)
                    next_heartbeat = time.monotonic() + backoff_seconds(
                        attempt,
                        self._connection.retry_backoff_ms,
                        max(int(interval_s * 1000), 1_000),
                    )
                    continue
                attempt = 0
                self.last_heartbeat_sent = sent
                self._buffer.set_session_deadline(sent + self._session_limit_s)
                self._session_alive.set()
                interval_s = int(answer.get("heartbeat_interval_ms") or interval_s * 1000) / 1000
                await self._reconcile(answer)
                self._joined.set()
                next_heartbeat = time.monotonic() + interval_s
                continue
            await sleep_or(self._wake, self._next_wake_s(next_heartbeat) - now)
        await self._finish_fetchers()

    async def _finish_fetchers(self) -> None:
        """Closing: lets each broker's long-poll finish (so its TLS connection goes
        back to the pool and closes cleanly with the session), then cancels the rest."""
        await self._fetchers.finish()

    def _next_wake_s(self, next_heartbeat: float) -> float:
        """When the membership task must look again: heartbeat, session, revocations."""
        wake = next_heartbeat
        if self._owned:
            wake = min(wake, self._buffer_session_deadline())
        limit_s = self._options.max_poll_interval_ms / 1000
        for began in self._revoking.values():
            wake = min(wake, began + limit_s)
        return max(wake, time.monotonic() + 0.001)

    def _buffer_session_deadline(self) -> float:
        sent = self.last_heartbeat_sent
        return float("inf") if sent is None else sent + self._session_limit_s

    async def _heartbeat(self) -> Any:
        body = {
            "member_id": self._member_id,
            "member_epoch": self._member_epoch,
            "topics": list(self.topics),
            "owned": [{"topic": t, "partition": p} for t, p in sorted(self._owned)],
            "session_timeout_ms": self._options.session_timeout_ms,
        }
        timeout_ms = min(self._connection.request_timeout_ms, int(self._session_limit_s * 1000))
        answer = await self._transport.coordinator(
            "POST", f"/v1/groups/{self.group}/heartbeat", json_body=body, timeout_ms=timeout_ms
        )
        self._member_id = str(answer["member_id"])
        self._member_epoch = int(answer.get("member_epoch", 0))
        changed = self.__dict__.get("_epoch_changed")
        if changed is not None:
            changed.set()
        return answer

    async def _reconcile(self, answer: Any) -> None:
        target = {
            (str(item["topic"]), int(item["partition"])) for item in answer.get("assignment", [])
        }
        revoked = self._owned - set(self._revoking) - target
        added = target - self._owned
        if revoked:
            await self._begin_revoke(revoked)
        if added:
            await self._assign(added)

    async def _begin_revoke(self, partitions: set[TopicPartition]) -> None:
        """Stop fetching and handing out; release once the application is done."""
        await self._stop_fetchers(partitions)
        now = time.monotonic()
        for tp in partitions:
            self._buffer.begin_revoke(tp)
            self._revoking[tp] = now
        self._wake.set()

    async def _release_finished(self) -> bool:
        """Releases revoking partitions whose records are all done (or that waited
        ``max_poll_interval_ms``): commits their done positions, drops them from owned."""
        if not self._revoking:
            return False
        limit_s = self._options.max_poll_interval_ms / 1000
        now = time.monotonic()
        finished = []
        for tp, began in self._revoking.items():
            if self._buffer.revocation_ready(tp):
                finished.append(tp)
            elif now - began >= limit_s:
                log.warning(
                    "%s/%s revoked %.0f s ago and not done: releasing it (records handed out "
                    "but not done will be delivered again)",
                    *tp,
                    now - began,
                )
                finished.append(tp)
        if not finished:
            return False
        positions = {}
        for tp in finished:
            del self._revoking[tp]
            position = self._buffer.remove(tp)
            if position is not None:
                positions[tp] = position
        if self._delivery != "manual":
            try:
                await self._commit(positions)
            except TideError as error:
                log.warning("commit on revocation failed: %s", error)
        for tp in finished:
            self._committed.pop(tp, None)
            self._fetched_once.discard(tp)
        self._owned -= set(finished)
        return True

    async def _session_lapsed(self) -> None:
        """No successful heartbeat for the session minus the margin: another member may
        soon own our partitions. Stop everything, commit nothing; rejoin when heard."""
        log.warning(
            "group %s: no successful heartbeat for %.1f s: stopped fetching and handing out",
            self.group,
            self._session_limit_s,
        )
        self._session_alive.clear()
        await self._drop_all()

    async def _lose_everything(self) -> None:
        """Fenced or expired: drop all partitions without committing, rejoin as new."""
        await self._drop_all()
        self._member_id = uuid.uuid4().hex  # rejoin as a new member (a retried join: same)
        self._member_epoch = 0

    async def _drop_all(self) -> None:
        await self._stop_fetchers(set(self._fetchers.partitions))
        for tp in self._owned:
            self._buffer.remove(tp)
        self._owned.clear()
        self._revoking.clear()
        self._committed.clear()
        self._fetched_once.clear()

    async def _assign(self, partitions: set[TopicPartition]) -> None:
        committed = await self._committed_offsets({topic for topic, _ in partitions})
        closing = self._closing_event
        if closing is not None and closing.is_set():
            return
        for tp in sorted(partitions):
            self._owned.add(tp)
            self._buffer.assign(tp)
            start = committed.get(tp) if committed is not None else None
            self._fetchers.start(tp, start, None)

    async def _seek(
        self, positions: dict[TopicPartition, int], commit: bool = False, strict: bool = True
    ) -> None:
        """Restarts fetching of owned, active partitions at ``positions``; others
        are an error if ``strict`` (the application's seek), else left alone (a rewind:
        a partition revoked meanwhile is its next owner's to deliver)."""
        for tp in list(positions):
            if tp not in self._owned or tp in self._revoking:
                if strict:
                    raise InvalidRequest(f"{tp[0]}/{tp[1]} is not assigned to this consumer")
                positions = {k: v for k, v in positions.items() if k != tp}
        await self._stop_fetchers(set(positions))
        for tp, offset in positions.items():
            self._buffer.seek(tp, offset)
            self._fetchers.start(tp, None, offset)
        if commit:
            await self._commit(positions)

    async def _stop_fetchers(self, partitions: Iterable[TopicPartition]) -> None:
        await self._fetchers.stop(partitions)

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
        """One commit at a time: two in flight on different connections could be
        applied in the opposite order and move the group's offset backwards (and the
        ``_committed`` cache would then hide it)."""
        lock = self.__dict__.get("_commit_lock")
        if lock is None:
            lock = self.__dict__["_commit_lock"] = asyncio.Lock()
        async with lock:
            await self._commit_serially(positions)

    async def _commit_serially(self, positions: dict[TopicPartition, int]) -> None:
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
        member_id = self._member_id
        for resend in range(STALE_COMMIT_RESENDS + 1):
            epoch = self._member_epoch
            if member_id is not None and epoch > 0:  # joined
                body["member_id"] = member_id
                body["member_epoch"] = epoch
            try:
                await self._transport.coordinator(
                    "POST", f"/v1/groups/{self.group}/offsets", json_body=body
                )
                break
            except StaleMemberEpoch:
                # A grant moved our epoch on while the commit was on its way; the
                # heartbeat answer that carries the new one arrives about now. Resend
                # under it (we still hold the commit lock: nothing newer of ours can
                # be overtaken); a late copy of the old request stays refused.
                if resend == STALE_COMMIT_RESENDS or not await self._epoch_moved(member_id, epoch):
                    raise
        self._committed.update(changed)

    async def _epoch_moved(self, member_id: str | None, epoch: int) -> bool:
        """Waits (up to a heartbeat interval) for a heartbeat to bring a newer epoch of
        the same member; False if none came (fenced, rejoined, or no answer). The stale
        answer shows the coordinator already answered the heartbeat that moved the
        epoch, so its answer is on the way; the wait stays short because the membership
        task may itself be waiting for this commit (a revocation's commit) and cannot
        heartbeat meanwhile."""
        changed = self.__dict__.get("_epoch_changed")
        if changed is None:
            changed = self.__dict__["_epoch_changed"] = asyncio.Event()
        wait_ms = min(self._connection.request_timeout_ms, self._options.heartbeat_interval_ms)
        deadline = time.monotonic() + wait_ms / 1000
        while self._member_id == member_id and self._member_epoch == epoch:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        return self._member_id == member_id and self._member_epoch > epoch

    async def _commit_logged(self, positions: dict[TopicPartition, int]) -> None:
        try:
            await self._commit(positions)
        except TideError as error:
            log.warning("auto-commit for group %s failed: %s", self.group, error)
