"""The pure replica core: high watermark, acks, ISR proposals, fencing, divergence."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidemq.core.replica import (
    UNKNOWN,
    Acks,
    Appended,
    Assigned,
    AwaitAck,
    AwaitData,
    Cancel,
    Closed,
    Complete,
    Effect,
    Event,
    Fail,
    Flushed,
    FollowerFetched,
    HighWatermarkAdvanced,
    IsrAnswered,
    LeaderAnswered,
    ProposeIsr,
    ReplicaAssignment,
    ReplicaCore,
    Tick,
    Truncated,
    diverging_epoch,
    truncation_offset,
)
from tidemq.errors import NotEnoughReplicas, NotLeader
from tidemq.storage import LogConfig, PartitionLog
from tidemq.wire.batch import build_batch


def leader(
    replicas: tuple[int, ...] = (1, 2), isr: tuple[int, ...] | None = None, min_isr: int = 1
) -> ReplicaCore:
    core = ReplicaCore(broker_id=1, log_end_offset=0, durable_offset=0, high_watermark=0)
    assignment = ReplicaAssignment(1, 1, 1, replicas, replicas if isr is None else isr, min_isr)
    core.handle(Assigned(assignment), now_ms=0)
    return core


def completed(effects: list[Effect]) -> set[int]:
    return {e.waiter_id for e in effects if isinstance(e, Complete)}


def failed(effects: list[Effect]) -> dict[int, Exception]:
    return {e.waiter_id: e.error for e in effects if isinstance(e, Fail)}


def test_a_lone_leader_acknowledges_what_it_has_fsynced() -> None:
    core = leader(replicas=(1,))
    core.handle(Appended(10), 1)
    assert core.handle(AwaitAck(7, 10, Acks.ALL), 1) == []
    assert core.high_watermark == 0  # appended is not durable
    effects = core.handle(Flushed(10), 2)
    assert completed(effects) == {7} and HighWatermarkAdvanced(10) in effects


def test_acks_all_waits_for_the_followers_durable_copy_acks_1_does_not() -> None:
    core = leader()
    core.handle(Appended(5), 1)
    core.handle(AwaitAck(1, 5, Acks.ALL), 1)
    core.handle(AwaitAck(2, 5, Acks.LEADER), 1)
    assert completed(core.handle(Flushed(5), 2)) == {2}
    # the follower copied everything but fsynced only 3 so far
    assert completed(core.handle(FollowerFetched(2, 5, 3), 3)) == set()
    assert core.high_watermark == 3
    assert completed(core.handle(FollowerFetched(2, 5, 5), 4)) == {1}
    assert core.high_watermark == 5


def test_acks_0_answers_at_once() -> None:
    core = leader()
    core.handle(Appended(5), 1)
    assert completed(core.handle(AwaitAck(1, 5, Acks.NONE), 1)) == {1}


def test_a_cut_off_leader_never_acknowledges_and_cannot_shrink_the_isr_alone() -> None:
    core = leader()
    core.handle(Appended(5), 0)
    core.handle(Flushed(5), 0)
    core.handle(AwaitAck(9, 5, Acks.ALL), 0)
    # the follower never fetches again; after the lag time the leader proposes to drop it
    effects = core.handle(Tick(), core.lag_time_max_ms + 1)
    assert effects == [ProposeIsr(1, 1, (1,))]
    assert core.handle(Tick(), core.lag_time_max_ms + 2) == []  # one proposal at a time
    # the coordinator refuses (a newer epoch elected the follower): nothing acknowledged
    assert core.handle(IsrAnswered(False, 1), core.lag_time_max_ms + 3) == []
    assert core.high_watermark == 0
    # then the heartbeat answer demotes it: the waiter fails at once, retriably
    demoted = ReplicaAssignment(2, 2, 2, (1, 2), (2,))
    effects = core.handle(Assigned(demoted), core.lag_time_max_ms + 4)
    assert isinstance(failed(effects)[9], NotLeader)
    assert core.waiting() == 0


def test_an_accepted_shrink_lets_the_high_watermark_advance() -> None:
    core = leader()
    core.handle(Appended(5), 0)
    core.handle(Flushed(5), 0)
    core.handle(AwaitAck(9, 5, Acks.ALL), 0)
    core.handle(Tick(), core.lag_time_max_ms + 1)
    effects = core.handle(IsrAnswered(True, 1, 1, 2, (1,)), core.lag_time_max_ms + 2)
    assert completed(effects) == {9} and core.isr == (1,)


def test_min_insync_replicas_refuses_and_fails_after_append() -> None:
    core = leader(replicas=(1, 2, 3), isr=(1,), min_isr=2)
    with pytest.raises(NotEnoughReplicas):
        core.check_produce(Acks.ALL)
    core.check_produce(Acks.LEADER)  # acks=1 does not need the ISR
    core = leader(replicas=(1, 2), min_isr=2)
    core.check_produce(Acks.ALL)
    core.handle(Appended(5), 0)
    core.handle(AwaitAck(3, 5, Acks.ALL), 0)
    core.handle(Flushed(5), 0)
    core.handle(Tick(), core.lag_time_max_ms + 1)
    effects = core.handle(IsrAnswered(True, 1, 1, 2, (1,)), core.lag_time_max_ms + 2)
    assert isinstance(failed(effects)[3], NotEnoughReplicas)


def test_a_caught_up_follower_is_proposed_back_and_counts_while_pending() -> None:
    core = leader(isr=(1,))
    core.handle(Appended(10), 0)
    core.handle(Flushed(10), 0)
    assert core.high_watermark == 10
    assert core.handle(FollowerFetched(2, 4, 4), 1) == []  # behind: stays out
    effects = core.handle(FollowerFetched(2, 10, 10), 2)
    assert ProposeIsr(1, 1, (1, 2)) in effects
    core.handle(Appended(12), 3)
    core.handle(Flushed(12), 3)
    assert core.high_watermark == 10  # the joining follower counts before the answer
    core.handle(FollowerFetched(2, 12, 12), 4)
    assert core.high_watermark == 12


def test_closing_fails_every_waiter_at_once() -> None:
    core = leader()
    core.handle(Appended(5), 0)
    core.handle(AwaitAck(1, 5, Acks.ALL), 0)
    core.handle(AwaitAck(2, 5, Acks.LEADER), 0)
    core.handle(AwaitData(3, 0), 0)
    core.handle(AwaitData(4, 5, follower=True), 0)
    core.handle(Cancel(2), 0)
    errors = failed(core.handle(Closed(), 1))
    assert set(errors) == {1, 3, 4} and all(isinstance(e, NotLeader) for e in errors.values())
    assert core.waiting() == 0
    assert isinstance(failed(core.handle(AwaitAck(5, 5, Acks.ALL), 2))[5], NotLeader)


def test_long_polls_wake_on_high_watermark_for_consumers_on_log_end_for_followers() -> None:
    core = leader()
    core.handle(AwaitData(1, 0), 0)
    core.handle(AwaitData(2, 0, follower=True), 0)
    assert completed(core.handle(Appended(3), 1)) == {2}
    core.handle(Flushed(3), 1)
    assert completed(core.handle(FollowerFetched(2, 3, 3), 2)) == {1}


def test_a_stale_assignment_is_ignored_and_a_follower_high_watermark_is_bounded() -> None:
    core = ReplicaCore(broker_id=2, log_end_offset=4, durable_offset=4, high_watermark=0)
    core.handle(Assigned(ReplicaAssignment(1, 3, 5, (1, 2), (1, 2))), 0)
    core.handle(Assigned(ReplicaAssignment(2, 2, 9, (1, 2), (2,))), 0)  # older epoch
    assert (core.leader_id, core.leader_epoch, core.is_leader) == (1, 3, False)
    core.handle(LeaderAnswered(10), 1)
    assert core.high_watermark == 4
    core.handle(Truncated(2), 2)
    assert core.high_watermark == 2 and core.durable_offset == 2


@pytest.mark.parametrize(
    ("fetch_offset", "last_epoch", "leader_answer", "log_start", "diverging"),
    [
        (10, 3, (3, 12), 0, None),  # same epoch, leader has more: prefix
        (10, 3, (3, 10), 0, None),
        (10, 3, (3, 7), 0, (3, 7)),  # leader's epoch 3 ended earlier
        (10, 4, (3, 8), 0, (3, 8)),  # leader never had epoch 4: up to where 3 ended
        (10, 4, (UNKNOWN, UNKNOWN), 2, (UNKNOWN, 2)),  # nothing at or below: log start
        (10, UNKNOWN, (UNKNOWN, UNKNOWN), 0, None),
        (0, 2, (UNKNOWN, UNKNOWN), 0, None),
    ],
)
def test_diverging_epoch(
    fetch_offset: int,
    last_epoch: int,
    leader_answer: tuple[int, int],
    log_start: int,
    diverging: tuple[int, int] | None,
) -> None:
    assert diverging_epoch(fetch_offset, last_epoch, leader_answer, log_start) == diverging


@pytest.mark.parametrize(
    ("diverging", "own", "own_start", "own_end", "cut"),
    [
        ((3, 8), (3, 10), 0, 12, 8),  # the leader's end of epoch 3 is earlier
        ((3, 12), (3, 10), 0, 14, 10),  # ours ends earlier: later records are epoch 4
        ((UNKNOWN, 5), (UNKNOWN, UNKNOWN), 0, 9, 5),  # the leader lost the epoch
        ((1, 110), (0, 100), 0, 103, 100),  # we never had epoch 1: keep epoch 0 only
        ((2, 7), (UNKNOWN, UNKNOWN), 4, 9, 4),  # nothing as old here: cut to our start
        ((3, 50), (3, 60), 0, 40, 40),  # never past our own log end
    ],
)
def test_truncation_offset(
    diverging: tuple[int, int], own: tuple[int, int], own_start: int, own_end: int, cut: int
) -> None:
    assert truncation_offset(diverging, own, own_start, own_end) == cut


def test_a_follower_with_an_epoch_the_new_leader_never_wrote_keeps_the_common_prefix(
    tmp_path: Path,
) -> None:
    """Review finding: a leader elected after a deposed leader's uncommitted epoch
    answered "unknown" and the follower emptied its log, committed records included."""
    leader = PartitionLog.open(tmp_path / "c", LogConfig(), 0)
    follower = PartitionLog.open(tmp_path / "b", LogConfig(), 0)
    for log in (leader, follower):
        log.append(build_batch([(None, b"x")] * 10, 0), 0, 0)
    follower.append(build_batch([(None, b"y")] * 5, 0), 1, 0)  # epoch 1: only here
    diverging = diverging_epoch(
        follower.log_end_offset,
        follower.latest_epoch(),
        leader.epoch_and_end_offset(follower.latest_epoch()),
        leader.log_start_offset,
    )
    assert diverging == (0, 10)
    own = follower.epoch_and_end_offset(diverging[0])
    assert truncation_offset(diverging, own, 0, follower.log_end_offset) == 10
    leader.close()
    follower.close()


def test_a_follower_cut_always_removes_something_or_nothing_diverges() -> None:
    """Review finding: C has epochs 0 [0,100), 1 [100,110), 3 [110,120); B has 0 [0,100),
    2 [100,103). B must cut to 100 (it never had epoch 1), not to 103 (a no-op loop)."""
    diverging = diverging_epoch(103, 2, (1, 110), 0)
    assert diverging == (1, 110)
    assert truncation_offset(diverging, (0, 100), 0, 103) == 100


# --- properties ------------------------------------------------------------------------

events = st.one_of(
    st.builds(Appended, st.integers(0, 3)),  # deltas; made absolute below
    st.builds(Flushed, st.integers(0, 3)),
    st.builds(FollowerFetched, st.sampled_from([2, 3]), st.integers(0, 3), st.integers(0, 3)),
    st.builds(AwaitAck, st.integers(0, 0), st.integers(0, 3), st.sampled_from(list(Acks))),
    st.builds(AwaitData, st.integers(0, 0), st.integers(0, 3), st.booleans()),
    st.builds(Cancel, st.integers(1, 40)),
    st.builds(IsrAnswered, st.booleans(), st.integers(0, 1)),
    st.just(Tick()),
    st.builds(
        ReplicaAssignment,
        st.sampled_from([1, 2, None]),
        st.integers(0, 3),
        st.integers(0, 3),
        st.just((1, 2, 3)),
        st.sampled_from([(1,), (1, 2), (1, 2, 3), (2, 3)]),
    ),
)


def _absolute(core: ReplicaCore, raw: object, waiter_id: int, now_ms: int) -> Event:
    """Turns a generated event into a consistent one for the core's current state."""
    if isinstance(raw, Appended):
        return Appended(core.log_end_offset + raw.log_end_offset)
    if isinstance(raw, Flushed):
        return Flushed(core.durable_offset + raw.durable_offset)
    if isinstance(raw, FollowerFetched):
        fetch = max(0, core.log_end_offset - raw.fetch_offset)
        return FollowerFetched(raw.broker_id, fetch, max(0, fetch - raw.durable_offset))
    if isinstance(raw, AwaitAck):
        return AwaitAck(waiter_id, max(1, core.log_end_offset - raw.end_offset), raw.acks)
    if isinstance(raw, AwaitData):
        return AwaitData(waiter_id, max(0, core.log_end_offset - raw.offset), raw.follower)
    if isinstance(raw, IsrAnswered):
        proposed = core.partition_epoch - raw.proposed_partition_epoch
        return IsrAnswered(raw.accepted, proposed, core.leader_epoch, proposed + 1, core.isr)
    if isinstance(raw, ReplicaAssignment):
        leader = raw.leader_id
        isr = raw.isr if leader is None or leader in raw.isr else (leader, *raw.isr)
        return Assigned(
            ReplicaAssignment(
                leader,
                core.leader_epoch + raw.leader_epoch,
                core.partition_epoch + raw.partition_epoch,
                raw.replicas,
                isr,
            )
        )
    assert isinstance(raw, Cancel | Tick | Closed)
    return raw


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(events, st.integers(0, 5_000)), max_size=60))
def test_invariants_hold_for_any_event_sequence(steps: list[tuple[object, int]]) -> None:
    core = leader(replicas=(1, 2, 3))
    now_ms = 0
    answered: set[int] = set()
    registered: set[int] = set()
    for waiter_id, (raw, delta_ms) in enumerate(steps, start=1):
        now_ms += delta_ms
        event = _absolute(core, raw, waiter_id, now_ms)
        if isinstance(event, AwaitAck | AwaitData):
            registered.add(event.waiter_id)
        was_leader, before = core.is_leader, core.high_watermark
        epoch_before = core.leader_epoch
        effects = core.handle(event, now_ms)
        for effect in effects:
            if isinstance(effect, Complete | Fail):
                assert effect.waiter_id in registered, "answered a waiter never registered"
                assert effect.waiter_id not in answered, "answered a waiter twice"
                answered.add(effect.waiter_id)
        proposals = [e for e in effects if isinstance(e, ProposeIsr)]
        assert len(proposals) <= 1
        for proposal in proposals:
            assert proposal.leader_epoch == core.leader_epoch
            assert core.broker_id in proposal.isr
        if was_leader and core.is_leader and core.leader_epoch == epoch_before:
            assert core.high_watermark >= before, "high watermark went backwards"
        assert core.high_watermark <= core.log_end_offset
        if core.is_leader:
            assert core.high_watermark <= max(core.durable_offset, before)
            for broker in core.maximal_isr:
                progress = core.followers.get(broker)
                if progress is not None and progress.durable_offset != UNKNOWN:
                    assert core.high_watermark <= max(progress.durable_offset, before)
        else:
            assert core.waiting() == 0, "a non-leader keeps leader-side waiters"


