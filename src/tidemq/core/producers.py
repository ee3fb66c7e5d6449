"""Idempotent producers: per partition, what each producer id last wrote.

Pure: no I/O, no clock, no asyncio. One :class:`ProducerStateTable` per partition
replica. The leader asks it about every batch of a produce request before it
appends (:meth:`~ProducerStateTable.check_all`), and tells it about every batch the
log took (:meth:`~ProducerStateTable.record`, with the offsets the log assigned).
A follower calls ``record`` for the batches it replicates, and a replica opening
its log calls :func:`rebuild` over the stored batch headers: the same ``record``
path, so leader, follower and restarted broker hold the same table for the same log.
``record`` therefore never depends on leadership and never raises for a batch the
log already holds (the log is the truth; the table follows it).

How it works (Kafka's ProducerStateManager, reduced): a batch stamped with a
producer id (>= 0), a producer epoch and a base sequence covers the sequences
``base_sequence .. base_sequence + record_count - 1`` (mod 2**31). Per producer id
the table keeps its epoch and its last ``WINDOW_BATCHES`` = 5 batches as
``(base_sequence, last_sequence, base_offset, last_offset)``. A new batch is:

* a **duplicate** if its epoch is the current one and its first and last sequence
  equal those of a remembered batch: the answer is that batch's offsets, and nothing
  is appended (a client retrying an appended batch whose answer was lost);
* an **append** if its epoch is the current one and its base sequence follows the
  last remembered one; or its epoch is newer and its base sequence is 0 (the client
  reset its sequences: after giving up on a batch, or when the broker had forgotten
  it); or the producer id is unknown and its base sequence is 0;
* **fenced** (:class:`ProducerFenced`) if its epoch is older than the current one;
* **behind** (:class:`Behind`) if its epoch is the current one and it lies wholly
  before the first remembered batch: it was appended before that one (a producer's
  batches of one epoch are appended in sequence order, and a truncation cuts a log's
  suffix, never its middle), its offsets are no longer known. It is answered as a
  duplicate with offset -1, and acknowledged once the first remembered batch's base
  offset is committed. A table rebuilt from the last two segments holds only the end
  of a window that straddles them; a retry of the window's head must not be taken for
  anything but a duplicate (Kafka's DUPLICATE_SEQUENCE_NUMBER);
* **out of order** (:class:`OutOfOrderSequence`) otherwise: a gap, or an old batch
  that overlaps the remembered ones without matching one. ``earlier_missing`` tells a
  gap (a batch before this one may still arrive: requests of one producer travel on
  several connections) from a batch that is behind;
* from an **unknown producer** (:class:`UnknownProducerId`) if the producer id is not
  in the table and the sequence is not 0: the broker lost its state (evicted, older
  than what a restart re-read, or a new producer whose first batch is still on its
  way). The client resolves it: while an earlier batch of its own is outstanding it
  resends in order; otherwise it starts a new epoch at sequence 0.

A client keeps at most ``WINDOW_BATCHES`` batches in flight per partition, so any
batch it may retry is still remembered here: retries are never appended twice.
Batches without a producer id (-1) are not checked and not remembered.

Invariants (tests/unit/test_producers.py checks them with hypothesis):

* a log built by appending exactly the batches judged ``Append`` holds each
  ``(producer id, epoch, sequence)`` at most once, and per producer id and epoch its
  sequences increase by one from batch to batch;
* ``check`` and ``check_all`` change nothing; only ``record`` changes the table;
* per producer id at most ``WINDOW_BATCHES`` batches, remembered oldest first, with
  increasing offsets; at most ``max_producers`` producer ids: recording a new id
  when full evicts the least recently *recorded* one (its batches are then retried
  as an unknown producer: a documented bound, like Kafka's producer-id expiry).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from tidemq.errors import InvalidRequest, OutOfOrderSequence, ProducerFenced, UnknownProducerId
from tidemq.wire.batch import BatchHeader

WINDOW_BATCHES: Final = 5
"""Batches remembered per producer id: the most a client may have in flight."""

MAX_PRODUCERS_DEFAULT: Final = 2_000
"""Producer ids remembered per partition (least recently recorded evicted first)."""

SEQUENCE_MODULUS: Final = 1 << 31
NO_PRODUCER_ID: Final = -1


def last_sequence(base_sequence: int, record_count: int) -> int:
    """The sequence of a batch's last record (sequences wrap from 2**31 - 1 to 0)."""
    return (base_sequence + record_count - 1) % SEQUENCE_MODULUS


