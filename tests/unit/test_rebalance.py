"""The rebalance planner and its commands: from random states, applying its plans
(with followers catching up between plans) converges to a balanced placement and
never breaks a safety rule on the way."""

from __future__ import annotations

import json
from collections.abc import Collection

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidemq.core.metadata import (
    CancelReassignment,
    ChangeIsr,
    ChangeLeader,
    ClusterState,
    Command,
    CompleteReassignment,
    CreateTopic,
    DeleteTopic,
    InitCluster,
    ReassignReplicas,
    RegisterBroker,
    SetBrokerDraining,
    command_from_json,
    command_to_json,
    min_insync_replicas,
)
from tidemq.core.rebalance import (
    RebalanceLimits,
    leader_counts,
    plan_rebalance,
    replica_counts,
)
from tidemq.errors import InvalidRequest, UnknownBroker

STEPS_MAX = 600


def cluster(brokers: int, *topics: CreateTopic) -> ClusterState:
    state = ClusterState()
    state.apply(InitCluster("c"))
    for broker in range(1, brokers + 1):
        state.apply(RegisterBroker(broker, f"https://b{broker}"))
    for topic in topics:
        state.apply(topic)
    return state


def catch_up(state: ClusterState, live: Collection[int]) -> bool:
    """Every live replica joins its ISR (an idle partition's followers do at once)."""
    changed = False
    for name, topic in sorted(state.topics.items()):
        for index, partition in enumerate(topic.partitions):
            if partition.leader_id is None or partition.leader_id not in live:
                continue
            isr = tuple(b for b in partition.replicas if b in partition.isr or b in live)
            if isr != tuple(partition.isr):
                state.apply(ChangeIsr(name, index, isr))
                changed = True
    return changed


def check_invariants(state: ClusterState) -> None:
    for name, topic in state.topics.items():
        for index, partition in enumerate(topic.partitions):
            assert set(partition.isr) <= set(partition.replicas), (name, index)
            assert partition.isr, f"{name}/{index} lost its last in-sync replica"
            if partition.leader_id is not None:
                assert partition.leader_id in partition.isr, (name, index)
            move = state.reassignments.get((name, index))
            expected = topic.replication_factor if move is None else len(partition.replicas)
            assert len(partition.replicas) == expected
            if move is not None:
                assert set(partition.replicas) == set(move.original) | set(move.target)


def apply_plan(
    state: ClusterState, live: Collection[int], limits: RebalanceLimits
) -> list[Command]:
    plan = plan_rebalance(state, live, limits)
    keys = [(c.topic, c.partition) for c in plan if hasattr(c, "topic")]
    assert len(keys) == len(set(keys)), f"two commands for one partition: {plan}"
    for command in plan:
        key = (command.topic, command.partition)  # type: ignore[union-attr]
        before = state.partition(*key)
        old_isr, old_leader = list(before.isr), before.leader_id
        assert old_leader is not None and old_leader in live, f"{command} on an offline leader"
        state.apply(command)
        after = state.partition(*key)
        assert set(old_isr) & set(after.isr), f"{command} dropped every in-sync copy"
        floor = min(min_insync_replicas(state.topic(key[0])), len(old_isr))
        assert len(after.isr) >= floor, f"{command} shrank the isr below min_insync"
        if isinstance(command, ReassignReplicas):
            new = set(command.replicas) - set(before.replicas)
            assert not new & state.draining, "a replica placed on a draining broker"
            assert new <= set(live), "a replica placed on a dead broker"
        check_invariants(state)
    assert len(state.reassignments) <= limits.moves_in_flight_max
    per_broker: dict[int, int] = {}
    for move in state.reassignments.values():
        for broker in move.adding + move.removing:
            per_broker[broker] = per_broker.get(broker, 0) + 1
    assert all(count <= limits.moves_per_broker_max for count in per_broker.values())
    return plan


def run_to_rest(state: ClusterState, live: Collection[int], limits: RebalanceLimits) -> int:
    """Plans and catches up until nothing changes; returns the number of rounds."""
    for step in range(STEPS_MAX):
        plan = apply_plan(state, live, limits)
        caught_up = catch_up(state, live)
        if not plan and not caught_up:
            return step
    raise AssertionError(f"no rest after {STEPS_MAX} rounds: {state.reassignments}")


def assert_balanced(state: ClusterState, live: Collection[int]) -> None:
    """Replicas within one; leaders within one where every topic has the same
    replication factor (then a balanced leader choice always exists: Hall's condition
    holds for both bounds). Mixed factors can make even leaders need other replica
    sets (a factor-1 partition leads only where it lives); the planner then evens
    leaders as far as its moves reach, which the rest of the checks cover."""
    eligible = set(live) - state.draining
    replicas = replica_counts(state, eligible)
    leaders = leader_counts(state, eligible)
    assert max(replicas.values()) - min(replicas.values()) <= 1, replicas
    if len({topic.replication_factor for topic in state.topics.values()}) == 1:
        assert max(leaders.values()) - min(leaders.values()) <= 1, leaders
    assert not state.reassignments
    for topic in state.topics.values():
        for partition in topic.partitions:
            assert not set(partition.replicas) & state.draining


