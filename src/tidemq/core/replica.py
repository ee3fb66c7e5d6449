"""The replica core: the replication decisions of one partition replica, as a pure
state machine (``ReplicaCore.handle(event, now_ms) -> effects``), in the style of
etcd's raft package. No I/O, no clock, no asyncio: the broker's partition shell feeds
it events (appended, flushed, a follower fetched, the coordinator answered, a waiter
gave up) and carries out the effects it returns (complete or fail a waiting request,
propose an ISR change to the coordinator, checkpoint the high watermark). A seeded
simulation drives the same class.

How replication works (Kafka's ISR protocol, with durable acknowledgements):

* The coordinator decides who leads and in which *leader epoch*, and owns the ISR;
  every change of leader, ISR or replicas bumps the *partition epoch*. This replica
  learns both from its assignment (heartbeat answers, level-triggered).
* Followers pull from the leader. A follower's fetch carries the offset it wants next
  (its log end), the epoch of its last batch and its *durable* end (what it has
  fsynced). The leader's shell first checks the follower's log against its own epoch
  history (:func:`diverging_epoch`); only a fetch whose log is a prefix of the leader's
  reaches this core as :class:`FollowerFetched`.
* The high watermark is the smallest durable end over the leader and every member of
  the *maximal ISR* (the committed ISR plus members a pending proposal would add).
  Consumers read below it; ``acks=all`` answers once it passes the request's records.
  So an acknowledged record is on the disk of every ISR member, and the coordinator
  elects leaders only from the ISR: losing power on every replica at once loses no
  acknowledged record (under ``fsync=always``; the shell reports log end as durable
  end under the other policies).
* The leader proposes ISR changes (a follower lagging more than ``lag_time_max_ms``
  leaves; one that holds the high watermark durably joins) with the leader epoch and
  partition epoch it knows. The coordinator applies them only if both still match
  (compare-and-set), so a deposed or cut-off leader can never shrink the ISR to itself:
  it keeps waiting for followers that no longer fetch from it, and acknowledges
  nothing with acks=all.

Must always hold (checked by tests/unit/test_replica_core.py and the simulation):

* the high watermark never decreases while this replica leads, and never exceeds the
  durable end of any member of the maximal ISR nor the local durable end;
* a follower's high watermark never exceeds its own log end;
* a waiter is answered exactly once (completed, failed, or cancelled by its owner);
  when the replica stops leading or closes, every leader-side waiter fails at once
  with the retriable :class:`~tidemq.errors.NotLeader` (nothing spins on it);
* at most one ISR proposal is in flight, and it names the current epochs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from tidemq.errors import NotEnoughReplicas, NotLeader, TideError, invariant

UNKNOWN = -1
PROPOSAL_RETRY_MS = 500


class Role(Enum):
    LEADER = "leader"
    FOLLOWER = "follower"
    OFFLINE = "offline"  # no leader known, or closed


class Acks(Enum):
    NONE = "0"
    LEADER = "1"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class ReplicaAssignment:
    """The coordinator's word on this partition, as a heartbeat answer carries it."""

    leader_id: int | None
    leader_epoch: int
    partition_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    min_insync_replicas: int = 1


# --- events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assigned:
    assignment: ReplicaAssignment


@dataclass(frozen=True, slots=True)
class Appended:
    """The local log now ends at ``log_end_offset`` (leader append or replication)."""

    log_end_offset: int


@dataclass(frozen=True, slots=True)
class Flushed:
    """Everything below ``durable_offset`` is on disk (or counts as such by policy)."""

    durable_offset: int


@dataclass(frozen=True, slots=True)
class Truncated:
    """The local log was cut back to ``log_end_offset`` (follower divergence)."""

    log_end_offset: int


@dataclass(frozen=True, slots=True)
class FollowerFetched:
    """Leader: a follower's fetch, already checked against the epoch history."""

    broker_id: int
    fetch_offset: int
    durable_offset: int


@dataclass(frozen=True, slots=True)
class LeaderAnswered:
    """Follower: the leader's high watermark, from a fetch answer."""

    high_watermark: int


@dataclass(frozen=True, slots=True)
class AwaitAck:
    """Leader: a produce whose records end below ``end_offset`` waits for ``acks``."""

    waiter_id: int
    end_offset: int
    acks: Acks


