"""The leader's side of incremental replica fetch sessions (Kafka's KIP-227).

A follower's session names every partition it follows on this leader. Without a
session, each request names all of them, and the leader checks, counts, reads and
watches each one per round, so a follower of many idle partitions pays for all of
them in every replication round, and so does the latency of the busy ones. With a
session the leader keeps what the follower last said of each partition; a request
names only the partitions whose state changed (and those it stopped fetching), and
the leader looks only at the partitions that may have something to say.

Invariants (``FollowerSession``):

* **Same state as a whole request.** After the leader applied request *e*, its
  ``partitions`` hold exactly what a whole request *e* would have named: the follower
  builds each request as the difference against what the leader holds, and takes
  the leader's state as its own only when the answer's ``Tide-Fetch-Session``
  header says the leader holds the session. Any other outcome (an error, a timeout,
  a cancelled poll, no header) makes the follower open a new session with a whole
  request. A request that does not continue the held session (another id, another
  epoch) is refused and changes nothing.
* **Nothing is missed.** Between two requests every held partition is either
  *dirty* (the next request looks at it or reads it: it changed, was answered, or
  its watch fired) or *watched*: a standing data watch at the follower's log end, which the
  replica completes when data arrives past it and fails when it stops leading or
  closes; either marks the partition dirty and wakes a waiting request. A partition
  that is neither dirty nor watched is one whose whole-request round would have
  done nothing but refresh the follower's fetch times.
* **Looks and reads.** A partition the request names is *looked at*: exactly the
  per-partition step of a whole request (the checks, then the core's
  FollowerFetched with its offsets), then read. A dirty partition looked at since
  it was last named (its watch fired, or it was answered and the follower did not
  name it again, so its state is the one looked at) is only read, as a waiting
  whole request reads after its wake-up; the read tells a lost leadership or a log
  start past the follower's log end.
* **Only a request vouches.** Held state is reported to a core (a look) only when
  a request arrives: the request names what changed and so vouches for the rest.
  Never after a wake-up in the middle of a poll, when the follower may already
  have dropped or reset a partition it has not told of yet.
* **Liveness.** The fetch times of partitions not named (which keep the follower
  in the ISR) are refreshed by looking at *every* held partition when a request
  arrives and the last such look is ``refresh_s`` old. A fetch waits at most half
  of ``replica_lag_time_max_ms`` on the leader (whole requests too), so looks are
  at most that plus ``refresh_s`` apart. Those looks also catch a leader epoch
  that moved, or a replica set that changed, while the leader kept leading
  (neither fails a watch).
* **A read checks the epoch.** A read without a look (a fired watch, a poll held
  back by the bound on replica bytes in flight) serves nothing if the replica's
  leader epoch is no longer the one the look checked: it may have lost and
  regained leadership, its log cut and rewritten meanwhile (fenced_leader_epoch,
  which closes the session).
* **Whole or nothing.** An answer that tells the follower something other than data
  or a high watermark (an error, a divergence, a log start past its log end) closes
  the session: the follower then acts on it and opens a new one, so neither side
  has to guess what the other did with that partition.
* **Bounds.** One session per follower broker (a new one closes the old); each holds
  at most ``PARTITIONS_MAX`` partitions; a session unused for ``IDLE_S`` is closed by
  the maintenance pass, which releases its watches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tidemq.broker.partition import PartitionReplica
from tidemq.errors import FetchSessionNotHeld, InvalidRequest
from tidemq.wire.replica_fetch import PARTITIONS_MAX, ReplicaFetchPartition, ReplicaFetchRequest

Key = tuple[str, int]
IDLE_S = 120.0  # a session unused this long is closed (the follower re-opens it)
# A request looks at every held partition once the last such look is this old (or an
# eighth of replica_lag_time_max_ms, if less): the ``refresh_s`` of ``take``.
REFRESH_S_MAX = 0.25


class _Watch:
    """A standing data watch of one held partition. It stands in for the future a
    replica's waiters hold (``done``, ``set_result``, ``set_exception``), and marks
    the partition dirty at once, with no loop callback."""

    __slots__ = ("_done", "key", "session")

    def __init__(self, session: FollowerSession, key: Key) -> None:
        self.session = session
        self.key = key
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, _result: None) -> None:
        self._fire()

    def set_exception(self, _error: BaseException) -> None:
        self._fire()  # no longer leading, or closed: the next look tells the follower

    def _fire(self) -> None:
        if not self._done:
            self._done = True
            self.session._fired(self.key, self)


@dataclass(slots=True)
class Held:
    wanted: ReplicaFetchPartition
    replica: PartitionReplica | None = None  # set by the last look that passed the checks
    # The standing watch: on the replica it was set on (a later look may fail and
    # forget the replica; the watch is still released there), its waiter id.
    watch: tuple[PartitionReplica, int, _Watch] | None = None


class FollowerSession:
    def __init__(self, broker_id: int, session_id: int) -> None:
        self.broker_id = broker_id
        self.id = session_id
        self.epoch = 0  # requests applied
        self.partitions: dict[Key, Held] = {}
        self.dirty: dict[Key, None] = {}  # insertion-ordered set: looked at next
        self.refreshed_at = float("-inf")
        self.used_at = time.monotonic()
        self.closed = False
        self._woken: asyncio.Future[None] | None = None

    def apply(self, request: ReplicaFetchRequest) -> None:
        """Takes the request's changes (the caller checked that it continues this
        session): forgotten partitions leave, named ones replace what was held.
        InvalidRequest (nothing changed) if the session would hold too many."""
        if len(self.partitions) + len(request.partitions) > PARTITIONS_MAX:
            keys = set(self.partitions).difference(
                (f.topic, f.partition) for f in request.forgotten
            )
            keys.update((w.topic, w.partition) for w in request.partitions)
            if len(keys) > PARTITIONS_MAX:
                raise InvalidRequest(f"a fetch session holds at most {PARTITIONS_MAX} partitions")
        for gone in request.forgotten:
            self._drop((gone.topic, gone.partition))
        for wanted in request.partitions:
            key = (wanted.topic, wanted.partition)
            self._drop(key)
            self.partitions[key] = Held(wanted)
            self.dirty[key] = None
        self.epoch += 1
        self.used_at = time.monotonic()

    def take(self, refresh_s: float, arrived: bool) -> tuple[list[Key], bool]:
        """The partitions to look at now: the dirty ones, or (and True) every held one
        when the request just ``arrived`` and the last look at all of them is
        ``refresh_s`` old. Never in the middle of a poll: only a request that
        arrives vouches for the state it does not name (its follower may have
        dropped or reset a partition since)."""
        now = time.monotonic()
        if arrived and now - self.refreshed_at >= refresh_s:
            self.refreshed_at = now
            self.dirty.clear()
            return list(self.partitions), True
        keys = list(self.dirty)
        self.dirty.clear()
        return keys, False

    def mark(self, keys: Iterable[Key]) -> None:
        for key in keys:
            if key in self.partitions:
                self.dirty[key] = None

    def watch(self, keys: Iterable[Key]) -> None:
        """A standing watch on each of ``keys`` that is held, looked at (has its
        replica), not dirty and not watched yet."""
        for key in keys:
            held = self.partitions.get(key)
            if held is None or held.watch is not None or held.replica is None:
                continue
            if key in self.dirty:
                continue
            watch = _Watch(self, key)
            waiter_id = held.replica.watch_data(held.wanted.offset, watch)
            if waiter_id is None or watch.done():
                self.dirty[key] = None  # data (or an error) at once
            else:
                held.watch = (held.replica, waiter_id, watch)

    async def wait(self, timeout_s: float) -> None:
        """Until a watch fires (or the session closes), or ``timeout_s``."""
        if self.dirty or self.closed:
            return
        woken = self._woken = asyncio.get_running_loop().create_future()
        timer = asyncio.get_running_loop().call_later(timeout_s, _wake, woken)
        try:
            await woken
        finally:
            timer.cancel()
            self._woken = None

    def close(self) -> None:
        self.closed = True
        for key in list(self.partitions):
            self._drop(key)
        self._wake()

    def _fired(self, key: Key, watch: _Watch) -> None:
        held = self.partitions.get(key)
        if held is None or held.watch is None or held.watch[2] is not watch:
            return
        held.watch = None
        self.dirty[key] = None
        self._wake()

    def _wake(self) -> None:
        if self._woken is not None:
            _wake(self._woken)

    def _drop(self, key: Key) -> None:
        held = self.partitions.pop(key, None)
        self.dirty.pop(key, None)
        if held is not None and held.watch is not None:
            replica, waiter_id, _ = held.watch
            held.watch = None
            replica.unwatch(waiter_id)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FetchSessions:
    """The leader's sessions, one per follower broker."""

    def __init__(self, opened: Callable[[], object] = lambda: None) -> None:
        self._sessions: dict[int, FollowerSession] = {}
        self._opened = opened  # called for each session opened (a metric)

    def session_for(self, request: ReplicaFetchRequest) -> FollowerSession:
        """The session ``request`` (whole, or incremental: the caller checked its
        shape) opens or continues, with the request applied; FetchSessionNotHeld
        (nothing changed) when it continues no held session."""
        if not request.incremental:
            old = self._sessions.pop(request.broker_id, None)
            if old is not None:
                old.close()
            session = self._sessions[request.broker_id] = FollowerSession(
                request.broker_id, request.session_id
            )
            self._opened()
        else:
            session = self._sessions.get(request.broker_id)  # type: ignore[assignment]
            if (
                session is None
                or session.closed
                or session.id != request.session_id
                or session.epoch != request.session_epoch
            ):
                raise FetchSessionNotHeld(
                    f"fetch session {request.session_id} epoch {request.session_epoch} "
                    "is not held here (the follower opens a new one)"
                )
        session.apply(request)
        return session

    def close(self, session: FollowerSession) -> None:
        session.close()
        if self._sessions.get(session.broker_id) is session:
            del self._sessions[session.broker_id]

    def expire(self, idle_s: float = IDLE_S) -> None:
        now = time.monotonic()
        for session in [s for s in self._sessions.values() if now - s.used_at > idle_s]:
            self.close(session)

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self.close(session)

    def __len__(self) -> int:
        return len(self._sessions)
