"""``close(timeout)`` is bounded by its timeout: once the flush has run out of time,
what is still in flight or held for a resend is abandoned at once (Kafka's forced
close), not waited for. Before, close waited up to 5 s more for the sender, which
went on retrying a partition in recovery or waiting for a hung request."""

from __future__ import annotations

import asyncio
import functools
import signal
import threading
import time
from typing import Any

import pytest
from tests.unit.producer_fakes import (
    HangingBroker,
    InstantBroker,
    StaticMetadata,
    fake_producer,
    led_by,
    wait_until,
)

from tidemq.client import producer as producer_module
from tidemq.client.transport import LoopThread
from tidemq.errors import ClientClosed, InvalidRequest, OutcomeUnknown

TOPIC = "t"


@pytest.mark.parametrize("idempotent", [True, False])
def test_close_after_a_timed_out_flush_returns_within_its_timeout(idempotent: bool) -> None:
    broker = HangingBroker()
    metadata = StaticMetadata(TOPIC, 1, led_by("https://b1"))
    producer = fake_producer(broker, metadata, linger_ms=0, enable_idempotence=idempotent)
    sent = producer.send(TOPIC, b"in flight", partition=0)
    wait_until(lambda: broker.requests > 0, what="nothing sent")
    queued = producer.send(TOPIC, b"queued", partition=0)
    started = time.monotonic()
    producer.close(timeout=0.3)
    took = time.monotonic() - started
    # The bound is the timeout plus the loop's shutdown; before, it was 5 s more.
    assert took < 2.5, f"close(timeout=0.3) took {took:.2f} s"
    with pytest.raises(OutcomeUnknown):  # sent, never answered: it may be written
        sent.result(timeout=0)
    if idempotent:  # behind it in flight too, or still queued: either is honest
        assert isinstance(queued.exception(timeout=0), OutcomeUnknown | ClientClosed)
    else:  # one request per partition: never sent
        with pytest.raises(ClientClosed):
            queued.result(timeout=0)


# -- found by the adversarial review of the forced close (helper-64) ---------------


class HangingCoordinator(InstantBroker):
    """POST /v1/producers never answers (a coordinator that hangs)."""

    asked = False

    async def coordinator(self, method: str, path: str, **kwargs: Any) -> Any:
        self.asked = True
        await asyncio.Event().wait()


def test_close_with_nothing_to_flush_is_bounded_while_the_producer_id_is_awaited() -> None:
    coordinator = HangingCoordinator()
    producer = fake_producer(
        coordinator, StaticMetadata(TOPIC, 1, led_by("https://b1")), linger_ms=0
    )
    wait_until(lambda: coordinator.asked)  # the sender waits in _acquire_identity
    started = time.monotonic()
    producer.close(timeout=0.3)
    took = time.monotonic() - started
    assert took < 2.5, f"close(timeout=0.3) took {took:.2f} s"


class FirstAnswersThenHangs(InstantBroker):
    """The first produce is answered after 0.3 s; every later one hangs."""

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        self.requests += 1
        if self.requests == 1:
            await asyncio.sleep(0.3)
            return await super().request_json(method, url, **kwargs)
        await asyncio.Event().wait()


def test_close_is_bounded_when_a_record_is_sent_during_its_flush() -> None:
    broker = FirstAnswersThenHangs()
    producer = fake_producer(
        broker,
        StaticMetadata(TOPIC, 2, led_by("https://b1")),
        linger_ms=0,
        enable_idempotence=False,
    )
    first = producer.send(TOPIC, b"answered", partition=0)
    late: list[Any] = []

    def send_later() -> None:  # another thread sends while close() flushes
        time.sleep(0.1)
        late.append(producer.send(TOPIC, b"hangs", partition=1))

    thread = threading.Thread(target=send_later)
    thread.start()
    started = time.monotonic()
    producer.close(timeout=1.0)
    took = time.monotonic() - started
    thread.join()
    assert first.result(timeout=0).offset == 0
    assert isinstance(late[0].exception(timeout=0), OutcomeUnknown)
    assert took < 3.0, f"close(timeout=1.0) took {took:.2f} s"


