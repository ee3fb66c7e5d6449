"""The idempotent producer table (core/producers.py): retries, gaps, epochs, rebuild."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidemq.core.producers import (
    APPEND,
    SEQUENCE_MODULUS,
    WINDOW_BATCHES,
    Append,
    Behind,
    Decision,
    Duplicate,
    ProducerStateTable,
    last_sequence,
    rebuild,
)
from tidemq.errors import (
    InvalidRequest,
    OutOfOrderSequence,
    ProducerFenced,
    TideError,
    UnknownProducerId,
)
from tidemq.wire.batch import BatchHeader


def header(
    producer_id: int, epoch: int, base_sequence: int, count: int, base_offset: int = 0
) -> BatchHeader:
    return BatchHeader(
        base_offset, 100, -1, 1, 0, 0, count - 1, 0, 0, producer_id, epoch, base_sequence, count
    )


@dataclass
class Log:
    """The partition log as the broker builds it: only batches judged Append."""

    table: ProducerStateTable
    batches: list[BatchHeader] = field(default_factory=list)
    end: int = 0

    def offer(self, batch: BatchHeader) -> Decision | TideError:
        before = snapshot(self.table)
        try:
            decision = self.table.check(batch)
        except TideError as error:
            assert snapshot(self.table) == before, "a rejected batch changed the table"
            return error
        assert snapshot(self.table) == before, "check changed the table"
        if isinstance(decision, Append):
            stored = batch._replace(base_offset=self.end)
            self.batches.append(stored)
            self.table.record(stored, self.end)
            self.end += batch.record_count
        return decision

    def at(self, offset: int) -> BatchHeader:
        return next(b for b in self.batches if b.base_offset == offset)


def snapshot(table: ProducerStateTable) -> list[tuple[int, int, list[object]]]:
    return [(pid, entry.epoch, list(entry.batches)) for pid, entry in table.items()]


def assert_log_is_clean(batches: list[BatchHeader]) -> None:
    """No (producer, epoch, sequence) twice; per producer the epochs never go back;
    per producer and epoch the sequences start at 0 and follow one another."""
    last: dict[int, tuple[int, int]] = {}
    seen: set[tuple[int, int, int]] = set()
    for batch in batches:
        pid, epoch, base = batch.producer_id, batch.producer_epoch, batch.base_sequence
        if pid < 0:
            continue
        for i in range(batch.record_count):
            key = (pid, epoch, (base + i) % SEQUENCE_MODULUS)
            assert key not in seen, f"duplicate {key}"
            seen.add(key)
        previous = last.get(pid)
        if previous is None or previous[0] < epoch:
            assert base == 0, f"producer {pid} epoch {epoch} starts at {base}"
        else:
            assert previous[0] == epoch, f"producer {pid}: epoch went back"
            assert base == (previous[1] + 1) % SEQUENCE_MODULUS, f"gap or reorder at {batch}"
        last[pid] = (epoch, last_sequence(base, batch.record_count))


# ---- a producer model: next batch, retries of any of its last 5, gaps, epoch bumps -----


@dataclass
class ProducerModel:
    producer_id: int
    epoch: int = 0
    sequence: int = 0
    sent: list[tuple[BatchHeader, int]] = field(default_factory=list)  # (batch, offset)


actions = st.lists(
    st.tuples(
        st.integers(0, 2),  # which producer
        st.sampled_from(["next", "next", "next", "retry", "retry", "gap", "bump", "stale"]),
        st.integers(1, 4),  # records in a new batch
        st.integers(0, WINDOW_BATCHES - 1),  # which of the last batches to retry
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(actions)
def test_retries_gaps_and_epoch_bumps_never_duplicate_or_reorder(
    steps: list[tuple[int, str, int, int]],
) -> None:
    log = Log(ProducerStateTable())
    producers = [ProducerModel(pid) for pid in range(3)]
    for which, action, count, back in steps:
        producer = producers[which]
        if action == "next" or (action in ("retry", "stale") and not producer.sent):
            batch = header(producer.producer_id, producer.epoch, producer.sequence, count)
            decision = log.offer(batch)
            assert decision == APPEND
            producer.sent.append((batch, log.end - count))
            producer.sequence = (producer.sequence + count) % SEQUENCE_MODULUS
        elif action == "retry":
            window = producer.sent[-WINDOW_BATCHES:]
            batch, offset = window[min(back, len(window) - 1)]
            decision = log.offer(batch)
            if batch.producer_epoch == producer.epoch:
                assert decision == Duplicate(offset, offset + batch.record_count - 1)
                assert log.at(offset)[9:12] == batch[9:12]
            else:  # a retry from before the last epoch bump
                assert isinstance(decision, ProducerFenced)
        elif action == "gap":
            batch = header(producer.producer_id, producer.epoch, producer.sequence + count, 1)
            assert isinstance(log.offer(batch), UnknownProducerId | OutOfOrderSequence)
        elif action == "bump":
            producer.epoch += 1
            producer.sequence = 0
            producer.sent.clear()
        else:  # "stale": a batch older than the remembered window, or from an old epoch
            batch = header(producer.producer_id, max(producer.epoch - 1, 0), 0, count)
            outcome = log.offer(batch)
            assert not isinstance(outcome, Append) or producer.sequence == 0
    assert_log_is_clean(log.batches)


arbitrary_batches = st.lists(
    st.builds(
        header,
        st.integers(-1, 2),
        st.integers(0, 2),
        st.integers(0, 12),
        st.integers(1, 3),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(arbitrary_batches)
def test_any_stream_of_batches_leaves_a_clean_log(batches: list[BatchHeader]) -> None:
    """Whatever arrives (retries, reorders, gaps, stale epochs), the log is clean and
    every Duplicate names the batch it duplicates."""
    log = Log(ProducerStateTable())
    for batch in batches:
        outcome = log.offer(batch)
        if isinstance(outcome, Duplicate):
            stored = log.at(outcome.base_offset)
            assert stored[9:13] == batch[9:13]
            assert outcome.last_offset == stored.last_offset
    assert_log_is_clean(log.batches)


@settings(max_examples=200, deadline=None)
@given(arbitrary_batches, arbitrary_batches)
def test_rebuild_from_the_log_decides_like_the_live_table(
    history: list[BatchHeader], probes: list[BatchHeader]
) -> None:
    log = Log(ProducerStateTable())
    for batch in history:
        log.offer(batch)
    rebuilt = rebuild(log.batches)
    assert snapshot(rebuilt) == snapshot(log.table)
    for probe in probes:
        assert outcome_of(rebuilt, probe) == outcome_of(log.table, probe)


def outcome_of(table: ProducerStateTable, batch: BatchHeader) -> Decision | str:
    try:
        return table.check(batch)
    except TideError as error:
        return error.code


@settings(max_examples=200, deadline=None)
@given(arbitrary_batches, arbitrary_batches)
def test_check_all_equals_checking_and_recording_one_by_one(
    history: list[BatchHeader], body: list[BatchHeader]
) -> None:
    log = Log(ProducerStateTable())
    for batch in history:
        log.offer(batch)
    before = snapshot(log.table)
    try:
        decisions: list[Decision] | str = log.table.check_all(body)
    except TideError as error:
        decisions = error.code
    assert snapshot(log.table) == before, "check_all changed the table"
    one_by_one = copy.deepcopy(log.table)
    expected: list[Decision] = []
    end = log.end
    for batch in body:
        try:
            decision = one_by_one.check(batch)
        except TideError as error:
            assert decisions == error.code
            return
        if isinstance(decision, Duplicate) and decision.base_offset >= log.end:
            assert decisions == "invalid_request"  # repeats a batch of the same request
            return
        if isinstance(decision, Append):
            one_by_one.record(batch, end)
            end += batch.record_count
        expected.append(decision)
    assert decisions == expected


# ---- examples --------------------------------------------------------------------------


def test_batches_without_a_producer_id_are_neither_checked_nor_remembered() -> None:
    table = ProducerStateTable()
    for _ in range(3):
        assert table.check(header(-1, -1, -1, 5)) == APPEND
        table.record(header(-1, -1, -1, 5), 0)
    assert len(table) == 0


def test_a_producer_id_with_a_negative_epoch_or_sequence_is_rejected() -> None:
    table = ProducerStateTable()
    with pytest.raises(InvalidRequest):
        table.check(header(7, -1, 0, 1))
    with pytest.raises(InvalidRequest):
        table.check(header(7, 0, -1, 1))


def test_a_retry_of_each_of_the_last_five_batches_gets_its_offsets_an_older_one_is_behind() -> None:
    log = Log(ProducerStateTable())
    sent = []
    for i in range(7):
        batch = header(1, 0, i * 2, 2)
        assert log.offer(batch) == APPEND
        sent.append((batch, log.end - 2))
    for batch, offset in sent[-WINDOW_BATCHES:]:
        assert log.offer(batch) == Duplicate(offset, offset + 1)
    first_remembered = sent[-WINDOW_BATCHES][1]
    for batch, _ in sent[:-WINDOW_BATCHES]:  # appended, offsets forgotten: never again
        assert log.offer(batch) == Behind(first_remembered)
    assert len(log.batches) == 7


def test_a_batch_that_overlaps_the_remembered_ones_without_matching_is_out_of_order() -> None:
    log = Log(ProducerStateTable())
    for i in range(3):
        assert log.offer(header(1, 0, i * 2, 2)) == APPEND  # sequences 0-5
    error = log.offer(header(1, 0, 1, 2))  # 1-2: inside the window, no batch's bounds
    assert isinstance(error, OutOfOrderSequence) and not error.earlier_missing
    error = log.offer(header(1, 0, 9, 1))  # a gap: 6-8 missing
    assert isinstance(error, OutOfOrderSequence) and error.earlier_missing


def test_a_table_rebuilt_from_the_end_of_a_window_answers_its_head_as_behind() -> None:
    """A rebuild reads the last two segments: a producer's window that straddles them
    is remembered from the middle. A retry of its head was appended (sequences of one
    epoch are appended in order): a duplicate, never a refusal that the client would
    take for "not appended" and renumber the rest (a review found them written twice)."""
    log = Log(ProducerStateTable())
    for i in range(3):
        assert log.offer(header(7, 0, i, 1)) == APPEND
    tail = log.batches[1:]  # what the last two segments hold
    rebuilt = rebuild(tail)
    assert rebuilt.check(header(7, 0, 0, 1)) == Behind(tail[0].base_offset)
    assert rebuilt.check(header(7, 0, 1, 1)) == Duplicate(1, 1)
    assert rebuilt.check(header(7, 0, 3, 1)) == APPEND


def test_sequences_wrap_at_two_to_the_31() -> None:
    log = Log(ProducerStateTable())
    top = SEQUENCE_MODULUS - 2
    log.table.record(header(3, 0, top - 4, 4), 0)
    log.end = 4
    assert log.offer(header(3, 0, top, 3)) == APPEND  # covers 2**31-2, 2**31-1, 0
    assert log.offer(header(3, 0, 1, 1)) == APPEND
    assert log.offer(header(3, 0, top, 3)) == Duplicate(4, 6)


def test_epochs_fence_and_reset() -> None:
    log = Log(ProducerStateTable())
    assert log.offer(header(1, 0, 0, 3)) == APPEND
    assert isinstance(log.offer(header(1, 1, 3, 1)), OutOfOrderSequence)
    assert log.offer(header(1, 1, 0, 1)) == APPEND
    assert isinstance(log.offer(header(1, 0, 3, 1)), ProducerFenced)
    assert isinstance(log.offer(header(1, 0, 0, 3)), ProducerFenced)


def test_an_unknown_producer_must_start_at_sequence_zero() -> None:
    table = ProducerStateTable()
    with pytest.raises(UnknownProducerId):
        table.check(header(9, 0, 10, 1))
    assert table.check(header(9, 4, 0, 1)) == APPEND


def test_the_table_is_bounded_and_evicts_the_least_recently_recorded() -> None:
    table = ProducerStateTable(max_producers=3)
    for pid in range(3):
        table.record(header(pid, 0, 0, 1), pid)
    table.record(header(0, 0, 1, 1), 10)  # producer 0 is now the most recent
    table.record(header(5, 0, 0, 1), 11)
    assert len(table) == 3
    assert table.entry(1) is None
    assert table.entry(0) is not None and table.entry(2) is not None
    with pytest.raises(ValueError):
        ProducerStateTable(max_producers=0)


def test_check_all_sees_the_batches_before_it_in_the_same_request() -> None:
    table = ProducerStateTable()
    table.record(header(1, 0, 0, 2), 0)
    decisions = table.check_all(
        [header(1, 0, 0, 2), header(1, 0, 2, 2), header(1, 0, 4, 1), header(-1, -1, -1, 1)]
    )
    assert decisions == [Duplicate(0, 1), APPEND, APPEND, APPEND]
    with pytest.raises(InvalidRequest):
        table.check_all([header(1, 0, 2, 2), header(1, 0, 2, 2)])
    with pytest.raises(OutOfOrderSequence):
        table.check_all([header(1, 0, 2, 2), header(1, 0, 5, 2)])
    assert table.entry(1) is not None and len(table.entry(1).batches) == 1  # type: ignore[union-attr]
