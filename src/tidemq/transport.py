"""The one HTTP client transport of tidemq: brokers (to the coordinator and to other
brokers), clients and the CLI's asynchronous paths all send requests through
:class:`HttpTransport`, and all read error answers the same way.

It is the error boundary: aiohttp, ssl and OS errors become
:class:`~tidemq.errors.ConnectionFailed`, timeouts :class:`~tidemq.errors.RequestTimedOut`
(``from`` the original), and error bodies ``{"error": {"code", "message"}}`` the
matching TideError. Nothing above this module sees an aiohttp or ssl exception.
Every request has a timeout; the connection pool is bounded per host.

The hot paths (``CHANNEL_TARGETS``: produce, multi-partition fetch, replica fetch) go
over the peer's request channel when it has one (service/channel.py: one WebSocket per
peer, requests as frames, ~4x less CPU per request than HTTP here), and over plain
HTTP otherwise: a peer that answers the upgrade with 404/405/400 is asked again only
after ``CHANNEL_RETRY_S``. The answers and errors are the same either way.
``TIDE_CHANNEL=0`` turns the channel off (comparisons, or a proxy that breaks
WebSockets).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import ssl
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec

from tidemq.errors import (
    ERRORS_BY_CODE,
    ConnectionFailed,
    InternalError,
    InvalidRequest,
    RequestTimedOut,
    TideError,
    Unavailable,
)
from tidemq.wire.channel import (
    CHANNEL_PATH,
    HELLO_ID,
    ChannelAnswer,
    decode_answer,
    encode_request,
)


class UnrecognizedRefusal(InvalidRequest):
    """A 4xx answer whose error code this side does not know (a newer peer, or a
    proxy's own page). Whether the server acted on the request before refusing is
    not known, so a producer takes a batch so answered as "outcome unknown", never as
    "not appended" (which would renumber later batches and could write them twice)."""

    code = "unrecognized_refusal"  # named by the side that reads the answer; no server sends it


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
        return UnrecognizedRefusal(label)
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


CHANNEL_TARGETS = frozenset({"POST /v1/produce", "POST /v1/fetch", "POST /v1/replica/fetch"})
CHANNEL_RETRY_S = 60.0
CHANNEL_PENDING_MAX = 1024
# A new channel waits this long for the peer's hello (sent right after the upgrade:
# it normally comes within milliseconds) before it is used; a peer of the previous
# version sends none, and bodies over CHANNEL_BODY_DEFAULT (every peer's channel
# takes such a frame) then go over HTTP, as they did with that version.
CHANNEL_BODY_DEFAULT = 60 * 1024
HELLO_WAIT_S = 0.25
# Above the largest answer: a consumer fetch is capped at 64 MiB of batches in total,
# plus per-partition framing and one batch past the budget.
_CHANNEL_FRAME_MAX = 128 * 1024 * 1024


class _NotOnChannel(Exception):
    """The peer does not serve this target over its channel: use HTTP."""


class _Channel:
    """One WebSocket to one peer; requests matched to answers by id.

    The peer's hello (its first frame) says its body limit: a body up to it goes over
    the channel, a larger one over HTTP (413 past the limit; a frame past the peer's
    limit would close the whole channel, failing every request waiting on it). Every
    body the peer takes going over the one channel keeps a producer's pipelined
    batches of a partition in order: requests spread over several HTTP connections
    can overtake each other (an out_of_order_sequence, and every later batch of the
    partition sent again). A channel is used once its hello has come, or after
    ``HELLO_WAIT_S`` without one: a peer of the previous version sends none and keeps
    ``CHANNEL_BODY_DEFAULT`` (larger bodies over HTTP, as that version had it)."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, what: str) -> None:
        self.socket = socket
        self.what = what
        self._ids = itertools.count(HELLO_ID + 1)
        self._pending: dict[int, asyncio.Future[ChannelAnswer]] = {}
        self.max_body_bytes = CHANNEL_BODY_DEFAULT
        self._hello = asyncio.Event()  # set by the hello, or when the channel closes
        self._reader = asyncio.ensure_future(self._read())

    async def wait_hello(self, timeout_s: float) -> None:
        """Until the hello has come (or the channel closed), at most ``timeout_s``: a
        peer without a hello keeps the default limit (a hello that comes later still
        raises it)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._hello.wait()
        except TimeoutError:
            pass

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def call(
        self, target: str, params: Mapping[str, str] | None, body: bytes, timeout_s: float
    ) -> ChannelAnswer:
        if len(self._pending) >= CHANNEL_PENDING_MAX:
            raise Unavailable(f"{self.what}: {CHANNEL_PENDING_MAX} requests already waiting")
        request_id = next(self._ids) & 0xFFFFFFFF
        if request_id == HELLO_ID:  # wrapped around
            request_id = next(self._ids) & 0xFFFFFFFF
        frame = encode_request(request_id, target, params, body)
        answer = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            async with asyncio.timeout(timeout_s):
                await self.socket.send_bytes(frame)
                result: ChannelAnswer = await answer
                return result
        finally:
            self._pending.pop(request_id, None)

    async def _read(self) -> None:
        failure: BaseException | None = None
        try:
            async for message in self.socket:
                if message.type is not aiohttp.WSMsgType.BINARY:
                    break
                answer = decode_answer(message.data)
                if answer.request_id == HELLO_ID:
                    if self._hello.is_set():
                        raise ValueError("a second hello")
                    self.max_body_bytes = _hello_body_max(answer)
                    self._hello.set()
                    continue
                waiter = self._pending.get(answer.request_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
        except Exception as exc:
            failure = exc
        finally:
            error = ConnectionFailed(f"{self.what}: channel closed ({failure!r})")
            self._hello.set()
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(error)
            if not self.socket.closed:
                await self.socket.close()

    async def close(self) -> None:
        await self.socket.close()
        await asyncio.gather(self._reader, return_exceptions=True)


@functools.lru_cache(maxsize=4096)
def _route(method: str, url: str) -> tuple[str, str] | tuple[()]:
    """(base URL, target) if the request's kind may go over a channel, else ().
    Remembered: a client sends the same few URLs (one per peer and kind) thousands of
    times a second, and parsing one is pure Python each time."""
    parts = urlsplit(url)
    target = f"{method} {parts.path}"
    if target not in CHANNEL_TARGETS or parts.query:
        return ()
    return f"{parts.scheme}://{parts.netloc}", target


def _retrieve(attempt: asyncio.Future[Any]) -> None:
    """A connection attempt every waiter gave up on may fail unobserved: no warning."""
    if not attempt.cancelled():
        attempt.exception()


def _hello_body_max(answer: ChannelAnswer) -> int:
    """The body limit a hello says (a ValueError closes the channel)."""
    body_max = json.loads(answer.body).get("max_body_bytes") if answer.body else None
    if answer.status != 200 or type(body_max) is not int or body_max < 0:
        raise ValueError(f"a malformed hello: {answer.status} {answer.body[:100]!r}")
    return body_max


_NEEDS_CLEANUP_CLOSED = bool(getattr(aiohttp.connector, "NEEDS_CLEANUP_CLOSED", False))


class HttpTransport:
    """HTTP(S) requests with error translation. Create, use and close inside one loop."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | bool,
        headers: Mapping[str, str],
        connections_per_host: int,
        request_timeout_ms: int,
    ) -> None:
        connector = aiohttp.TCPConnector(
            ssl=ssl_context,
            limit=0,
            limit_per_host=connections_per_host,
            keepalive_timeout=60,
            # Before CPython 3.12.8 a TLS connection closed mid-request (a cancelled
            # long-poll) leaves its socket open until the TLS shutdown finishes, which
            # never happens once the client's loop stops: abort them on close instead.
            enable_cleanup_closed=_NEEDS_CLEANUP_CLOSED,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=request_timeout_ms / 1000),
            raise_for_status=False,
        )
        self._request_timeout_s = request_timeout_ms / 1000
        self._use_channels = os.environ.get("TIDE_CHANNEL", "1") != "0"
        self._channels: dict[str, _Channel] = {}
        self._connecting: dict[str, asyncio.Future[_Channel | None]] = {}
        self._closed = False
        self._no_channel_until: dict[tuple[str, str], float] = {}  # (base, target)

    async def close(self) -> None:
        self._closed = True
        for attempt in self._connecting.values():
            attempt.cancel()
        await asyncio.gather(*self._connecting.values(), return_exceptions=True)
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)
        await self._session.close()

    async def _channel(self, base: str, timeout_s: float) -> _Channel | None:
        """The peer's channel once its hello has come (or HELLO_WAIT_S passed without
        one); None for a peer without a channel. One connection attempt per peer at a
        time, shared by every request that waits for it (each for at most its own
        timeout), and they resume in the order they came."""
        channel = self._channels.get(base)
        if channel is not None and not channel.closed:
            return channel
        attempt = self._connecting.get(base)
        if attempt is None or attempt.done():
            attempt = self._connecting[base] = asyncio.ensure_future(self._connect(base))
            attempt.add_done_callback(_retrieve)
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(attempt)

    async def _connect(self, base: str) -> _Channel | None:
        try:
            socket = await self._session.ws_connect(
                base + CHANNEL_PATH,
                autoping=True,
                max_msg_size=_CHANNEL_FRAME_MAX,
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (400, 404, 405):  # an older peer: plain HTTP for a while
                self._no_channel_until[(base, "")] = time.monotonic() + CHANNEL_RETRY_S
                return None
            raise
        channel = _Channel(socket, base)
        try:
            await channel.wait_hello(HELLO_WAIT_S)
        except BaseException:
            await channel.close()
            raise
        if self._closed:
            await channel.close()
            raise ConnectionFailed(f"{base}: the transport closed")
        self._channels[base] = channel
        return channel

    def _channel_target(self, method: str, url: str) -> tuple[str, str] | None:
        """(base URL, target) when this request may go over a channel."""
        if not self._use_channels:
            return None
        routed = _route(method, url)
        if not routed:
            return None
        if not self._no_channel_until:  # the usual case: every peer has its channel
            return routed
        base, target = routed
        now = time.monotonic()
        for key in ((base, ""), (base, target)):
            until = self._no_channel_until.get(key)
            if until is not None:
                if now < until:
                    return None
                del self._no_channel_until[key]
        return base, target

    async def _over_channel(
        self,
        base: str,
        target: str,
        params: Mapping[str, str] | None,
        data: bytes,
        timeout_s: float,
    ) -> tuple[bytes, Mapping[str, str]]:
        deadline = time.monotonic() + timeout_s
        channel = await self._channel(base, timeout_s)
        if channel is None or len(data) > channel.max_body_bytes:
            raise _NotOnChannel()
        answer = await channel.call(target, params, data, deadline - time.monotonic())
        status, headers, body = answer.status, answer.headers, answer.body
        if status == 404 and b'"not_found"' in body:
            self._no_channel_until[(base, target)] = time.monotonic() + CHANNEL_RETRY_S
            raise _NotOnChannel()
        if status >= 400:
            raise error_from_response(status, body)
        return body, headers

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
        timeout_s = self._request_timeout_s if timeout_ms is None else timeout_ms / 1000
        routed = self._channel_target(method, url) if json_body is None else None
        extra: dict[str, Any] = {}
        if timeout_ms is not None:
            extra["timeout"] = aiohttp.ClientTimeout(total=timeout_s)
        if routed is not None:
            started = time.monotonic()
            try:
                return await self._over_channel(*routed, params, data or b"", timeout_s)
            except _NotOnChannel:  # over HTTP, in what is left of the request's time
                remaining = timeout_s - (time.monotonic() - started)
                if remaining <= 0:
                    raise RequestTimedOut(f"{what}: timed out") from None
                extra["timeout"] = aiohttp.ClientTimeout(total=remaining)
            except TideError:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise translate_exception(exc, what) from exc
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
            return msgspec.json.decode(body)  # as json.loads, in a fifth of the time
        except ValueError:
            pass  # what msgspec refuses and json.loads reads (a lone surrogate, NaN, a BOM)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise InternalError(f"{method} {url}: answer is not JSON") from exc
