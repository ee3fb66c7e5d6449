"""Consumer group membership: a server-side, incremental protocol (after KIP-848).

Owns: the members of every consumer group, their member epochs, the group's target
assignment, what each member has been told it may own, and which partitions each
member *holds*. Soft state: nothing here is persisted except, by the shell, the
largest session timeout a group's members ever used (``RecordGroupSession``), which
bounds how long a member the coordinator forgot in a restart may still be fetching.
Committed offsets live in :mod:`tidemq.core.metadata`.

How it works. A member heartbeats with the topics it subscribes to and the partitions
it owns (``owned``). Whenever membership, subscriptions or partition counts change, the
group computes a *target*: per topic, the subscribed members share its partitions
evenly (sizes differ by at most one), keeping every partition with its current target
owner when quotas allow (sticky). A member's *assignment* (what we answer) moves
towards its target in two steps:

* revoke at once: partitions outside its target leave its assignment;
* grant only when free: a target partition joins its assignment only when no other
  member *holds* it, where a member holds the partitions of its assignment and of the
  ``owned`` it last reported (it may still be processing them). The old owner releases
  a partition by leaving it out of ``owned`` in its next heartbeat, or by leaving the
  group, or by its session expiring.

The member epoch grows by one whenever a member's assignment changes. A heartbeat with
any other epoch than the member's current one (or 0, a rejoin that resends the full
state) is fenced and changes nothing; a fenced member is *not* removed, so a delayed
duplicate cannot evict a healthy member. One exception, as KIP-848 makes it: the
member's previous epoch is accepted when everything it reports owning is in its
current assignment or still held by it (the answer that moved its epoch, a grant, was
lost; a revocation may be in progress); otherwise one lost answer would fence the
member and stall its partitions for a session. Like a join, such a heartbeat never
shrinks what the member holds.

Commits. A member's commit is accepted only if it carries the member's current epoch
and the member is the only holder of every partition in it (assignment or last
reported ``owned``: the commit on revocation is sent after the assignment dropped the
partition but before the member reported it gone). An older epoch is refused even for
partitions the member still holds: a late copy of its own earlier commit (or one from
an earlier life of a reused member id) would move the offset backwards. It is refused
as *stale* (``StaleMemberEpoch``) rather than fenced when the member is the only holder
of every partition named, so a client whose epoch a grant moved on while the commit was
on its way resends it with the epoch its heartbeat brings (after Kafka's
STALE_MEMBER_EPOCH); the late copy itself stays refused. A commit without a member id (a
standalone consumer) is accepted only for partitions no member holds. The shell runs this check
under the same lock that persists and applies the commit, and membership changes take
that lock too, so a check can never be overtaken by a grant.

Coordinator restart. Membership is soft, so a restarted coordinator does not know who
holds what. For each group it knows ``session_bound_ms``, the largest session timeout
its members ever used (persisted before any member may use it). Until
``recover_until_ms`` = restart time + that bound (inclusive), the group is *recovering*:

* nothing is granted (a member we have not heard from since the restart may hold any
  partition, but by ``recover_until_ms`` its session has run out and it has stopped);
* a heartbeat from an unknown member with an epoch > 0 is *adopted* rather than fenced:
  the member is re-created at its epoch and holds what it reports owning, except what
  another member already holds, so members that stay in touch keep consuming;
* every commit is answered ``unavailable`` (retriable): an adopted member may be a
  ghost (a heartbeat delayed across the restart, whose sender has since moved on) and
  its delayed commit could overwrite the real owner's offsets, which may not have
  heartbeated yet. Once recovery ends every member that may still be fetching has
  heartbeated and holds what it fetches, so "the only holder" is exact again.

Why not persist membership: every assignment change would cost an fsync and a
command, and members re-sync within one heartbeat anyway; the restart pause applies
only to *moving* partitions, for at most one session timeout. See docs/ARCHITECTURE.md.

The invariant (checked by tests/unit/test_groups_model.py under reordered, duplicated
and lost heartbeats, expiry and restarts). Assume each member stops fetching a
partition (a) before it reports it no longer owned, (b) as soon as it is fenced, and
(c) once ``session_timeout_ms`` has passed since it *sent* its last heartbeat that was
answered successfully. Then:

    at every moment, no partition is owned by two members that could both still be
    fetching it.

A partition leaves a member's assignment (revoked) but stays in what it holds until
the member confirms it gone, in a heartbeat at its current epoch: a member that was
told of a partition may be fetching it before it ever reports it owned.

It rests on three facts this module maintains: holdings of two members never
overlap in assignments, and a partition joins an assignment only when nobody else
holds it; a member is forgotten (leave, expiry) only once it has stopped (expiry
needs ``now - last_heartbeat_ms > session_timeout_ms``, and the coordinator's
``last_heartbeat_ms`` is no earlier than the member's send time); and after a restart
no grant happens before every forgotten member's session has run out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tidemq.errors import FencedMember, InvalidRequest, StaleMemberEpoch, Unavailable, invariant

MAX_MEMBERS_PER_GROUP = 1000


def recover_until_ms(started_ms: int, session_bound_ms: int) -> int:
    """The first millisecond a group is no longer recovering after a coordinator that
    started at ``started_ms`` (0: a group with no bound never recovers). A member heard
    just before the restart may fetch through its last heartbeat + session (expiry needs
    the session strictly passed), so recovery includes that millisecond."""
    return started_ms + session_bound_ms + 1 if session_bound_ms else 0


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
    previous_epoch: int = -1  # its epoch before the last change of its assignment


@dataclass(frozen=True)
class HeartbeatResult:
    member_id: str
    member_epoch: int
    assignment: list[TopicPartition]


@dataclass
class ConsumerGroup:
    """One group's membership state machine.

    Work per heartbeat is proportional to the member's own request and to what
    changed: the group looks up partition counts only for the topics its members
    subscribe to, and an index (partition -> members holding it) answers "is it
    free?" without scanning other members. The target is recomputed (over the
    group's partitions) only when membership, subscriptions or counts change.
    """

    name: str
    # After a coordinator restart, the first millisecond the group no longer recovers
    # (see the module docstring).
    recover_until_ms: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    partition_counts: dict[str, int] = field(default_factory=dict)
    group_epoch: int = 0  # grows when the target must be recomputed
    target_epoch: int = -1
    holders: dict[TopicPartition, set[str]] = field(default_factory=dict)
    subscribers: dict[str, int] = field(default_factory=dict)  # topic -> members

    def recovering(self, now_ms: int) -> bool:
        return now_ms < self.recover_until_ms

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
        ``partition_counts`` is read only for the topics the group subscribes to.

        Raises FencedMember for a stale epoch or an unknown member with epoch > 0
        (outside recovery); a fenced heartbeat changes nothing.
        """
        reported = frozenset(owned)
        member = self._gate(
            member_id, member_epoch, reported, new_member_id, now_ms, session_timeout_ms
        )
        if member is None:  # an unknown member while recovering: adopt it
            member = self._adopt(
                member_id or new_member_id, member_epoch, reported, now_ms, session_timeout_ms
            )
        elif member_epoch != member.member_epoch:  # a join, or the previous epoch
            # A join says nothing about what the member stopped holding: a late copy of
            # it (delayed, or a transport retry) must not free a partition whose
            # records the member's application still has. Only a heartbeat at the
            # current epoch shrinks what it holds.
            reported |= member.owned
        self._subscribe(member, tuple(sorted(set(topics))))
        self._refresh_counts(partition_counts)
        self._hold(member, member.assignment, reported)
        member.last_heartbeat_ms = now_ms
        member.session_timeout_ms = session_timeout_ms
        self._refresh_target()
        self._reconcile(member, now_ms)
        return HeartbeatResult(member.member_id, member.member_epoch, sorted(member.assignment))

    def leave(self, member_id: str) -> bool:
        """Removes a member at once; its partitions become free. False if unknown."""
        member = self.members.get(member_id)
        if member is None:
            return False
        self._remove(member)
        return True

    def expire(self, now_ms: int) -> list[str]:
        """Drops members whose session passed without a heartbeat; returns their ids."""
        gone = [
            member
            for member in self.members.values()
            if now_ms - member.last_heartbeat_ms > member.session_timeout_ms
        ]
        for member in gone:
            self._remove(member)
        return [member.member_id for member in gone]

    def validate_commit(
        self,
        member_id: str | None,
        member_epoch: int | None,
        partitions: Iterable[TopicPartition],
        now_ms: int,
    ) -> None:
        """Raises unless the commit may be applied now: see "Commits" above."""
        if self.recovering(now_ms):
            raise Unavailable(
                f"group {self.name!r} is relearning its members after a coordinator restart "
                f"(for {self.recover_until_ms - now_ms} ms more): retry"
            )
        wanted = sorted(set(partitions))
        if member_id is None:
            taken = [tp for tp in wanted if self.holders.get(tp)]
            if taken:
                raise FencedMember(
                    f"partitions {_names(taken)} are owned by members of group {self.name!r}: "
                    "commit with member_id and member_epoch"
                )
            return
        member = self.members.get(member_id)
        if member is None:
            raise FencedMember(f"unknown member {member_id!r}: rejoin the group")
        foreign = [tp for tp in wanted if self.holders.get(tp) != {member_id}]
        if member_epoch != member.member_epoch:
            refused = f"member {member_id} committed with epoch {member_epoch}, current is "
            if member_epoch is not None and member_epoch < member.member_epoch and not foreign:
                raise StaleMemberEpoch(
                    f"{refused}{member.member_epoch}: resend with the epoch of your last heartbeat"
                )
            raise FencedMember(f"{refused}{member.member_epoch}")
        if foreign:
            raise FencedMember(f"member {member_id} does not own {_names(foreign)}")

    # -- internals --

    def check_heartbeat(
        self,
        member_id: str | None,
        member_epoch: int,
        owned: Iterable[TopicPartition],
        now_ms: int,
    ) -> None:
        """Raises what :meth:`heartbeat` would refuse it with (FencedMember, a full
        group) and changes nothing: the coordinator asks before it persists anything
        for the heartbeat (the group's session bound), so a refused one leaves no
        trace."""
        reported = frozenset(owned)
        known = None if member_id is None else self.members.get(member_id)
        if known is not None:
            lost_grant = member_epoch == known.previous_epoch and reported <= (
                known.assignment | known.owned
            )
            if member_epoch not in (0, known.member_epoch) and not lost_grant:
                raise FencedMember(
                    f"member {known.member_id} sent epoch {member_epoch}, current is "
                    f"{known.member_epoch}: rejoin with member_epoch 0"
                )
            return
        if member_epoch != 0 and (member_id is None or not self.recovering(now_ms)):
            raise FencedMember(f"unknown member {member_id!r}: rejoin with member_epoch 0")
        if len(self.members) >= MAX_MEMBERS_PER_GROUP:
            raise InvalidRequest(f"group {self.name!r} has {MAX_MEMBERS_PER_GROUP} members")

    def _gate(
        self,
        member_id: str | None,
        member_epoch: int,
        reported: frozenset[TopicPartition],
        new_member_id: str,
        now_ms: int,
        session_timeout_ms: int,
    ) -> Member | None:
        """The one epoch gate: stale is fenced, epoch 0 (re)joins. None: adopt."""
        self.check_heartbeat(member_id, member_epoch, reported, now_ms)
        known = None if member_id is None else self.members.get(member_id)
        if known is not None:
            return known
        if member_epoch != 0:
            return None
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

    def _adopt(
        self,
        member_id: str,
        member_epoch: int,
        reported: frozenset[TopicPartition],
        now_ms: int,
        session_timeout_ms: int,
    ) -> Member:
        """Re-creates a member the coordinator forgot in a restart, holding what it
        reports except what another member already holds (a stale report)."""
        free = frozenset(tp for tp in reported if not self.holders.get(tp))
        member = Member(
            member_id=member_id,
            member_epoch=member_epoch if free == reported else member_epoch + 1,
            topics=(),
            owned=frozenset(),
            last_heartbeat_ms=now_ms,
            session_timeout_ms=session_timeout_ms,
        )
        self.members[member_id] = member
        self._hold(member, free, frozenset())
        self.group_epoch += 1
        return member

    def _remove(self, member: Member) -> None:
        self._hold(member, frozenset(), frozenset())
        self._subscribe(member, ())
        del self.members[member.member_id]
        self.group_epoch += 1

    def _subscribe(self, member: Member, topics: tuple[str, ...]) -> None:
        if topics == member.topics:
            return
        for topic in member.topics:
            self.subscribers[topic] -= 1
            if not self.subscribers[topic]:
                del self.subscribers[topic]
        for topic in topics:
            self.subscribers[topic] = self.subscribers.get(topic, 0) + 1
        member.topics = topics
        self.group_epoch += 1

    def _refresh_counts(self, partition_counts: Mapping[str, int]) -> None:
        counts = {}
        for topic in sorted(self.subscribers):
            count = partition_counts.get(topic, 0)
            if count > 0:
                counts[topic] = count
        if counts != self.partition_counts:
            self.partition_counts = counts
            self.group_epoch += 1

    def _hold(
        self,
        member: Member,
        assignment: frozenset[TopicPartition],
        owned: frozenset[TopicPartition],
    ) -> None:
        """Sets a member's assignment and owned, keeping the holders index exact."""
        before = member.assignment | member.owned
        member.assignment = assignment
        member.owned = owned
        after = assignment | owned
        for tp in before - after:
            holders = self.holders[tp]
            holders.discard(member.member_id)
            if not holders:
                del self.holders[tp]
        for tp in after - before:
            self.holders.setdefault(tp, set()).add(member.member_id)

    def _refresh_target(self) -> None:
        if self.target_epoch == self.group_epoch:
            return
        targets = compute_target(
            {m.member_id: m.topics for m in self.members.values()},
            self.partition_counts,
            {m.member_id: m.target for m in self.members.values()},
            {m.member_id: m.assignment for m in self.members.values()},
        )
        for member in self.members.values():
            member.target = targets.get(member.member_id, frozenset())
        self.target_epoch = self.group_epoch

    def _free_for(self, member: Member, tp: TopicPartition) -> bool:
        holders = self.holders.get(tp)
        return not holders or holders == {member.member_id}

    def _reconcile(self, member: Member, now_ms: int) -> None:
        keep = member.assignment & member.target
        grant: frozenset[TopicPartition] = frozenset()
        if not self.recovering(now_ms):
            grant = frozenset(tp for tp in member.target - keep if self._free_for(member, tp))
        invariant(
            all(self._free_for(member, tp) for tp in grant - member.assignment),
            "a partition was granted while another member holds it",
        )
        assignment = keep | grant
        if assignment != member.assignment:
            # What leaves the assignment stays held until the member confirms it gone
            # (a heartbeat at its current epoch): it may be fetching a partition it was
            # told of but has not reported yet (a late copy of its join revokes).
            revoked = member.assignment - assignment
            self._hold(member, assignment, member.owned | revoked)
            member.previous_epoch = member.member_epoch
            member.member_epoch += 1


