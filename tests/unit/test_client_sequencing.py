"""The producer's per-partition sequencing (client/sequencing.py) and the accumulator's
in-flight window: stamping at drain, renumbering on a new epoch, pause and resume."""

from __future__ import annotations

import pytest

from tidemq.client.accumulator import RecordAccumulator
from tidemq.client.sequencing import EPOCH_MAX, PartitionSequencer
from tidemq.core.producers import APPEND, ProducerStateTable
from tidemq.errors import InvariantViolation, OutOfOrderSequence, ProducerFenced
from tidemq.wire.batch import check_batch


def accumulator_with(batches: int, window: int | None) -> RecordAccumulator:
    """``batches`` sealed batches of two records each on partition ("t", 0)."""
    accumulator = RecordAccumulator(
        batch_size=61 + 2 * 19,
        buffer_memory=1 << 20,
        linger_ms=0,
        wake=lambda: None,
        clock=lambda: 0.0,
    )
    accumulator.in_flight_batches_max = window
    for _ in range(batches * 2):
        accumulator.append("t", 0, 1, None, b"x", None, 1_000, 0.1)
    return accumulator


def test_the_window_bounds_batches_in_flight_across_requests() -> None:
    accumulator = accumulator_with(8, window=5)
    first = accumulator.drain(("t", 0), 1 << 20, 1.0)
    assert len(first) == 5
    assert accumulator.drain(("t", 0), 1 << 20, 1.0) == []
    assert accumulator.ready(1.0).partitions == []
    accumulator.complete(("t", 0), first[:2])  # say a request of two of them settled
    second = accumulator.drain(("t", 0), 1 << 20, 1.0)
    assert len(second) == 2
    accumulator.pause(("t", 0))
    accumulator.complete(("t", 0), first[2:])
    assert accumulator.ready(1.0).partitions == [] and not accumulator.is_empty()
    accumulator.resume(("t", 0))
    assert accumulator.ready(1.0).partitions == [("t", 0)]


def test_without_idempotence_one_request_per_partition_takes_everything_ready() -> None:
    accumulator = accumulator_with(8, window=None)
    batches = accumulator.drain(("t", 0), 1 << 20, 1.0)
    assert len(batches) == 8
    assert accumulator.drain(("t", 0), 1 << 20, 1.0) == []


def test_groups_are_stamped_in_drain_order_and_renumbered_by_a_new_epoch() -> None:
    accumulator = accumulator_with(6, window=5)
    sequencer = PartitionSequencer(epoch=0, producer_id=9)
    one = sequencer.start(accumulator.drain(("t", 0), 400, 1.0))
    two = sequencer.start(accumulator.drain(("t", 0), 1 << 20, 1.0))
    stamps = [check_batch(b.payload or b"")[9:12] for b in one.batches + two.batches]
    assert stamps == [(9, 0, 2 * i) for i in range(len(stamps))]
    assert sequencer.next_sequence == 2 * len(stamps)
    with pytest.raises(InvariantViolation):
        sequencer.reset()  # both still in flight
    one.in_flight = two.in_flight = False
    sequencer.settle(one)
    sequencer.reset()
    assert sequencer.epoch == 1
    restamped = [check_batch(b.payload or b"")[9:12] for b in two.batches]
    assert restamped == [(9, 1, 2 * i) for i in range(len(two.batches))]
    assert sequencer.next_sequence == 2 * len(two.batches)


def test_a_broker_table_accepts_the_renumbered_groups_and_fences_the_old_ones() -> None:
    """What a reset is for: after a group failed for good, the held ones still land."""
    accumulator = accumulator_with(3, window=5)
    sequencer = PartitionSequencer(epoch=0, producer_id=4)
    groups = [sequencer.start(accumulator.drain(("t", 0), 1, 1.0)) for _ in range(3)]
    table = ProducerStateTable()
    first = check_batch(groups[0].payload())
    assert table.check(first) == APPEND
    table.record(first, 0)
    old_third = check_batch(groups[2].payload())
    with pytest.raises(OutOfOrderSequence):  # the second group never arrived: a gap
        table.check(old_third)
    for group in groups:
        group.in_flight = False
    sequencer.settle(groups[0])
    sequencer.settle(groups[1])  # given up
    sequencer.reset()
    new_third = check_batch(groups[2].payload())
    assert table.check(new_third) == APPEND
    table.record(new_third, 2)
    with pytest.raises(ProducerFenced):
        table.check(old_third)