# --- the shortcuts for idle partitions (repeated_fetch, watch_data, unwatch_data) ---


def _idle_pair() -> ReplicaCore:
    """A leader with follower 2 caught up, durable and in the ISR; nothing uncommitted."""
    core = leader()
    core.handle(Appended(3), now_ms=0)
    core.handle(Flushed(3), now_ms=0)
    core.handle(FollowerFetched(2, 3, 3), now_ms=10)
    assert core.high_watermark == 3
    return core


def test_a_repeated_idle_fetch_keeps_the_follower_caught_up_without_an_event() -> None:
    core = _idle_pair()
    assert core.repeated_fetch(2, 3, 3, now_ms=9_000)
    assert core.followers[2].last_caught_up_ms == 9_000
    core.handle(Tick(), now_ms=15_000)  # 6 s later: within lag_time_max_ms of the last fetch
    assert core.isr == (1, 2) and core._proposal is None
    # Anything that moved takes the event: new data, a new offset, a lagging durable end.
    core.handle(Appended(4), now_ms=15_000)
    assert not core.repeated_fetch(2, 3, 3, now_ms=15_001)
    assert not core.repeated_fetch(2, 4, 3, now_ms=15_001)
    assert not core.repeated_fetch(3, 3, 3, now_ms=15_001)  # no such follower


