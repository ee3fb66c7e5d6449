"""The event loop every tidemq process runs: uvloop when installed, else asyncio's.

Why: the brokers, the coordinator and the client spend most of their CPU in the event
loop and its TLS transports; uvloop (libuv, Cython) does the same work in less CPU,
which on a 2-core machine is latency. ``TIDE_EVENT_LOOP=asyncio`` forces the standard
loop (for comparisons, or if uvloop misbehaves somewhere).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


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
    loop.set_exception_handler(_exception_handler)
    return loop


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's handler, except for one known uvloop race (MagicStack/uvloop#506):
    TLS bytes read on a connection whose socket was closed meanwhile (a peer's answer
    crossing our close) make its SSL layer write to the closed socket, which uvloop
    logs as a "Fatal error on SSL protocol" with a traceback. Nothing is lost (the
    connection was being closed); a user saw it once in ~30 runs of `tide consume`
    and took it for a failure. Logged at DEBUG instead; everything else as before."""
    error = context.get("exception")
    if (
        isinstance(error, RuntimeError)
        and "the handler is closed" in str(error)
        and str(context.get("message", "")).startswith("Fatal error on SSL protocol")
    ):
        log.debug("TLS connection closed while its peer was still writing: %s", error)
        return
    loop.default_exception_handler(context)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