def next_sequence(sequence: int) -> int:
    return (sequence + 1) % SEQUENCE_MODULUS


@dataclass(frozen=True, slots=True)
class Append:
    """Append the batch: it is new."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The batch was appended before, at these offsets: answer them, append nothing."""

    base_offset: int
    last_offset: int


@dataclass(frozen=True, slots=True)
class Behind:
    """The batch was appended before the first remembered batch of its producer, at
    offsets no longer known: answer -1, append nothing, and acknowledge once the high
    watermark reaches ``commit_offset`` (that first remembered batch's base offset)."""

    commit_offset: int


APPEND: Final = Append()
Decision = Append | Duplicate | Behind


@dataclass(frozen=True, slots=True)
class BatchMetadata:
    base_sequence: int
    last_sequence: int
    base_offset: int
    last_offset: int


class ProducerEntry:
    """One producer id's epoch and its last batches, oldest first."""

    __slots__ = ("batches", "epoch")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches: deque[BatchMetadata] = deque(maxlen=WINDOW_BATCHES)

    @property
    def last_sequence(self) -> int:
        return self.batches[-1].last_sequence if self.batches else -1

    def find(self, base_sequence: int, last: int) -> BatchMetadata | None:
        for batch in self.batches:
            if batch.base_sequence == base_sequence and batch.last_sequence == last:
                return batch
        return None


def _check_fields(header: BatchHeader) -> None:
    if header.producer_epoch < 0 or not 0 <= header.base_sequence < SEQUENCE_MODULUS:
        raise InvalidRequest(
            f"producer {header.producer_id}: epoch {header.producer_epoch} and base sequence "
            f"{header.base_sequence} must both be >= 0 when a producer id is set"
        )


def judge(entry: ProducerEntry | None, header: BatchHeader) -> Decision:
    """The decision for one batch of producer ``header.producer_id`` given its entry."""
    _check_fields(header)
    producer_id, epoch, base = header.producer_id, header.producer_epoch, header.base_sequence
    if entry is None:
        if base == 0:
            return APPEND
        raise UnknownProducerId(
            f"producer {producer_id} is unknown to this partition and its batch starts at "
            f"sequence {base}, not 0"
        )
    if epoch < entry.epoch:
        raise ProducerFenced(
            f"producer {producer_id}: epoch {epoch} is older than the current {entry.epoch}"
        )
    if epoch > entry.epoch:
        if base == 0:
            return APPEND
        raise OutOfOrderSequence(
            f"producer {producer_id}: a new epoch {epoch} must start at sequence 0, not {base}",
            earlier_missing=True,
        )
    known = entry.find(base, last_sequence(base, header.record_count))
    if known is not None:
        return Duplicate(known.base_offset, known.last_offset)
    expected = next_sequence(entry.last_sequence)
    if base == expected:
        return APPEND
    ahead = (base - expected) % SEQUENCE_MODULUS < SEQUENCE_MODULUS // 2
    first = entry.batches[0] if entry.batches else None
    if not ahead and first is not None and first.base_offset >= 0:
        # Wholly before the first remembered batch: how far the first one is past
        # this batch's last sequence, 1 for the batch right before it.
        gap = (first.base_sequence - last_sequence(base, header.record_count)) % SEQUENCE_MODULUS
        if 0 < gap <= SEQUENCE_MODULUS // 2:
            return Behind(first.base_offset)
    raise OutOfOrderSequence(
        f"producer {producer_id} epoch {epoch}: batch starts at sequence {base}, "
        f"expected {expected}",
        earlier_missing=ahead,
    )


