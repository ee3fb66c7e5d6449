"""Sending a partition's later groups in turn (producer.py `_deliver_in_turn`): cases
found by the review of f6fe107 (helper-67), and its checks of close, a sender bug and
recovery with groups waiting in turn."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.unit.producer_fakes import InstantBroker
from tests.unit.test_producer_wake_races import (
    LEADERS,
    GatedMetadata,
    hold_loop,
    ordered_producer,
    sequences_sent,
    until,
)

from tidemq.client.metadata import PartitionInfo
from tidemq.wire.batch import iter_headers
from tidemq.wire.produce import decode_produce


class ResendingBroker(InstantBroker):
    """InstantBroker that also answers a recovery's single-partition resend
    (``.../v1/topics/{t}/partitions/{p}/records``), and logs each produce request's
    (topic, partition, base sequence) entries in ``produce_requests``."""

    def __init__(self) -> None:
        super().__init__()
        self.produce_requests: list[list[tuple[str, int, int]]] = []

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        if "/records" not in url:
            self.produce_requests.append(
                [
                    (entry.topic, entry.partition, header.base_sequence)
                    for entry in decode_produce(kwargs["data"])
                    for header in iter_headers(entry.batches)
                ]
            )
            return await super().request_json(method, url, **kwargs)
        self.requests += 1
        leader, path = url.split("/v1/topics/", 1)
        topic, rest = path.split("/partitions/", 1)
        partition = int(rest.split("/", 1)[0])
        headers = list(iter_headers(kwargs["data"]))
        for header in headers:
            self.sent.append((leader, topic, partition, header.base_sequence))
        await asyncio.sleep(0)
        end = self.ends.get(partition, 0)
        offsets = []
        for header in headers:
            offsets.append(end)
            end += header.record_count
        base = self.ends.get(partition, 0)
        self.ends[partition] = end
        return {"base_offset": base, "batch_base_offsets": offsets}


class LeaderlessOnce(GatedMetadata):
    """As GatedMetadata, but b/0's first lookup names no leader (a failover)."""

    def __init__(self, *topics: str, **options: Any) -> None:
        super().__init__(*topics, **options)
        self.leaderless = {("b", 0)}

    async def leader(self, topic: str, partition: int) -> PartitionInfo:
        info = await super().leader(topic, partition)
        if (topic, partition) in self.leaderless:
            self.leaderless.discard((topic, partition))
            return PartitionInfo(partition, None, 0)
        return info


def test_a_group_that_went_to_recovery_does_not_hold_later_groups_for_another_topic() -> None:
    """Delivery 1 drained [b/0 g1, s/0] and waits for b's refresh; delivery 2 drained
    [a/0, b/0 g2] and waits for a's. b's refresh names no leader (a failover): g1 goes
    to _failed (recovery), and delivery 1 goes on to wait for s's refresh. a's refresh
    ends; delivery 2's lookup of b (invalidated, refreshed again) finds the new leader.
    g1 counts as dispatched only when delivery 1 ends, so g2 waits in turn for s's
    refresh, and, in flight, keeps b/0's recovery from starting: b/0 waits for topic s
    although its earlier group is no longer unsent (ARCHITECTURE: dispatched "also set
    when it goes to recovery")."""
    broker = ResendingBroker()
    metadata = LeaderlessOnce("a", "b", "s", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "a", "b", "s")
        release = hold_loop(producer)
        g1 = producer.send("b", b"b-1", partition=0)
        s1 = producer.send("s", b"s-1", partition=0)
        release.set()
        assert until(lambda: metadata.waiting["b"] >= 1)  # delivery 1 waits for b
        release = hold_loop(producer)
        a1 = producer.send("a", b"a-1", partition=0)
        g2 = producer.send("b", b"b-2", partition=0)
        producer.send("b", b"b-3", partition=0)  # seals b-2
        release.set()
        assert until(lambda: metadata.waiting["a"] >= 1)  # delivery 2 waits for a
        metadata.open_gate(producer, "b")  # no leader: g1 to recovery
        assert until(lambda: metadata.waiting["s"] >= 1)  # delivery 1 now waits for s
        metadata.open_gate(producer, "a")  # delivery 2 finds b/0's new leader
        try:
            held = not until(lambda: g1.done() and g2.done(), 1.0)
        finally:
            metadata.open_gate(producer, "s")
        g1.result(5), g2.result(5), s1.result(5), a1.result(5)
    assert not held, "b/0 (g1 already in recovery) waited for topic s's refresh"


