"""The error middleware (service/http.py) and a caller that hangs up first: a client
that exits while its request channel upgrades made every broker log an ERROR with a
traceback ("unhandled error serving GET /v1/channel") and count a 500."""

from __future__ import annotations

import asyncio
import logging
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from tidemq.service.http import CLIENT_CLOSED_REQUEST, make_error_middleware, new_latency_histogram


async def _hung_up(_: web.Request) -> web.StreamResponse:
    raise ClientConnectionResetError("Cannot write to closing transport")


def _serve(transport_closing: bool) -> tuple[web.StreamResponse, CollectorRegistry]:
    registry = CollectorRegistry()
    middleware = make_error_middleware(new_latency_histogram(registry))
    transport = mock.Mock()
    transport.is_closing.return_value = transport_closing
    request = make_mocked_request("GET", "/v1/channel", transport=transport)
    request.match_info.route.resource.canonical = "/v1/channel"  # as routed
    response = asyncio.run(middleware(request, _hung_up))
    return response, registry


def _count(registry: CollectorRegistry, status: str) -> float | None:
    return registry.get_sample_value(
        "tide_http_request_duration_seconds_count",
        {"method": "GET", "endpoint": "/v1/channel", "status": status},
    )


def test_a_caller_that_left_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="tidemq.service.http"):
        response, registry = _serve(transport_closing=True)
    assert response.status == CLIENT_CLOSED_REQUEST
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert _count(registry, "499") == 1
    assert _count(registry, "500") is None


def test_a_reset_while_the_caller_is_still_there_is_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reset of some other connection (not the caller's) stays an internal error."""
    with caplog.at_level(logging.ERROR, logger="tidemq.service.http"):
        response, registry = _serve(transport_closing=False)
    assert response.status == 500
    assert any("unhandled error serving GET /v1/channel" in r.message for r in caplog.records)
    assert _count(registry, "500") == 1
