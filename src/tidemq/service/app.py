"""Builds an aiohttp application from an endpoint table and runs it under TLS.

Every service gets /healthz, /readyz, /metrics and /openapi.json from here (PUBLIC:
anyone who can connect, for monitoring; the coordinator and brokers only let callers
with a cluster certificate connect), and the authorization middleware that enforces
each endpoint's ``callers``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tidemq.service.callers import PUBLIC, Callers
from tidemq.service.http import (
    Endpoint,
    make_authorization_middleware,
    make_error_middleware,
    new_latency_histogram,
    openapi_document,
)

log = logging.getLogger(__name__)


def build_app(
    title: str,
    endpoints: Sequence[Endpoint],
    registry: CollectorRegistry,
    is_ready: Callable[[], bool],
    max_body_bytes: int,
) -> web.Application:
    latency = new_latency_histogram(registry)
    rules: dict[web.AbstractRoute, Callers] = {}

    def rule_for(request: web.Request) -> Callers | None:
        return rules.get(request.match_info.route)

    middlewares: list[Any] = [
        make_error_middleware(latency),
        make_authorization_middleware(rule_for),
    ]
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready = is_ready()
        return web.json_response(
            {"status": "ready" if ready else "not_ready"}, status=200 if ready else 503
        )

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    standard = [
        Endpoint(
            "GET", "/healthz", healthz, "Liveness: the process serves requests", callers=PUBLIC
        ),
        Endpoint(
            "GET",
            "/readyz",
            readyz,
            "Readiness",
            responses={"200": "ready", "503": "not ready"},
            callers=PUBLIC,
        ),
        Endpoint("GET", "/metrics", metrics, "Prometheus metrics", callers=PUBLIC),
    ]
    every = [*standard, *endpoints]
    document = openapi_document(title, every)

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(document)

    every.append(
        Endpoint("GET", "/openapi.json", openapi, "This API, as OpenAPI 3.1", callers=PUBLIC)
    )
    for endpoint in every:
        route = app.router.add_route(endpoint.method, endpoint.path, endpoint.handler)
        rules[route] = endpoint.callers
        if endpoint.on_shutdown is not None:
            app.on_shutdown.append(endpoint.on_shutdown)
    return app


async def serve(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    until: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT (or ``until`` returns), then shuts down cleanly."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=512)
    await site.start()
    # Start-up objects (modules, routes, the app) leave the collector's generations:
    # full collections no longer walk them, so their pauses (latency tails) shrink.
    gc.freeze()
    log.info("listening on %s:%s (%s)", host, port, "https" if ssl_context else "http")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if until is None:
            await stop.wait()
        else:
            waiter = asyncio.ensure_future(stop.wait())
            other = asyncio.ensure_future(until())
            done, pending = await asyncio.wait({waiter, other}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in done:
                task.result()
    finally:
        await runner.cleanup()