def test_groups_sent_in_turn_share_one_request_per_leader() -> None:
    """Delivery 1 drained [a/0..a/5, s/0] (one leader) and waits for s's refresh;
    delivery 2 drained a/0..a/5's next groups. Each waits in turn, and each is sent in
    a request of its own when delivery 1 goes: 6 requests where one would do (before
    f6fe107 delivery 2 made one multi-partition request)."""
    broker = ResendingBroker()
    metadata = GatedMetadata("a", "s", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "s")
        release = hold_loop(producer)
        first = [producer.send("a", b"a-1", partition=p) for p in range(6)]
        first.append(producer.send("s", b"s-1", partition=0))
        release.set()
        assert until(lambda: metadata.waiting["s"] >= 1)
        release = hold_loop(producer)
        second = []
        for p in range(6):
            second.append(producer.send("a", b"a-2", partition=p))
            producer.send("a", b"a-3", partition=p)  # seals a-2
        release.set()
        time.sleep(0.2)  # delivery 2 runs: all six wait in turn
        metadata.open_gate(producer, "s")
        for future in first + second:
            future.result(5)
        later = [r for r in broker.produce_requests if all(seq > 0 for _, _, seq in r)]
    assert len(later) == 1, f"delivery 2's groups went in {len(later)} requests to one leader"


def a_group_waiting_in_turn(producer: Any, metadata: GatedMetadata) -> tuple[list[Any], list[Any]]:
    """a/0's g1 goes in a delivery that waits for s's refresh (its gate stays closed);
    g2 (a-2, sealed by a-3) is drained by a later delivery and waits in turn behind it.
    Returns the futures of the first delivery's records and of a-2, a-3."""
    metadata.close_gates(producer, "s")
    release = hold_loop(producer)
    first = [producer.send("a", b"a-1", partition=0), producer.send("s", b"s", partition=0)]
    release.set()
    assert until(lambda: metadata.waiting["s"] >= 1)
    release = hold_loop(producer)
    second = [producer.send("a", b"a-2", partition=0), producer.send("a", b"a-3", partition=0)]
    release.set()
    time.sleep(0.2)  # the later delivery runs and hands g2 to a send in turn
    return first, second


def test_a_forced_close_fails_groups_waiting_in_turn() -> None:
    """Check (expected to pass): a/0's g2 waits in turn behind g1 (delivery 1 waits for
    s's refresh, which never ends); close(0.3) fails everything, bounded."""
    broker = ResendingBroker()
    metadata = GatedMetadata("a", "s", leader=LEADERS[0])
    with ordered_producer(broker, metadata, close_timeout_s=0.3) as (producer, _):
        first, second = a_group_waiting_in_turn(producer, metadata)
        started = time.monotonic()
    assert time.monotonic() - started < 3
    for future in first + second:
        assert future.done() and future.exception(0) is not None
    assert broker.requests == 0