def test_a_lagging_follower_repeating_its_fetch_is_not_caught_up() -> None:
    """Found by review: the high watermark can equal the log end while an ISR member
    lags (the coordinator put it back while it was behind). Its repeated fetch below
    the log end must take the event, which leaves it lagging, so that the ISR shrinks;
    a shortcut would mark it caught up at every fetch and acks=all would stall."""
    core = leader(replicas=(1, 2, 3), isr=(1, 2))
    core.handle(Appended(5), now_ms=0)
    core.handle(Flushed(5), now_ms=0)
    core.handle(FollowerFetched(2, 5, 5), now_ms=0)
    core.handle(FollowerFetched(3, 2, 2), now_ms=0)
    core.handle(Assigned(ReplicaAssignment(1, 1, 2, (1, 2, 3), (1, 2, 3))), now_ms=0)
    assert core.high_watermark == 5 and core.followers[3].fetch_offset == 2
    assert not core.repeated_fetch(3, 2, 2, now_ms=20_000)
    effects = core.handle(FollowerFetched(3, 2, 2), now_ms=20_000)
    assert [e.isr for e in effects if isinstance(e, ProposeIsr)] == [(1,)]


def test_a_repeated_fetch_with_a_lower_durable_end_takes_the_event() -> None:
    """Found by re-review: at log end 5, everything committed, a follower reporting a
    durable end below what it reported before (its disk lost a write) must have it
    recorded, as the event does; the shortcut would keep the old one."""
    core = leader(replicas=(1, 2, 3))
    core.handle(Appended(5), now_ms=0)
    core.handle(Flushed(5), now_ms=0)
    core.handle(FollowerFetched(2, 5, 5), now_ms=0)
    core.handle(FollowerFetched(3, 5, 5), now_ms=0)
    assert core.high_watermark == 5
    assert core.repeated_fetch(2, 5, 5, now_ms=1)  # the real repeat: taken
    for broker, fetch, durable in ((2, 5, 4), (2, 4, 4), (3, 5, 0)):
        assert not core.repeated_fetch(broker, fetch, durable, now_ms=2)
    core.handle(FollowerFetched(2, 5, 4), now_ms=2)
    assert core.followers[2].durable_offset == 4
    # The log end moved since follower 2's last fetch: its next one takes the event.
    core.handle(Appended(6), now_ms=3)
    core.handle(Flushed(6), now_ms=3)
    core.handle(FollowerFetched(3, 6, 6), now_ms=3)
    assert not core.repeated_fetch(2, 5, 4, now_ms=4)


