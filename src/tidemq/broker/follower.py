"""The follower side of replication: one fetch session per leader broker.

A :class:`FetchSession` holds every partition this broker follows on one leader and
keeps exactly one request in flight to it (``POST /v1/replica/fetch``, see
:mod:`tidemq.wire.replica_fetch`): one long-poll and one wake-up per leader, not per
partition. Its loop:

1. send, for every followed partition that is not backing off, its log end, last
   epoch, durable end and known high watermark; the order rotates per request so
   that the answer's byte budget favours no partition. Within an incremental
   session (broker/fetch_sessions.py) only the partitions whose fields changed
   since the last request the leader applied, and the ones no longer fetched;
2. apply each entry of the answer on its own (truncate on a divergence, start over
   at the leader's log start, append batches, note the high watermark); a partition
   whose entry is an error, or whose bytes fail their checks, backs off alone
   (capped exponential) while the others go on;
3. wait until what was appended is durable (the syncer's fsync completes each
   replica's durable waiters) and go to 1 at once: that request carries the new
   durable ends, which is what moves the leader's high watermark. So an acks=all
   produce costs the leader one follower round trip plus the follower's fsync.

Why no request waits at the leader while an fsync is pending here: the next request
is sent only after the fsync of everything the previous answer brought, so the
leader never holds a poll whose durable ends are stale. Sending earlier (pipelining
the next fetch with the fsync) would need a second request per answer to report
the fsync, or a poll the leader ends early, yet it cannot acknowledge new records
sooner: their own fsync here queues behind the running one (one fsync in flight per
log, or per journal). docs/ARCHITECTURE.md, "Replication", has the whole argument.

A partition added to the session (a new follower, or a new leader epoch) cancels
the poll in flight and sends a new one at once: a new follower must not wait out a
long-poll before the leader hears of it (its first fetch is what lets the high
watermark, and acks=all, move). Such changes come from heartbeats, so they are rare.
A partition backing off is left out of the requests, and the poll's ``wait_ms`` is
cut to end when its backoff does, so it rejoins without a cancelled request.

Failures: a failed request (leader down, timeout) backs the whole session off; an
unexpected exception (a broken invariant, a failed write) escapes ``run`` and stops
the broker through its task group (fail-stop), as before.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tidemq.broker.partition import PartitionReplica
from tidemq.core.replica import UNKNOWN, truncation_offset
from tidemq.errors import (
    ERRORS_BY_CODE,
    CorruptBatch,
    FetchSessionNotHeld,
    InternalError,
    InvalidRequest,
    TideError,
)
from tidemq.transport import HttpTransport
from tidemq.wire import control
from tidemq.wire.replica_fetch import (
    REPLICA_FETCH_TYPE,
    SESSION_HEADER,
    SESSION_ID_MAX,
    ReplicaFetchEntry,
    ReplicaFetchForgotten,
    ReplicaFetchPartition,
    ReplicaFetchRequest,
    decode_replica_fetch,
)

log = logging.getLogger(__name__)

Key = tuple[str, int]
PARTITION_BYTES = 4 * 1024 * 1024  # per partition and answer
SESSION_BYTES = 8 * 1024 * 1024  # per answer: what one session holds in memory
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0
WARN_INTERVAL_S = 1.0
LEGACY_RETRY_S = 30.0  # per-partition fetching (an old leader) before trying a session again


@dataclass(slots=True)
class Followed:
    replica: PartitionReplica
    leader_epoch: int
    retry_at: float = 0.0  # time.monotonic(): backing off after a failure until then
    backoff_s: float = BACKOFF_MIN_S
    warned_at: float = 0.0


_POLL_HEADERS = {"Content-Type": "application/json", "Accept": REPLICA_FETCH_TYPE}


async def _all_durable(appended: list[tuple[PartitionReplica, int]]) -> None:
    """Until every (replica, log end) appended is durable here. One after the other
    in this task (no task per partition): each waits for the same group commits, so
    the total wait is the slowest one's."""
    for replica, end in appended:
        try:
            await replica.wait_durable(end)
        except TideError:  # closed meanwhile (NotLeader): nothing to report
            continue


