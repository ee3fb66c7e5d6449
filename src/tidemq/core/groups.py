"""Consumer group membership: a server-side, incremental protocol (after KIP-848).

Owns: the members of every consumer group, their member epochs, the group's target
assignment and what each member has been told it may own. Soft state: nothing here
is persisted. After a coordinator restart members are unknown; their next heartbeat
is fenced and they rejoin with ``member_epoch`` 0 (committed offsets, which *are*
persisted, live in :mod:`tidemq.core.metadata`).

How it works. A member heartbeats with the topics it subscribes to and the partitions
it owns (``owned``). Whenever membership, subscriptions or partition counts change, the
group computes a *target*: per topic, the subscribed members share its partitions
evenly (sizes differ by at most one), keeping every partition with its current target
owner when quotas allow (sticky). A member's *assignment* (what we answer) moves
towards its target in two steps:

* revoke at once: partitions outside its target leave its assignment;
* grant only when free: a target partition joins its assignment only when no other
  member holds it, where "holds" means it is in that member's assignment or in the
  ``owned`` that member last reported (it may still be processing it). The old owner
  releases a partition by leaving it out of ``owned`` in its next heartbeat, or by
  leaving the group, or by its session expiring.

The member epoch grows by one whenever a member's assignment changes. A heartbeat with
any other epoch than the member's current one (or 0, a rejoin that resends the full
state) is fenced; so is a commit.

Must always hold: the assignments of two members never share a partition; and a
partition never enters an assignment while another member reports owning it. Hence a
partition has at most one consumer of the group at any moment, as long as members
stop consuming what they no longer list in ``owned`` and when their session expires.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tidemq.errors import FencedMember, InvalidRequest, invariant

MAX_MEMBERS_PER_GROUP = 1000

TopicPartition = tuple[str, int]


@dataclass
class Member:
    member_id: str
    member_epoch: int
    topics: tuple[str, ...]
    owned: frozenset[TopicPartition]
    last_heartbeat_ms: int
    session_timeout_ms: int
    assignment: frozenset[TopicPartition] = frozenset()
    target: frozenset[TopicPartition] = frozenset()


@dataclass(frozen=True)
class HeartbeatResult:
    member_id: str
    member_epoch: int
    assignment: list[TopicPartition]


@dataclass
class ConsumerGroup:
    """One group's membership state machine."""

    name: str
    members: dict[str, Member] = field(default_factory=dict)
    partition_counts: dict[str, int] = field(default_factory=dict)
    group_epoch: int = 0  # grows when the target must be recomputed
    target_epoch: int = -1

    def heartbeat(
        self,
        member_id: str | None,
        member_epoch: int,
        topics: Iterable[str],
        owned: Iterable[TopicPartition],
        now_ms: int,
        partition_counts: Mapping[str, int],
        new_member_id: str,
        session_timeout_ms: int,
    ) -> HeartbeatResult:
        """One heartbeat. ``new_member_id`` names a member that joins without an id.

        Raises FencedMember for a stale epoch or an unknown member with epoch > 0.
        """
        member = self._gate(member_id, member_epoch, new_member_id, now_ms, session_timeout_ms)
        subscribed = tuple(sorted(set(topics)))
        if subscribed != member.topics:
            member.topics = subscribed
            self.group_epoch += 1
        wanted = {topic for m in self.members.values() for topic in m.topics}
        counts = {t: partition_counts[t] for t in sorted(wanted) if partition_counts.get(t, 0) > 0}
        if counts != self.partition_counts:
            self.partition_counts = counts
            self.group_epoch += 1
        member.owned = frozenset(owned)
        member.last_heartbeat_ms = now_ms
        member.session_timeout_ms = session_timeout_ms
        self._refresh_target()
        self._reconcile(member)
        return HeartbeatResult(member.member_id, member.member_epoch, sorted(member.assignment))

    def _gate(
        self,
        member_id: str | None,
        member_epoch: int,
        new_member_id: str,
        now_ms: int,
        session_timeout_ms: int,
    ) -> Member:
        """The one epoch gate: stale is fenced, epoch 0 (re)joins."""
        known = None if member_id is None else self.members.get(member_id)
        if known is not None:
            if member_epoch not in (0, known.member_epoch):
                raise FencedMember(
                    f"member {known.member_id} sent epoch {member_epoch}, current is "
                    f"{known.member_epoch}: rejoin with member_epoch 0"
                )
            return known
        if member_epoch != 0:
            raise FencedMember(f"unknown member {member_id!r}: rejoin with member_epoch 0")
        if len(self.members) >= MAX_MEMBERS_PER_GROUP:
            raise InvalidRequest(f"group {self.name!r} has {MAX_MEMBERS_PER_GROUP} members")
        member = Member(
            member_id=member_id or new_member_id,
            member_epoch=1,
            topics=(),
            owned=frozenset(),
            last_heartbeat_ms=now_ms,
            session_timeout_ms=session_timeout_ms,
        )
        self.members[member.member_id] = member
        self.group_epoch += 1
        return member

    def leave(self, member_id: str) -> bool:
        """Removes a member at once; its partitions become free. False if unknown."""
        if self.members.pop(member_id, None) is None:
            return False
        self.group_epoch += 1
        return True

    def expire(self, now_ms: int) -> list[str]:
        """Drops members whose session passed without a heartbeat; returns their ids."""
        gone = [
            member.member_id
            for member in self.members.values()
            if now_ms - member.last_heartbeat_ms > member.session_timeout_ms
        ]
        for member_id in gone:
            del self.members[member_id]
        if gone:
            self.group_epoch += 1
        return gone

    def validate_commit(self, member_id: str | None, member_epoch: int | None) -> None:
        """Commits without a member id (standalone consumers) pass; a member's must
        carry its current epoch."""
        if member_id is None:
            return
        member = self.members.get(member_id)
        if member is None:
            raise FencedMember(f"unknown member {member_id!r}: rejoin the group")
        if member_epoch != member.member_epoch:
            raise FencedMember(
                f"member {member_id} committed with epoch {member_epoch}, "
                f"current is {member.member_epoch}"
            )

    # -- internals --

    def _refresh_target(self) -> None:
        if self.target_epoch == self.group_epoch:
            return
        targets = compute_target(
            {m.member_id: m.topics for m in self.members.values()},
            self.partition_counts,
            {m.member_id: m.target for m in self.members.values()},
        )
        for member in self.members.values():
            member.target = targets.get(member.member_id, frozenset())
        self.target_epoch = self.group_epoch

    def _reconcile(self, member: Member) -> None:
        held_by_others: set[TopicPartition] = set()
        for other in self.members.values():
            if other is not member:
                held_by_others |= other.assignment | other.owned
        keep = member.assignment & member.target
        grant = (member.target - keep) - held_by_others
        assignment = keep | grant
        invariant(
            not (assignment & (held_by_others - member.assignment)),
            "a partition was granted while another member holds it",
        )
        if assignment != member.assignment:
            member.assignment = assignment
            member.member_epoch += 1


