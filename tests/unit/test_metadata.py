"""ClusterState: commands, snapshots, replay, failover planning, liveness."""

from __future__ import annotations

import json

import pytest

import tidemq.core.metadata as metadata
from tidemq.core.metadata import (
    AllocateProducerId,
    AlterIsr,
    ChangeIsr,
    ChangeLeader,
    ClusterState,
    Command,
    CommitOffsets,
    CreateTopic,
    DeleteGroup,
    DeleteTopic,
    InitCluster,
    Liveness,
    RecordGroupSession,
    RegisterBroker,
    check_bounds,
    check_group_room,
    command_from_json,
    command_to_json,
    plan_failover,
    plan_reelection,
    remembers_group,
)
from tidemq.errors import (
    ClusterStateConflict,
    InvalidRequest,
    NotLeader,
    StalePartitionEpoch,
    TopicExists,
    UnknownPartition,
    UnknownTopic,
)


def history() -> list[Command]:
    return [
        InitCluster("c1"),
        RegisterBroker(1, "https://b1"),
        RegisterBroker(2, "https://b2"),
        RegisterBroker(3, "https://b3"),
        CreateTopic("orders", 3, 2, ((1, 2), (2, 3), (3, 1))),
        CreateTopic("gone", 1, 1, ((1,),)),
        CommitOffsets("g", (("orders", 0, 5), ("gone", 0, 1))),
        ChangeLeader("orders", 0, 2, (2,)),
        ChangeIsr("orders", 0, (1, 2)),
        AllocateProducerId(),
        DeleteTopic("gone"),
        RecordGroupSession("g", 30_000),
        CommitOffsets("idle", (("orders", 1, 3),)),
        RecordGroupSession("idle", 10_000),
        DeleteGroup("idle"),
    ]


def build(commands: list[Command]) -> ClusterState:
    state = ClusterState()
    for command in commands:
        state.apply(command)
    return state


def test_commands_round_trip_through_json() -> None:
    for command in history():
        text = json.dumps(command_to_json(command))
        assert command_from_json(json.loads(text)) == command


def test_replay_of_serialized_commands_gives_the_same_state() -> None:
    original = build(history())
    replayed = build(
        [command_from_json(json.loads(json.dumps(command_to_json(c)))) for c in history()]
    )
    assert replayed.to_snapshot() == original.to_snapshot()


def test_snapshot_round_trip_then_more_commands() -> None:
    commands = history()
    original = build(commands[:6])
    restored = ClusterState.from_snapshot(json.loads(json.dumps(original.to_snapshot())))
    for command in commands[6:]:
        original.apply(command)
        restored.apply(command)
    assert restored == original


def test_group_session_bounds_only_grow_and_survive_old_snapshots() -> None:
    state = build([RecordGroupSession("g", 10_000)])
    with pytest.raises(InvalidRequest):
        state.check(RecordGroupSession("g", 10_000))
    snapshot = state.to_snapshot()
    assert ClusterState.from_snapshot(snapshot).group_session_ms == {"g": 10_000}
    del snapshot["group_sessions"]  # written before the field existed
    assert ClusterState.from_snapshot(snapshot).group_session_ms == {}


def test_apply_results_and_effects() -> None:
    state = build(history()[:7])
    assert state.apply(AllocateProducerId()) == 0
    assert state.apply(AllocateProducerId()) == 1
    assert state.apply(ChangeLeader("orders", 1, 3, (3,))) == 1  # the new leader epoch
    state.apply(DeleteTopic("gone"))
    assert state.offsets == {"g": {("orders", 0): 5}}  # offsets of a deleted topic go