class FetchSession:
    """Every partition this broker follows on one leader; one request in flight."""

    def __init__(
        self,
        broker_id: int,
        leader_id: int,
        leader_url: str,
        transport: Callable[[], HttpTransport],
        mark_dirty: Callable[[PartitionReplica], None],
        replicated: Callable[[str, int], None],
        wait_ms: int,
        request_timeout_ms: int,
    ) -> None:
        self.broker_id = broker_id
        self.leader_id = leader_id
        self.leader_url = leader_url
        self.url = f"{leader_url.rstrip('/')}/v1/replica/fetch"
        self.partitions: dict[Key, Followed] = {}
        self._transport = transport
        self._mark_dirty = mark_dirty
        self._replicated = replicated
        self._wait_ms = wait_ms
        self._timeout_ms = wait_ms + request_timeout_ms
        self._changed = asyncio.Event()
        # The session's task while it waits for a poll's answer (None otherwise), and
        # whether add() cancelled that wait to send the poll again with the new set.
        self._polling: asyncio.Task[Any] | None = None
        self._kicked = False
        self._rotation = 0
        self._warned_at = 0.0
        # The incremental session (broker/fetch_sessions.py): its id (0: none open),
        # the requests the leader applied to it, what the leader holds of each
        # partition, and what it will hold once it applies the request in flight.
        self._session_id = 0
        self._session_epoch = 0
        self._held: dict[Key, ReplicaFetchPartition] = {}
        self._pending: dict[Key, ReplicaFetchPartition] = {}

    # -- membership (called by the broker's reconcile) --

    def add(self, key: Key, replica: PartitionReplica, leader_epoch: int) -> None:
        self.partitions[key] = Followed(replica, leader_epoch)
        self._changed.set()
        if self._polling is not None and not self._kicked:
            self._kicked = True  # the poll in flight does not ask for it: send again
            self._polling.cancel()

    def remove(self, key: Key) -> None:
        """The poll in flight goes on: an answer for ``key`` is ignored."""
        self.partitions.pop(key, None)

    # -- the loop --

    async def run(self) -> None:
        backoff_s = BACKOFF_MIN_S
        while True:
            self._changed.clear()
            followed = self._ready(time.monotonic())
            if not followed:
                await self._idle()
                continue
            try:
                entries = await self._fetch(followed)
            except FetchSessionNotHeld:
                continue  # the leader restarted or expired it: open a new one at once
            except (TideError, ValueError) as error:
                if _no_such_endpoint(error):
                    await self._follow_one_by_one()  # a leader of an older version
                    continue
                self._warn(f"replica fetch session with broker {self.leader_id} failed: {error}")
                await self._sleep_unless_changed(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                continue
            backoff_s = BACKOFF_MIN_S
            if entries is None:
                continue  # the partition set changed while the poll waited: send again
            appended = self._apply(entries, followed)
            if appended:
                # Durable waiters are futures the syncer's fsync completes: the next
                # request leaves the moment the last of these fsyncs is done.
                await _all_durable(appended)

    async def _follow_one_by_one(self) -> None:
        """Compatibility with a leader that predates sessions: one loop per partition
        on its per-partition endpoint, as followers did before, until the partition
        set changes or ``LEGACY_RETRY_S`` passed (then the session is tried again: the
        leader may have been upgraded meanwhile)."""
        self._warn(f"broker {self.leader_id} has no replica fetch sessions: fetching per partition")
        self._changed.clear()
        loops = [asyncio.ensure_future(self._follow_one(key)) for key in list(self.partitions)]
        changed = asyncio.ensure_future(self._changed.wait())
        try:  # a loop ends only when its partition left or on an unexpected failure
            await asyncio.wait(
                [*loops, changed], timeout=LEGACY_RETRY_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for loop in [*loops, changed]:
                loop.cancel()
            results = await asyncio.gather(*loops, return_exceptions=True)
        for result in results:  # an unexpected failure stops the broker, as in run()
            if isinstance(result, Exception):
                raise result

    async def _follow_one(self, key: Key) -> None:
        url = f"{self.leader_url.rstrip('/')}/v1/replica/{key[0]}/{key[1]}/records"
        while (one := self.partitions.get(key)) is not None and not one.replica.closed:
            if one.retry_at > time.monotonic():
                await asyncio.sleep(one.retry_at - time.monotonic())
                continue
            wanted = _wanted(one)
            params = {
                "broker_id": str(self.broker_id),
                "topic_id": wanted.topic_id,
                "leader_epoch": str(wanted.leader_epoch),
                "offset": str(wanted.offset),
                "last_fetched_epoch": str(wanted.last_fetched_epoch),
                "durable_offset": str(wanted.durable_offset),
                "wait_ms": str(self._wait_ms),
                "max_bytes": str(PARTITION_BYTES),
            }
            try:
                body, headers = await self._transport().request(
                    "GET", url, params=params, timeout_ms=self._timeout_ms
                )
                entry = _entry_from_headers(key, body, headers)
            except (TideError, ValueError) as error:
                self._back_off(key, one, error)
                continue
            appended = self._apply([entry], {key: one})
            await _all_durable(appended)

    def _ready(self, now: float) -> dict[Key, Followed]:
        return {
            key: f
            for key, f in self.partitions.items()
            if f.retry_at <= now and not f.replica.closed
        }

    async def _idle(self) -> None:
        """Nothing to fetch now: until the set changes or the first backoff ends."""
        now = time.monotonic()
        retry = [f.retry_at for f in self.partitions.values() if not f.replica.closed]
        await self._sleep_unless_changed(min(retry) - now if retry else None)

    async def _sleep_unless_changed(self, timeout_s: float | None) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def _fetch(self, followed: dict[Key, Followed]) -> list[ReplicaFetchEntry] | None:
        """One request; None when the partition set changed before its answer came.
        The leader's view of the session is taken as ours only from an answer that
        was read whole and names the session; after anything else (a failure, a
        cancelled poll, no header) the next request opens a new one."""
        request = self._request(followed)
        held = False
        try:
            answer = await self._poll(request)
            if answer is None:
                return None
            body, headers = answer
            entries = decode_replica_fetch(body)
            held = headers.get(SESSION_HEADER) == str(self._session_id)
            return entries
        finally:
            if held:
                self._held, self._session_epoch = self._pending, self._session_epoch + 1
            else:  # or the leader holds no session (an older leader has none at all)
                self._end_session()

    async def _poll(self, request: ReplicaFetchRequest) -> tuple[bytes, Mapping[str, str]] | None:
        """The request's answer; None when ``add`` kicked it.

        The request runs in this task (no task per poll, no race against the change
        event): ``add`` cancels the wait instead, and ``_kicked`` tells that cancel
        from the session's own (shutdown), which still propagates."""
        task = asyncio.current_task()
        self._polling, self._kicked = task, False
        try:
            return await self._transport().request(
                "POST",
                self.url,
                data=control.encode(request),
                headers=_POLL_HEADERS,
                timeout_ms=self._timeout_ms,
            )
        except asyncio.CancelledError:
            if self._kicked and task is not None:
                self._kicked = False
                if task.uncancel() == 0:
                    # Kicked by add(): poll again, with the new partition. An answer that
                    # came in the same loop turn is dropped and asked for again.
                    return None
            raise  # the session itself is cancelled (shutdown), kicked or not
        finally:
            self._polling = None
            if self._kicked and task is not None and task.cancelling():
                # The kick's cancel never surfaced here (something below absorbed it):
                # withdraw it, so that later timeouts in this task still work.
                task.uncancel()
            self._kicked = False

    def _end_session(self) -> None:
        """The next request opens a new session with every partition in it."""
        self._session_id, self._session_epoch = 0, 0
        self._held, self._pending = {}, {}

    def _poll_wait_ms(self, followed: dict[Key, Followed]) -> int:
        """The poll's wait: ``wait_ms``, or less so that it ends when the first partition
        left out of it (backing off) may be fetched again."""
        waiting = [
            f.retry_at
            for key, f in self.partitions.items()
            if key not in followed and not f.replica.closed
        ]
        if not waiting:
            return self._wait_ms
        until_ms = math.ceil((min(waiting) - time.monotonic()) * 1000)
        return max(0, min(self._wait_ms, until_ms))

    def _request(self, followed: dict[Key, Followed]) -> ReplicaFetchRequest:
        """A whole request that opens a session, or, within one, only what changed
        against what the leader holds (the partitions whose state moved, and the ones
        no longer fetched): an idle partition costs the leader nothing per round, and
        this side one comparison."""
        wanted = {key: _wanted(f) for key, f in followed.items()}
        self._pending = wanted
        forgotten: list[ReplicaFetchForgotten] = []
        if self._session_id:
            held = self._held
            partitions = [w for key, w in wanted.items() if held.get(key) != w]
            forgotten = [ReplicaFetchForgotten(*key) for key in held if key not in wanted]
        else:
            self._session_id = random.randint(1, SESSION_ID_MAX)
            self._session_epoch = 0
            partitions = list(wanted.values())
        if partitions:  # the order rotates so that the byte budget favours none
            self._rotation = (self._rotation + 1) % len(partitions)
            partitions = partitions[self._rotation :] + partitions[: self._rotation]
        return ReplicaFetchRequest(
            broker_id=self.broker_id,
            partitions=partitions,
            wait_ms=self._poll_wait_ms(followed),
            max_bytes=SESSION_BYTES,
            session_id=self._session_id,
            session_epoch=self._session_epoch,
            forgotten=forgotten,
        )

    # -- applying an answer --

    def _apply(
        self, entries: list[ReplicaFetchEntry], followed: dict[Key, Followed]
    ) -> list[tuple[PartitionReplica, int]]:
        """Each entry on its own; returns the (replica, log end) pairs to await durable."""
        appended: list[tuple[PartitionReplica, int]] = []
        for entry in entries:
            key = (entry.topic, entry.partition)
            one = followed.get(key)
            if one is None or self.partitions.get(key) is not one or one.replica.closed:
                continue  # not asked for, or dropped meanwhile
            try:
                end = self._apply_entry(one.replica, entry)
            except (TideError, ValueError) as error:
                self._back_off(key, one, error)
                continue
            one.backoff_s = BACKOFF_MIN_S
            if end is not None:
                appended.append((one.replica, end))
        return appended

    def _apply_entry(self, replica: PartitionReplica, entry: ReplicaFetchEntry) -> int | None:
        if entry.error is not None:
            raise _error(entry.error)
        log_ = replica.log
        if entry.diverging is not None:
            _truncate(replica, entry.diverging)
            return None
        if log_.log_end_offset < entry.log_start_offset:
            _restart_at(replica, entry.log_start_offset)
            return None
        end = None
        if entry.batches:
            replica.append_replicated(entry.batches, _now_ms())
            self._mark_dirty(replica)
            self._replicated(replica.topic, len(entry.batches))
            end = log_.log_end_offset
        replica.leader_answered(entry.high_watermark)
        return end

    def _back_off(self, key: Key, one: Followed, error: Exception) -> None:
        now = time.monotonic()
        one.retry_at = now + one.backoff_s
        one.backoff_s = min(one.backoff_s * 2, BACKOFF_MAX_S)
        # Said once per second at most, not at DEBUG: a follower that cannot fetch is
        # how a partition becomes under-replicated.
        if now - one.warned_at >= WARN_INTERVAL_S:
            one.warned_at = now
            log.warning("%s/%s: replica fetch from %s failed: %s", *key, self.leader_url, error)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL_S:
            self._warned_at = now
            log.warning("%s", message)


def _wanted(followed: Followed) -> ReplicaFetchPartition:
    replica = followed.replica
    log_ = replica.log
    return ReplicaFetchPartition(
        topic=replica.topic,
        partition=replica.partition,
        topic_id=replica.topic_id,
        leader_epoch=followed.leader_epoch,
        offset=log_.log_end_offset,
        last_fetched_epoch=log_.latest_epoch(),
        durable_offset=replica.core.durable_offset,
        high_watermark=replica.high_watermark,
        max_bytes=PARTITION_BYTES,
    )


def _truncate(replica: PartitionReplica, diverging: tuple[int, int]) -> None:
    """KIP-279: cut where the leader's log and ours agree (or start over below our log
    start); a divergence with nothing to cut is an error, never asked again at once."""
    log_ = replica.log
    epoch, end_offset = diverging
    own = log_.epoch_and_end_offset(epoch) if epoch != UNKNOWN else (UNKNOWN, UNKNOWN)
    cut = truncation_offset(diverging, own, log_.log_start_offset, log_.log_end_offset)
    if cut < log_.log_start_offset:
        _restart_at(replica, cut)
    elif cut < log_.log_end_offset:
        replica.truncate_to(cut)
    else:
        raise CorruptBatch(
            f"leader says our log diverges at epoch {epoch} end {end_offset}, "
            f"but ours ends at {log_.log_end_offset} with nothing to cut"
        )


def _restart_at(replica: PartitionReplica, offset: int) -> None:
    """The leader deleted (retention) what this follower needs next: start over."""
    log.info(
        "%s/%s: leader's log starts at %s, past ours (%s): starting over there",
        replica.topic,
        replica.partition,
        offset,
        replica.log.log_end_offset,
    )
    replica.reset_to(offset, _now_ms())


def _no_such_endpoint(error: Exception) -> bool:
    """The leader's router has no POST /v1/replica/fetch (404 not_found, which the
    transport reads as an InvalidRequest): a broker of an older version."""
    return isinstance(error, InvalidRequest) and str(error).startswith("not_found")


def _entry_from_headers(key: Key, body: bytes, headers: Mapping[str, str]) -> ReplicaFetchEntry:
    """The per-partition endpoint's answer (headers, docs/PROTOCOL.md) as an entry."""
    diverging_end = headers.get("Tide-Diverging-End-Offset")
    diverging = None
    if diverging_end is not None:
        diverging = (int(headers.get("Tide-Diverging-Epoch", str(UNKNOWN))), int(diverging_end))
    return ReplicaFetchEntry(
        key[0],
        key[1],
        int(headers.get("Tide-High-Watermark", "-1")),
        int(headers.get("Tide-Log-Start-Offset", "0")),
        int(headers.get("Tide-Log-End-Offset", "-1")),
        diverging,
        None,
        body,
    )


def _error(raw: dict[str, str]) -> TideError:
    cls = ERRORS_BY_CODE.get(str(raw.get("code", "")), InternalError)
    return cls(str(raw.get("message", "")))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