# --- random states ---------------------------------------------------------------------


@st.composite
def states(
    draw: st.DrawFn, dead_allowed: bool = False, same_factor: bool = False
) -> tuple[ClusterState, set[int]]:
    count = draw(st.integers(2, 6))
    brokers = list(range(1, count + 1))
    draining = set(draw(st.lists(st.sampled_from(brokers), max_size=count - 1, unique=True)))
    staying = count - len(draining)
    state = cluster(count)
    shared_factor = draw(st.integers(1, min(3, staying)))
    for number in range(draw(st.integers(1, 3))):
        factor = shared_factor if same_factor else draw(st.integers(1, min(3, staying)))
        partitions = draw(st.integers(1, 6))
        assignments = tuple(
            tuple(draw(st.permutations(brokers))[:factor]) for _ in range(partitions)
        )
        state.apply(CreateTopic(f"t{number}", partitions, factor, assignments))
        for index, replicas in enumerate(assignments):
            leader = draw(st.sampled_from(replicas))
            isr = tuple(b for b in replicas if b == leader or draw(st.booleans()))
            state.apply(ChangeLeader(f"t{number}", index, leader, isr))
    for broker in sorted(draining):
        state.apply(SetBrokerDraining(broker, True))
    live = set(brokers)
    if dead_allowed:
        live = set(draw(st.lists(st.sampled_from(brokers), min_size=1, unique=True)))
    return state, live


limit_strategy = st.builds(
    RebalanceLimits,
    moves_in_flight_max=st.integers(1, 5),
    moves_per_broker_max=st.integers(1, 3),
    leader_changes_per_plan_max=st.integers(1, 6),
)


@settings(max_examples=300, deadline=None)
@given(states(), limit_strategy)
def test_plans_converge_to_a_balanced_placement(
    drawn: tuple[ClusterState, set[int]], limits: RebalanceLimits
) -> None:
    state, live = drawn
    check_invariants(state)
    run_to_rest(state, live, limits)
    assert_balanced(state, live)


@settings(max_examples=300, deadline=None)
@given(states(same_factor=True), limit_strategy)
def test_one_replication_factor_converges_to_even_leaders(
    drawn: tuple[ClusterState, set[int]], limits: RebalanceLimits
) -> None:
    state, live = drawn
    assert len({t.replication_factor for t in state.topics.values()}) == 1
    run_to_rest(state, live, limits)
    assert_balanced(state, live)


@settings(max_examples=300, deadline=None)
@given(states(dead_allowed=True), limit_strategy, st.data())
def test_dead_brokers_and_offline_leaders_break_no_rule(
    drawn: tuple[ClusterState, set[int]], limits: RebalanceLimits, data: st.DataObject
) -> None:
    """Brokers die half way: no command ever touches a partition without a live
    leader (apply_plan asserts it) and the invariants hold after every command."""
    state, live = drawn
    for _ in range(40):
        apply_plan(state, live, limits)
        catch_up(state, live)
        if data.draw(st.booleans()):
            victim = data.draw(st.sampled_from(sorted(state.brokers)))
            live = (live - {victim}) if len(live) > 1 else live | {victim}
            _failover(state, live)


def _failover(state: ClusterState, live: set[int]) -> None:
    from tidemq.core.metadata import plan_failover

    for command in plan_failover(state, live):
        state.apply(command)
    check_invariants(state)


# --- scenarios ---------------------------------------------------------------------------


def test_a_new_broker_gets_a_fair_share_step_by_step() -> None:
    topic = CreateTopic("t", 6, 2, ((1, 2), (2, 1), (1, 2), (2, 1), (1, 2), (2, 1)))
    state = cluster(2, topic)
    catch_up(state, {1, 2})
    state.apply(RegisterBroker(3, "https://b3"))
    limits = RebalanceLimits(moves_in_flight_max=1, moves_per_broker_max=1)
    live = {1, 2, 3}

    [start] = apply_plan(state, live, limits)
    assert isinstance(start, ReassignReplicas) and 3 in start.replicas
    key = (start.topic, start.partition)
    assert 3 in state.partition(*key).replicas and 3 not in state.partition(*key).isr
    assert apply_plan(state, live, limits) == []  # copying: nothing else may start
    catch_up(state, live)
    step = apply_plan(state, live, limits)
    assert [type(c) for c in step] in ([CompleteReassignment], [ChangeLeader])
    run_to_rest(state, live, limits)
    assert_balanced(state, live)
    assert replica_counts(state, live) == {1: 4, 2: 4, 3: 4}
    assert leader_counts(state, live) == {1: 2, 2: 2, 3: 2}