def _names(partitions: list[TopicPartition]) -> str:
    shown = ", ".join(f"{topic}/{partition}" for topic, partition in partitions[:5])
    return shown + (f" and {len(partitions) - 5} more" if len(partitions) > 5 else "")


def compute_target(
    subscriptions: Mapping[str, Iterable[str]],
    partition_counts: Mapping[str, int],
    previous: Mapping[str, frozenset[TopicPartition]],
    held: Mapping[str, frozenset[TopicPartition]] | None = None,
) -> dict[str, frozenset[TopicPartition]]:
    """Balanced, sticky target: per topic, subscribers get floor or ceil of its
    partitions; members keep what they ``held`` (their assignment), then their
    ``previous`` target, up to their quota. Deterministic."""
    result: dict[str, set[TopicPartition]] = {member: set() for member in subscriptions}
    # Indexed once: per topic, its subscribers and each member's wishes. Looking them up
    # per topic by scanning every member cost topics x members x holdings, under the
    # coordinator's write lock (seconds at a few thousand topics).
    subscribers: dict[str, list[str]] = {}
    for member in sorted(subscriptions):
        for topic in set(subscriptions[member]):
            subscribers.setdefault(topic, []).append(member)
    preferences = (_by_topic(held or {}), _by_topic(previous))
    for topic, count in sorted(partition_counts.items()):
        members = subscribers.get(topic)
        if members:
            _assign_topic(topic, count, members, preferences, result)
    return {member: frozenset(parts) for member, parts in result.items()}


