"""The producer's batching core: sealing, draining, record futures, memory bound."""

from __future__ import annotations

import threading
import time
import zlib

import pytest

from tidemq.client.accumulator import RecordAccumulator, RecordMetadata, record_size
from tidemq.client.config import ResultTimeout
from tidemq.errors import ClientClosed, NotLeader, RequestTooLarge
from tidemq.wire.batch import HEADER_SIZE, check_batches, decode_records
from tidemq.wire.partitioner import partition_for_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    batch_size: int = 1000, buffer_memory: int = 1 << 20, linger_ms: int = 5
) -> tuple[RecordAccumulator, Clock, list[int]]:
    clock = Clock()
    wakes: list[int] = []
    accumulator = RecordAccumulator(
        batch_size, buffer_memory, linger_ms, lambda: wakes.append(1), clock
    )
    return accumulator, clock, wakes


def append(accumulator: RecordAccumulator, partition: int, value: bytes, key: bytes | None = None):  # type: ignore[no-untyped-def]
    return accumulator.append("t", partition, 4, key, value, None, 1_000, 0.05)


def on_broker(tp: tuple[str, int]) -> str:
    """Every partition led by one broker."""
    return "https://b1"


def test_records_share_a_batch_while_the_broker_is_busy_then_drain_in_one_request() -> None:
    accumulator, clock, wakes = make()
    accumulator.in_flight_batches_max = 5  # idempotence: room for more behind the first
    first = append(accumulator, 1, b"first")
    [batch] = accumulator.drain(("t", 1), 1 << 20, clock.now, "https://b1")
    futures = [append(accumulator, 1, b"v%d" % i) for i in range(3)]
    assert len(wakes) == 2  # only the first record of a new batch wakes the sender
    ready = accumulator.ready(clock.now, on_broker)
    assert ready.partitions == [] and ready.next_check == pytest.approx(100.005)
    batch.complete(39, None)
    accumulator.complete(("t", 1), [batch])
    assert first.result(0) == RecordMetadata("t", 1, 39)
    assert accumulator.ready(clock.now, on_broker).partitions == [("t", 1)]
    batches = accumulator.drain(("t", 1), 1 << 20, clock.now, "https://b1")
    assert [b.count for b in batches] == [3]
    payload = batches[0].seal(-1, -1, -1)
    check_batches(payload)
    assert [m.value for m in decode_records(payload)] == [b"v0", b"v1", b"v2"]
    assert not futures[0].done()
    batches[0].complete(40, None)
    accumulator.complete(("t", 1), batches)
    assert [f.result(0) for f in futures] == [RecordMetadata("t", 1, 40 + i) for i in range(3)]
    assert accumulator.used == 0 and accumulator.is_empty()


def test_batch_is_sealed_when_the_next_record_would_exceed_batch_size() -> None:
    accumulator, clock, wakes = make(batch_size=HEADER_SIZE + 3 * (18 + 10))
    for _ in range(7):
        append(accumulator, 0, b"x" * 10)
    # 3 + 3 sealed, 1 open; a drain takes the open batch along
    assert accumulator.ready(clock.now).partitions == [("t", 0)]
    batches = accumulator.drain(("t", 0), 1 << 20, clock.now)
    assert [b.count for b in batches] == [3, 3, 1]
    assert len(wakes) == 3
    append(accumulator, 0, b"x" * 10)
    # one request in flight per partition: nothing more until it completes
    assert accumulator.ready(clock.now + 1).partitions == []
    assert accumulator.drain(("t", 0), 1 << 20, clock.now + 1) == []
    for batch in batches:
        batch.complete(0, None)
    accumulator.complete(("t", 0), batches)
    assert [b.count for b in accumulator.drain(("t", 0), 1 << 20, clock.now + 1)] == [1]


