"""Rebalancing: moves replicas and leaders until every broker holds a fair share.

Owns: the decision of which partition moves where, and the next step of every move
in progress. Pure: ``plan_rebalance(state, live, limits)`` reads the cluster state and
the set of live brokers and returns commands (core/metadata.py); no I/O, no clock.
The coordinator runs it in its level-triggered tick, after failover and ISR
expansion, and commits what it returns. Because every decision is recomputed from
the state each tick, a lost tick, a coordinator restart or a broker that dies half
way through a move needs no special recovery: the next plan carries on.

A move (Kafka's partition reassignment) replaces one replica of a partition:

1. ``ReassignReplicas``: the new replica is added (replicas = original + new); the
   ISR does not change, so acks=all and the high watermark are unaffected;
2. the new broker copies the partition; the coordinator adds it to the ISR once it
   reported, under the current leader epoch, a log end at the leader's high
   watermark, proposed by its leader (``AlterIsr``);
3. if the leaving replica leads, ``ChangeLeader`` hands leadership to an in-sync
   target replica (epoch bump: the old leader is fenced);
4. ``CompleteReassignment`` drops the leaving replica: only once every target replica
   is in the ISR and leads or follows the leader, so the ISR after the drop is the
   whole target (replication factor copies, never fewer than min_insync_replicas).

A move whose new replica cannot finish (its broker died or started draining) is
cancelled while the leader is still an original replica (``CancelReassignment``).

What "balanced" means: over the live, non-draining ("eligible") brokers, replica
counts differ by at most one and leader counts differ by at most one; draining
brokers hold nothing. Replicas on dead brokers that are not draining are left to
failover (they are neither counted nor moved); replicas on draining brokers move
even when the broker is dead, so a dead broker can be drained before it is removed.

Must always hold (tests/unit/test_rebalance.py checks them from random states):

* at most one command per partition per plan (the shell checks a plan as one batch);
* never a command for a partition whose leader is offline or dead;
* nothing is placed on a draining or dead broker;
* at most ``moves_in_flight_max`` moves at once, and at most ``moves_per_broker_max``
  of them adding to or removing from any one broker (the copy traffic throttle);
* leaders are evened out (preferred-leader changes) only when no move is in flight
  or planned, so a partition's leadership moves at most once per move.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from tidemq.core.metadata import (
    CancelReassignment,
    ChangeLeader,
    ClusterState,
    Command,
    CompleteReassignment,
    PartitionState,
    Reassignment,
    ReassignReplicas,
    TopicPartition,
)
from tidemq.errors import InvariantViolation, TideError


@dataclass(frozen=True)
class RebalanceLimits:
    """The throttle. ``moves_in_flight_max = 0`` turns rebalancing and draining off."""

    moves_in_flight_max: int = 4
    moves_per_broker_max: int = 2
    leader_changes_per_plan_max: int = 8


@dataclass(frozen=True)
class _View:
    """What one plan reads, computed once."""

    state: ClusterState
    live: frozenset[int]
    eligible: frozenset[int]  # live and not draining
    draining: frozenset[int]  # draining, or dead long enough to be replaced

    def partitions(self) -> Iterator[tuple[TopicPartition, PartitionState]]:
        for name, topic in sorted(self.state.topics.items()):
            for index, partition in enumerate(topic.partitions):
                yield (name, index), partition

    def leader_is_live(self, partition: PartitionState) -> bool:
        return partition.leader_id is not None and partition.leader_id in self.live


def plan_rebalance(
    state: ClusterState,
    live: Collection[int],
    limits: RebalanceLimits,
    evacuate: Collection[int] = (),
) -> list[Command]:
    """The next commands towards a balanced placement (see the module docstring).

    ``evacuate``: brokers treated like draining ones without being marked so: the
    coordinator passes those dead for longer than its replica replacement delay, so
    their replicas are re-created on live brokers (a new follower copies the data)."""
    if limits.moves_in_flight_max <= 0:
        return []
    live_set = frozenset(live) & frozenset(state.brokers)
    draining = frozenset(state.draining) | (frozenset(evacuate) - live_set)
    view = _View(state, live_set, live_set - draining, draining)
    if not view.eligible:
        return []
    busy: set[TopicPartition] = set()
    commands = _advance_moves(view, busy)
    commands += _leaders_off_draining(view, busy, limits)
    moves = _new_moves(view, busy, limits)
    commands += moves
    if not state.reassignments and not moves:
        leader_changes = _balance_leaders(view, busy, limits)
        commands += leader_changes or _leader_room_move(view, busy, limits)
    # Each command touches its own partition, so checking each against the current
    # state is checking the batch. The rules above already keep to the checks; this
    # keeps a planner bug from ever reaching the store as a failing command.
    return [command for command in commands if _passes_check(state, command)]


def _passes_check(state: ClusterState, command: Command) -> bool:
    try:
        state.check(command)
    except TideError:
        return False
    return True


# --- moves in progress ---------------------------------------------------------------


def _advance_moves(view: _View, busy: set[TopicPartition]) -> list[Command]:
    commands: list[Command] = []
    leaders = leader_counts(view.state, view.eligible)
    for key, move in sorted(view.state.reassignments.items()):
        partition = view.state.partition(*key)
        if not view.leader_is_live(partition):
            continue  # failover first; never touch a partition without a live leader
        command = _next_step(view, key, move, partition, leaders)
        if command is not None:
            commands.append(command)
            busy.add(key)
    return commands


def _next_step(
    view: _View,
    key: TopicPartition,
    move: Reassignment,
    partition: PartitionState,
    leaders: dict[int, int],
) -> Command | None:
    stuck = any(b not in view.eligible for b in move.adding)
    if stuck and partition.leader_id in move.original:
        return CancelReassignment(*key)
    if any(b not in partition.isr for b in move.target):
        return None  # still copying
    if partition.leader_id not in move.target:
        candidates = [b for b in move.target if b in view.live and b in partition.isr]
        if not candidates:
            return None
        new_leader = min(candidates, key=lambda b: (b not in view.eligible, leaders.get(b, 0)))
        leaders[new_leader] = leaders.get(new_leader, 0) + 1
        return ChangeLeader(
            key[0], key[1], new_leader, tuple(partition.isr), partition.leader_epoch
        )
    return CompleteReassignment(*key)


# --- leaders --------------------------------------------------------------------------


def leader_counts(state: ClusterState, brokers: Collection[int]) -> dict[int, int]:
    """Partitions led by each of ``brokers`` (zero included)."""
    counts = dict.fromkeys(brokers, 0)
    for topic in state.topics.values():
        for partition in topic.partitions:
            if partition.leader_id in counts:
                counts[partition.leader_id] += 1
    return counts


def _leaders_off_draining(
    view: _View, busy: set[TopicPartition], limits: RebalanceLimits
) -> list[Command]:
    """Leadership leaves a draining broker at once where an eligible replica is in
    sync: cheaper than waiting for its replica to be moved."""
    commands: list[Command] = []
    leaders = leader_counts(view.state, view.eligible)
    for key, partition in view.partitions():
        if len(commands) >= limits.leader_changes_per_plan_max:
            break
        if key in busy or partition.leader_id not in view.draining:
            continue
        if not view.leader_is_live(partition) or key in view.state.reassignments:
            continue
        candidates = [b for b in partition.isr if b in view.eligible]
        if candidates:
            new_leader = min(candidates, key=lambda b: leaders[b])
            leaders[new_leader] += 1
            commands.append(
                ChangeLeader(
                    key[0], key[1], new_leader, tuple(partition.isr), partition.leader_epoch
                )
            )
            busy.add(key)
    return commands


def _balance_leaders(
    view: _View, busy: set[TopicPartition], limits: RebalanceLimits
) -> list[Command]:
    """Preferred-leader changes along augmenting paths: a chain b0 -> b1 -> ... -> bk,
    each step moving one partition's leadership to an in-sync eligible replica, takes
    one leader from b0 to bk (loaded at least two fewer) and leaves the others even.
    When no such chain exists the leader counts are as even as the ISRs allow."""
    leaders = leader_counts(view.state, view.eligible)
    led: dict[int, list[tuple[TopicPartition, PartitionState]]] = {b: [] for b in leaders}
    for key, partition in view.partitions():
        if key in busy or not view.leader_is_live(partition):
            continue
        if partition.leader_id in led:
            led[partition.leader_id].append((key, partition))
    commands: list[Command] = []
    while len(commands) < limits.leader_changes_per_plan_max:
        path = _augmenting_path(leaders, led, view.eligible)
        if path is None:
            break
        if commands and len(commands) + len(path) > limits.leader_changes_per_plan_max:
            break  # a chain is carried out whole: its middle alone evens nothing
        for key, partition, new_leader in path:
            old_leader = _leader(partition)
            led[old_leader] = [item for item in led[old_leader] if item[0] != key]
            leaders[old_leader] -= 1
            leaders[new_leader] += 1
            commands.append(
                ChangeLeader(
                    key[0], key[1], new_leader, tuple(partition.isr), partition.leader_epoch
                )
            )
    return commands


def _leader(partition: PartitionState) -> int:
    if partition.leader_id is None:
        raise InvariantViolation("a partition on a leader path has no leader")
    return partition.leader_id


def _leader_room_move(
    view: _View, busy: set[TopicPartition], limits: RebalanceLimits
) -> list[Command]:
    """When no leader chain exists but leader counts are still uneven (mixed
    replication factors can do that: a factor-1 partition can be led only where its
    one replica is), one replica move that gives a lightly-led broker a replica of a
    partition a heavily-led broker leads. The replaced replica's broker holds at least
    one replica more than the new one, so replica counts stay within one."""
    leaders = leader_counts(view.state, view.eligible)
    if not leaders or max(leaders.values()) - min(leaders.values()) <= 1:
        return []
    counts = replica_counts(view.state, view.eligible)
    movable = list(_movable(view, busy))
    for source in sorted(leaders, key=lambda b: (-leaders[b], b)):
        for destination in sorted(leaders, key=lambda b: (leaders[b], b)):
            if leaders[destination] > leaders[source] - 2:
                break
            for key, partition in movable:
                if partition.leader_id != source or destination in partition.replicas:
                    continue
                replaced = [
                    b
                    for b in partition.replicas
                    if b in counts and counts[b] >= counts[destination] + 1
                ]
                if replaced:
                    old = source if source in replaced else replaced[0]
                    target = tuple(destination if b == old else b for b in partition.replicas)
                    return [ReassignReplicas(key[0], key[1], target)]
    return []


_Step = tuple[TopicPartition, PartitionState, int]


def _augmenting_path(
    leaders: dict[int, int],
    led: dict[int, list[tuple[TopicPartition, PartitionState]]],
    eligible: frozenset[int],
) -> list[_Step] | None:
    """The shortest chain from a most-loaded broker to one led at least two less."""
    for source in sorted(leaders, key=lambda b: (-leaders[b], b)):
        came_from: dict[int, _Step | None] = {source: None}
        frontier = [source]
        while frontier:
            following: list[int] = []
            for broker in frontier:
                for key, partition in led[broker]:
                    for replica in partition.isr:
                        if replica in came_from or replica not in eligible:
                            continue
                        came_from[replica] = (key, partition, replica)
                        if leaders[replica] <= leaders[source] - 2:
                            return _unwind(came_from, replica)
                        following.append(replica)
            frontier = following
    return None


def _unwind(came_from: dict[int, _Step | None], end: int) -> list[_Step]:
    path: list[_Step] = []
    step = came_from[end]
    while step is not None:
        path.append(step)
        step = came_from[_leader(step[1])]
    path.reverse()
    return path


# --- new moves ------------------------------------------------------------------------


def replica_counts(state: ClusterState, brokers: Collection[int]) -> dict[int, int]:
    """Replicas each of ``brokers`` holds once every move in progress is done."""
    counts = dict.fromkeys(brokers, 0)
    for name, topic in state.topics.items():
        for index, partition in enumerate(topic.partitions):
            move = state.reassignments.get((name, index))
            for broker in partition.replicas if move is None else move.target:
                if broker in counts:
                    counts[broker] += 1
    return counts


class _Throttle:
    def __init__(self, state: ClusterState, limits: RebalanceLimits) -> None:
        self.limits = limits
        self.in_flight = len(state.reassignments)
        self.per_broker: dict[int, int] = {}
        for move in state.reassignments.values():
            self._count(move.adding + move.removing)

    def _count(self, brokers: tuple[int, ...]) -> None:
        for broker in brokers:
            self.per_broker[broker] = self.per_broker.get(broker, 0) + 1

    def full(self) -> bool:
        return self.in_flight >= self.limits.moves_in_flight_max

    def allows(self, *brokers: int) -> bool:
        cap = self.limits.moves_per_broker_max
        return not self.full() and all(self.per_broker.get(b, 0) < cap for b in brokers)

    def take(self, source: int, destination: int) -> None:
        self.in_flight += 1
        self._count((source, destination))


def _new_moves(view: _View, busy: set[TopicPartition], limits: RebalanceLimits) -> list[Command]:
    state = view.state
    throttle = _Throttle(state, limits)
    counts = replica_counts(state, view.eligible)
    commands: list[Command] = []
    while not throttle.full():
        choice = _drain_move(view, busy, counts, throttle)
        if choice is None and not _draining_replicas(view):
            # Balance only once nothing waits to leave a draining broker: drain moves
            # go to the least-loaded brokers anyway, and moving replicas between the
            # staying brokers meanwhile would only add copies.
            choice = _balance_move(view, busy, counts, throttle)
        if choice is None:
            break
        key, partition, source, destination = choice
        target = tuple(destination if b == source else b for b in partition.replicas)
        commands.append(ReassignReplicas(key[0], key[1], target))
        busy.add(key)
        throttle.take(source, destination)
        counts[destination] += 1
        if source in counts:
            counts[source] -= 1
    return commands


_Move = tuple[TopicPartition, PartitionState, int, int]


def _movable(
    view: _View, busy: set[TopicPartition]
) -> Iterator[tuple[TopicPartition, PartitionState]]:
    for key, partition in view.partitions():
        if key in busy or key in view.state.reassignments:
            continue
        if view.leader_is_live(partition):
            yield key, partition


def _destination(
    partition: PartitionState, counts: dict[int, int], throttle: _Throttle, source: int
) -> int | None:
    options = [b for b in counts if b not in partition.replicas and throttle.allows(source, b)]
    return min(options, key=lambda b: (counts[b], b)) if options else None


def _draining_replicas(view: _View) -> bool:
    """Whether a movable partition still has a replica on a draining broker."""
    draining = view.draining
    return any(
        b in draining
        for key, partition in view.partitions()
        if key not in view.state.reassignments and view.leader_is_live(partition)
        for b in partition.replicas
    )


def _drain_move(
    view: _View, busy: set[TopicPartition], counts: dict[int, int], throttle: _Throttle
) -> _Move | None:
    """A replica on a draining broker, followers before leaders."""
    draining = view.draining & set(view.state.brokers)
    if not draining:
        return None
    candidates = [
        (partition.leader_id == source, key, partition, source)
        for key, partition in _movable(view, busy)
        for source in partition.replicas
        if source in draining
    ]
    for _, key, partition, source in sorted(candidates, key=lambda c: (c[0], c[1], c[3])):
        destination = _destination(partition, counts, throttle, source)
        if destination is not None:
            return key, partition, source, destination
    return None


def _balance_move(
    view: _View, busy: set[TopicPartition], counts: dict[int, int], throttle: _Throttle
) -> _Move | None:
    """From a most-loaded eligible broker to a least-loaded one (at least two fewer);
    a follower replica when one can go, so leadership need not move."""
    by_load = sorted(counts, key=lambda b: (-counts[b], b))
    movable = list(_movable(view, busy))
    for source in by_load:
        for destination in reversed(by_load):
            if counts[destination] > counts[source] - 2:
                break
            if not throttle.allows(source, destination):
                continue
            choice = _pick_partition(movable, source, destination)
            if choice is not None:
                return choice[0], choice[1], source, destination
    return None


def _pick_partition(
    movable: list[tuple[TopicPartition, PartitionState]], source: int, destination: int
) -> tuple[TopicPartition, PartitionState] | None:
    leading = None
    for key, partition in movable:
        if source not in partition.replicas or destination in partition.replicas:
            continue
        if partition.leader_id != source:
            return key, partition
        leading = leading or (key, partition)
    return leading


def _change_leader(key: TopicPartition, leader: int, partition: PartitionState) -> ChangeLeader:
    """A leadership move, as a compare-and-set on the epoch it was planned from."""
    return ChangeLeader(key[0], key[1], leader, tuple(partition.isr), partition.leader_epoch)
