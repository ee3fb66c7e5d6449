"""LoopThread.stop from inside another event loop (what a garbage-collected, unclosed
``Admin(...)`` does when its finalizer runs while the application's loop is running),
from its own thread, twice, and racing submissions while the loop finishes."""

from __future__ import annotations

import asyncio
import concurrent.futures
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