def test_drain_respects_max_bytes_but_takes_at_least_one_batch() -> None:
    accumulator, clock, _ = make(batch_size=200)
    for _ in range(20):
        append(accumulator, 2, b"y" * 100)
    # one record per batch (61 + 118 bytes); 400 bytes fit two of the nineteen sealed
    batches = accumulator.drain(("t", 2), 400, clock.now)
    assert len(batches) == 2
    accumulator.complete(("t", 2), batches)
    assert len(accumulator.drain(("t", 2), 10, clock.now)) == 1  # never zero


def test_offsets_of_concatenated_batches_are_consecutive() -> None:
    accumulator, clock, _ = make(batch_size=HEADER_SIZE + 2 * 19)
    futures = [append(accumulator, 3, b"z") for _ in range(5)]
    clock.now += 1
    batches = accumulator.drain(("t", 3), 1 << 20, clock.now)
    assert [b.count for b in batches] == [2, 2, 1]
    base = 10
    for batch in batches:
        batch.complete(base, None)
        base += batch.count
    assert [f.result().offset for f in futures] == [10, 11, 12, 13, 14]


def test_failed_batch_fails_its_futures_and_callbacks_run() -> None:
    accumulator, clock, _ = make()
    future = append(accumulator, 0, b"a")
    seen: list[object] = []
    future.add_done_callback(lambda f: seen.append(f.exception()))
    clock.now += 1
    [batch] = accumulator.drain(("t", 0), 1 << 20, clock.now)
    batch.complete(-1, NotLeader("gone"))
    assert future.done() and not future.cancel()
    assert isinstance(future.exception(), NotLeader)
    with pytest.raises(NotLeader):
        future.result()
    assert len(seen) == 1 and isinstance(seen[0], NotLeader)
    late: list[object] = []
    future.add_done_callback(late.append)  # already done: runs at once
    assert late == [future]


def test_result_timeout_is_a_timeout_error() -> None:
    accumulator, _, _ = make()
    future = append(accumulator, 0, b"a")
    with pytest.raises(TimeoutError):
        future.result(timeout=0.01)
    with pytest.raises(ResultTimeout):
        future.result(timeout=0.0)


def test_keyless_records_stick_to_a_partition_until_its_batch_seals() -> None:
    accumulator, clock, _ = make(batch_size=HEADER_SIZE + 2 * 19)
    futures = [accumulator.append("t", -1, 4, None, b"k", None, 1_000, 1.0) for _ in range(8)]
    clock.now += 1
    partitions = []
    for tp in accumulator.ready(clock.now).partitions:
        for batch in accumulator.drain(tp, 1 << 20, clock.now):
            partitions.append((tp[1], batch.count))
            batch.complete(0, None)
    assert sorted(count for _, count in partitions) == [2, 2, 2, 2]
    assert sorted(p for p, _ in partitions) == [0, 1, 2, 3]  # round robin over all four
    assert {f.result().partition for f in futures} == {0, 1, 2, 3}


def test_buffer_memory_bounds_send_and_blocks_until_freed() -> None:
    size = record_size(None, b"x" * 100, None)
    accumulator, clock, _ = make(batch_size=10_000, buffer_memory=3 * size)
    for _ in range(3):
        append(accumulator, 0, b"x" * 100)
    assert accumulator.used == 3 * size
    with pytest.raises(ResultTimeout, match="buffer_memory"):
        append(accumulator, 0, b"x" * 100)
    with pytest.raises(RequestTooLarge):
        append(accumulator, 0, b"x" * (4 * size))

    clock.now += 1
    batches = accumulator.drain(("t", 0), 1 << 20, clock.now)

    def release() -> None:
        for batch in batches:
            batch.complete(0, None)
        accumulator.complete(("t", 0), batches)

    timer = threading.Timer(0.05, release)
    timer.start()
    future = accumulator.append("t", 0, 4, None, b"x" * 100, None, 1_000, 5.0)
    timer.join()
    assert not future.done() and accumulator.used == size