def test_a_follower_outside_the_isr_never_takes_the_shortcut() -> None:
    core = leader(isr=(1,))
    core.handle(FollowerFetched(2, 0, 0), now_ms=0)  # proposes 2 back
    assert core._proposal is not None and not core.repeated_fetch(2, 0, 0, now_ms=1)


def test_watching_an_idle_partition_without_an_event() -> None:
    core = _idle_pair()
    assert core.watch_data(7, 3, follower=True)  # nothing at 3 yet: it waits
    assert not core.watch_data(8, 2, follower=True)  # data at 2: answered by the event
    effects = core.handle(Appended(4), now_ms=1)
    assert completed(effects) == {7}
    assert core.watch_data(9, 4, follower=True)
    core.unwatch_data(9)
    assert core.waiting() == 0
    core.handle(Closed(), now_ms=2)
    assert not core.watch_data(10, 4, follower=True)  # no longer leads: the event fails it


def _fetches_to_try(core: ReplicaCore) -> list[tuple[int, int, int]]:
    """Each follower's last fetch repeated, and fetches next to it and to the log end
    (as the shell passes them: offsets within the log, durable end up to the fetch)."""
    tried = []
    for broker in (2, 3, 4):
        progress = core.followers.get(broker)
        known = [] if progress is None else [progress.fetch_offset, progress.durable_offset]
        offsets = {core.log_end_offset, core.durable_offset, *known}
        candidates = {o + d for o in offsets for d in (-1, 0, 1)}
        for fetch in sorted(c for c in candidates if 0 <= c <= core.log_end_offset):
            for durable in sorted(c for c in candidates if 0 <= c <= fetch):
                tried.append((broker, fetch, durable))
    return tried


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(events | st.just(Closed()), st.integers(0, 5_000)), max_size=60))
def test_each_shortcut_does_what_its_event_does(steps: list[tuple[object, int]]) -> None:
    """After any event sequence: a repeated fetch that takes the shortcut, then the
    Tick it defers ISR changes to, leaves the core as the FollowerFetched event does,
    with the same effects; watch_data registers exactly when AwaitData would wait;
    unwatch_data is Cancel. Tried against every follower's last fetch at every step."""
    core = leader(replicas=(1, 2, 3))
    now_ms = 0
    for waiter_id, (raw, delta_ms) in enumerate(steps, start=1):
        now_ms += delta_ms
        core.handle(_absolute(core, raw, waiter_id, now_ms), now_ms)
        later = now_ms + delta_ms
        for broker, fetch, durable in _fetches_to_try(core):
            short, full = copy.deepcopy(core), copy.deepcopy(core)
            expected = full.handle(FollowerFetched(broker, fetch, durable), later)
            if short.repeated_fetch(broker, fetch, durable, later):
                assert short.handle(Tick(), later) == expected
                assert short == full
            else:
                assert short == core, "a refused shortcut changed something"
        for offset in (core.log_end_offset, max(0, core.log_end_offset - 1)):
            for follower in (True, False):
                short, full = copy.deepcopy(core), copy.deepcopy(core)
                waiter = 10_000 + waiter_id
                expected = full.handle(AwaitData(waiter, offset, follower), now_ms)
                if short.watch_data(waiter, offset, follower):
                    assert expected == [] and short == full
                    cancelled = copy.deepcopy(short)
                    short.unwatch_data(waiter)
                    assert cancelled.handle(Cancel(waiter), now_ms) == []
                    assert short == cancelled and short == core
                else:
                    assert expected != [] and short == core
