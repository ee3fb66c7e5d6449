"""The one HTTP client transport of tidemq: brokers (to the coordinator and to other
brokers), clients and the CLI's asynchronous paths all send requests through
:class:`HttpTransport`, and all read error answers the same way.

It is the error boundary: aiohttp, ssl and OS errors become
:class:`~tidemq.errors.ConnectionFailed`, timeouts :class:`~tidemq.errors.RequestTimedOut`
(``from`` the original), and error bodies ``{"error": {"code", "message"}}`` the
matching TideError. Nothing above this module sees an aiohttp or ssl exception.
Every request has a timeout; the connection pool is bounded per host.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp

from tidemq.errors import (
    ERRORS_BY_CODE,
    ConnectionFailed,
    InternalError,
    InvalidRequest,
    RequestTimedOut,
    TideError,
    Unavailable,
)


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