def test_flush_makes_open_batches_ready_and_abort_fails_the_rest() -> None:
    accumulator, clock, _ = make(linger_ms=60_000)
    accumulator.in_flight_batches_max = 5
    append(accumulator, 0, b"in flight")
    in_flight = accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    future = append(accumulator, 0, b"a")
    assert accumulator.ready(clock.now, on_broker).partitions == []
    pending = accumulator.begin_flush()
    assert len(pending) == 2 and in_flight[0] in pending
    assert accumulator.ready(clock.now, on_broker).partitions == [("t", 0)]
    accumulator.end_flush()
    accumulator.abort(ClientClosed("bye"))
    with pytest.raises(ClientClosed):
        future.result(0)
    accumulator.close()
    with pytest.raises(ClientClosed):
        append(accumulator, 0, b"b")


def test_partition_choice_is_the_documented_crc32() -> None:
    # docs/PROTOCOL.md: partition = crc32(key) mod partitions, IEEE CRC-32, unsigned
    for key in [b"", b"a", b"key-1", "clé".encode(), bytes(range(256))]:
        assert partition_for_key(key, 12) == (zlib.crc32(key) & 0xFFFFFFFF) % 12
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32/IEEE check value
    assert partition_for_key(b"123456789", 12) == 0xCBF43926 % 12


def on_two_brokers(tp: tuple[str, int]) -> str:
    """Partitions 0 and 1 led by broker b1, 2 and 3 by b2."""
    return "https://b1" if tp[1] < 2 else "https://b2"


def test_a_lone_record_is_ready_at_once_with_the_default_linger() -> None:
    accumulator, clock, wakes = make(linger_ms=20)  # the default linger_ms
    future = append(accumulator, 0, b"alone")
    assert wakes == [1]
    assert accumulator.ready(clock.now, on_two_brokers).partitions == [("t", 0)]
    [batch] = accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    assert batch.count == 1 and not future.done()


def test_under_a_request_in_flight_records_accumulate_into_one_request_per_broker() -> None:
    accumulator, clock, _ = make(linger_ms=5)
    accumulator.in_flight_batches_max = 5
    append(accumulator, 0, b"first")
    [first] = accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    for i in range(10):  # keyed records for both partitions of the busy broker b1
        append(accumulator, i % 2, b"r%d" % i)
    clock.now += 0.002
    ready = accumulator.ready(clock.now, on_two_brokers)
    assert ready.partitions == [] and ready.next_check == pytest.approx(100.005)
    append(accumulator, 2, b"other broker")  # b2 has nothing in flight: not delayed
    assert accumulator.ready(clock.now, on_two_brokers).partitions == [("t", 2)]
    first.complete(0, None)
    accumulator.complete(("t", 0), [first])  # b1 is idle again: both partitions go
    ready = accumulator.ready(clock.now, on_two_brokers)
    assert sorted(ready.partitions) == [("t", 0), ("t", 1), ("t", 2)]
    drained = {
        tp: accumulator.drain(tp, 1 << 20, clock.now, on_two_brokers(tp)) for tp in ready.partitions
    }
    assert {tp[1]: [b.count for b in batches] for tp, batches in drained.items()} == {
        0: [5],
        1: [5],
        2: [1],
    }


def test_linger_bounds_the_wait_behind_a_request_in_flight() -> None:
    accumulator, clock, _ = make(linger_ms=5)
    accumulator.in_flight_batches_max = 5
    append(accumulator, 1, b"first")
    in_flight = accumulator.drain(("t", 1), 1 << 20, clock.now, "https://b1")
    clock.now += 0.001
    append(accumulator, 0, b"waits")
    append(accumulator, 1, b"waits too")
    assert accumulator.ready(clock.now + 0.0049, on_two_brokers).partitions == []
    ready = accumulator.ready(clock.now + 0.005, on_two_brokers)  # the request is still out
    assert sorted(ready.partitions) == [("t", 0), ("t", 1)]
    second = accumulator.drain(("t", 1), 1 << 20, clock.now + 0.005, "https://b1")
    assert [b.count for b in second] == [1] and not in_flight[0].done