def _by_topic(
    wishes: Mapping[str, frozenset[TopicPartition]],
) -> dict[str, dict[str, list[int]]]:
    """topic -> member -> its partitions of the topic (in no order)."""
    out: dict[str, dict[str, list[int]]] = {}
    for member, partitions in wishes.items():
        for topic, partition in partitions:
            out.setdefault(topic, {}).setdefault(member, []).append(partition)
    return out


def _assign_topic(
    topic: str,
    count: int,
    members: list[str],
    preferences: tuple[dict[str, dict[str, list[int]]], ...],
    result: dict[str, set[TopicPartition]],
) -> None:
    rounds = []
    for by_topic in preferences:
        wishes = by_topic.get(topic, {})
        rounds.append({m: sorted(p for p in wishes.get(m, ()) if p < count) for m in members})
    kept_count = {m: len({p for wishes in rounds for p in wishes[m]}) for m in members}
    base, extra = divmod(count, len(members))
    # Ceil quotas go to members that already hold the most (stickiness), then to the
    # members with the fewest partitions over all topics so far (global balance).
    order = sorted(members, key=lambda m: (-kept_count[m], len(result[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(order)}
    taken: set[int] = set()
    given = dict.fromkeys(members, 0)
    for wishes in rounds:  # what members hold first, so a stale target never wins
        for member in members:
            for partition in wishes[member]:
                if given[member] < quota[member] and partition not in taken:
                    taken.add(partition)
                    given[member] += 1
                    result[member].add((topic, partition))
    free = iter(p for p in range(count) if p not in taken)
    for member in order:
        for _ in range(quota[member] - given[member]):
            result[member].add((topic, next(free)))