def test_bad_commands_raise_and_change_nothing() -> None:
    state = build(history())
    before = state.to_snapshot()
    bad: list[tuple[Command, type[Exception]]] = [
        (CreateTopic("orders", 1, 1, ((1,),)), TopicExists),
        (CreateTopic("x", 2, 1, ((1,),)), InvalidRequest),
        (CreateTopic("x", 1, 2, ((1, 1),)), InvalidRequest),
        (CreateTopic("x", 1, 1, ((9,),)), InvalidRequest),
        (DeleteTopic("nope"), UnknownTopic),
        (ChangeLeader("orders", 7, 1, (1,)), UnknownPartition),
        (ChangeLeader("orders", 1, 1, (2, 3)), InvalidRequest),  # leader not in isr
        (ChangeIsr("orders", 1, (1,)), InvalidRequest),  # not a replica
        (CommitOffsets("g", (("orders", 0, -1),)), InvalidRequest),
    ]
    for command, error in bad:
        with pytest.raises(error):
            state.apply(command)
    assert state.to_snapshot() == before


def test_failover_picks_an_isr_replica_and_bumps_the_epoch() -> None:
    state = build(history()[:5])  # orders: [1,2] [2,3] [3,1], leaders 1, 2, 3
    for index, replicas in enumerate(([1, 2], [2, 3], [3, 1])):
        assert state.partition("orders", index).isr == replicas  # new and empty: all in sync
    commands = plan_failover(state, live={2, 3})
    assert ChangeLeader("orders", 0, 2, (2,), 0) in commands
    assert ChangeIsr("orders", 2, (3,)) in commands  # dead follower leaves the ISR
    for command in commands:
        state.apply(command)
    partition = state.partition("orders", 0)
    assert (partition.leader_id, partition.leader_epoch, partition.isr) == (2, 1, [2])
    assert plan_failover(state, live={2, 3}) == []  # level-triggered: nothing left to do


def test_no_unclean_election_and_return_of_the_last_in_sync_replica() -> None:
    state = build(history()[:5])
    state.apply(ChangeIsr("orders", 0, (1,)))  # broker 2 fell behind
    [offline] = [c for c in plan_failover(state, live={2, 3}) if c.partition == 0]
    assert offline == ChangeLeader("orders", 0, None, (1,), 0)
    state.apply(offline)
    assert [c for c in plan_failover(state, live={2, 3}) if c.partition == 0] == []
    [back] = [c for c in plan_failover(state, live={1, 2, 3}) if c.partition == 0]
    assert back == ChangeLeader("orders", 0, 1, (1,), 1)
    state.apply(back)
    assert state.partition("orders", 0).leader_epoch == 2


def test_alter_isr_is_a_compare_and_set_on_both_epochs() -> None:
    state = build(history()[:5])
    partition = state.partition("orders", 0)
    leader, epoch, partition_epoch = partition.leader_id, partition.leader_epoch, 0
    assert leader is not None and partition.isr == partition.replicas
    follower = next(b for b in partition.replicas if b != leader)
    state.apply(AlterIsr("orders", 0, leader, epoch, partition_epoch, (leader,)))
    assert partition.isr == [leader] and partition.partition_epoch == 1
    # the same proposal again names an old partition epoch: refused, nothing changes
    with pytest.raises(StalePartitionEpoch):
        state.apply(AlterIsr("orders", 0, leader, epoch, partition_epoch, (leader,)))
    # a deposed leader (old leader epoch) cannot shrink the ISR to itself
    state.apply(ChangeLeader("orders", 0, follower, (follower,)))
    with pytest.raises(NotLeader):
        state.apply(AlterIsr("orders", 0, leader, epoch + 1, 2, (leader,)))
    with pytest.raises(NotLeader):
        state.apply(AlterIsr("orders", 0, leader, epoch, 2, (leader,)))
    assert partition.isr == [follower] and partition.partition_epoch == 2
    # the current leader may expand, but never leave itself out
    with pytest.raises(InvalidRequest):
        state.apply(AlterIsr("orders", 0, follower, epoch + 1, 2, (leader,)))
    state.apply(AlterIsr("orders", 0, follower, epoch + 1, 2, (follower, leader)))
    assert partition.isr == [follower, leader] and partition.partition_epoch == 3


