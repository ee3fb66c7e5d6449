"""The broker side of idempotent produce: the produce path's check / append / record,
and the rebuild of a partition's producer table from its log.

The decisions live in ``core/producers.py`` (pure); this module only carries them out
against a :class:`~tidemq.broker.partition.PartitionReplica`:

* ``append_idempotent``: check every batch of a request (nothing changes if one is
  rejected), append only the new ones (duplicates of retried batches are answered with
  their original offsets), then record the appended ones with the offsets the log
  gave them. Check, append and record run without an ``await`` between them, so two
  requests of one producer can never interleave there.
* ``append_in_sequence``: the same, but a request whose batches follow one that has
  not arrived yet (``earlier_missing``: the producer's requests of one partition travel
  on several HTTP connections and may overtake one another) waits up to
  ``REORDER_WAIT_S`` for appends to this partition and tries again, instead of sending
  the producer through a resend round at once. Then the error goes back as usual.
* ``load_producer_state``: on open, replay the headers of the last two segments
  (Kafka's choice when it has no producer snapshot). A producer whose last batch is
  older is unknown to the table; its next batch gets ``unknown_producer_id`` unless it
  starts at sequence 0, and its client resolves that (resend in order, or a new epoch).
  The replica calls it again after truncating its log.
* ``record_replicated``: a follower records the batches it replicates, so that it has
  the same table as its leader and can answer retries when it becomes leader.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidemq.core.producers import Append, Behind, ProducerStateTable
from tidemq.core.replica import Acks
from tidemq.errors import NotLeader, OutOfOrderSequence, UnknownProducerId
from tidemq.storage import PartitionLog
from tidemq.wire.batch import BatchHeader, iter_headers

if TYPE_CHECKING:
    from tidemq.broker.partition import PartitionReplica

REBUILD_SEGMENTS = 2
REBUILD_READ_BYTES = 1024 * 1024
REORDER_WAIT_S = 0.25

# One event per replica, set (and replaced) after every append of the produce path.
_appended: weakref.WeakKeyDictionary[PartitionReplica, asyncio.Event] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class ProduceOutcome:
    """Offsets of each batch of one request, appended now or before (duplicates)."""

    batch_base_offsets: list[int]
    last_offset: int  # last offset of the request's last batch
    commit_offset: int  # acknowledge once the high watermark reaches this
    appended_records: int
    appended_bytes: int

    @property
    def base_offset(self) -> int:
        return self.batch_base_offsets[0]


def append_idempotent(
    replica: PartitionReplica, body: bytes, headers: list[BatchHeader], acks: Acks, now_ms: int
) -> ProduceOutcome:
    """Appends the batches of ``body`` (already checked: ``headers``) that are new."""
    replica.core.check_produce(acks)  # role and min ISR, also for a body of duplicates
    decisions = replica.producers.check_all(headers)
    fresh = [isinstance(decision, Append) for decision in decisions]
    if all(fresh):
        appended_body = body
    else:
        parts = []
        position = 0
        for header, new in zip(headers, fresh, strict=True):
            if new:
                parts.append(body[position : position + header.size])
            position += header.size
        appended_body = b"".join(parts)
    cursor = replica.append(appended_body, acks, now_ms)[0] if appended_body else -1
    if appended_body:
        event = _appended.pop(replica, None)
        if event is not None:
            event.set()
    offsets: list[int] = []
    commit_offset = 0
    appended_records = 0
    for header, decision in zip(headers, decisions, strict=True):
        if isinstance(decision, Append):
            replica.producers.record(header, cursor)
            offsets.append(cursor)
            cursor += header.record_count
            appended_records += header.record_count
        elif isinstance(decision, Behind):  # appended before, offsets forgotten
            offsets.append(-1)
            commit_offset = max(commit_offset, decision.commit_offset)
            continue
        else:
            offsets.append(decision.base_offset)
        commit_offset = max(commit_offset, offsets[-1] + header.record_count)
    return ProduceOutcome(
        offsets,
        offsets[-1] + headers[-1].record_count - 1 if offsets[-1] >= 0 else -1,
        commit_offset,
        appended_records,
        len(appended_body),
    )


async def append_in_sequence(
    replica: PartitionReplica,
    body: bytes,
    headers: list[BatchHeader],
    acks: Acks,
    now_ms: Callable[[], int],
    wait_s: float = REORDER_WAIT_S,
) -> ProduceOutcome:
    """``append_idempotent``, waiting up to ``wait_s`` for a missing earlier batch."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    leader_epoch = replica.leader_epoch
    while True:
        try:
            return append_idempotent(replica, body, headers, acks, now_ms())
        except (OutOfOrderSequence, UnknownProducerId) as error:
            remaining = deadline - loop.time()
            if not error.earlier_missing or remaining <= 0:
                raise
            event = _appended.get(replica)
            if event is None:
                event = _appended[replica] = asyncio.Event()
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                pass
            if replica.closed or replica.leader_epoch != leader_epoch:
                raise NotLeader(
                    f"leadership of {replica.topic}/{replica.partition} changed meanwhile"
                ) from error


def record_replicated(table: ProducerStateTable, batches: bytes) -> None:
    """A follower's appended batches (with their leader-given offsets) into its table."""
    for header in iter_headers(batches):
        table.record(header, header.base_offset)


def load_producer_state(log: PartitionLog) -> ProducerStateTable:
    """The producer table of ``log``, from the batch headers of its last segments."""
    table = ProducerStateTable()
    bases = log.segment_base_offsets[-REBUILD_SEGMENTS:]
    offset = max(bases[0] if bases else 0, log.log_start_offset)
    while offset < log.log_end_offset:
        data = log.read(offset, REBUILD_READ_BYTES)
        next_offset = offset
        for header in iter_headers(data):
            table.record(header, header.base_offset)
            next_offset = header.next_offset
        if next_offset <= offset:
            break
        offset = next_offset
    return table