def test_bytes_in_flight_per_broker_are_bounded() -> None:
    size = HEADER_SIZE + record_size(None, b"x" * 100, None)
    accumulator, clock, _ = make(batch_size=size, linger_ms=5)
    accumulator.max_in_flight_bytes = 3 * size
    accumulator.in_flight_batches_max = 5
    for partition in (0, 1):
        for _ in range(4):
            append(accumulator, partition, b"x" * 100)  # one record per full batch
    drained = []
    for tp in accumulator.ready(clock.now, on_two_brokers).partitions:
        drained += accumulator.drain(tp, 1 << 20, clock.now, "https://b1")
    assert len(drained) == 3 and accumulator.in_flight_bytes("https://b1") == 3 * size
    # at the bound: b1 is not ready, whatever lingers or is full
    assert accumulator.ready(clock.now + 1, on_two_brokers).partitions == []
    assert accumulator.drain(("t", 1), 1 << 20, clock.now + 1, "https://b1") == []
    append(accumulator, 2, b"x" * 100)  # another broker is not held back
    assert accumulator.ready(clock.now, on_two_brokers).partitions == [("t", 2)]
    batch = drained.pop(0)
    batch.complete(0, None)
    accumulator.complete((batch.topic, batch.partition), [batch])
    assert accumulator.in_flight_bytes("https://b1") == 2 * size
    more = []
    for tp in accumulator.ready(clock.now, on_two_brokers).partitions:
        more += accumulator.drain(tp, 1 << 20, clock.now, on_two_brokers(tp))
    assert sorted(on_two_brokers((b.topic, b.partition)) for b in more) == [
        "https://b1",
        "https://b2",
    ]
    assert accumulator.in_flight_bytes("https://b1") == 3 * size


def test_a_batch_larger_than_the_bound_goes_alone_when_nothing_is_in_flight() -> None:
    accumulator, clock, _ = make(batch_size=10_000)
    accumulator.max_in_flight_bytes = 500
    append(accumulator, 0, b"x" * 2000)
    [batch] = accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    append(accumulator, 1, b"y")
    assert accumulator.ready(clock.now + 1, on_two_brokers).partitions == []
    batch.complete(0, None)
    accumulator.complete(("t", 0), [batch])
    assert accumulator.in_flight_bytes("https://b1") == 0
    assert accumulator.ready(clock.now, on_two_brokers).partitions == [("t", 1)]


def test_each_answer_from_a_broker_sends_what_gathered_meanwhile() -> None:
    accumulator, clock, _ = make(linger_ms=5)
    accumulator.in_flight_batches_max = 5
    append(accumulator, 0, b"a")
    [first] = accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    append(accumulator, 1, b"b")
    clock.now += 0.005  # linger: a second request goes while the first is out
    [second] = accumulator.drain(("t", 1), 1 << 20, clock.now, "https://b1")
    append(accumulator, 1, b"gathered")
    assert accumulator.ready(clock.now, on_two_brokers).partitions == []
    first.complete(0, None)
    accumulator.complete(("t", 0), [first])  # b1 still has `second` in flight
    assert accumulator.ready(clock.now, on_two_brokers).partitions == [("t", 1)]
    [third] = accumulator.drain(("t", 1), 1 << 20, clock.now, "https://b1")
    append(accumulator, 1, b"next")
    assert accumulator.ready(clock.now, on_two_brokers).partitions == []  # answer used up
    assert third.count == 1 and not second.done


