"""The request channel: chosen HTTP requests carried over one WebSocket per peer.

Why: an HTTPS request through aiohttp costs ~220-260 us of CPU (client and server
together, measured here), a WebSocket message round trip ~60 us. The hot paths of
tidemq (produce, multi-partition fetch, replica fetch) send thousands of small
requests a second, and on a 2-core machine that CPU *is* the latency. So a peer that
knows the channel opens ``GET /v1/channel`` (a WebSocket upgrade on the same HTTPS
port, same certificate) and sends those requests as frames; anything else, and any
peer that does not know the channel, uses plain HTTP. Semantics are exactly the
HTTP endpoint's: same handler, same authorization rule (``callers``), same status
codes and error bodies; only the framing differs. docs/PROTOCOL.md "Request channel".

Frames are binary WebSocket messages, big-endian::

    request:  id u32 | target_length u16 | target ("POST /v1/produce", UTF-8)
              | query_length u16 | query (URL-encoded) | body
    answer:   id u32 | status u16 | type_length u16 | content type
              | headers_length u16 | headers (JSON object, or empty) | body

The server's first frame is a hello: an answer with id 0 whose JSON body holds its body
limit (``{"max_body_bytes": N}``); request ids start at 1.

Requests on one channel are served concurrently (a long-poll fetch does not hold up
a produce) and answered in any order, matched by id. Bounds: a frame is at most the
service's body limit plus 64 KiB; at most ``REQUESTS_MAX`` requests per channel are
served at once, a request past that is answered 503 at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

from tidemq.errors import (
    Forbidden,
    InvalidRequest,
    InvariantViolation,
    RequestTooLarge,
    TideError,
    Unavailable,
)
from tidemq.service.callers import ANY, Callers, Identity, Location
from tidemq.service.failstop import fail_stop
from tidemq.service.http import Endpoint, grant_values
from tidemq.wire.channel import (
    CHANNEL_PATH,
    FRAME_HEAD_MAX,
    HELLO_ID,
    ChannelAnswer,
    ChannelRequest,
    decode_request,
    encode_answer,
)

log = logging.getLogger(__name__)

REQUESTS_MAX = 256


@dataclass(frozen=True)
class Reply:
    content_type: str
    body: bytes
    headers: dict[str, str] | None = None
    done: Callable[[], None] | None = None  # called once the answer is written (or dropped)


# What an operation gets: the query and the body; what it returns: its 200 answer, or
# it raises a TideError (answered with its status and error body, as over HTTP).
OperationHandler = Callable[[Mapping[str, str], bytes], Awaitable[Reply]]


@dataclass(frozen=True)
class Operation:
    """An HTTP endpoint also served over the channel. ``callers`` is the endpoint's."""

    method: str
    path: str
    handler: OperationHandler
    callers: Callers

    @property
    def target(self) -> str:
        return f"{self.method} {self.path}"