def test_draining_moves_leaders_first_then_every_replica() -> None:
    topic = CreateTopic("t", 3, 2, ((1, 2), (2, 3), (3, 1)))
    state = cluster(3, topic)
    catch_up(state, {1, 2, 3})
    state.apply(SetBrokerDraining(1, True))
    live = {1, 2, 3}
    first = apply_plan(state, live, RebalanceLimits(moves_per_broker_max=4))
    assert ChangeLeader("t", 0, 2, (1, 2), 0) in first
    assert state.partition("t", 0).leader_id == 2
    run_to_rest(state, live, RebalanceLimits())
    assert all(1 not in p.replicas for p in state.topic("t").partitions)
    assert_balanced(state, live)


def test_a_stuck_move_is_cancelled_when_its_new_broker_dies() -> None:
    state = cluster(3, CreateTopic("t", 2, 1, ((1,), (1,))))
    state.apply(ReassignReplicas("t", 0, (3,)))
    plan = plan_rebalance(state, {1, 2}, RebalanceLimits())
    assert CancelReassignment("t", 0) in plan
    state.apply(CancelReassignment("t", 0))
    assert state.partition("t", 0).replicas == [1] and not state.reassignments


def test_offline_partitions_and_disabled_limits_are_left_alone() -> None:
    state = cluster(2, CreateTopic("t", 4, 1, ((1,), (1,), (1,), (1,))))
    assert plan_rebalance(state, {1, 2}, RebalanceLimits(moves_in_flight_max=0)) == []
    for index in range(4):
        state.apply(ChangeLeader("t", index, None, (1,)))
    assert plan_rebalance(state, {1, 2}, RebalanceLimits()) == []


# --- commands ----------------------------------------------------------------------------


def test_new_commands_round_trip_and_survive_a_snapshot() -> None:
    commands: list[Command] = [
        SetBrokerDraining(2, True),
        ReassignReplicas("t", 0, (3, 2)),
        CompleteReassignment("t", 0),
        CancelReassignment("t", 1),
    ]
    for command in commands:
        assert command_from_json(json.loads(json.dumps(command_to_json(command)))) == command
    state = cluster(4, CreateTopic("t", 2, 2, ((1, 2), (2, 1))))
    state.apply(SetBrokerDraining(4, True))
    state.apply(ReassignReplicas("t", 1, (2, 3)))
    assert state.partition("t", 1).replicas == [2, 1, 3]
    assert state.partition("t", 1).isr == [2, 1]  # new topics start fully in sync
    copy = ClusterState.from_snapshot(json.loads(json.dumps(state.to_snapshot())))
    assert copy == state
    state.apply(DeleteTopic("t"))
    assert not state.reassignments


def test_bad_move_commands_raise_and_change_nothing() -> None:
    state = cluster(3, CreateTopic("t", 1, 2, ((1, 2),)), CreateTopic("u", 1, 1, ((1,),)))
    before = state.to_snapshot()
    bad: list[tuple[Command, type[Exception]]] = [
        (ReassignReplicas("t", 0, (1, 1)), InvalidRequest),
        (ReassignReplicas("t", 0, (1, 2, 3)), InvalidRequest),
        (ReassignReplicas("t", 0, (2, 1)), InvalidRequest),  # nothing moves
        (ReassignReplicas("t", 0, (1, 9)), InvalidRequest),
        (CompleteReassignment("t", 0), InvalidRequest),  # no move in progress
        (SetBrokerDraining(9, True), UnknownBroker),
    ]
    for command, error in bad:
        with pytest.raises(error):
            state.apply(command)
        assert state.to_snapshot() == before
    state.apply(SetBrokerDraining(3, True))
    with pytest.raises(InvalidRequest, match="replication factor"):
        state.apply(SetBrokerDraining(2, True))  # would leave 1 broker for RF 2
    with pytest.raises(InvalidRequest, match="draining"):
        state.apply(ReassignReplicas("t", 0, (1, 3)))
    state.apply(SetBrokerDraining(3, False))

    state.apply(ReassignReplicas("t", 0, (1, 3)))
    with pytest.raises(InvalidRequest, match="already being moved"):
        state.apply(ReassignReplicas("t", 0, (3, 2)))
    with pytest.raises(InvalidRequest, match="not in sync"):
        state.apply(CompleteReassignment("t", 0))
    state.apply(ChangeIsr("t", 0, (1, 3)))
    state.apply(ChangeLeader("t", 0, 3, (1, 3)))
    state.apply(ReassignReplicas("u", 0, (2,)))
    state.apply(ChangeIsr("u", 0, (1, 2)))
    state.apply(ChangeLeader("u", 0, 2, (1, 2)))
    with pytest.raises(InvalidRequest, match="leader"):
        state.apply(CancelReassignment("u", 0))  # the leader is the new replica
    state.apply(CompleteReassignment("t", 0))
    assert state.partition("t", 0).replicas == [1, 3]
    assert state.partition("t", 0).isr == [1, 3]