def test_flush_from_a_callback_during_a_forced_close_is_refused() -> None:
    broker = HangingBroker()
    producer = fake_producer(
        broker,
        StaticMetadata(TOPIC, 2, led_by("https://b1")),
        linger_ms=0,
        enable_idempotence=False,
    )
    futures = [producer.send(TOPIC, b"a", partition=0)]
    wait_until(lambda: broker.requests >= 1)
    futures.append(producer.send(TOPIC, b"b", partition=1))
    wait_until(lambda: broker.requests >= 2)
    seen: list[BaseException | None] = []

    def callback(_: Any) -> None:
        if seen:
            return
        try:
            producer.flush(timeout=1.5)  # flush(None) here never returns
            seen.append(None)
        except BaseException as exc:
            seen.append(exc)

    futures[0].add_done_callback(callback)
    futures[1].add_done_callback(callback)
    started = time.monotonic()
    producer.close(timeout=0.2)
    took = time.monotonic() - started
    assert isinstance(seen[0], InvalidRequest), f"flush in a callback: {seen[0]!r}"
    assert took < 1.5, f"close(timeout=0.2) took {took:.2f} s"


class AnswersP0LaterHangsP1(InstantBroker):
    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        self.requests += 1
        if b"a-slow-answer" in kwargs["data"]:
            await asyncio.sleep(0.3)
            return await super().request_json(method, url, **kwargs)
        await asyncio.Event().wait()


def test_a_slow_callback_during_a_forced_close_leaves_no_record_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A callback still running when close() stops the loop, and for longer than
    # LoopThread.stop's join (10 s; 0.5 s here to keep the test short).
    monkeypatch.setattr(LoopThread, "stop", functools.partialmethod(LoopThread.stop, timeout_s=0.5))
    broker = AnswersP0LaterHangsP1()
    producer = fake_producer(
        broker,
        StaticMetadata(TOPIC, 2, led_by("https://b1")),
        linger_ms=0,
        enable_idempotence=False,
    )
    release = threading.Event()
    hung = producer.send(TOPIC, b"hangs", partition=1)
    wait_until(lambda: broker.requests >= 1)  # alone in its request
    answered = producer.send(TOPIC, b"a-slow-answer", partition=0)
    answered.add_done_callback(lambda _: release.wait(5))  # slow work on the loop thread
    producer.close(timeout=0.6)  # the answer comes at 0.3 s: the callback runs
    release.set()
    assert answered.result(timeout=0).offset == 0
    # close() has returned: nothing may still be pending.
    assert isinstance(hung.exception(timeout=3), OutcomeUnknown)


class SlowToCloseHangingBroker(HangingBroker):
    async def close(self) -> None:  # as a channel to a hung peer: ws_close is 1 s
        await asyncio.sleep(0.5)


def test_a_second_close_waits_for_the_first() -> None:
    """Both threads passed the "closed?" check; one then failed with RuntimeError
    (the loop stopped twice), and a second close() returned at once while the first
    was still failing the records. Now it waits for the first (up to its own
    timeout; test_a_second_close_keeps_its_own_timeout)."""
    broker = SlowToCloseHangingBroker()
    producer = fake_producer(broker, StaticMetadata(TOPIC, 1, led_by("https://b1")), linger_ms=0)
    sent = producer.send(TOPIC, b"x", partition=0)
    wait_until(lambda: broker.requests >= 1)
    outcomes: list[tuple[BaseException | None, bool]] = []

    def close(timeout: float | None) -> None:
        try:
            producer.close(timeout=timeout)
            outcomes.append((None, sent.done()))
        except BaseException as exc:  # what the test inspects
            outcomes.append((exc, sent.done()))

    first = threading.Thread(target=close, args=(0.2,))
    first.start()
    wait_until(lambda: producer._closing_thread is not None)  # the first close is under way
    second = threading.Thread(target=close, args=(None,))
    second.start()
    for thread in (first, second):
        thread.join(15)
    assert outcomes == [(None, True), (None, True)], outcomes
    assert isinstance(sent.exception(timeout=0), OutcomeUnknown)


# -- found by the review of the reworked close (helper-65) -------------------------


