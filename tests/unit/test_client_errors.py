"""Error translation at the client boundary: users only ever see TideError."""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path

import aiohttp
import pytest

from tidemq import errors
from tidemq.client.transport import (
    UnrecognizedRefusal,
    backoff_seconds,
    error_from_response,
    translate_exception,
)
from tidemq.service.http import error_response


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (421, "not_leader", errors.NotLeader),
        (409, "fenced_leader_epoch", errors.FencedLeaderEpoch),
        (404, "unknown_topic", errors.UnknownTopic),
        (416, "offset_out_of_range", errors.OffsetOutOfRange),
        (409, "topic_exists", errors.TopicExists),
        (504, "request_timed_out", errors.RequestTimedOut),
        (500, "internal_error", errors.InternalError),
    ],
)
def test_error_bodies_become_their_class(status: int, code: str, expected: type) -> None:
    body = b'{"error": {"code": "%s", "message": "why"}}' % code.encode()
    error = error_from_response(status, body)
    assert type(error) is expected
    assert error.message == "why"


def test_unknown_codes_and_foreign_bodies_map_by_status() -> None:
    not_found = error_from_response(404, b'{"error": {"code": "not_found", "message": "x"}}')
    assert isinstance(not_found, errors.InvalidRequest) and not not_found.retriable
    assert "not_found" in not_found.message
    assert isinstance(error_from_response(503, b"<html>busy</html>"), errors.Unavailable)
    assert isinstance(error_from_response(502, b""), errors.Unavailable)
    assert isinstance(error_from_response(504, b""), errors.RequestTimedOut)
    assert isinstance(error_from_response(400, b"nope"), errors.InvalidRequest)
    assert isinstance(error_from_response(500, b"boom"), errors.InternalError)


def test_a_4xx_this_client_cannot_name_is_told_apart_from_a_known_refusal() -> None:
    # A producer must not take it for "not appended" (test_producer_outcomes.py).
    newer = error_from_response(429, b'{"error": {"code": "quota_v9", "message": "x"}}')
    assert isinstance(newer, UnrecognizedRefusal) and isinstance(newer, errors.InvalidRequest)
    assert isinstance(error_from_response(413, b"<html>too big</html>"), UnrecognizedRefusal)
    known = error_from_response(400, b'{"error": {"code": "invalid_request", "message": "x"}}')
    assert type(known) is errors.InvalidRequest


def test_transport_exceptions_are_translated() -> None:
    refused = aiohttp.ClientConnectionError("refused")
    assert isinstance(translate_exception(refused, "GET x"), errors.ConnectionFailed)
    assert isinstance(
        translate_exception(ssl.SSLError("bad cert"), "GET x"), errors.ConnectionFailed
    )
    assert isinstance(translate_exception(ConnectionResetError(), "GET x"), errors.ConnectionFailed)
    assert isinstance(translate_exception(TimeoutError(), "GET x"), errors.RequestTimedOut)
    server_timeout = aiohttp.ServerTimeoutError("slow")  # both a ClientError and a timeout
    assert isinstance(translate_exception(server_timeout, "GET x"), errors.RequestTimedOut)
    assert translate_exception(errors.NotLeader("n"), "GET x").code == "not_leader"


def test_backoff_is_exponential_capped_and_jittered() -> None:
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (10, 1.0), (100, 1.0)]:
        delay = backoff_seconds(attempt, 100, 1000)
        assert ceiling / 2 <= delay <= ceiling


def test_public_surface() -> None:
    import tidemq

    for name in tidemq.__all__:
        assert getattr(tidemq, name) is not None
    assert tidemq.Message._fields == (
        "topic",
        "partition",
        "offset",
        "key",
        "value",
        "timestamp",
        "headers",
    )
    assert tidemq.RecordMetadata._fields == ("topic", "partition", "offset")
    assert issubclass(tidemq.ResultTimeout, TimeoutError)
    assert issubclass(tidemq.ResultTimeout, errors.TideError)
    assert issubclass(tidemq.ConfigurationError, errors.TideError)
    # client-side classes never shadow a wire code
    assert errors.error_for_code("invalid_request", "x").__class__ is errors.InvalidRequest
    assert errors.error_for_code("request_timed_out", "x").__class__ is errors.RequestTimedOut


def test_client_objects_need_a_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    import tidemq

    monkeypatch.delenv("TIDE_BOOTSTRAP", raising=False)
    with pytest.raises(tidemq.ConfigurationError, match="bootstrap"):
        tidemq.Producer()
    with pytest.raises(tidemq.ConfigurationError, match="bootstrap"):
        tidemq.Consumer("t", group="g")
    with pytest.raises(tidemq.ConfigurationError, match="bootstrap"):
        tidemq.Admin()


def test_an_unrecognized_4xx_relayed_by_a_service_keeps_a_documented_code() -> None:
    """tide proxy (and a broker) answer a TideError raised by a call they make with its
    own code: a 4xx page from a gateway reaches the proxy's caller with this code."""
    doc = (Path(__file__).parents[2] / "docs" / "PROTOCOL.md").read_text()
    documented = set(re.findall(r"^\| ([a-z_]+) \| \d{3} \|", doc, re.M))
    relayed = error_from_response(418, b"<html>I'm a teapot</html>")
    body = error_response(relayed).body
    assert isinstance(body, bytes)
    assert json.loads(body)["error"]["code"] in documented