@dataclass(frozen=True, slots=True)
class AwaitData:
    """Leader: a long-poll fetch at ``offset`` waits for something to read there.

    A consumer waits for the high watermark to pass ``offset``; a follower for the
    log end (followers copy what is not committed yet)."""

    waiter_id: int
    offset: int
    follower: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """The waiter's owner gave up (timeout, client gone): forget it, answer nothing."""

    waiter_id: int


@dataclass(frozen=True, slots=True)
class IsrAnswered:
    """The coordinator's answer to our ISR proposal that named ``proposed_partition_epoch``:
    the partition as it now is, if the proposal was accepted; ``accepted=False`` when it
    was refused or its answer lost. An answer that does not match the pending proposal
    (a duplicate, a late answer) is ignored."""

    accepted: bool
    proposed_partition_epoch: int
    leader_epoch: int = UNKNOWN
    partition_epoch: int = UNKNOWN
    isr: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Tick:
    pass


@dataclass(frozen=True, slots=True)
class Closed:
    pass


Event = (
    Assigned
    | Appended
    | Flushed
    | Truncated
    | FollowerFetched
    | LeaderAnswered
    | AwaitAck
    | AwaitData
    | Cancel
    | IsrAnswered
    | Tick
    | Closed
)


# --- effects -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Complete:
    waiter_id: int


@dataclass(frozen=True, slots=True)
class Fail:
    waiter_id: int
    error: TideError


@dataclass(frozen=True, slots=True)
class ProposeIsr:
    leader_epoch: int
    partition_epoch: int
    isr: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HighWatermarkAdvanced:
    high_watermark: int


Effect = Complete | Fail | ProposeIsr | HighWatermarkAdvanced


# --- state -------------------------------------------------------------------------


@dataclass(slots=True)
class FollowerProgress:
    """What the leader knows of one follower in this leader epoch."""

    fetch_offset: int = UNKNOWN
    durable_offset: int = UNKNOWN
    last_caught_up_ms: int = 0
    last_fetch_ms: int = UNKNOWN
    last_fetch_leader_end: int = UNKNOWN


@dataclass(slots=True)
class _Proposal:
    isr: tuple[int, ...]
    partition_epoch: int