def test_new_batches_behind_a_request_in_flight_wake_the_sender_only_if_it_would_not_look() -> None:
    accumulator, clock, wakes = make(linger_ms=5)
    accumulator.in_flight_batches_max = 5
    append(accumulator, 0, b"a0")
    append(accumulator, 1, b"a1")
    ready = accumulator.ready(clock.now, on_broker)
    assert sorted(ready.partitions) == [("t", 0), ("t", 1)]
    assert ready.next_check == pytest.approx(100.005)  # requests go out: a look-in armed
    in_flight = [accumulator.drain(("t", p), 1 << 20, clock.now, "https://b1") for p in (0, 1)]
    assert len(wakes) == 2
    append(accumulator, 0, b"b0")  # b1 busy, and the sender's timer ends by b0's linger
    assert len(wakes) == 2
    assert accumulator.ready(clock.now, on_broker).next_check == pytest.approx(100.005)
    clock.now += 0.001
    append(accumulator, 1, b"b1")
    assert len(wakes) == 2
    clock.now = 100.005
    ready = accumulator.ready(clock.now, on_broker)  # the timer: both go, linger is kept
    assert sorted(ready.partitions) == [("t", 0), ("t", 1)]
    for p in (0, 1):
        accumulator.drain(("t", p), 1 << 20, clock.now, "https://b1")
    clock.now += 0.001
    append(accumulator, 1, b"c1")  # armed again one linger after that scan
    assert len(wakes) == 2
    accumulator._sender_timer = 200.0  # a sender that slept past c1's linger must be woken
    append(accumulator, 2, b"c2")
    assert len(wakes) == 3
    for batch in in_flight[0]:
        batch.complete(0, None)
    accumulator.complete(("t", 0), in_flight[0])
    assert len(wakes) == 4  # an answer always wakes
    append(accumulator, 0, b"c0")  # b1 answered since the scan: the sender must look
    assert len(wakes) == 5


def test_the_sender_looks_again_within_a_linger_only_after_a_pass_that_sends() -> None:
    """The look-in timer lets batches opened behind a request just sent go without a
    wake; a pass that sends nothing arms none (behind a hung request it would scan
    every linger for nothing; an idle producer sleeps), and a new record then wakes
    the sender at once."""
    accumulator, clock, wakes = make(linger_ms=5)
    accumulator.in_flight_batches_max = 5
    assert accumulator.ready(clock.now, on_broker).next_check is None
    append(accumulator, 0, b"a0")
    assert len(wakes) == 1
    assert accumulator.ready(clock.now, on_broker).next_check == pytest.approx(100.005)
    [batch] = accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    append(accumulator, 0, b"b0")  # behind the request just sent: the timer will look
    assert len(wakes) == 1
    clock.now = 100.005
    ready = accumulator.ready(clock.now, on_broker)  # the timer: b0's linger is up
    assert ready.partitions == [("t", 0)] and ready.next_check == pytest.approx(100.010)
    [later] = accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    clock.now = 100.010
    ready = accumulator.ready(clock.now, on_broker)  # nothing waits, requests are out
    assert ready.partitions == [] and ready.next_check is None  # no timer behind them
    append(accumulator, 1, b"c1")  # so a record behind them wakes the sender
    assert len(wakes) == 2
    accumulator.drain(("t", 1), 1 << 20, clock.now, "https://b1")
    for sent in (batch, later):
        sent.complete(0, None)
    accumulator.complete(("t", 0), [batch, later])
    assert len(wakes) == 3  # an answer always wakes
    zero, _, _ = make(linger_ms=0)
    zero.in_flight_batches_max = 5
    append(zero, 0, b"z")
    assert zero.ready(100.0, on_broker).next_check is None  # linger 0: never a look-in
    zero.drain(("t", 0), 1 << 20, 100.0, "https://b1")
    assert zero.ready(100.0, on_broker).next_check is None


