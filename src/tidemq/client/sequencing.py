"""Per-partition sequencing for the idempotent producer. No I/O; loop thread only.

Each request of a partition carries a *group*: the batches drained together, sent and
resent as one unit. ``start`` stamps a group's batches with the producer id, the
partition's producer epoch and consecutive sequence numbers (once; retries resend the
same bytes). Groups stay here, oldest first, until they succeed or fail for good.

The broker (core/producers.py) appends a batch only if its sequence follows the last
one it holds, answers a resent batch with its original offsets, and remembers the last
5 batches per producer: so the accumulator lets at most 5 batches of a partition be in
flight, in one or several requests.

Recovery (Kafka's rules, simplified): when a group fails (connection lost, timeout,
not leader, or a sequence error because an earlier group had not arrived yet), the
partition is paused; once no group of it is in flight, the groups are resent one at a
time, oldest first, each until it settles. A group that fails for good (non-retriable
error, out of retries or time) leaves a gap, and a broker that forgot the producer
answers ``unknown_producer_id``: both are healed by a *reset* when the oldest held
group meets them and none of its attempts may have landed (else that group fails with
an unknown outcome and the next one resets), which starts a new epoch for this
partition and renumbers the groups still held from sequence 0 (the broker
accepts sequence 0 of a newer epoch, and fences the old one).

Invariants: sequences of a partition's groups are consecutive in ``groups`` order; at
most one resend is in flight per partition; a reset happens only while nothing of the
partition is in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque

from tidemq.client.accumulator import ProducerBatch
from tidemq.errors import InvariantViolation
from tidemq.wire.batch import restamp

SEQUENCE_MODULUS = 1 << 31
EPOCH_MAX = (1 << 15) - 1  # the batch header's producer_epoch is an i16


class RequestGroup:
    """The batches of one partition sent in one request, whether it is in flight, and
    whether an attempt may have been appended (its outcome was unknown: a lost answer,
    a timeout, an error after the append). Once true it stays true: a later refusal
    says nothing about what an earlier attempt did."""

    __slots__ = (
        "_sent",
        "attempted",
        "batches",
        "dispatched",
        "in_flight",
        "maybe_appended",
        "record_count",
    )

    def __init__(self, batches: list[ProducerBatch]) -> None:
        self.batches = batches
        self.in_flight = True
        self.maybe_appended = False
        self.record_count = sum(batch.count for batch in batches)
        # Its first request is made (a task created for it), or it went to recovery
        # or was given up: a later group of the partition may be sent after it.
        self.dispatched = False
        self.attempted = False  # a request carrying it was made (first or resend)
        self._sent: asyncio.Future[None] | None = None  # made only when one waits

    def mark_dispatched(self) -> None:
        self.dispatched = True
        if self._sent is not None and not self._sent.done():
            self._sent.set_result(None)

    def sent(self) -> asyncio.Future[None]:
        """Done once the group is dispatched (loop thread)."""
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
            if self.dispatched:
                self._sent.set_result(None)
        return self._sent

    def payload(self) -> bytes:
        parts = []
        for batch in self.batches:
            if batch.payload is None:
                raise InvariantViolation("a group's batch lost its bytes before it settled")
            parts.append(batch.payload)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class PartitionSequencer:
    """One partition's producer id, epoch and next sequence, and its held groups. The
    producer id is the producer's until this partition used up its epochs; a reset
    then continues under a new producer id (``reset(producer_id, epoch)``)."""

    __slots__ = ("epoch", "groups", "next_sequence", "producer_id", "recovering", "reset_needed")

    def __init__(self, epoch: int, producer_id: int) -> None:
        self.producer_id = producer_id
        self.epoch = epoch
        self.next_sequence = 0
        self.groups: deque[RequestGroup] = deque()
        self.recovering = False  # paused: resending in order (one task at a time)
        self.reset_needed = False

    def start(self, batches: list[ProducerBatch]) -> RequestGroup:
        """Stamps and registers a newly drained group; it is in flight."""
        producer_id = self.producer_id
        sequence = self.next_sequence
        for batch in batches:
            if producer_id < 0:
                batch.seal(-1, -1, -1)
                continue
            batch.seal(producer_id, self.epoch, sequence)
            sequence = (sequence + batch.count) % SEQUENCE_MODULUS
        self.next_sequence = sequence
        group = RequestGroup(batches)
        self.groups.append(group)
        return group

    def undispatched_before(self, group: RequestGroup) -> list[RequestGroup]:
        """The groups ahead of ``group`` whose first request is not made yet (an
        earlier delivery still looks up a leader): ``group`` must not go before them."""
        earlier: list[RequestGroup] = []
        for held in self.groups:
            if held is group:
                return earlier
            if not held.dispatched:
                earlier.append(held)
        return []  # not held any more: nothing to keep order with

    @property
    def in_flight(self) -> int:
        return sum(1 for group in self.groups if group.in_flight)

    def settle(self, group: RequestGroup) -> None:
        """The group succeeded or failed for good: forget it."""
        self.groups.remove(group)
        group.mark_dispatched()

    @property
    def epochs_exhausted(self) -> bool:
        """A reset needs a new producer id: this one's epochs are used up here."""
        return self.producer_id >= 0 and self.epoch >= EPOCH_MAX

    def reset(self, producer_id: int | None = None, epoch: int = 0) -> None:
        """New epoch (or the new ``producer_id`` at ``epoch``, once the epochs are used
        up); the held groups are renumbered from 0. Only with nothing in flight."""
        if self.in_flight:
            raise InvariantViolation("producer epoch reset with requests in flight")
        if self.producer_id < 0:
            self.reset_needed = False
            return
        if producer_id is not None:
            self.producer_id, self.epoch = producer_id, epoch
        elif self.epochs_exhausted:
            raise InvariantViolation("producer epochs used up: reset with a new producer id")
        else:
            self.epoch += 1
        self.reset_needed = False
        producer_id = self.producer_id
        sequence = 0
        for group in self.groups:
            for batch in group.batches:
                if batch.payload is None:
                    raise InvariantViolation("a held batch has no bytes")
                batch.payload = restamp(batch.payload, producer_id, self.epoch, sequence)
                sequence = (sequence + batch.count) % SEQUENCE_MODULUS
        self.next_sequence = sequence