def _in_flight_and_queued() -> tuple[Any, Any, Any]:
    """One record hung in flight, one queued behind it (one request per partition)."""
    broker = HangingBroker()
    producer = fake_producer(
        broker,
        StaticMetadata(TOPIC, 1, led_by("https://b1")),
        linger_ms=0,
        enable_idempotence=False,
    )
    producer.send(TOPIC, b"in flight", partition=0)
    wait_until(lambda: broker.requests >= 1)
    return broker, producer, producer.send(TOPIC, b"queued", partition=0)


def test_close_from_the_callback_of_a_record_close_aborts_does_not_deadlock() -> None:
    _, producer, queued = _in_flight_and_queued()
    seen: list[BaseException | None] = []

    def callback(_: Any) -> None:  # runs on close()'s thread (accumulator.abort)
        try:
            producer.close(timeout=0.1)
            seen.append(None)
        except BaseException as exc:
            seen.append(exc)

    queued.add_done_callback(callback)
    closer = threading.Thread(target=producer.close, kwargs={"timeout": 0.2}, daemon=True)
    started = time.monotonic()
    closer.start()
    closer.join(5)
    assert not closer.is_alive(), "close() deadlocked on its own _close_lock"
    assert time.monotonic() - started < 2.5
    assert len(seen) == 1 and (seen[0] is None or isinstance(seen[0], InvalidRequest))


def test_flush_from_the_callback_of_a_record_close_aborts_does_not_wait_for_close() -> None:
    _, producer, queued = _in_flight_and_queued()
    seen: list[BaseException | None] = []

    def callback(_: Any) -> None:
        try:
            producer.flush(timeout=3.0)  # flush(None) here never returns
            seen.append(None)
        except BaseException as exc:
            seen.append(exc)

    queued.add_done_callback(callback)
    started = time.monotonic()
    producer.close(timeout=0.2)
    took = time.monotonic() - started
    assert took < 2.2, f"close(timeout=0.2) took {took:.2f} s; flush in callback: {seen!r}"


def test_a_second_close_keeps_its_own_timeout() -> None:
    _, producer, _ = _in_flight_and_queued()
    first = threading.Thread(target=producer.close, kwargs={"timeout": 4.0}, daemon=True)
    first.start()
    wait_until(lambda: producer._closing_thread is not None)  # the first close is under way
    started = time.monotonic()
    producer.close(timeout=0.2)
    took = time.monotonic() - started
    first.join(10)
    assert took < 2.2, f"close(timeout=0.2) took {took:.2f} s"


class _Deadlocked(Exception):
    pass


def test_close_from_a_signal_handler_during_close_does_not_deadlock() -> None:
    _, producer, _ = _in_flight_and_queued()
    calls: list[float] = []

    def handler(signum: int, frame: Any) -> None:
        if calls:  # the watchdog alarm, still inside the first handler's close()
            raise _Deadlocked
        calls.append(time.monotonic())
        producer.close(timeout=0)

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.1, 3.0)
    try:
        producer.close(timeout=1.0)
    except _Deadlocked:
        pytest.fail("close() in a signal handler waited for the close it interrupted")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class SlowCloseP0AnsweredP1Hangs(InstantBroker):
    """p0's produce is answered after 0.3 s, p1's hangs; close() takes 1 s (a WebSocket
    close to a hung peer: ws_close=1.0)."""

    closed = False

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        self.requests += 1
        if b"answered" in kwargs["data"]:
            await asyncio.sleep(0.3)
            return await super().request_json(method, url, **kwargs)
        await asyncio.Event().wait()

    async def close(self) -> None:
        await asyncio.sleep(1.0)
        self.closed = True


def _blocked_loop_close(block_s: float) -> tuple[float, Any, Any]:
    broker = SlowCloseP0AnsweredP1Hangs()
    producer = fake_producer(
        broker,
        StaticMetadata(TOPIC, 2, led_by("https://b1")),
        linger_ms=0,
        enable_idempotence=False,
    )
    hung = producer.send(TOPIC, b"hangs", partition=1)
    wait_until(lambda: broker.requests >= 1)
    answered = producer.send(TOPIC, b"answered", partition=0)
    answered.add_done_callback(lambda _: time.sleep(block_s))  # blocks the loop
    started = time.monotonic()
    producer.close(timeout=0.6)
    took = time.monotonic() - started
    assert isinstance(hung.exception(timeout=0), OutcomeUnknown)  # nothing left waiting
    return took, broker, producer