def test_a_new_batch_wakes_the_sender_when_a_seal_or_a_flush_makes_it_ready() -> None:
    accumulator, clock, wakes = make(batch_size=HEADER_SIZE + 2 * (18 + 10), linger_ms=5)
    accumulator.in_flight_batches_max = 5
    append(accumulator, 0, b"first")
    accumulator.ready(clock.now, on_broker)
    accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    append(accumulator, 0, b"x" * 10)
    assert accumulator.ready(clock.now, on_broker).next_check is not None  # timer armed
    count = len(wakes)
    append(accumulator, 0, b"y" * 10)  # fits: same batch, no wake
    assert len(wakes) == count
    append(accumulator, 0, b"z" * 10)  # seals the full batch: ready now, so a wake
    assert len(wakes) == count + 1
    assert accumulator.ready(clock.now, on_broker).partitions == [("t", 0)]
    accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    append(accumulator, 1, b"p1")
    accumulator.ready(clock.now, on_broker)
    accumulator.drain(("t", 1), 1 << 20, clock.now, "https://b1")
    append(accumulator, 1, b"armed")
    accumulator.ready(clock.now, on_broker)
    accumulator.begin_flush()
    count = len(wakes)
    append(accumulator, 0, b"flushing")  # a flush ignores linger: the sender must look
    assert len(wakes) == count + 1


def test_a_thread_waiting_on_a_record_wakes_when_its_batch_completes() -> None:
    accumulator, clock, _ = make()
    future = append(accumulator, 0, b"waited")
    [batch] = accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")
    results: list[RecordMetadata] = []
    waiter = threading.Thread(target=lambda: results.append(future.result(10)))
    waiter.start()
    deadline = time.monotonic() + 5
    while batch._event is None and time.monotonic() < deadline:  # the waiter is blocked
        time.sleep(0.001)
    assert batch._event is not None and not future.done()
    batch.complete(7, None)
    waiter.join(10)
    assert results == [RecordMetadata("t", 0, 7)] and future.done()
    assert append(accumulator, 1, b"unwaited")._batch._event is None


def test_a_record_for_a_new_leader_with_nothing_in_flight_wakes_the_sender() -> None:
    accumulator, clock, wakes = make(linger_ms=5)
    accumulator.in_flight_batches_max = 5
    leaders = {0: "https://b1", 1: "https://b1"}

    def node_of(tp: tuple[str, int]) -> str:
        return leaders[tp[1]]

    append(accumulator, 0, b"a0")
    assert accumulator.ready(clock.now, node_of).partitions == [("t", 0)]
    accumulator.drain(("t", 0), 1 << 20, clock.now, "https://b1")  # out to b1, slow
    append(accumulator, 1, b"a1")
    assert accumulator.ready(clock.now, node_of).next_check == pytest.approx(100.005)
    leaders[0] = "https://b2"  # the metadata cache learned p0's new leader: idle
    count = len(wakes)
    append(accumulator, 0, b"lone")  # b1 is still busy, but p0 goes to b2 now
    assert len(wakes) == count + 1
    assert accumulator.ready(clock.now, node_of).partitions == [("t", 0)]


def test_a_keyless_record_that_seals_its_batch_wakes_the_sender_wherever_it_lands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accumulator, clock, wakes = make(batch_size=HEADER_SIZE + 2 * (18 + 10))
    monkeypatch.setattr("tidemq.client.accumulator.random.randrange", lambda n: 0)
    for _ in range(2):
        accumulator.append("t", -1, 4, None, b"x" * 10, None, 1_000, 0.05)  # p0 full
    append(accumulator, 1, b"y" * 10)  # keyed: p1 has an open batch
    monkeypatch.setattr("tidemq.client.accumulator.random.randrange", lambda n: 1)
    count = len(wakes)
    future = accumulator.append("t", -1, 4, None, b"z" * 10, None, 1_000, 0.05)
    assert future._batch.partition == 1  # sealed p0's batch, joined p1's open one
    assert len(wakes) == count + 1
    assert ("t", 0) in accumulator.ready(clock.now).partitions
