"""The event loop every tidemq process runs: uvloop when installed, else asyncio's.

Why: the brokers, the coordinator and the client spend most of their CPU in the event
loop and its TLS transports; uvloop (libuv, Cython) does the same work in less CPU,
which on a 2-core machine is latency. ``TIDE_EVENT_LOOP=asyncio`` forces the standard
loop (for comparisons, or if uvloop misbehaves somewhere).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _uvloop() -> Any | None:
    if os.environ.get("TIDE_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop


def new_event_loop() -> asyncio.AbstractEventLoop:
    uvloop = _uvloop()
    loop: asyncio.AbstractEventLoop = (
        uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    )
    return loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
