"""The producer's wakes and passes under races (found by review of the change that
cut them): the real Producer against in-memory fakes.

* A user thread's wake interrupted before it reaches the loop (a signal handler's
  exception, KeyboardInterrupt or a SIGTERM handler's SystemExit, delivered at the
  next call boundary in the main thread) loses that one wake, never the later ones: a
  flag meaning "a wake is on its way", raised before the call, stayed up for ever and
  every later cross-thread wake, flush's and close's included, was skipped.
* A partition's batches reach its leader in drain order, however the deliveries that
  drained them wait for leader lookups: sending one request inline and deferring the
  others to tasks let a later batch overtake an earlier one when two deliveries
  resumed together, and so did a later delivery whose lookups hit the cache while an
  earlier one waited for another topic's refresh.
* The sender does not scan once a linger while a request is out and nothing can be
  sent (a hung broker keeps one out for up to request_timeout_ms): neither with
  nothing queued nor with a batch that does not fit the broker's bytes in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.unit.producer_fakes import InstantBroker, StaticMetadata, fake_producer

from tidemq.client import producer as producer_module
from tidemq.client.accumulator import Readiness, RecordAccumulator
from tidemq.client.config import ResultTimeout
from tidemq.client.metadata import PartitionInfo
from tidemq.errors import OutcomeUnknown, RequestTimedOut

TOPIC = "t"
PARTITIONS = 6
LEADERS = ("https://b1.invalid", "https://b2.invalid", "https://b3.invalid")


class GatedMetadata(StaticMetadata):
    """Topics of PARTITIONS partitions, partition p led by LEADERS[p % 3] (or by
    ``leader``, or as ``leader_of`` says, asked on every lookup); a lookup of a topic
    whose gate is set and not done waits for it, as every lookup of a stale topic waits
    for its one refresh."""

    def __init__(
        self,
        *topics: str,
        leader: str | None = None,
        leader_of: Callable[[int], PartitionInfo] | None = None,
    ) -> None:
        super().__init__(
            TOPIC,
            PARTITIONS,
            leader_of or (lambda p: PartitionInfo(p, leader or LEADERS[p % 3], 0)),
        )
        topics = topics or (TOPIC,)
        self.partition_counts = {topic: PARTITIONS for topic in topics}
        self.gates: dict[str, asyncio.Future[None]] = {}
        self.waiting = dict.fromkeys(topics, 0)

    async def leader(self, topic: str, partition: int) -> PartitionInfo:
        gate = self.gates.get(topic)
        if gate is not None and not gate.done():
            self.waiting[topic] += 1
            await gate
        return await super().leader(topic, partition)

    def close_gates(self, producer: Any, *topics: str) -> None:
        """Lookups of these topics wait from now on (the futures made on its loop)."""
        made = threading.Event()

        def close() -> None:
            for topic in topics:
                self.gates[topic] = producer._thread.loop.create_future()
            made.set()

        producer._thread.loop.call_soon_threadsafe(close)
        assert made.wait(5)

    def open_gate(self, producer: Any, topic: str) -> None:
        producer._thread.loop.call_soon_threadsafe(self.gates[topic].set_result, None)


def hold_loop(producer: Any) -> threading.Event:
    """Holds the producer's loop until the event is set: records sent meanwhile are
    all in the accumulator before the sender looks."""
    release = threading.Event()
    producer._thread.loop.call_soon_threadsafe(release.wait, 5)
    return release


def in_drain_order(patch: pytest.MonkeyPatch) -> list[list[tuple[str, int]]]:
    """Makes ``ready`` name partitions sorted (a chosen drain order, not a set's);
    returns the list of each pass that drains something."""
    passes: list[list[tuple[str, int]]] = []
    ready = RecordAccumulator.ready

    def ordered_ready(self: RecordAccumulator, now: float, node_of: Any = None) -> Readiness:
        readiness = ready(self, now, node_of) if node_of else ready(self, now)
        partitions = sorted(readiness.partitions)
        if partitions:
            passes.append(partitions)
        return Readiness(partitions, readiness.next_check)

    patch.setattr(RecordAccumulator, "ready", ordered_ready)
    return passes


@contextlib.contextmanager
def ordered_producer(
    broker: InstantBroker, metadata: GatedMetadata, close_timeout_s: float = 1.0
) -> Iterator[tuple[producer_module.Producer, list[list[tuple[str, int]]]]]:
    """A producer whose sender drains in a chosen order (``in_drain_order``; the passes
    that drain are the second item), a long linger and small batches, its identity
    known; closed with a bound at the end, so that a lost wake fails, never hangs."""
    with pytest.MonkeyPatch.context() as patch:
        passes = in_drain_order(patch)
        producer = fake_producer(broker, metadata, linger_ms=60_000, batch_size=64)
        try:
            assert until(lambda: producer._identity_known)
            yield producer, passes
        finally:
            producer.close(timeout=close_timeout_s)


def counting_passes(patch: pytest.MonkeyPatch) -> list[int]:
    """Counts the sender's ``ready`` passes (in the list's one item)."""
    passes = [0]
    ready = RecordAccumulator.ready

    def counted_ready(self: RecordAccumulator, now: float, node_of: Any = None) -> Readiness:
        passes[0] += 1
        return ready(self, now, node_of) if node_of else ready(self, now)

    patch.setattr(RecordAccumulator, "ready", counted_ready)
    return passes


def passes_behind_a_hung_request(**options: Any) -> int:
    """The sender's passes over 0.5 s while a 600-byte request to b1 hangs (1 s) and a
    second 600-byte batch for b1 waits behind it, linger_ms=1, under ``options`` (a
    bound that keeps the second batch from going until the answer)."""
    broker = InstantBroker(1.0)  # hangs
    with pytest.MonkeyPatch.context() as patch:
        passes = counting_passes(patch)
        producer = fake_producer(broker, GatedMetadata(), linger_ms=1, **options)
        try:
            first = producer.send(TOPIC, b"x" * 600, partition=0)  # b1, goes at once, hangs
            assert until(lambda: broker.requests >= 1)
            second = producer.send(TOPIC, b"y" * 600, partition=3)  # b1: must wait
            time.sleep(0.1)  # its linger is up; nothing can go until the answer
            before = passes[0]
            time.sleep(0.5)
            idle_passes = passes[0] - before
            assert first.result(5).offset == 0 and second.result(5).offset == 0
        finally:
            producer.close(timeout=1)
    return idle_passes


def sequences_sent(broker: InstantBroker, topic: str, partition: int) -> list[int]:
    return [seq for _, t, p, seq in broker.sent if (t, p) == (topic, partition)]


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
    with ordered_producer(broker, metadata) as (producer, passes):
        metadata.close_gates(producer, TOPIC)
        release = hold_loop(producer)  # both records are in before the sender looks
        first = [producer.send(TOPIC, b"p0", partition=0)]
        first.append(producer.send(TOPIC, b"p1-a", partition=1))
        release.set()
        assert until(lambda: metadata.waiting[TOPIC] >= 1)  # delivery 1 waits
        release = hold_loop(producer)
        second = [producer.send(TOPIC, b"p1-b", partition=1)]
        second.append(producer.send(TOPIC, b"p1-c", partition=1))  # seals p1-b
        second.append(producer.send(TOPIC, b"p2", partition=2))
        release.set()
        assert until(lambda: metadata.waiting[TOPIC] >= 2)  # delivery 2 waits too
        assert passes[-2:] == [[(TOPIC, 0), (TOPIC, 1)], [(TOPIC, 1), (TOPIC, 2)]]
        metadata.open_gate(producer, TOPIC)
        for future in first + second:
            future.result(5)
    assert {leader for leader, _, p, _ in broker.sent if p == 1} == {LEADERS[1]}
    to_b2 = sequences_sent(broker, TOPIC, 1)
    assert to_b2 == sorted(to_b2), f"p1's batches reached b2 as sequences {to_b2}"


def test_a_later_delivery_with_cached_lookups_does_not_overtake_an_earlier_one() -> None:
    """Delivery 1 drained [a-stale/0, b-fresh/0 (seq 0)] and waits for a-stale's
    refresh before it makes its requests. Delivery 2 drained [b-fresh/0 (seq 1..)]: its
    lookup is a cache hit (no suspension). Without a wait for delivery 1 it made its
    request first, and b-fresh/0's later batch reached the leader first (found by
    review of ad60202; the leader then holds it up to REORDER_WAIT_S or, behind a
    slower refresh, answers out_of_order_sequence and the partition is resent)."""
    broker = InstantBroker()
    metadata = GatedMetadata("a-stale", "b-fresh", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "a-stale")
        release = hold_loop(producer)
        first = [producer.send("a-stale", b"x", partition=0)]
        first.append(producer.send("b-fresh", b"p-a", partition=0))
        release.set()
        assert until(lambda: metadata.waiting["a-stale"] >= 1)  # delivery 1 waits
        second = [producer.send("b-fresh", b"p-b", partition=0)]
        second.append(producer.send("b-fresh", b"p-c", partition=0))  # seals p-b
        time.sleep(0.2)  # delivery 2 runs (its lookup needs no refresh)
        metadata.open_gate(producer, "a-stale")
        for future in first + second:
            future.result(5)
    fresh = sequences_sent(broker, "b-fresh", 0)
    assert fresh == sorted(fresh), f"b-fresh/0's batches reached its leader as {fresh}"


def test_two_deliveries_that_waited_for_one_refresh_stay_in_order_when_the_first_waits_again() -> (
    None
):
    """Delivery 1 drained [a/0 (seq 0), c/0], delivery 2 [a/0 (seq 1..)]; both wait for
    a's refresh. When it ends, delivery 1 resumes first, goes on to c/0 and waits for
    c's refresh; delivery 2 resumes and must not send a/0's later batch before
    delivery 1 has made its requests (found by review of ad60202)."""
    broker = InstantBroker()
    metadata = GatedMetadata("a", "c", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "a", "c")
        release = hold_loop(producer)
        first = [producer.send("a", b"a-1", partition=0)]
        first.append(producer.send("c", b"c-1", partition=0))
        release.set()
        assert until(lambda: metadata.waiting["a"] >= 1)
        second = [producer.send("a", b"a-2", partition=0)]
        second.append(producer.send("a", b"a-3", partition=0))  # seals a-2: a wake
        assert until(lambda: metadata.waiting["a"] >= 2)
        metadata.open_gate(producer, "a")
        time.sleep(0.2)
        metadata.open_gate(producer, "c")
        for future in first + second:
            future.result(5)
    sequences = sequences_sent(broker, "a", 0)
    assert sequences == sorted(sequences), f"a/0's batches reached its leader as {sequences}"


def test_a_request_in_flight_with_nothing_else_to_send_does_not_spin_the_sender() -> None:
    """One record, its request out for a second, nothing else queued: there is nothing
    for the sender to do until the answer. On 174b8bb ``ready`` arms the look-in timer
    one linger ahead whenever anything is in flight, so with linger_ms=1 the sender
    scans the accumulator ~1,000 times a second for as long as a request is out (a
    hung broker: up to request_timeout_ms, then retries for delivery_timeout_ms)."""
    broker = InstantBroker(1.0)  # a broker that hangs: its request times out later
    with pytest.MonkeyPatch.context() as patch:
        passes = counting_passes(patch)
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


@pytest.mark.xfail(
    strict=True,
    reason="open: behind a hung request a batch that cannot go re-arms the look-in every "
    "linger (0d6bd8a's fix delayed a moved partition and was reverted)",
)
def test_a_batch_that_does_not_fit_the_bytes_in_flight_does_not_spin_the_sender() -> None:
    """A request of 600 bytes hangs at b1 under a 1,000-byte bound; a second 600-byte
    batch for b1 cannot go until it is answered (drain takes nothing). ad60202 still
    counted b1 ready (its bytes under the bound, the batch's linger up) and armed the
    look-in timer on every such pass: a scan of every queue once a linger (found by
    review of ad60202)."""
    idle_passes = passes_behind_a_hung_request(max_in_flight_bytes_per_broker=1000)
    assert idle_passes < 20, f"{idle_passes} sender passes in 0.5 s with nothing to send"


def test_a_partition_no_earlier_delivery_holds_is_not_held_by_another_topics_refresh() -> None:
    """Delivery 1 drained [a/0, s/0] and waits for s's refresh. Delivery 2 drained
    [a/0 (later batch), v/0]: it must wait for delivery 1 for a/0's sake, but v/0 has
    no earlier delivery and its topic needs no refresh. 0d6bd8a holds the whole of
    delivery 2 (and, transitively, every later delivery of v/0) until s's refresh
    ends: a slow refresh holds up another topic, which the commit says it never does."""
    broker = InstantBroker()
    metadata = GatedMetadata("a", "s", "v", leader=LEADERS[0])
    with ordered_producer(broker, metadata) as (producer, _):
        metadata.close_gates(producer, "s")
        release = hold_loop(producer)
        first = [producer.send("a", b"a-1", partition=0)]
        first.append(producer.send("s", b"s-1", partition=0))
        release.set()
        assert until(lambda: metadata.waiting["s"] >= 1)  # delivery 1 waits
        release = hold_loop(producer)
        second = [producer.send("a", b"a-2", partition=0)]
        second.append(producer.send("a", b"a-3", partition=0))  # seals a-2
        unrelated = producer.send("v", b"v-1", partition=0)
        release.set()
        try:
            held = not until(unrelated.done, 1.0)
        finally:
            metadata.open_gate(producer, "s")
        for future in [*first, *second, unrelated]:
            future.result(5)
    assert not held, "v/0 (no earlier delivery, fresh metadata) waited for s's refresh"


@pytest.mark.xfail(
    strict=True,
    reason="open: a batch larger than max_request_bytes behind a hung request re-arms the "
    "look-in every linger (ready does not know max_request_bytes)",
)
def test_a_batch_larger_than_max_request_bytes_does_not_spin_the_sender() -> None:
    """The same spin the commit removes, through the other half of drain's budget:
    drain takes nothing when the oldest batch exceeds max_request_bytes and the broker
    has bytes in flight, but ready() only compares with max_in_flight_bytes, so the
    broker is 'ready' and the look-in timer is armed on every pass."""
    idle_passes = passes_behind_a_hung_request(max_request_bytes=500)
    assert idle_passes < 20, f"{idle_passes} sender passes in 0.5 s with nothing to send"


class PerLeaderBroker(InstantBroker):
    """Answers b1 after ``slow_s``, every other leader at once."""

    def __init__(self, slow_s: float) -> None:
        super().__init__()
        self.slow_s = slow_s

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        self.delay_s = self.slow_s if url.startswith(LEADERS[0]) else 0.0
        return await super().request_json(method, url, **kwargs)


def test_a_skipped_partition_whose_leader_moves_goes_to_the_new_leader_without_waiting() -> None:
    """p3's batch does not fit b1's bytes in flight (a hung 600-byte request under a
    1,000-byte bound), so ready() skips it. Then p3's leader moves to b2, where nothing
    is in flight. On ad60202 the look-in found it within a linger; on 0d6bd8a nothing
    wakes the sender until b1 answers (a hung broker: up to request_timeout_ms)."""
    broker = PerLeaderBroker(3.0)
    leaders = {p: LEADERS[0] for p in range(6)}
    metadata = GatedMetadata(leader_of=lambda p: PartitionInfo(p, leaders[p], 0))
    producer = fake_producer(broker, metadata, linger_ms=5, max_in_flight_bytes_per_broker=1000)
    try:
        first = producer.send(TOPIC, b"x" * 600, partition=0)  # b1, hangs 3 s
        assert until(lambda: broker.requests >= 1)
        second = producer.send(TOPIC, b"y" * 600, partition=3)  # b1: does not fit
        time.sleep(0.1)
        leaders[3] = LEADERS[1]  # the cache now names b2 (a refresh by any lookup)
        started = time.monotonic()
        second.result(5)
        waited = time.monotonic() - started
        first.result(5)
    finally:
        producer.close(timeout=1)
    assert waited < 1.0, f"p3 waited {waited:.2f} s for b1's answer though b2 leads it"


class TimesOutFirst(InstantBroker):
    """The first request is answered with a timeout once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release: asyncio.Event | None = None

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        self.requests += 1
        if self.requests == 1:
            self.release = asyncio.Event()
            await self.release.wait()
            raise RequestTimedOut("timed out")
        self.requests -= 1
        return await super().request_json(method, url, **kwargs)


def test_a_maybe_appended_group_is_not_reported_closed_before_delivery() -> None:
    """a/0: group 1 is sent and times out (it may have been appended; resend waits
    for group 2 to leave). Group 2's delivery waits for s's refresh (drained with
    s/0). close() gives up after its 5 s and cancels: the delivery gives group 2 up
    with ClientClosed, and _give_up fails the held group 1 with the same ClientClosed
    ('closed before delivery') though it may be in the log: the application resends
    it, a duplicate. (034d74a's cancel path does the same; 0d6bd8a's wait for an
    earlier delivery widens the window.)"""
    broker = TimesOutFirst()
    metadata = GatedMetadata("a", "s", leader=LEADERS[0])
    with ordered_producer(broker, metadata, close_timeout_s=0.2) as (producer, _):
        group1 = producer.send("a", b"a-1", partition=0)
        assert until(lambda: broker.release is not None)
        metadata.close_gates(producer, "s")
        release = hold_loop(producer)
        group2 = [producer.send("a", b"a-2", partition=0)]
        group2.append(producer.send("a", b"a-3", partition=0))  # seals a-2
        group2.append(producer.send("s", b"s-1", partition=0))
        release.set()
        assert until(lambda: metadata.waiting["s"] >= 1)
        loop = producer._thread.loop
        loop.call_soon_threadsafe(broker.release.set)  # type: ignore[union-attr]
        assert until(
            lambda: (
                producer._accumulator._queues.get(("a", 0)) is not None
                and producer._accumulator._queues[("a", 0)].paused
            )
        )
    error = group1.exception(1)
    assert isinstance(error, OutcomeUnknown), (
        f"group 1 may have been appended, yet fails with {error!r}"
    )