@dataclass
class ReplicaCore:
    """One partition replica's replication state. See the module docstring."""

    broker_id: int
    log_end_offset: int
    durable_offset: int
    high_watermark: int
    lag_time_max_ms: int = 10_000
    role: Role = Role.OFFLINE
    leader_id: int | None = None
    leader_epoch: int = UNKNOWN
    partition_epoch: int = UNKNOWN
    replicas: tuple[int, ...] = ()
    isr: tuple[int, ...] = ()
    min_insync_replicas: int = 1
    epoch_start_offset: int = 0
    followers: dict[int, FollowerProgress] = field(default_factory=dict)
    _proposal: _Proposal | None = None
    _unresolved: tuple[int, ...] = ()  # members a proposal of unknown outcome may have added
    _proposal_retry_at_ms: int = 0
    _durable_waiters: deque[tuple[int, int]] = field(default_factory=deque)
    _hw_waiters: deque[tuple[int, int]] = field(default_factory=deque)
    _data_waiters: dict[int, tuple[int, bool]] = field(default_factory=dict)
    _cancelled: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        invariant(
            self.high_watermark <= self.log_end_offset,
            f"high watermark {self.high_watermark} above log end {self.log_end_offset}",
        )

    # -- queries (pure, for the shell's request checks) --

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def maximal_isr(self) -> tuple[int, ...]:
        """The ISR as the coordinator may have it now: the committed one plus whoever a
        pending or refused-but-maybe-applied proposal adds (a lost answer does not mean
        the coordinator did not apply it). The high watermark waits for all of them."""
        pending = self._proposal.isr if self._proposal is not None else ()
        extra = tuple(dict.fromkeys(b for b in (*pending, *self._unresolved) if b not in self.isr))
        return self.isr + extra

    def check_produce(self, acks: Acks) -> None:
        """Raises what a produce must be refused with before anything is appended."""
        if self.role is not Role.LEADER:
            raise NotLeader(f"broker {self.broker_id} does not lead this partition")
        if acks is Acks.ALL and len(self.isr) < self.min_insync_replicas:
            raise NotEnoughReplicas(
                f"in-sync replicas {list(self.isr)} are fewer than "
                f"min_insync_replicas={self.min_insync_replicas}"
            )

    def waiting(self) -> int:
        return len(self._durable_waiters) + len(self._hw_waiters) + len(self._data_waiters)

    # -- the one entry point --

    def handle(self, event: Event, now_ms: int) -> list[Effect]:
        effects: list[Effect] = []
        match event:
            case Appended(log_end_offset):
                self._on_appended(log_end_offset, effects)
            case Flushed(durable_offset):
                self._on_flushed(durable_offset, now_ms, effects)
            case FollowerFetched():
                self._on_follower_fetched(event, now_ms, effects)
            case AwaitAck():
                self._on_await_ack(event, effects)
            case AwaitData():
                self._on_await_data(event, effects)
            case Cancel(waiter_id):
                self._cancel(waiter_id)
            case LeaderAnswered(high_watermark):
                self._on_leader_answered(high_watermark, effects)
            case Assigned(assignment):
                self._on_assigned(assignment, now_ms, effects)
            case IsrAnswered():
                self._on_isr_answered(event, now_ms, effects)
            case Truncated(log_end_offset):
                self._on_truncated(log_end_offset)
            case Tick():
                self._maybe_propose(now_ms, effects)
            case Closed():
                self.role = Role.OFFLINE
                self._fail_all(NotLeader("partition closed on this broker"), effects)
        return effects

    # -- shortcuts for a replication round's idle partitions --
    #
    # A follower's fetch session names every partition it follows on this leader, so
    # each round touches every one of them, most often with nothing new: the follower
    # fetched the same offset as last time, and the session watches the partition for
    # data and stops watching it. These three do what the equivalent event does, with
    # no event, no dispatch and no effects list; tests/unit/test_replica_core.py checks
    # each against its event.

    def repeated_fetch(
        self, broker_id: int, fetch_offset: int, durable_offset: int, now_ms: int
    ) -> bool:
        """A caught-up ISR member's fetch that repeats its previous one while the log
        stood still and everything is committed: applied as :class:`FollowerFetched`
        would (it stays caught up, as of now) and True; False (nothing done) when the
        event is needed. The one difference: an ISR change that is due for *another*
        reason (another follower lags, a refused proposal's retry) waits for the next
        :class:`Tick` instead of riding on this fetch."""
        # Some of these follow from others in every reachable state (an ISR member's
        # durable end bounds the high watermark); each is kept so that the shortcut's
        # equivalence never rests on that reasoning. The tests pin the ones that matter
        # on their own (role, ISR, fetch at the log end).
        progress = self.followers.get(broker_id)
        if (
            progress is None
            or self.role is not Role.LEADER
            or fetch_offset != self.log_end_offset
            or self.high_watermark != self.log_end_offset
            or progress.fetch_offset != fetch_offset
            or progress.durable_offset != durable_offset
            or progress.last_fetch_leader_end != self.log_end_offset
            or broker_id not in self.isr
        ):
            return False
        progress.last_caught_up_ms = now_ms
        progress.last_fetch_ms = now_ms
        return True

    def watch_data(self, waiter_id: int, offset: int, follower: bool) -> bool:
        """:class:`AwaitData` when it would wait: True and the waiter registered; False
        (nothing done) when it would be answered or failed at once (use the event)."""
        if self.role is not Role.LEADER or self._has_data(offset, follower):
            return False
        self._data_waiters[waiter_id] = (offset, follower)
        return True

    def unwatch_data(self, waiter_id: int) -> None:
        """:class:`Cancel` of a waiter :meth:`watch_data` registered."""
        self._cancel(waiter_id)

    # -- local log progress --

    def _on_appended(self, log_end_offset: int, effects: list[Effect]) -> None:
        invariant(log_end_offset >= self.log_end_offset, "log end offset went backwards")
        self.log_end_offset = log_end_offset
        if self._data_waiters:
            self._release_data_waiters(effects)

    def _on_flushed(self, durable_offset: int, now_ms: int, effects: list[Effect]) -> None:
        durable_offset = min(durable_offset, self.log_end_offset)
        if durable_offset <= self.durable_offset:
            return
        self.durable_offset = durable_offset
        while self._durable_waiters and self._durable_waiters[0][1] <= durable_offset:
            self._answer(self._durable_waiters.popleft()[0], effects)
        if self.role is Role.LEADER:
            self._advance_high_watermark(effects)

    def _on_truncated(self, log_end_offset: int) -> None:
        invariant(self.role is not Role.LEADER, "a leader never truncates its log")
        self.log_end_offset = log_end_offset
        self.durable_offset = min(self.durable_offset, log_end_offset)
        self.high_watermark = min(self.high_watermark, log_end_offset)

    # -- leader: followers and the high watermark --

    def _on_follower_fetched(
        self, event: FollowerFetched, now_ms: int, effects: list[Effect]
    ) -> None:
        if self.role is not Role.LEADER or event.broker_id not in self.followers:
            return
        progress = self.followers[event.broker_id]
        fetch_offset = min(event.fetch_offset, self.log_end_offset)
        # Kafka's rule: caught up if it asked for the log end as of now, or for the
        # log end as of its previous fetch (then it was caught up at that time).
        if fetch_offset >= self.log_end_offset:
            progress.last_caught_up_ms = now_ms
        elif progress.last_fetch_leader_end != UNKNOWN and (
            fetch_offset >= progress.last_fetch_leader_end
        ):
            progress.last_caught_up_ms = max(progress.last_caught_up_ms, progress.last_fetch_ms)
        progress.fetch_offset = fetch_offset
        progress.durable_offset = min(event.durable_offset, fetch_offset)
        progress.last_fetch_ms = now_ms
        progress.last_fetch_leader_end = self.log_end_offset
        self._advance_high_watermark(effects)
        self._maybe_propose(now_ms, effects)

    def _advance_high_watermark(self, effects: list[Effect]) -> None:
        candidate = self.durable_offset
        for broker in self.maximal_isr:
            if broker == self.broker_id:
                continue
            progress = self.followers.get(broker)
            if progress is None or progress.durable_offset == UNKNOWN:
                return
            candidate = min(candidate, progress.durable_offset)
        if candidate <= self.high_watermark:
            return
        self.high_watermark = candidate
        effects.append(HighWatermarkAdvanced(candidate))
        enough = len(self.isr) >= self.min_insync_replicas
        while self._hw_waiters and self._hw_waiters[0][1] <= candidate:
            waiter_id = self._hw_waiters.popleft()[0]
            if enough:
                self._answer(waiter_id, effects)
            elif waiter_id not in self._cancelled:
                effects.append(Fail(waiter_id, self._too_few_after_append()))
            else:
                self._cancelled.discard(waiter_id)
        self._release_data_waiters(effects)

    def _too_few_after_append(self) -> NotEnoughReplicas:
        return NotEnoughReplicas(
            f"appended, but the in-sync replicas {list(self.isr)} fell below "
            f"min_insync_replicas={self.min_insync_replicas}"
        )

    # -- waiters --

    def _on_await_ack(self, event: AwaitAck, effects: list[Effect]) -> None:
        if self.role is not Role.LEADER:
            effects.append(Fail(event.waiter_id, NotLeader("no longer the leader")))
            return
        if event.acks is Acks.NONE:
            effects.append(Complete(event.waiter_id))
        elif event.acks is Acks.LEADER:
            if self.durable_offset >= event.end_offset:
                effects.append(Complete(event.waiter_id))
            else:
                _insert_sorted(self._durable_waiters, event.waiter_id, event.end_offset)
        elif self.high_watermark >= event.end_offset:
            if len(self.isr) >= self.min_insync_replicas:
                effects.append(Complete(event.waiter_id))
            else:
                effects.append(Fail(event.waiter_id, self._too_few_after_append()))
        else:
            _insert_sorted(self._hw_waiters, event.waiter_id, event.end_offset)

    def _on_await_data(self, event: AwaitData, effects: list[Effect]) -> None:
        if self.role is not Role.LEADER:
            effects.append(Fail(event.waiter_id, NotLeader("no longer the leader")))
        elif self._has_data(event.offset, event.follower):
            effects.append(Complete(event.waiter_id))
        else:
            self._data_waiters[event.waiter_id] = (event.offset, event.follower)

    def _has_data(self, offset: int, follower: bool) -> bool:
        return (self.log_end_offset if follower else self.high_watermark) > offset

    def _release_data_waiters(self, effects: list[Effect]) -> None:
        ready = [w for w, (o, f) in self._data_waiters.items() if self._has_data(o, f)]
        for waiter_id in ready:
            del self._data_waiters[waiter_id]
            effects.append(Complete(waiter_id))

    def _cancel(self, waiter_id: int) -> None:
        if self._data_waiters.pop(waiter_id, None) is None:
            self._cancelled.add(waiter_id)  # skipped lazily when its turn comes

    def _answer(self, waiter_id: int, effects: list[Effect]) -> None:
        if waiter_id in self._cancelled:
            self._cancelled.discard(waiter_id)
        else:
            effects.append(Complete(waiter_id))

    def _fail_all(self, error: TideError, effects: list[Effect]) -> None:
        for queue in (self._durable_waiters, self._hw_waiters):
            for waiter_id, _ in queue:
                if waiter_id not in self._cancelled:
                    effects.append(Fail(waiter_id, error))
            queue.clear()
        for waiter_id in self._data_waiters:
            effects.append(Fail(waiter_id, error))
        self._data_waiters.clear()
        self._cancelled.clear()

    # -- assignment and ISR changes --

    def _on_assigned(self, new: ReplicaAssignment, now_ms: int, effects: list[Effect]) -> None:
        if new.leader_epoch < self.leader_epoch:
            return  # a delayed, stale answer
        if new.leader_epoch == self.leader_epoch and new.partition_epoch <= self.partition_epoch:
            self.min_insync_replicas = new.min_insync_replicas
            return
        new_epoch = new.leader_epoch > self.leader_epoch
        was_leader = self.role is Role.LEADER
        self.leader_id = new.leader_id
        self.leader_epoch = new.leader_epoch
        self.partition_epoch = new.partition_epoch
        self.replicas = new.replicas
        self.isr = new.isr
        self.min_insync_replicas = new.min_insync_replicas
        # A pending proposal names an old partition epoch: it can no longer apply, and
        # this assignment is the coordinator's word on what did.
        self._proposal = None
        self._unresolved = ()
        if new.leader_id == self.broker_id:
            self.role = Role.LEADER
            if new_epoch or not was_leader:
                self._become_leader(now_ms)
            self._sync_followers(now_ms)
            self._advance_high_watermark(effects)
        else:
            self.role = Role.FOLLOWER if new.leader_id is not None else Role.OFFLINE
            if was_leader:
                self._fail_all(NotLeader("leadership moved to another broker"), effects)
            self.followers.clear()
            self.high_watermark = min(self.high_watermark, self.log_end_offset)

    def _become_leader(self, now_ms: int) -> None:
        self.epoch_start_offset = self.log_end_offset
        self.followers = {}
        self._proposal_retry_at_ms = now_ms

    def _sync_followers(self, now_ms: int) -> None:
        wanted = {b for b in self.replicas if b != self.broker_id}
        for broker in list(self.followers):
            if broker not in wanted:
                del self.followers[broker]
        for broker in wanted:
            if broker not in self.followers:
                self.followers[broker] = FollowerProgress(last_caught_up_ms=now_ms)

    def _on_isr_answered(self, answer: IsrAnswered, now_ms: int, effects: list[Effect]) -> None:
        proposal = self._proposal
        if proposal is None or answer.proposed_partition_epoch != proposal.partition_epoch:
            return
        self._proposal = None
        if self.role is not Role.LEADER:
            return
        if not answer.accepted:
            # Refused, or the answer was lost: until an assignment tells, the members it
            # would have added keep counting for the high watermark.
            added = tuple(b for b in proposal.isr if b not in self.isr)
            self._unresolved = tuple(dict.fromkeys((*self._unresolved, *added)))
            self._proposal_retry_at_ms = now_ms + PROPOSAL_RETRY_MS
            return
        if answer.leader_epoch != self.leader_epoch or answer.partition_epoch <= (
            self.partition_epoch
        ):
            return  # an assignment already told us something newer
        self.partition_epoch = answer.partition_epoch
        self.isr = answer.isr
        self._unresolved = ()
        self._advance_high_watermark(effects)

    def _maybe_propose(self, now_ms: int, effects: list[Effect]) -> None:
        if self.role is not Role.LEADER or self._proposal is not None:
            return
        if now_ms < self._proposal_retry_at_ms:
            return
        wanted = self._wanted_isr(now_ms)
        if wanted == self.isr:
            return
        self._proposal = _Proposal(wanted, self.partition_epoch)
        effects.append(ProposeIsr(self.leader_epoch, self.partition_epoch, wanted))

    def _wanted_isr(self, now_ms: int) -> tuple[int, ...]:
        """Laggards out, caught-up followers in; the leader always stays."""
        members = []
        for broker in self.replicas:
            if broker == self.broker_id:
                members.append(broker)
                continue
            progress = self.followers.get(broker)
            if progress is None:
                continue
            if broker in self.isr:
                if now_ms - progress.last_caught_up_ms <= self.lag_time_max_ms:
                    members.append(broker)
            elif self._may_join(progress):
                members.append(broker)
        return tuple(members)

    def _may_join(self, progress: FollowerProgress) -> bool:
        """Holds, on disk, everything committed and everything of this epoch so far."""
        floor = max(self.high_watermark, self.epoch_start_offset)
        return progress.fetch_offset >= floor and progress.durable_offset >= floor

    # -- follower --

    def _on_leader_answered(self, high_watermark: int, effects: list[Effect]) -> None:
        if self.role is not Role.FOLLOWER:
            return
        bounded = min(high_watermark, self.log_end_offset)
        if bounded > self.high_watermark:
            self.high_watermark = bounded
            effects.append(HighWatermarkAdvanced(bounded))