def test_a_sender_bug_fails_groups_waiting_in_turn(monkeypatch: Any) -> None:
    """Check (expected to pass): a delivery's bug while g2 waits in turn stops the
    producer; every record fails, none waits for ever."""
    from tidemq.client import producer as producer_module

    broker = ResendingBroker()
    metadata = GatedMetadata("a", "s", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        first, second = a_group_waiting_in_turn(producer, metadata)

        def boom(*_: Any) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(producer_module.Producer, "_deliver_to_leader", boom)
        metadata.open_gate(producer, "s")
        assert until(lambda: all(f.done() for f in first + second), 3)


class FirstTimesOut(ResendingBroker):
    def __init__(self) -> None:
        super().__init__()
        self.release: asyncio.Event | None = None
        self.first = True

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        if self.first:
            self.first = False
            self.release = asyncio.Event()
            await self.release.wait()
            from tidemq.errors import RequestTimedOut

            raise RequestTimedOut("timed out")
        return await super().request_json(method, url, **kwargs)


def test_recovery_with_groups_waiting_in_turn() -> None:
    """Check: a/0 g0 in flight times out while g1 (delivery 1, waits for s) and g2
    (in turn) wait; recovery starts only once both went; all succeed."""
    broker = FirstTimesOut()
    leaders = {"a": LEADERS[0]}
    metadata = GatedMetadata("a", "s", leader_of=lambda p: PartitionInfo(p, leaders["a"], 0))
    with ordered_producer(broker, metadata) as (producer, _):
        g0 = producer.send("a", b"a-0", partition=0)
        assert until(lambda: broker.release is not None)
        metadata.close_gates(producer, "s")
        release = hold_loop(producer)
        first = [producer.send("a", b"a-1", partition=0), producer.send("s", b"s", partition=0)]
        producer.send("a", b"a-1b", partition=0)
        release.set()
        assert until(lambda: metadata.waiting["s"] >= 1)
        release = hold_loop(producer)
        second = [producer.send("a", b"a-2", partition=0), producer.send("a", b"a-3", partition=0)]
        release.set()
        time.sleep(0.2)
        producer._thread.loop.call_soon_threadsafe(broker.release.set)  # type: ignore[union-attr]
        time.sleep(0.1)
        leaders["a"] = LEADERS[1]  # moved while g2 waits in turn
        metadata.open_gate(producer, "s")
        for future in [g0, *first, *second]:
            assert future.result(5).offset >= 0  # every record acknowledged


# -- found by the second review of the in-turn sends (helper-69) ----------------------


class LeaderlessOnSecondLookup(GatedMetadata):
    """As GatedMetadata, but b/0's second lookup names no leader (a failover)."""

    def __init__(self, *topics: str, **options: Any) -> None:
        super().__init__(*topics, **options)
        self.b_lookups = 0

    async def leader(self, topic: str, partition: int) -> PartitionInfo:
        info = await super().leader(topic, partition)
        if (topic, partition) == ("b", 0):
            self.b_lookups += 1
            if self.b_lookups == 2:
                return PartitionInfo(partition, None, 0)
        return info


def test_a_group_waiting_in_turn_is_not_held_once_its_earlier_group_went_to_recovery() -> None:
    """Delivery 1 drained [a/0, b/0 g1, c/0] and waits for a's refresh. Delivery 2
    drained [b/0 g2]; its lookup hits the cache, g1 is undispatched: g2 waits in turn
    on delivery 1's unit. a's refresh ends; delivery 1's lookup of b names no leader:
    g1 goes to recovery (dispatched), and delivery 1 waits for c's refresh. g2's task
    sleeps on delivery 1's unit, set only when delivery 1 ends: g2 stays undispatched
    and in flight, so b/0's recovery cannot start either; b/0 waits for topic c (the
    af38652 fix only covers g1 going to recovery before g2's delivery looks)."""
    broker = ResendingBroker()
    metadata = LeaderlessOnSecondLookup("a", "b", "c", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "a", "c")
        release = hold_loop(producer)
        first = [producer.send(t, f"{t}-1".encode(), partition=0) for t in ("a", "b", "c")]
        release.set()
        assert until(lambda: metadata.waiting["a"] >= 1)  # delivery 1 waits for a
        release = hold_loop(producer)
        g2 = producer.send("b", b"b-2", partition=0)
        producer.send("b", b"b-3", partition=0)  # seals b-2
        release.set()
        assert until(lambda: metadata.b_lookups >= 1)  # delivery 2 looked: g2 in turn
        time.sleep(0.05)
        metadata.open_gate(producer, "a")  # g1 to recovery; delivery 1 waits for c
        assert until(lambda: metadata.waiting["c"] >= 1)
        try:
            held = not until(lambda: first[1].done() and g2.done(), 1.0)
        finally:
            metadata.open_gate(producer, "c")
        for future in [*first, g2]:
            future.result(5)
    assert not held, "b/0 (g1 in recovery, g2 in turn) waited for topic c's refresh"


def test_a_partition_in_turn_is_not_held_by_another_partitions_earlier_delivery() -> None:
    """Delivery 1 drained [p/0, x/0 g1] and waits for p; delivery 2 drained [q/0,
    y/0 h1] and waits for q; delivery 3 drained [x/0 g2, y/0 h2]: both wait in turn,
    in one task. p's refresh ends and g1 is sent: x/0 has no earlier unsent group, but
    g2 still waits (the task awaits every unit) for topic q's refresh."""
    broker = ResendingBroker()
    metadata = GatedMetadata("p", "q", "x", "y", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "p", "q")
        release = hold_loop(producer)
        producer.send("p", b"p-1", partition=0)
        g1 = producer.send("x", b"x-1", partition=0)
        release.set()
        assert until(lambda: metadata.waiting["p"] >= 1)
        release = hold_loop(producer)
        producer.send("q", b"q-1", partition=0)
        producer.send("q", b"q-2", partition=0)  # seals q-1
        producer.send("y", b"y-1", partition=0)
        producer.send("y", b"y-2", partition=0)  # seals y-1
        release.set()
        assert until(lambda: metadata.waiting["q"] >= 1)
        release = hold_loop(producer)
        g2 = producer.send("x", b"x-2", partition=0)
        producer.send("x", b"x-3", partition=0)  # seals x-2
        producer.send("y", b"y-3", partition=0)  # seals y-2 (h2)
        release.set()
        time.sleep(0.2)  # delivery 3: x/0 and y/0 wait in turn
        metadata.open_gate(producer, "p")
        try:
            held = not until(lambda: g1.done() and g2.done(), 1.0)
        finally:
            metadata.open_gate(producer, "q")
    assert not held, "x/0 (its earlier group sent) waited for topic q's refresh"


def test_a_later_first_attempt_does_not_go_before_an_earlier_group_in_recovery() -> None:
    """af38652's own case: g1 goes to recovery at its lookup (no leader) and g2's
    first attempt is sent at once, before g1's resend (which waits for g2 to end):
    a real leader holds g2 REORDER_WAIT_S (250 ms) for g1, answers
    out_of_order_sequence, and b/0 is resent: every time, 250 ms and a request lost."""
    from tests.unit.test_producer_in_turn import LeaderlessOnce

    broker = ResendingBroker()
    metadata = LeaderlessOnce("a", "b", "s", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "a", "b", "s")
        release = hold_loop(producer)
        producer.send("b", b"b-1", partition=0)
        producer.send("s", b"s-1", partition=0)
        release.set()
        assert until(lambda: metadata.waiting["b"] >= 1)
        release = hold_loop(producer)
        producer.send("a", b"a-1", partition=0)
        producer.send("b", b"b-2", partition=0)
        producer.send("b", b"b-3", partition=0)  # seals b-2
        release.set()
        assert until(lambda: metadata.waiting["a"] >= 1)
        metadata.open_gate(producer, "b")  # no leader: g1 to recovery
        assert until(lambda: metadata.waiting["s"] >= 1)
        metadata.open_gate(producer, "a")
        metadata.open_gate(producer, "s")
        producer.flush(5)
        sent = sequences_sent(broker, "b", 0)
    assert sent == sorted(sent), f"b/0's sequences reached the leader as {sent}"


def test_a_sender_bug_reports_never_sent_groups_in_turn_as_not_sent(monkeypatch: Any) -> None:
    """g1 (b/0) went to recovery at its lookup; g2 (b/0) and h2 (e/0) wait in turn in
    one task. A delivery's bug aborts the producer's task group: the in-turn task's
    cancel handler gives up g2, whose settle starts b/0's recovery
    (``_maybe_recover``: _closing is still False) with create_task on the aborting
    group: RuntimeError, so h2 is skipped and _fail_unsettled reports the never-sent
    h2 as OutcomeUnknown ("may have been written") instead of ClientClosed."""
    from tidemq.client import producer as producer_module
    from tidemq.errors import ClientClosed

    broker = ResendingBroker()
    metadata = LeaderlessOnSecondLookup("a", "b", "c", "e", "z", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "a", "c")
        release = hold_loop(producer)
        for topic in ("a", "b", "c", "e"):
            producer.send(topic, f"{topic}-1".encode(), partition=0)
        release.set()
        assert until(lambda: metadata.waiting["a"] >= 1)
        release = hold_loop(producer)
        producer.send("b", b"b-2", partition=0)
        producer.send("b", b"b-3", partition=0)  # seals b-2
        h2 = producer.send("e", b"e-2", partition=0)
        producer.send("e", b"e-3", partition=0)  # seals e-2
        release.set()
        assert until(lambda: metadata.b_lookups >= 1)
        time.sleep(0.05)
        metadata.open_gate(producer, "a")  # g1 to recovery; delivery 1 waits for c
        assert until(lambda: metadata.waiting["c"] >= 1)

        def boom(*_: Any) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(producer_module.Producer, "_deliver_to_leader", boom)
        producer.send("z", b"z-1", partition=0)
        producer.send("z", b"z-2", partition=0)  # seals z-1: its delivery hits the bug
        assert until(h2.done, 3)
    error = h2.exception(0)
    assert type(error) is ClientClosed, f"never-sent h2 reported as {error!r}"
