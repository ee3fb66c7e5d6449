"""The client's only I/O: one asyncio loop on a background thread, one aiohttp session.

* :class:`LoopThread` runs an event loop on a daemon thread; user threads hand it
  coroutines with :meth:`LoopThread.call` (blocking, bounded) or ``submit``.
* :class:`Transport` owns the ``aiohttp.ClientSession`` (keep-alive, TLS client
  context, ``connections_per_host`` connections per host, ``Authorization: Bearer``
  when a token is set) and is the error boundary: aiohttp, ssl and OS errors become
  :class:`~tidemq.errors.ConnectionFailed`, timeouts become
  :class:`~tidemq.errors.RequestTimedOut` (``from`` the original), and error bodies
  ``{"error": {"code", "message"}}`` become the matching TideError. Nothing above
  this module sees an aiohttp or ssl exception.
* Coordinator calls go to the bootstrap URLs in turn, starting with the last one that
  answered; a connection failure moves on to the next.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import random
import ssl
import threading
from collections.abc import Awaitable, Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp

from tidemq.client.config import ConnectionConfig, ResultTimeout
from tidemq.errors import (
    ERRORS_BY_CODE,
    ClientClosed,
    ConnectionFailed,
    InternalError,
    InvalidRequest,
    RequestTimedOut,
    TideError,
    Unavailable,
)
from tidemq.tls import TlsFiles, client_context

log = logging.getLogger("tidemq.client")

BATCH_TYPE = "application/vnd.tidemq.batches"
JSON_TYPE = "application/json"
T = TypeVar("T")


def error_from_response(status: int, body: bytes) -> TideError:
    """The TideError for an HTTP error answer; tolerant of bodies that are not ours."""
    code, message = "", ""
    try:
        parsed = json.loads(body)
        error = parsed["error"]
        code, message = str(error["code"]), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    cls = ERRORS_BY_CODE.get(code)
    if cls is not None and code != "internal_error":
        return cls(message)
    if code == "internal_error" or status == 500:
        return InternalError(message or f"HTTP {status}")
    label = f"{code or 'HTTP ' + str(status)}: {message}".rstrip(": ")
    if status in (502, 503):
        return Unavailable(label)
    if status == 504:
        return RequestTimedOut(label)
    if 400 <= status < 500:
        return InvalidRequest(label)
    return InternalError(label)


def translate_exception(exc: BaseException, what: str) -> TideError:
    """The TideError for a transport failure (aiohttp, ssl, OS, timeout)."""
    if isinstance(exc, TideError):
        return exc
    if isinstance(exc, TimeoutError):
        return RequestTimedOut(f"{what}: timed out")
    if isinstance(exc, aiohttp.ClientError | ssl.SSLError | OSError):
        return ConnectionFailed(f"{what}: {type(exc).__name__}: {exc}")
    return InternalError(f"{what}: {type(exc).__name__}: {exc}")


def backoff_seconds(attempt: int, base_ms: int, max_ms: int) -> float:
    """Exponential, capped, with full jitter in [half, whole]: attempt 1 ~ base."""
    ceiling = min(max_ms, base_ms * (1 << min(max(attempt - 1, 0), 16)))
    jitter: float = 0.5 + random.random() / 2
    return ceiling * jitter / 1000.0


class Transport:
    """HTTP(S) requests with error translation. Create and use inside the loop."""

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
        connector = aiohttp.TCPConnector(
            ssl=ssl_context,
            limit=0,
            limit_per_host=config.connections_per_host,
            keepalive_timeout=60,
            # Before CPython 3.12.8 a TLS connection closed mid-request (a cancelled
            # long-poll) leaves its socket open until the TLS shutdown finishes, which
            # never happens once the client's loop stops: abort them on close instead.
            enable_cleanup_closed=_NEEDS_CLEANUP_CLOSED,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=config.request_timeout_ms / 1000),
            raise_for_status=False,
        )
        self._coordinator_index = 0

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
    ) -> tuple[bytes, Mapping[str, str]]:
        """One request; the body and headers of a 2xx answer, else a TideError."""
        what = f"{method} {url}"
        extra: dict[str, Any] = {}
        if timeout_ms is not None:
            extra["timeout"] = aiohttp.ClientTimeout(total=timeout_ms / 1000)
        try:
            async with self._session.request(
                method,
                url,
                params=params,
                json=json_body,
                data=data,
                headers=headers,
                **extra,
            ) as response:
                body = await response.read()
                if response.status >= 400:
                    raise error_from_response(response.status, body)
                return body, response.headers
        except TideError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate_exception(exc, what) from exc

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        body, _ = await self.request(method, url, **kwargs)
        if not body:
            return {}
        try:
            return json.loads(body)
        except ValueError as exc:
            raise InternalError(f"{method} {url}: answer is not JSON") from exc

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


_NEEDS_CLEANUP_CLOSED = bool(getattr(aiohttp.connector, "NEEDS_CLEANUP_CLOSED", False))


class LoopThread:
    """An asyncio loop running on its own daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self._thread.is_alive() or self.loop.is_closed():
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
        """Stops the loop (pending tasks are cancelled) and joins the thread."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("client loop thread did not stop within %s s", timeout_s)
            return
        pending = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


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
