"""The producer's wakes and passes under races (found by review of the change that
cut them): the real Producer against in-memory fakes.

* A user thread's wake interrupted before it reaches the loop (a signal handler's
  exception, KeyboardInterrupt or a SIGTERM handler's SystemExit, delivered at the
  next call boundary in the main thread) loses that one wake, never the later ones: a
  flag meaning "a wake is on its way", raised before the call, stayed up for ever and
  every later cross-thread wake, flush's and close's included, was skipped.
* Two deliveries that resume together (both waited for one metadata refresh) send a
  partition's batches to its leader in drain order: sending one request inline and
  deferring the others to tasks let a later batch overtake an earlier one.
* The sender does not scan once a linger while a request is out and nothing else is
  to be sent (a hung broker keeps one out for up to request_timeout_ms).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from tests.unit.producer_fakes import InstantBroker, StaticMetadata, fake_producer

from tidemq.client.accumulator import Readiness, RecordAccumulator
from tidemq.client.config import ResultTimeout
from tidemq.client.metadata import PartitionInfo

TOPIC = "t"
PARTITIONS = 6
LEADERS = ("https://b1.invalid", "https://b2.invalid", "https://b3.invalid")


class GatedMetadata(StaticMetadata):
    """Leaders as LEADERS[p % 3]; while ``gate`` is set and not done, a leader lookup
    waits for it, as every lookup of a stale topic waits for the one refresh."""

    def __init__(self) -> None:
        super().__init__(TOPIC, PARTITIONS, lambda p: PartitionInfo(p, LEADERS[p % 3], 0))
        self.gate: asyncio.Future[None] | None = None
        self.waiting = 0

    async def leader(self, topic: str, partition: int) -> PartitionInfo:
        gate = self.gate
        if gate is not None and not gate.done():
            self.waiting += 1
            await gate
        return await super().leader(topic, partition)


def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return condition()


def test_an_interrupted_wake_does_not_silence_every_later_wake() -> None:
    """A send interrupted inside its wake (the exception a signal handler raises in the
    main thread, delivered when the wake calls into the loop thread's call_soon) loses
    that one wake. Later wakes (flush's, the next record's) must still reach the
    sender: with such a flag stuck, every user-thread wake was skipped, nothing was in
    flight to arm a timer, and the record waited for ever (flush(None) and close()
    without a timeout hung)."""
    broker = InstantBroker()
    producer = fake_producer(broker, GatedMetadata(), linger_ms=60_000)
    try:
        assert producer.send(TOPIC, b"warm-up", partition=0).result(5).offset == 0
        # The answer set the sender's event; once the sender cleared it (and sleeps), a
        # record for an idle broker must wake it with a call into the loop thread.
        event = producer._wake_event
        assert event is not None
        assert until(lambda: not event.is_set()), "the sender never went back to sleep"
        thread = producer._thread
        original = thread.call_soon
        interrupted: list[Any] = []

        def call_soon_interrupted(callback: Any, *args: Any) -> None:
            if not interrupted:
                interrupted.append(callback)
                raise KeyboardInterrupt  # as a SIGINT landing at this call boundary
            original(callback, *args)

        thread.call_soon = call_soon_interrupted  # type: ignore[method-assign]
        try:
            with pytest.raises(KeyboardInterrupt):
                producer.send(TOPIC, b"interrupted", partition=1)
        finally:
            thread.call_soon = original  # type: ignore[method-assign]
        assert interrupted
        # The application catches it and carries on: the next record and flush wake.
        later = producer.send(TOPIC, b"later", partition=2)
        try:
            producer.flush(timeout=2)
        except ResultTimeout:
            pytest.fail("flush never woke the sender: a wake was lost for good")
        assert later.result(1).offset == 0
    finally:
        producer.close(timeout=1)  # bounded: a lost wake must fail the test, not hang it


def test_a_partitions_batches_reach_its_leader_in_drain_order() -> None:
    """Two deliveries resume in one loop turn (both waited for one metadata refresh).
    The first drained [p0 (b1), p1 (b2)], the second [p1 (b2), p2 (b3)] (p1's next
    batches, stamped with later sequences). With gather (034d74a) every request was a
    task, created in drain order, so b2 got p1's sequence 0 first. On 174b8bb the
    second delivery sends its first leader's request inline, before the first
    delivery's deferred task: b2 sees p1's sequences 1, 2 before 0 (the broker then
    answers out_of_order_sequence or holds the request up to REORDER_WAIT_S)."""
    broker = InstantBroker()
    metadata = GatedMetadata()
    passes: list[list[tuple[str, int]]] = []
    ready = RecordAccumulator.ready

    def ordered_ready(self: RecordAccumulator, now: float, node_of: Any = None) -> Readiness:
        readiness = ready(self, now, node_of) if node_of else ready(self, now)
        partitions = sorted(readiness.partitions)  # a chosen drain order, not a set's
        if partitions:
            passes.append(partitions)
        return Readiness(partitions, readiness.next_check)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RecordAccumulator, "ready", ordered_ready)
        producer = fake_producer(broker, metadata, linger_ms=60_000, batch_size=64)
        try:
            assert until(lambda: producer._identity_known)
            loop = producer._thread.loop
            gate_made = threading.Event()

            def close_gate() -> None:
                metadata.gate = loop.create_future()
                gate_made.set()

            loop.call_soon_threadsafe(close_gate)
            assert gate_made.wait(5)

            def hold_loop() -> threading.Event:
                release = threading.Event()
                loop.call_soon_threadsafe(release.wait, 5)
                return release

            release = hold_loop()  # both records are in before the sender looks
            first = [producer.send(TOPIC, b"p0", partition=0)]
            first.append(producer.send(TOPIC, b"p1-a", partition=1))
            release.set()
            assert until(lambda: metadata.waiting >= 1)  # delivery 1 waits for the refresh
            release = hold_loop()
            second = [producer.send(TOPIC, b"p1-b", partition=1)]
            second.append(producer.send(TOPIC, b"p1-c", partition=1))  # seals p1-b
            second.append(producer.send(TOPIC, b"p2", partition=2))
            release.set()
            assert until(lambda: metadata.waiting >= 2)  # delivery 2 waits too
            assert passes[-2:] == [[(TOPIC, 0), (TOPIC, 1)], [(TOPIC, 1), (TOPIC, 2)]]
            gate = metadata.gate
            assert gate is not None
            loop.call_soon_threadsafe(gate.set_result, None)
            for future in first + second:
                future.result(5)
        finally:
            producer.close(timeout=1)
    to_b2 = [sequence for leader, partition, sequence in broker.sent if partition == 1]
    assert all(leader == LEADERS[1] for leader, partition, _ in broker.sent if partition == 1)
    assert to_b2 == sorted(to_b2), f"p1's batches reached b2 as sequences {to_b2}"


def test_a_request_in_flight_with_nothing_else_to_send_does_not_spin_the_sender() -> None:
    """One record, its request out for a second, nothing else queued: there is nothing
    for the sender to do until the answer. On 174b8bb ``ready`` arms the look-in timer
    one linger ahead whenever anything is in flight, so with linger_ms=1 the sender
    scans the accumulator ~1,000 times a second for as long as a request is out (a
    hung broker: up to request_timeout_ms, then retries for delivery_timeout_ms)."""
    broker = InstantBroker(1.0)  # a broker that hangs: its request times out later
    passes = [0]
    ready = RecordAccumulator.ready

    def counted_ready(self: RecordAccumulator, now: float, node_of: Any = None) -> Readiness:
        passes[0] += 1
        return ready(self, now, node_of) if node_of else ready(self, now)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RecordAccumulator, "ready", counted_ready)
        producer = fake_producer(broker, GatedMetadata(), linger_ms=1)
        try:
            future = producer.send(TOPIC, b"slow", partition=0)
            assert until(lambda: passes[0] >= 1)
            time.sleep(0.5)  # the request is out, nothing else to send
            idle_passes = passes[0]
            assert future.result(5).offset == 0
        finally:
            producer.close(timeout=1)
    assert idle_passes < 20, f"{idle_passes} sender passes in 0.5 s with nothing to send"