class ProducerStateTable:
    """Producer id -> :class:`ProducerEntry` for one partition; bounded, LRU-evicted."""

    def __init__(self, max_producers: int = MAX_PRODUCERS_DEFAULT) -> None:
        if max_producers < 1:
            raise ValueError("max_producers must be >= 1")
        self.max_producers = max_producers
        self._entries: OrderedDict[int, ProducerEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, producer_id: int) -> ProducerEntry | None:
        return self._entries.get(producer_id)

    def items(self) -> Iterator[tuple[int, ProducerEntry]]:
        """(producer id, entry), least recently recorded first."""
        return iter(self._entries.items())

    def check(self, header: BatchHeader) -> Decision:
        """Append or Duplicate for one batch; raises the operating error otherwise."""
        if header.producer_id < 0:
            return APPEND
        return judge(self._entries.get(header.producer_id), header)

    def check_all(self, headers: Sequence[BatchHeader]) -> list[Decision]:
        """Decisions for the batches of one request, in order, as if each ``Append``
        before it had been recorded. Changes nothing; raises for the first bad batch
        (the whole request is then rejected), also InvalidRequest for a batch that
        repeats an earlier one of the same request.
        """
        decisions: list[Decision] = []
        pending: dict[int, ProducerEntry] = {}  # producers appended earlier in this body
        for header in headers:
            producer_id = header.producer_id
            if producer_id < 0:
                decisions.append(APPEND)
                continue
            entry = pending.get(producer_id)
            if entry is None:
                entry = self._entries.get(producer_id)
            decision = judge(entry, header)
            if isinstance(decision, Duplicate) and decision.base_offset < 0:
                raise InvalidRequest(
                    f"producer {producer_id}: a batch repeats an earlier batch of the same "
                    f"request (sequence {header.base_sequence})"
                )
            if isinstance(decision, Append):
                scratch = _scratch_copy(entry, header.producer_epoch)
                scratch.batches.append(_metadata(header, -1))
                pending[producer_id] = scratch
            decisions.append(decision)
        return decisions

    def record(self, header: BatchHeader, base_offset: int) -> None:
        """The log holds this batch at ``base_offset``: remember it (leader, follower
        and rebuild alike). A newer epoch replaces the entry; an older one is ignored
        (the log never holds it after a newer one unless state was lost, and then the
        newer epoch still fences it).
        """
        producer_id = header.producer_id
        if producer_id < 0:
            return
        entries = self._entries
        entry = entries.get(producer_id)
        if entry is None or header.producer_epoch > entry.epoch:
            if entry is None and len(entries) >= self.max_producers:
                entries.popitem(last=False)
            entry = ProducerEntry(header.producer_epoch)
            entries[producer_id] = entry
        elif header.producer_epoch < entry.epoch:
            return
        entries.move_to_end(producer_id)
        entry.batches.append(_metadata(header, base_offset))


def _metadata(header: BatchHeader, base_offset: int) -> BatchMetadata:
    base = header.base_sequence
    return BatchMetadata(
        base,
        last_sequence(base, header.record_count),
        base_offset,
        base_offset + header.record_count - 1,
    )


def _scratch_copy(entry: ProducerEntry | None, epoch: int) -> ProducerEntry:
    scratch = ProducerEntry(epoch)
    if entry is not None and entry.epoch == epoch:
        scratch.batches.extend(entry.batches)
    return scratch


def rebuild(
    headers: Iterable[BatchHeader], max_producers: int = MAX_PRODUCERS_DEFAULT
) -> ProducerStateTable:
    """The table for a log whose stored batch headers (with their real base offsets)
    are ``headers``, oldest first: each goes through ``record``."""
    table = ProducerStateTable(max_producers)
    for header in headers:
        table.record(header, header.base_offset)
    return table