def _insert_sorted(queue: deque[tuple[int, int]], waiter_id: int, end_offset: int) -> None:
    """Appends in offset order; produce waiters almost always arrive in order."""
    if not queue or queue[-1][1] <= end_offset:
        queue.append((waiter_id, end_offset))
        return
    items = sorted([*queue, (waiter_id, end_offset)], key=lambda item: item[1])
    queue.clear()
    queue.extend(items)


def diverging_epoch(
    fetch_offset: int,
    last_fetched_epoch: int,
    leader_epoch_end: tuple[int, int],
    leader_log_start: int,
) -> tuple[int, int] | None:
    """Leader side: None when a follower's log (ending at ``fetch_offset``, last batch
    in ``last_fetched_epoch``) is a prefix of the leader's; else what to tell it, the
    leader's (epoch, end offset) for that epoch, so it can cut (:func:`truncation_offset`).

    ``leader_epoch_end`` is the leader's OffsetsForLeaderEpoch answer for
    ``last_fetched_epoch``: the largest epoch it knows that is <= it and where that
    epoch ends in the leader's log (at most the leader's log end). The follower's
    records past it were never committed: committed records are on every ISR member,
    the leader included. (UNKNOWN, leader log start) when the leader has no such
    epoch any more (retention)."""
    if last_fetched_epoch == UNKNOWN or fetch_offset <= leader_log_start:
        return None
    epoch, end_offset = leader_epoch_end
    if epoch == UNKNOWN:
        return UNKNOWN, leader_log_start
    if epoch == last_fetched_epoch and end_offset >= fetch_offset:
        return None
    return epoch, end_offset


def truncation_offset(
    diverging: tuple[int, int],
    own_epoch_end: tuple[int, int],
    own_log_start: int,
    own_log_end: int,
) -> int:
    """Follower side (Kafka's KIP-279): where to cut, given the leader's (epoch, end)
    and the follower's own answer for that epoch (the largest epoch it has <= it, and
    where that ends here). The logs agree up to the smaller of the two ends: beyond
    the leader's end the follower has what the leader lacks; beyond its own end, its
    records belong to a later epoch the leader did not write. May be below the
    follower's log start: then the follower starts over empty at that offset."""
    leader_epoch, leader_end = diverging
    own_epoch, own_end = own_epoch_end
    if leader_epoch == UNKNOWN:
        cut = leader_end
    elif own_epoch == UNKNOWN:
        cut = own_log_start  # nothing here as old as the leader's epoch
    else:
        cut = min(leader_end, own_end)
    return min(cut, own_log_end)
