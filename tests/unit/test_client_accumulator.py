"""The producer's batching core: sealing, draining, record futures, memory bound."""

from __future__ import annotations

import threading
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


def test_records_share_a_batch_until_linger_then_drain_in_one_request() -> None:
    accumulator, clock, wakes = make()
    futures = [append(accumulator, 1, b"v%d" % i) for i in range(3)]
    assert len(wakes) == 1  # only the first record of a new batch wakes the sender
    ready = accumulator.ready(clock.now)
    assert ready.partitions == [] and ready.next_check == pytest.approx(100.005)
    clock.now += 0.005
    assert accumulator.ready(clock.now).partitions == [("t", 1)]
    batches = accumulator.drain(("t", 1), 1 << 20, clock.now)
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
    # 3 + 3 sealed, 1 open; sealed batches are ready without waiting for linger
    assert accumulator.ready(clock.now).partitions == [("t", 0)]
    batches = accumulator.drain(("t", 0), 1 << 20, clock.now)
    assert [b.count for b in batches] == [3, 3]
    assert len(wakes) == 3
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
    future = append(accumulator, 0, b"a")
    assert accumulator.ready(clock.now).partitions == []
    pending = accumulator.begin_flush()
    assert len(pending) == 1
    assert accumulator.ready(clock.now).partitions == [("t", 0)]
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
