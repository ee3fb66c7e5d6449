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


def test_a_forced_close_fails_groups_waiting_in_turn() -> None:
    """Check (expected to pass): a/0's g2 waits in turn behind g1 (delivery 1 waits for
    s's refresh, which never ends); close(0.3) fails everything, bounded."""
    broker = ResendingBroker()
    metadata = GatedMetadata("a", "s", leader=LEADERS[0])
    with ordered_producer(broker, metadata, close_timeout_s=0.3) as (producer, _):
        metadata.close_gates(producer, "s")
        release = hold_loop(producer)
        first = [producer.send("a", b"a-1", partition=0), producer.send("s", b"s", partition=0)]
        release.set()
        assert until(lambda: metadata.waiting["s"] >= 1)
        release = hold_loop(producer)
        second = [producer.send("a", b"a-2", partition=0), producer.send("a", b"a-3", partition=0)]
        release.set()
        time.sleep(0.2)
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
        metadata.close_gates(producer, "s")
        release = hold_loop(producer)
        first = [producer.send("a", b"a-1", partition=0), producer.send("s", b"s", partition=0)]
        release.set()
        assert until(lambda: metadata.waiting["s"] >= 1)
        release = hold_loop(producer)
        second = [producer.send("a", b"a-2", partition=0), producer.send("a", b"a-3", partition=0)]
        release.set()
        time.sleep(0.2)

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
