"""Review of f6b4a64 (with 1ee0c32 on top): a member that is still releasing a revoked
partition (the consumer reports it in ``owned`` until the application is done, up to
max_poll_interval_ms) and loses the answer to a grant is fenced, because the lost-grant
exception asks ``reported <= assignment`` and the revoked partition, which f6b4a64
keeps held on purpose, is not in the assignment. The member then drops everything
uncommitted and rejoins under a new id, while its old id holds all its partitions until
its session runs out: the stall 1ee0c32 meant to remove."""

from __future__ import annotations

from tidemq.core.groups import ConsumerGroup

SESSION_MS = 1000


def test_a_lost_grant_answer_while_a_revocation_is_in_progress_is_not_fenced() -> None:
    group = ConsumerGroup("g")
    counts = {"t": 4}

    def beat(member: str | None, epoch: int, owned: set, new_id: str = "x", now: int = 0):
        r = group.heartbeat(member, epoch, ("t",), owned, now, counts, new_id, SESSION_MS)
        return r.member_epoch, set(r.assignment)

    a_epoch, a_assigned = beat(None, 0, set(), new_id="a")  # a gets t0..t3
    a_owned = set(a_assigned)
    b_epoch, _ = beat(None, 0, set(), new_id="b")
    a_epoch, a_assigned = beat("a", a_epoch, a_owned)  # revokes two partitions
    revoking = a_owned - a_assigned
    assert len(revoking) == 2
    # a keeps reporting them while its application finishes their records.
    b_epoch, _ = beat("b", b_epoch, set())
    counts["t"] = 6  # partitions added: each member's target grows by one
    before = a_epoch
    a_epoch_lost, a_assigned_lost = beat("a", a_epoch, a_owned)  # the grant; answer lost
    assert a_epoch_lost == before + 1 and a_assigned_lost - a_assigned
    # a heartbeats again at the epoch it knows, reporting what it fetches / releases.
    epoch, assignment = beat("a", before, a_owned)  # raises FencedMember
    assert epoch == a_epoch_lost and assignment == a_assigned_lost