def test_liveness_sessions_expire_and_revive() -> None:
    liveness = Liveness(session_timeout_ms=100)
    liveness.start_session(1, now_ms=0)
    liveness.start_session(2, now_ms=0)
    liveness.heartbeat(2, now_ms=90)
    assert liveness.expire(now_ms=100) == []
    assert liveness.expire(now_ms=101) == [1]
    assert liveness.expire(now_ms=102) == []  # reported once
    assert liveness.alive_ids() == {2}
    assert liveness.heartbeat(1, now_ms=150) is True
    assert liveness.alive_ids() == {1, 2}


def test_a_reelection_planned_before_a_failover_does_not_apply_after_it() -> None:
    """Review finding: a restarted broker's re-election, planned from the state before a
    failover, must not undo it (ChangeLeader is a compare-and-set on the epoch)."""
    state = ClusterState()
    state.apply(InitCluster("c"))
    for broker in (1, 2):
        state.apply(RegisterBroker(broker, f"http://b{broker}"))
    state.apply(CreateTopic("t", 1, 2, ((1, 2),), "a" * 32, 1))
    stale = plan_reelection(state, 1)
    for command in plan_failover(state, live={2}):
        state.apply(command)
    assert state.partition("t", 0).leader_id == 2
    with pytest.raises(StalePartitionEpoch):
        for command in stale:
            state.apply(command)
    assert (state.partition("t", 0).leader_id, state.partition("t", 0).isr) == (2, [2])


def test_a_broker_that_may_have_lost_acknowledged_records_neither_leads_nor_stays_in_sync() -> None:
    """Review finding: under fsync=interval a leader that lost power and came back
    within its session kept leading, and its followers truncated acknowledged records."""
    state = build(history()[:5])  # orders: [1,2] [2,3] [3,1], leaders 1, 2, 3, full ISRs
    commands = plan_reelection(state, 1, may_have_lost_acknowledged=True, live={1, 2, 3})
    assert ChangeLeader("orders", 0, 2, (2,), 0) in commands  # another in-sync replica leads
    assert ChangeIsr("orders", 2, (3,)) in commands  # out of the ISR where it follows
    for command in commands:
        state.apply(command)
    assert state.partition("orders", 0).leader_id == 2
    assert 1 not in state.partition("orders", 2).isr
    # with nobody else in sync it keeps leading (in a new epoch): nothing better exists
    alone = build(history()[:5])
    alone.apply(ChangeIsr("orders", 0, (1,)))
    [again] = [c for c in plan_reelection(alone, 1, True, live={1, 2, 3}) if c.partition == 0]
    assert again == ChangeLeader("orders", 0, 1, (1,), 0)
    # a clean restart (or fsync=always) only bumps the epoch
    assert plan_reelection(build(history()[:5]), 1) == [ChangeLeader("orders", 0, 1, (1, 2), 0)]


def test_a_topic_created_again_starts_above_every_epoch_of_the_deleted_one() -> None:
    """Produce and fetch name a partition by topic name and leader epoch: a broker that
    had not yet learned of a deletion served the re-created topic's epoch-0 requests
    from the old incarnation's epoch-0 log (acknowledged writes went into the deleted
    log; a consumer read the old records). The new incarnation's epochs start above."""
    state = build(history()[:5])
    state.apply(ChangeLeader("orders", 1, 3, (3,)))
    state.apply(ChangeLeader("orders", 1, 2, (2,)))  # orders/1 at leader epoch 2
    state.apply(DeleteTopic("orders"))
    state.apply(CreateTopic("orders", 2, 1, ((1,), (2,))))
    assert [p.leader_epoch for p in state.topic("orders").partitions] == [3, 3]
    again = ClusterState.from_snapshot(json.loads(json.dumps(state.to_snapshot())))
    again.apply(DeleteTopic("orders"))
    again.apply(CreateTopic("orders", 1, 1, ((1,),)))
    assert again.topic("orders").partitions[0].leader_epoch == 4
    state.apply(CreateTopic("fresh", 1, 1, ((1,),)))
    assert state.topic("fresh").partitions[0].leader_epoch == 0


