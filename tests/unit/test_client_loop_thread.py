"""LoopThread.stop from inside another event loop (what a garbage-collected, unclosed
``Admin(...)`` does when its finalizer runs while the application's loop is running),
from its own thread, twice, and racing submissions while the loop finishes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import signal
import threading
import time
from typing import Any

import pytest

from tidemq.client.transport import LoopThread
from tidemq.errors import ClientClosed


def test_stop_inside_a_running_event_loop_still_cancels_and_closes() -> None:
    thread = LoopThread("tidemq-test")

    async def forever() -> None:
        await asyncio.sleep(3600)

    future = thread.submit(forever())

    async def application() -> None:
        thread.stop(5.0)  # no "Cannot run the event loop while another loop is running"

    asyncio.run(application())
    assert thread.loop.is_closed()
    assert future.cancelled()


# -- found by the review of 0574cf4 (helper-66): the loop's thread now finishes it --


def _task_with_slow_cleanup(thread: LoopThread, cleaned: threading.Event) -> Any:
    async def body() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.5)  # cleanup after the cancel: runs inside _finish
            cleaned.set()

    future = thread.submit(body())
    deadline = time.monotonic() + 5
    while not any(not t.done() for t in asyncio.all_tasks(thread.loop)):  # it started
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return future


def test_a_coroutine_submitted_while_the_loop_finishes_still_completes() -> None:
    thread = LoopThread("tidemq-test")
    cleaned = threading.Event()
    _task_with_slow_cleanup(thread, cleaned)
    thread.stop(0.05)  # gives up: the loop thread is in _finish, running the cleanup
    try:
        late = thread.submit(asyncio.sleep(2))  # accepted: not closed yet
    except ClientClosed:
        return  # refusing is fine
    try:
        late.result(timeout=4)
    except (concurrent.futures.CancelledError, ClientClosed):
        pass
    except concurrent.futures.TimeoutError:
        pytest.fail("a future submitted during _finish never completes")


def test_a_second_stop_while_the_loop_finishes_still_closes_it() -> None:
    errors: list[Any] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        thread = LoopThread("tidemq-test")
        cleaned = threading.Event()
        future = _task_with_slow_cleanup(thread, cleaned)
        thread.stop(0.05)  # gives up
        thread.stop(5.0)  # e.g. a second close(), a finalizer
    finally:
        threading.excepthook = old_hook
    assert not errors, errors  # RuntimeError('Event loop stopped before Future completed.')
    assert cleaned.is_set()
    assert future.done()
    assert thread.loop.is_closed()


def test_stop_from_the_loop_thread_does_not_raise() -> None:
    # Admin's finalizer when the last reference goes on the loop thread; Consumer.close
    # from a coroutine/callback on its loop.
    thread = LoopThread("tidemq-test")

    async def stop_here() -> None:
        thread.stop(1.0)

    thread.submit(stop_here()).result(5)  # RuntimeError: cannot join current thread
    thread._thread.join(5)
    assert thread.loop.is_closed()


# -- found by the review of b31d087 (helper-68): signal handlers, endless tasks --------


class _Deadlocked(Exception):
    pass


def _signal_inside_submit(
    monkeypatch: pytest.MonkeyPatch, thread: LoopThread, in_handler: Any
) -> None:
    """Runs thread.call on the main thread with a SIGUSR1 arriving while submit()
    holds _lock (as SIGTERM -> consumer.close() / admin.close() can, during poll or
    any admin call); a 3 s SIGALRM breaks a deadlock (lock waits are interruptible)."""
    real = asyncio.run_coroutine_threadsafe
    armed = [True]
    made: list[Any] = []

    def inside_submit(coroutine: Any, loop: asyncio.AbstractEventLoop) -> Any:
        made.append(coroutine)
        if armed[0]:
            armed[0] = False
            signal.raise_signal(signal.SIGUSR1)  # its handler runs here, under _lock
        return real(coroutine, loop)

    def watchdog(signum: int, frame: Any) -> None:
        raise _Deadlocked

    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", inside_submit)
    old_usr1 = signal.signal(signal.SIGUSR1, lambda signum, frame: in_handler(made))
    old_alrm = signal.signal(signal.SIGALRM, watchdog)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    outer = asyncio.sleep(0)
    made.append(outer)
    try:
        thread.call(outer, 2.0)
    except _Deadlocked:
        pytest.fail("the signal handler waited for the _lock held by the code it interrupted")
    except Exception:  # ClientClosed after the handler's stop() is fine
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alrm)
        signal.signal(signal.SIGUSR1, old_usr1)
        monkeypatch.undo()
        thread.stop(5.0)
        for coroutine in made:  # the ones a deadlock left unscheduled
            if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
                coroutine.close()


def test_a_signal_handler_may_call_while_submit_holds_the_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    thread = LoopThread("tidemq-test")
    seen: list[Any] = []

    def in_handler(made: list[Any]) -> None:
        coroutine = asyncio.sleep(0, "inner")
        made.append(coroutine)
        seen.append(thread.call(coroutine, 2.0))

    _signal_inside_submit(monkeypatch, thread, in_handler)
    assert seen == ["inner"]


def test_a_signal_handler_may_stop_while_submit_holds_the_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    thread = LoopThread("tidemq-test")
    _signal_inside_submit(monkeypatch, thread, lambda made: thread.stop(0.5))
    assert thread.loop.is_closed()


def test_finish_is_bounded_when_cancelled_tasks_keep_creating_tasks() -> None:
    thread = LoopThread("tidemq-test")
    rounds = [0]

    async def hydra() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            rounds[0] += 1
            asyncio.get_running_loop().create_task(hydra())
            raise

    started = threading.Event()

    async def first() -> None:
        started.set()
        await hydra()

    thread.submit(first())
    assert started.wait(5)
    thread.stop(1.0)
    thread._thread.join(5.0)
    assert thread.loop.is_closed(), f"_finish still cancelling after {rounds[0]} rounds"