def channel_endpoint(operations: Sequence[Operation], max_body_bytes: int) -> Endpoint:
    by_target = {operation.target: operation for operation in operations}
    hello = json.dumps({"max_body_bytes": max_body_bytes}).encode()
    open_sockets: set[web.WebSocketResponse] = set()
    for operation in operations:
        if any(grant.location == "path" for grant in operation.callers.broker_self_grants()):
            raise ValueError(f"{operation.target}: a channel operation has no path values")

    async def channel(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(
            max_msg_size=max_body_bytes + FRAME_HEAD_MAX, compress=False, autoping=True
        )
        if not socket.can_prepare(request).ok:
            raise InvalidRequest(f"GET {CHANNEL_PATH} expects a WebSocket upgrade")
        tls = request.transport is not None and (
            request.transport.get_extra_info("ssl_object") is not None
        )
        identity = (
            Identity.from_peercert(request.transport.get_extra_info("peercert"))
            if tls and request.transport is not None
            else None
        )
        await socket.prepare(request)
        # The hello (id 0): this peer's body limit, so that the client sends every body
        # up to it over the channel, in order, and only larger ones over HTTP.
        await _send(socket, ChannelAnswer(HELLO_ID, 200, "application/json", {}, hello))
        serving: set[asyncio.Task[None]] = set()
        # Targets this socket's identity may call whatever the request says (a role
        # grant): authorized once per channel, not per request.
        allowed: set[str] = set()
        open_sockets.add(socket)
        try:
            async for message in socket:
                if message.type is not WSMsgType.BINARY:
                    await socket.close(code=1003, message=b"binary frames only")
                    break
                try:
                    frame = decode_request(message.data)
                except ValueError as error:
                    await socket.close(code=1002, message=str(error).encode()[:120])
                    break
                if len(serving) >= REQUESTS_MAX:
                    busy = Unavailable(f"more than {REQUESTS_MAX} requests in flight")
                    await _send(socket, _error_answer(frame.request_id, busy))
                    continue
                operation = by_target.get(frame.target)
                task = asyncio.ensure_future(
                    _serve(socket, operation, frame, tls, identity, allowed, max_body_bytes)
                )
                serving.add(task)
                task.add_done_callback(serving.discard)
        finally:
            open_sockets.discard(socket)
            for task in serving:
                task.cancel()
            await asyncio.gather(*serving, return_exceptions=True)
        return socket

    async def close_all(_: web.Application) -> None:
        """Server shutdown: peers are told to go (1001) so that no handler holds it up;
        their waiting requests fail with connection_failed, as on any lost connection."""
        for socket in list(open_sockets):
            await socket.close(code=1001, message=b"server shutting down")

    return Endpoint(
        "GET",
        CHANNEL_PATH,
        channel,
        "WebSocket upgrade: the request channel (docs/PROTOCOL.md); "
        + ", ".join(sorted(by_target)),
        responses={"101": "switching to the request channel", "400": "not a WebSocket upgrade"},
        callers=ANY,
        on_shutdown=close_all,
    )


async def _serve(
    socket: web.WebSocketResponse,
    operation: Operation | None,
    frame: ChannelRequest,
    tls: bool,
    identity: Identity | None,
    allowed: set[str],
    max_body_bytes: int,
) -> None:
    try:
        if operation is None:
            raise _NotServed(f"{frame.target} is not served over the channel")
        if len(frame.body) > max_body_bytes:  # as HTTP's client_max_size: 413
            raise RequestTooLarge(f"body of {len(frame.body)} bytes exceeds {max_body_bytes}")
        query: dict[str, str] = {}
        if frame.query:  # most channel requests have none
            pairs = parse_qsl(frame.query, keep_blank_values=True)
            query = dict(pairs)
            if len(query) != len(pairs):
                raise InvalidRequest("a query parameter is given twice")
        authorize = tls and frame.target not in allowed
        if authorize and _authorize(operation, identity, query, frame.body):
            allowed.add(frame.target)
        reply = await operation.handler(query, frame.body)
        try:
            await _send(
                socket,
                ChannelAnswer(
                    frame.request_id, 200, reply.content_type, reply.headers or {}, reply.body
                ),
            )
        finally:
            if reply.done is not None:
                reply.done()
        return
    except _NotServed as error:
        answer = ChannelAnswer(
            frame.request_id,
            404,
            "application/json",
            {},
            json.dumps({"error": {"code": "not_found", "message": str(error)}}).encode(),
        )
    except TideError as error:
        answer = _error_answer(frame.request_id, error)
    except InvariantViolation as error:
        fail_stop(f"invariant broken serving {frame.target} over the channel: {error}")
    except Exception:
        log.exception("unhandled error serving %s over the channel", frame.target)
        answer = ChannelAnswer(
            frame.request_id,
            500,
            "application/json",
            {},
            b'{"error": {"code": "internal_error", "message": "internal error"}}',
        )
    await _send(socket, answer)


class _NotServed(Exception):
    pass


def _error_answer(request_id: int, error: TideError) -> ChannelAnswer:
    body = json.dumps(error.to_json()).encode()
    return ChannelAnswer(request_id, error.http_status, "application/json", {}, body)


async def _send(socket: web.WebSocketResponse, answer: ChannelAnswer) -> None:
    if socket.closed:
        return  # the peer left: it fails its own waiters
    try:
        await socket.send_bytes(encode_answer(answer))
    except ConnectionError:
        return


def _authorize(
    operation: Operation, identity: Identity | None, query: Mapping[str, str], body: bytes
) -> bool:
    """The endpoint's rule, as the authorization middleware applies it over HTTP.
    Raises Forbidden; returns whether the grant held whatever the request says (a
    role grant), so that the channel need not ask again for this identity."""
    if identity is None:
        raise Forbidden("the client certificate does not have exactly one common name")
    values: dict[tuple[Location, str], Any] = {}
    needs_values = operation.callers.needs_values(identity)
    if needs_values:  # as the HTTP middleware reads them (no path: see channel_endpoint)
        values = grant_values(operation.callers, {}, query, body)
    refusal = operation.callers.refusal(identity, values)
    if refusal is not None:
        raise Forbidden(refusal)
    return not needs_values
