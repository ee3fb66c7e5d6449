"""The client's only I/O: one asyncio loop on a background thread, one aiohttp session.

* :class:`LoopThread` runs an event loop on a daemon thread; user threads hand it
  coroutines with :meth:`LoopThread.call` (blocking, bounded) or ``submit``.
* :class:`Transport` is the shared :class:`tidemq.transport.HttpTransport` (one
  error boundary for broker, client and CLI) configured from the client's settings:
  TLS client context, ``connections_per_host``, ``Authorization: Bearer`` when a token
  is set.
* Coordinator calls go to the bootstrap URLs in turn, starting with the last one that
  answered; a connection failure moves on to the next.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import ssl
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from tidemq import eventloop
from tidemq.client.config import ConnectionConfig, ResultTimeout
from tidemq.errors import (
    ClientClosed,
    ConnectionFailed,
    InvalidRequest,
    TideError,
)
from tidemq.tls import TlsFiles, client_context
from tidemq.transport import (  # re-exported: the client's error boundary is the shared one
    HttpTransport,
    UnrecognizedRefusal,
    error_from_response,
    translate_exception,
)

log = logging.getLogger("tidemq.client")

BATCH_TYPE = "application/vnd.tidemq.batches"
JSON_TYPE = "application/json"
T = TypeVar("T")


def backoff_seconds(attempt: int, base_ms: int, max_ms: int) -> float:
    """Exponential, capped, with full jitter in [half, whole]: attempt 1 ~ base."""
    ceiling = min(max_ms, base_ms * (1 << min(max(attempt - 1, 0), 16)))
    jitter: float = 0.5 + random.random() / 2
    return ceiling * jitter / 1000.0


__all__ = ["Transport", "UnrecognizedRefusal", "error_from_response", "translate_exception"]


class Transport(HttpTransport):
    """The client's requests: TLS and token from its configuration, coordinator calls
    over every bootstrap URL. Create and use inside the loop."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        ssl_context: ssl.SSLContext | bool = True
        if any(url.startswith("https://") for url in config.bootstrap):
            try:
                ssl_context = client_context(
                    TlsFiles(config.ca_file, config.cert_file, config.key_file)
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConnectionFailed(f"cannot load TLS files: {exc}") from exc
        headers = {"User-Agent": "tidemq-python"}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        super().__init__(
            ssl_context, headers, config.connections_per_host, config.request_timeout_ms
        )
        self._coordinator_index = 0

    async def coordinator(self, method: str, path: str, **kwargs: Any) -> Any:
        """A JSON request to the coordinator, trying each bootstrap URL in turn."""
        urls = self.config.bootstrap
        last: TideError | None = None
        # One more round than URLs: a pooled keep-alive connection that the server closed
        # fails once with ServerDisconnected; the coordinator API is safe to repeat.
        for step in range(len(urls) + 1):
            index = (self._coordinator_index + step) % len(urls)
            try:
                answer = await self.request_json(method, urls[index] + path, **kwargs)
            except ConnectionFailed as exc:
                last = exc
                continue
            self._coordinator_index = index
            return answer
        if last is None:  # pragma: no cover - bootstrap is never empty
            raise ConnectionFailed("no coordinator URL")
        raise last


FINISH_ROUNDS_MAX = 100  # rounds of cancelling new tasks when a client loop stops


class LoopThread:
    """An asyncio loop running on its own daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = eventloop.new_event_loop()
        # Reentrant: a signal handler may call or stop while this thread is in submit.
        self._lock = threading.RLock()
        self._accepting = True  # until _finish starts: submit() refuses from then on
        self._stop_posted = False  # one loop.stop only (a second ends _finish's runs)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self._finish()  # here, so that a stop() that gave up waiting still ends it

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if not self._accepting:
                coroutine.close()
                raise ClientClosed("the client is closed")
            return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        """Runs ``coroutine`` on the loop and waits for it, at most ``timeout_s``."""
        if self.in_loop_thread:
            coroutine.close()
            raise InvalidRequest("a blocking client call cannot run inside a client callback")
        future = self.submit(coroutine)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise ResultTimeout(f"no answer within {timeout_s} s") from exc
        except concurrent.futures.CancelledError as exc:
            raise ClientClosed("the client closed while the call was running") from exc

    def call_soon(self, callback: Any, *args: Any) -> None:
        """Thread-safe; silently dropped once the loop is closed."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the loop and waits up to ``timeout_s`` for its thread to cancel what
        is pending, run it to completion and close the loop. If the thread is still
        busy then (a callback blocks it), it finishes that on its own afterwards.
        From the loop's own thread it only asks: the loop stops when the current
        callback returns."""
        with self._lock:
            if self._accepting and not self._stop_posted:
                self._stop_posted = True
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    self.loop.call_soon_threadsafe(self.loop.stop)
        if self.in_loop_thread:
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("client loop thread did not stop within %s s", timeout_s)

    def _finish(self) -> None:
        """The loop's thread, once the loop stopped: cancels what is left (each task
        once; tasks made meanwhile, e.g. from submissions queued before the refusal
        began, in later rounds), runs it to completion, and closes the loop."""
        with self._lock:
            self._accepting = False
        cancelled: set[asyncio.Task[Any]] = set()
        for _ in range(FINISH_ROUNDS_MAX):  # a cancelled task may make new tasks for ever
            pending = self._new_tasks(cancelled)
            if not pending:
                self._run_until(asyncio.sleep(0))  # queued submissions become tasks
                pending = self._new_tasks(cancelled)
                if not pending:
                    break
            cancelled.update(pending)
            for task in pending:
                task.cancel()
            self._run_until(asyncio.gather(*pending, return_exceptions=True))
        else:
            log.warning("client loop: tasks kept making tasks while it stopped")
        self._run_until(self.loop.shutdown_asyncgens())
        self.loop.close()

    def _new_tasks(self, seen: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks(self.loop) if not t.done() and t not in seen]

    def _run_until(self, awaitable: Awaitable[Any]) -> None:
        future = asyncio.ensure_future(awaitable, loop=self.loop)
        for _ in range(3):  # a loop.stop posted before the refusal ends a run early
            try:
                self.loop.run_until_complete(future)
                return
            except RuntimeError:
                if future.done():
                    raise
        log.warning("client loop did not finish its last tasks")


async def sleep_or(event: asyncio.Event, seconds: float) -> bool:
    """Sleeps up to ``seconds``; returns True early if ``event`` is set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def gather_logged(awaitables: list[Awaitable[Any]], what: str) -> None:
    for result in await asyncio.gather(*awaitables, return_exceptions=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.warning("%s failed: %s", what, result)
