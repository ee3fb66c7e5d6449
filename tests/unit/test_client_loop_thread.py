"""LoopThread.stop from inside another event loop: what a garbage-collected, unclosed
``Admin(...)`` does when its finalizer runs while the application's loop is running."""

from __future__ import annotations

import asyncio

from tidemq.client.transport import LoopThread


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