# A forced close whose loop a callback blocks: at most the timeout, 1 s for the loop to
# fail the records, 1 s for the sender's cleanup, 1 s for the loop to stop, and the
# transport's close (1 s here) when the loop stops only then.
BLOCKED_BOUND_S = 0.6 + 4.5


def test_a_forced_close_whose_loop_unblocks_late_is_still_bounded() -> None:
    took, _, _ = _blocked_loop_close(1.9)
    assert took < BLOCKED_BOUND_S, f"close(timeout=0.6) took {took:.2f} s"


def test_a_forced_close_whose_loop_stays_blocked_still_closes_the_transport() -> None:
    took, broker, producer = _blocked_loop_close(2.5)
    assert took < BLOCKED_BOUND_S, f"close(timeout=0.6) took {took:.2f} s"
    wait_until(
        lambda: broker.closed and producer._thread.loop.is_closed(),
        what="the transport and the loop not closed",
    )


class SlowToCloseBroker(InstantBroker):
    """Answers at once; its close takes 0.2 s (a WebSocket close handshake)."""

    closed = False

    async def close(self) -> None:
        await asyncio.sleep(0.2)
        self.closed = True


def test_a_close_whose_flush_succeeded_still_closes_the_transport() -> None:
    broker = SlowToCloseBroker()
    producer = fake_producer(broker, StaticMetadata(TOPIC, 1, led_by("https://b1")), linger_ms=0)
    assert producer.send(TOPIC, b"x", partition=0).result(timeout=5).offset == 0
    producer.close(timeout=0.1)  # nothing left: the normal path
    assert broker.closed, "the sender was cancelled inside Transport.close"


# -- found by the review of 0574cf4 (helper-66) ------------------------------------


class SlowCloseBroker(InstantBroker):
    def __init__(self) -> None:
        super().__init__()
        self.close_started = threading.Event()
        self.close_finished = threading.Event()
        self.close_cancelled = False

    async def close(self) -> None:
        self.close_started.set()
        try:
            await asyncio.sleep(0.3)  # e.g. a channel's websocket close handshake
        except asyncio.CancelledError:
            self.close_cancelled = True
            raise
        self.close_finished.set()


class LateEvent(threading.Event):
    """is_set() read, then the closing thread is preempted before it acts on it."""

    def __init__(self, started: threading.Event) -> None:
        super().__init__()
        self._started = started

    def is_set(self) -> bool:
        value = super().is_set()
        self._started.wait(2)  # meanwhile the sender ends by itself and starts closing
        return value


def test_a_forced_close_does_not_cancel_the_transports_close_it_raced() -> None:
    broker = SlowCloseBroker()
    producer = fake_producer(broker, StaticMetadata(TOPIC, 1, led_by("https://b1")), linger_ms=0)
    producer._records_failed = LateEvent(broker.close_started)  # type: ignore[assignment]
    producer.close(timeout=0)  # nothing to flush; the sender has not ended yet: forced
    assert not broker.close_cancelled, "the cancel landed in the transport's close"
    assert broker.close_finished.is_set()


class _Threading:
    """producer.threading, where a signal handler's close() runs just after
    close() set _closed and before it set _closing_thread."""

    def __init__(self, hook: Any) -> None:
        self._hook = hook
        self._fired = False

    def get_ident(self) -> int:
        if not self._fired:
            self._fired = True
            self._hook()
        return threading.get_ident()

    def __getattr__(self, name: str) -> Any:
        return getattr(threading, name)


def test_a_signal_handlers_close_inside_close_returns() -> None:
    producer = fake_producer(
        InstantBroker(), StaticMetadata(TOPIC, 1, led_by("https://b1")), linger_ms=0
    )
    done = threading.Event()

    def main() -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(producer_module, "threading", _Threading(lambda: producer.close()))
            producer.close()
        done.set()

    threading.Thread(target=main, daemon=True).start()
    assert done.wait(5), "close() from a signal handler waits for itself for ever"