def test_a_partition_that_used_up_its_epochs_continues_under_a_new_producer_id() -> None:
    """The epoch is an i16: a reset past 32,767 overflowed in the sender and stopped the
    producer. It is refused; the producer resets with a new id from the coordinator."""
    accumulator = accumulator_with(2, window=5)
    sequencer = PartitionSequencer(epoch=EPOCH_MAX - 1, producer_id=4)
    first = sequencer.start(accumulator.drain(("t", 0), 1, 1.0))
    first.in_flight = False
    sequencer.reset()
    assert (sequencer.epoch, sequencer.epochs_exhausted) == (EPOCH_MAX, True)
    with pytest.raises(InvariantViolation):
        sequencer.reset()
    sequencer.reset(producer_id=5, epoch=0)
    assert [check_batch(first.payload())[9:12]] == [(5, 0, 0)]
    second = sequencer.start(accumulator.drain(("t", 0), 1, 1.0))
    assert check_batch(second.payload())[9:12] == (5, 0, first.record_count)
    assert not sequencer.epochs_exhausted


def test_behind_a_request_in_flight_an_open_batch_waits_up_to_linger_a_full_one_not() -> None:
    now = [0.0]
    accumulator = RecordAccumulator(
        batch_size=61 + 2 * 19,
        buffer_memory=1 << 20,
        linger_ms=10,
        wake=lambda: None,
        clock=lambda: now[0],
    )
    accumulator.in_flight_batches_max = 5

    def node_of(tp: tuple[str, int]) -> str:
        return "https://b1"

    def append() -> None:
        accumulator.append("t", 0, 1, None, b"x", None, 1_000, 0.1)

    append()
    assert accumulator.ready(0.0, node_of).partitions == [("t", 0)]  # nothing in flight
    assert len(accumulator.drain(("t", 0), 1 << 20, 0.0, "https://b1")) == 1
    append()  # opens a new batch behind the request in flight
    ready = accumulator.ready(0.005, node_of)
    assert ready.partitions == [] and ready.next_check == pytest.approx(0.010)
    append()
    append()  # seals the full batch: ready at once, and the open batch goes along
    assert accumulator.ready(0.005, node_of).partitions == [("t", 0)]
    assert [b.count for b in accumulator.drain(("t", 0), 1 << 20, 0.005, "https://b1")] == [2, 1]
    now[0] = 0.006
    append()
    assert accumulator.ready(0.015, node_of).partitions == []
    assert accumulator.ready(0.016, node_of).partitions == [("t", 0)]  # linger: the bound
    assert [b.count for b in accumulator.drain(("t", 0), 1 << 20, 0.016, "https://b1")] == [1]
    append()
    accumulator.begin_flush()  # flush: no lingering at all
    assert accumulator.ready(0.016, node_of).partitions == [("t", 0)]
    accumulator.end_flush()


def test_the_window_counts_from_the_oldest_unsettled_batch_when_requests_settle_out_of_order() -> (
    None
):
    # The broker remembers a producer's last 5 batches: if the oldest request were still
    # out while younger ones settled and 5 more went, its resend would be unrecognisable.
    accumulator = accumulator_with(1, window=5)
    requests = []
    for _ in range(5):
        requests.append(accumulator.drain(("t", 0), 1 << 20, 1.0))
        for _ in range(2):
            accumulator.append("t", 0, 1, None, b"x", None, 1_000, 0.1)
    assert [len(r) for r in requests] == [1, 1, 1, 1, 1]
    for request in requests[1:]:  # the younger four settle, the oldest is still out
        accumulator.complete(("t", 0), request)
    assert accumulator.drain(("t", 0), 1 << 20, 1.0) == []
    assert accumulator.ready(1.0).partitions == []
    accumulator.complete(("t", 0), requests[0])
    assert len(accumulator.drain(("t", 0), 1 << 20, 1.0)) == 1