def test_a_name_forgotten_past_the_bound_still_starts_above_its_old_epochs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """recreated_epochs holds the newest DELETED_TOPIC_IDS_MAX names: a name pushed out
    (a tool that makes a topic per run) came back at epoch 0. Every topic created
    since a name was forgotten starts at least at its epoch (found by review)."""
    monkeypatch.setattr(metadata, "DELETED_TOPIC_IDS_MAX", 2)
    state = build(history()[:5])
    state.apply(ChangeLeader("orders", 1, 3, (3,)))
    state.apply(ChangeLeader("orders", 1, 2, (2,)))  # orders/1 at leader epoch 2
    state.apply(DeleteTopic("orders"))
    for name in ("a", "b"):  # two more deletions push "orders" out
        state.apply(CreateTopic(name, 1, 1, ((1,),)))
        state.apply(DeleteTopic(name))
    assert "orders" not in state.recreated_epochs
    again = ClusterState.from_snapshot(json.loads(json.dumps(state.to_snapshot())))
    for one in (state, again):
        one.apply(CreateTopic("orders", 1, 1, ((1,),)))
        assert one.topic("orders").partitions[0].leader_epoch >= 3


def test_the_topic_and_broker_bounds_refuse_new_ones_but_never_fail_a_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bounds are the shell's policy (check_bounds), not rules of check: a log
    written under a larger bound still replays after a version that lowers it."""
    state = build(history())  # 3 brokers, topic "orders" ("gone" was deleted)
    monkeypatch.setattr(metadata, "MAX_TOPICS", 2)
    monkeypatch.setattr(metadata, "MAX_BROKERS", 4)
    third = CreateTopic("third", 1, 1, ((1,),))
    fourth = CreateTopic("fourth", 1, 1, ((2,),))
    check_bounds(state, [third])
    check_bounds(state, [CreateTopic("orders", 1, 1, ((1,),))])  # exists: check says so
    with pytest.raises(InvalidRequest, match="maximum of 2 topics"):
        check_bounds(state, [third, fourth])  # counted together in one batch
    check_bounds(state, [RegisterBroker(4, "https://b4"), RegisterBroker(1, "https://b1")])
    with pytest.raises(InvalidRequest, match="maximum of 4 brokers"):
        check_bounds(state, [RegisterBroker(4, "https://b4"), RegisterBroker(5, "https://b5")])
    monkeypatch.setattr(metadata, "MAX_PARTITIONS_PER_TOPIC", 1)
    wide = CreateTopic("wide", 2, 1, ((1,), (2,)))
    with pytest.raises(InvalidRequest, match="partitions must be 1 to 1"):
        check_bounds(state, [wide])
    for command in (third, fourth, RegisterBroker(4, "https://b4"), RegisterBroker(5, "x"), wide):
        state.apply(command)  # past every bound: replay applies it
    assert {"third", "fourth", "wide"} <= set(state.topics) and len(state.brokers) == 5
    with pytest.raises(InvalidRequest, match="at least 1 partition"):
        state.check(CreateTopic("empty", 0, 1, ()))  # an invariant, not a bound


def test_a_deleted_group_is_forgotten_and_a_group_new_past_the_bound_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = build(history())
    assert "idle" not in state.offsets and "idle" not in state.group_session_ms
    before = state.to_snapshot()
    state.apply(DeleteGroup("idle"))  # never fails (replay): the shell answers 404
    assert state.to_snapshot() == before
    monkeypatch.setattr(metadata, "MAX_GROUPS", 3)
    state.apply(RecordGroupSession("live", 10_000))  # "g" and "live" remembered
    check_group_room(state, {"new"})
    with pytest.raises(ClusterStateConflict, match="tide groups delete"):
        check_group_room(state, {"new", "newer"})  # two new ones in one batch
    # The bound is the shell's policy, not a rule of check: a persisted command past
    # it (the bound lowered since) still replays.
    state.apply(CommitOffsets("new", (("orders", 0, 1),)))
    state.apply(CommitOffsets("newer", (("orders", 0, 1),)))
    assert set(state.offsets) == {"g", "new", "newer"}
    state.apply(DeleteGroup("g"))
    assert remembers_group(state, "live") and not remembers_group(state, "g")
