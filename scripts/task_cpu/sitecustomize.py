"""CPU per kind of asyncio task in every tidemq process: a profiling aid, not product
code. docs/BENCHMARKS.md, "Fifteenth session", shows what it is for.

Put this directory first on PYTHONPATH, as an absolute path (the brokers run in
their own directories), and name an output directory in TIDE_TASK_CPU for every
process to measure (``tide up`` passes its environment to the coordinator and the
brokers; a client inherits it from its shell):

    TIDE_TASK_CPU=/tmp/tc PYTHONPATH=$PWD/scripts/task_cpu tide up --data-dir D --detach
    TIDE_TASK_CPU=/tmp/tc PYTHONPATH=$PWD/scripts/task_cpu \
        python src/tidemq/cli/bench_latency.py sweep --data-dir D ...
    python scripts/task_cpu_report.py /tmp/tc --seconds 8     # while the load runs

Each event loop gets a task factory that wraps every task's coroutine: the thread CPU
time (``time.thread_time``) of each step of the task is added to its kind, the
coroutine's qualified name (for the request channel's ``_serve``, with the request's
target). Once a second each process writes its cumulative counters, its process CPU
and its loop thread's CPU to ``$TIDE_TASK_CPU/<pid>.json``. The loop thread's CPU that
no task step accounts for is the event loop's own work: I/O callbacks (TLS, frame
parsing), timers, and anything called with ``call_soon`` (the journal's fdatasync).
The cost of the accounting itself is two ``thread_time`` calls per step (~1 us).
"""

from __future__ import annotations

import collections
import collections.abc
import json
import os
import sys
import threading
import time
from typing import Any

_OUT = os.environ.get("TIDE_TASK_CPU")
_counts: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])
_loop_threads: set[int] = set()


class _Timed(collections.abc.Coroutine):  # type: ignore[type-arg]
    """A coroutine that adds the CPU of each of its steps to its kind."""

    __slots__ = ("_coro", "_counter")

    def __init__(self, coro: Any, counter: list[float]) -> None:
        self._coro = coro
        self._counter = counter

    def send(self, value: Any) -> Any:
        started = time.thread_time()
        try:
            return self._coro.send(value)
        finally:
            self._counter[0] += 1
            self._counter[1] += time.thread_time() - started

    def throw(self, *args: Any) -> Any:
        started = time.thread_time()
        try:
            return self._coro.throw(*args)
        finally:
            self._counter[0] += 1
            self._counter[1] += time.thread_time() - started

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)


def _kind(coro: Any) -> str:
    kind = getattr(coro, "__qualname__", type(coro).__name__)
    if kind == "_serve":  # service/channel.py: one task per channel request
        frame = getattr(getattr(coro, "cr_frame", None), "f_locals", {}).get("frame")
        target = getattr(frame, "target", None)
        if target:
            kind = f"_serve {target}"
    return kind


def _install(loop: Any) -> Any:
    import asyncio

    def factory(loop: Any, coro: Any, **kwargs: Any) -> Any:
        _loop_threads.add(threading.get_ident())
        counter = _counts[_kind(coro)]
        counter[2] += 1
        return asyncio.Task(_Timed(coro, counter), loop=loop, **kwargs)

    loop.set_task_factory(factory)
    return loop


def _dump(path: str) -> None:
    name = " ".join(os.path.basename(a) for a in sys.argv[:4])
    while True:
        time.sleep(1.0)
        loop_cpu = 0.0
        for ident in list(_loop_threads):
            try:
                loop_cpu += time.clock_gettime(time.pthread_getcpuclockid(ident))
            except OSError:
                pass
        data = {
            "pid": os.getpid(),
            "name": name,
            "t": time.monotonic(),
            "process_cpu": time.process_time(),
            "loop_threads_cpu": loop_cpu,
            "tasks": {kind: list(counter) for kind, counter in list(_counts.items())},
        }
        with open(path + ".tmp", "w") as out:
            json.dump(data, out)
        os.replace(path + ".tmp", path)


if _OUT:
    import uvloop

    _new_event_loop = uvloop.new_event_loop

    def _patched_new_event_loop() -> Any:
        return _install(_new_event_loop())

    uvloop.new_event_loop = _patched_new_event_loop
    os.makedirs(_OUT, exist_ok=True)
    threading.Thread(
        target=_dump, args=(os.path.join(_OUT, f"{os.getpid()}.json"),), daemon=True
    ).start()