def compute_target(
    subscriptions: Mapping[str, Iterable[str]],
    partition_counts: Mapping[str, int],
    previous: Mapping[str, frozenset[TopicPartition]],
) -> dict[str, frozenset[TopicPartition]]:
    """Balanced, sticky target: per topic, subscribers get floor or ceil of its
    partitions; members keep previous partitions up to their quota. Deterministic."""
    result: dict[str, set[TopicPartition]] = {member: set() for member in subscriptions}
    for topic, count in sorted(partition_counts.items()):
        members = sorted(m for m, topics in subscriptions.items() if topic in set(topics))
        if members:
            _assign_topic(topic, count, members, previous, result)
    return {member: frozenset(parts) for member, parts in result.items()}


def _assign_topic(
    topic: str,
    count: int,
    members: list[str],
    previous: Mapping[str, frozenset[TopicPartition]],
    result: dict[str, set[TopicPartition]],
) -> None:
    kept = {
        m: sorted(p for t, p in previous.get(m, frozenset()) if t == topic and p < count)
        for m in members
    }
    base, extra = divmod(count, len(members))
    # Ceil quotas go to members that already hold the most (stickiness), then to the
    # members with the fewest partitions over all topics so far (global balance).
    order = sorted(members, key=lambda m: (-len(kept[m]), len(result[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(order)}
    taken: set[int] = set()
    given = dict.fromkeys(members, 0)
    for member in members:
        for partition in kept[member][: quota[member]]:
            if partition not in taken:
                taken.add(partition)
                given[member] += 1
                result[member].add((topic, partition))
    free = iter(p for p in range(count) if p not in taken)
    for member in order:
        for _ in range(quota[member] - given[member]):
            result[member].add((topic, next(free)))
