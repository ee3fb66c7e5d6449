"""HTTP shell helpers: an endpoint table that serves routing, authorization and
OpenAPI; one error middleware that maps every failure to
``{"error": {"code", "message"}}``; one authorization middleware that checks each
endpoint's declared callers (service/callers.py) against the caller's certificate.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram

from tidemq.errors import (
    Forbidden,
    InvalidRequest,
    InvariantViolation,
    MalformedJson,
    RequestTooLarge,
    TideError,
)
from tidemq.service.callers import Callers, Identity, Location
from tidemq.service.failstop import fail_stop

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON_TYPE = "application/json"
# nginx's status for "the client closed the connection first": the latency metric's
# label for such requests (the answer itself goes nowhere).
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class Endpoint:
    """One route: what it does and who may call it, for the router, the authorization
    middleware and /openapi.json. ``callers`` has no default: every endpoint says."""

    method: str
    path: str
    handler: Handler
    summary: str
    request_body: dict[str, Any] | None = None  # OpenAPI requestBody content map
    request_body_required: bool = True  # False: an empty body is accepted too
    parameters: list[dict[str, Any]] = field(default_factory=list)
    responses: dict[str, str] = field(default_factory=lambda: {"200": "OK"})
    callers: Callers = field(kw_only=True)
    # For endpoints that hold connections open (the request channel): closes them when
    # the server shuts down, which otherwise waits for them.
    on_shutdown: Callable[[web.Application], Awaitable[None]] | None = field(
        default=None, kw_only=True
    )

    def __post_init__(self) -> None:
        names = path_parameters(self.path)
        for grant in self.callers.broker_self_grants():
            if grant.location == "path" and grant.name not in names:
                raise ValueError(
                    f"{self.path}: broker_self(path={grant.name!r}) names no path part"
                )


def path_parameters(path: str) -> list[str]:
    """The names of ``{name}`` / ``{name:regex}`` parts of a route path."""
    return [
        segment[1:-1].split(":")[0]
        for segment in path.split("/")
        if segment.startswith("{") and segment.endswith("}")
    ]


def error_response(error: TideError) -> web.Response:
    return web.json_response(error.to_json(), status=error.http_status)


def make_error_middleware(
    latency: Histogram,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except TideError as error:
            status = error.http_status
            return error_response(error)
        except web.HTTPRequestEntityTooLarge as error:
            status = 413
            return error_response(RequestTooLarge(error.text or "request body too large"))
        except web.HTTPException as error:
            status = error.status
            if error.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(error.status, "http_error")
            body = {"error": {"code": code, "message": error.reason}}
            # A 405 says which methods the path has (RFC 9110: Allow is required).
            kept = {name: error.headers[name] for name in ("Allow",) if name in error.headers}
            return web.json_response(body, status=error.status, headers=kept)
        except InvariantViolation as error:
            fail_stop(f"invariant broken serving {request.method} {request.path}: {error}")
        except Exception as error:
            if isinstance(error, ConnectionResetError) and _caller_left(request):
                # The caller hung up before its answer was written (a client that exits
                # while its request channel upgrades): nothing failed here, and nobody
                # reads an answer. Not an ERROR with a traceback for the operator.
                status = CLIENT_CLOSED_REQUEST
                log.debug("%s %s: the caller left first", request.method, request.path)
                return web.Response(status=CLIENT_CLOSED_REQUEST)
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return web.json_response(
                {"error": {"code": "internal_error", "message": "internal error"}}, status=500
            )
        finally:
            latency.labels(request.method, endpoint, str(status)).observe(
                time.perf_counter() - started
            )

    return middleware


def _caller_left(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# The body, when the authorization middleware read it first (RequestKey: aiohttp >= 3.14).
_BODY_KEY = web.RequestKey("tidemq.body", bytes)


def make_authorization_middleware(
    rules: Callable[[web.Request], Callers | None],
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Checks the matched endpoint's ``callers`` against the caller's certificate.

    Over TLS the common name of the certificate the server verified is the identity
    (service/callers.py); a caller without one is anonymous, which only servers that
    do not demand certificates ever see. Over plain HTTP (``--plain-http``) there is
    no identity at all and nothing is checked: plain HTTP is for tests on loopback
    only (docs/OPERATIONS.md). A request the router did not match has no rule and goes
    on to the router's 404/405.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is None:
            raise Forbidden("the connection is closed: the caller is unknown")
        if transport.get_extra_info("ssl_object") is None:
            return await handler(request)
        callers = rules(request)
        if callers is None:
            return await handler(request)
        identity = Identity.from_peercert(transport.get_extra_info("peercert"))
        if identity is None:
            raise Forbidden("the client certificate does not have exactly one common name")
        values: dict[tuple[Location, str], Any] = {}
        if callers.needs_values(identity):
            values = await _named_values(request, callers)
        refusal = callers.refusal(identity, values)
        if refusal is not None:
            raise Forbidden(refusal)
        return await handler(request)

    return middleware


async def _named_values(request: web.Request, callers: Callers) -> dict[tuple[Location, str], Any]:
    """The raw values the broker-self grants name; the body is read (bounded by the
    app's client_max_size) only if one is in it, and kept for the handler's
    :func:`read_json`."""
    body = None
    if any(grant.location == "body" for grant in callers.broker_self_grants()):
        if _BODY_KEY not in request:
            request[_BODY_KEY] = await request.read()
        body = request[_BODY_KEY]
    return grant_values(callers, request.match_info, request.query, body)


def grant_values(
    callers: Callers, path: Mapping[str, str], query: Mapping[str, str], body: bytes | None
) -> dict[tuple[Location, str], Any]:
    """The raw values ``callers``' broker-self grants name, each read from its place
    (``body`` through :func:`body_values`; None: not read, no values from it). One
    reading for the HTTP middleware and the request channel, so the same request
    gets the same verdict over both."""
    values: dict[tuple[Location, str], Any] = {}
    in_body: list[str] = []
    for grant in callers.broker_self_grants():
        if grant.location == "body":
            in_body.append(grant.name)
        else:
            place = path if grant.location == "path" else query
            values[(grant.location, grant.name)] = place.get(grant.name)
    if in_body and body is not None:
        for name, value in body_values(body, tuple(in_body)).items():
            values[("body", name)] = value
    return values


# What json.loads raises for bytes that are no JSON it reads: JSONDecodeError, bad
# UTF-8, and a plain ValueError (an integer past 4,300 digits) or RecursionError (deep
# nesting), which would otherwise escape as a 500.
JSON_ERRORS = (ValueError, RecursionError)


def body_values(raw: bytes, names: tuple[str, ...]) -> dict[str, Any]:
    """The top-level fields ``names`` of a JSON object body, as the authorization
    rules read them: those present, raw; none if the body is no JSON object msgspec
    reads. One rule for the HTTP middleware and the request channel, so the same
    bytes get the same verdict over both. Only the named fields are built: the rest
    is skipped, not parsed into objects (a follower's replica fetch names every
    partition it follows, and its ``broker_id`` is all the check needs)."""
    try:
        found = msgspec.json.decode(raw, type=_fields_of(names))
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
        return {}
    values = (getattr(found, f"f{index}") for index in range(len(names)))
    return {name: value for name, value in zip(names, values, strict=True) if value is not _ABSENT}


_ABSENT: Any = object()


@functools.cache
def _fields_of(names: tuple[str, ...]) -> type[msgspec.Struct]:
    """A struct with just ``names`` (any JSON value each, absent by default). Its
    attributes are ``f0``, ``f1``...: a JSON key need not be a Python identifier.
    Cached per grant's names: a handful, fixed by the endpoint tables."""
    return msgspec.defstruct(
        "Named",
        [(f"f{index}", Any, msgspec.field(default=_ABSENT)) for index in range(len(names))],
        rename={f"f{index}": name for index, name in enumerate(names)},
    )


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The whole body (it may arrive in many chunks: ``content.read(n)`` returns one),
    or RequestTooLarge past ``max_bytes``. Never trusts Content-Length alone."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise RequestTooLarge(f"body of {request.content_length} bytes exceeds {max_bytes}")
    if _BODY_KEY in request:  # the authorization middleware read it already
        raw = request[_BODY_KEY]
        if len(raw) > max_bytes:
            raise RequestTooLarge(f"body exceeds {max_bytes} bytes")
        return raw
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(max_bytes + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLarge(f"body exceeds {max_bytes} bytes")
    return b"".join(chunks)


async def read_json(request: web.Request, max_bytes: int = 1 << 20) -> Any:
    """The request body as JSON, or a 400/413 TideError. Never trusts Content-Length alone."""
    raw = await read_body(request, max_bytes)
    if not raw:
        raise MalformedJson("expected a JSON body")
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, or MalformedJson (400) whatever json.loads refused it with."""
    try:
        return json.loads(raw)
    except JSON_ERRORS as error:
        raise MalformedJson(f"malformed JSON: {str(error)[:200]}") from error


async def read_json_object(request: web.Request, max_bytes: int = 1 << 20) -> dict[str, Any]:
    body = await read_json(request, max_bytes)
    if not isinstance(body, dict):
        raise InvalidRequest("expected a JSON object")
    return body


def query_int(
    request: web.Request,
    name: str,
    default: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise InvalidRequest(f"query parameter {name!r} is required")
        return default
    return check_int(raw, name, minimum, maximum)


def check_int(raw: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise InvalidRequest(f"{name} must be an integer, got {raw!r}")
    try:
        value = int(raw)
    except (TypeError, ValueError) as error:
        raise InvalidRequest(f"{name} must be an integer, got {raw!r}") from error
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidRequest(f"{name} must be <= {maximum}, got {value}")
    return value


def check_name(raw: Any, what: str) -> str:
    """Topic and group names: 1-200 chars of [A-Za-z0-9._-]."""
    if not isinstance(raw, str) or not 1 <= len(raw) <= 200:
        raise InvalidRequest(f"{what} name must be a string of 1 to 200 characters")
    if not all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in raw):
        raise InvalidRequest(f"{what} name {raw!r} may only hold letters, digits, '.', '_', '-'")
    return raw


# OpenAPI schemas of what check_name / check_int accept, for parameters.
NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 200,
    "pattern": "^[A-Za-z0-9._-]+$",
}


def int_schema(minimum: int | None = None, maximum: int | None = None) -> dict[str, Any]:
    bounds = {"minimum": minimum, "maximum": maximum}
    return {"type": "integer", **{k: v for k, v in bounds.items() if v is not None}}


def path_parameter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A typed path parameter for ``Endpoint.parameters`` (untyped ones are strings)."""
    return {"name": name, "in": "path", "required": True, "schema": schema}


def query_parameter(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def openapi_document(title: str, endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    """Every endpoint with its callers and answers. Whatever takes input (parameters or
    a body) can answer 400 ``invalid_request``, and a body can answer 413: both are
    documented for every such endpoint, so the document lists every status it can see."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "responses": {code: {"description": text} for code, text in endpoint.responses.items()},
        }
        operation["x-callers"] = endpoint.callers.labels()
        if endpoint.callers.labels() not in (["any"], ["public"]):
            operation["responses"].setdefault("403", {"description": "forbidden"})
        parameters = list(endpoint.parameters)
        described = {(p.get("in"), p.get("name")) for p in parameters}
        for name in path_parameters(endpoint.path):
            if ("path", name) in described:
                continue  # the endpoint describes it itself (e.g. with a pattern)
            parameters.append(
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            )
        if parameters:
            operation["parameters"] = parameters
            operation["responses"].setdefault("400", {"description": "invalid_request"})
        if endpoint.request_body:
            operation["requestBody"] = {
                "content": endpoint.request_body,
                "required": endpoint.request_body_required,
            }
            operation["responses"].setdefault("400", {"description": "invalid_request"})
            operation["responses"].setdefault("413", {"description": "request_too_large"})
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
    }


def new_latency_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "tide_http_request_duration_seconds",
        "HTTP request latency by endpoint",
        ["method", "endpoint", "status"],
        registry=registry,
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
