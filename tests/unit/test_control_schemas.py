"""The client request types of wire/control.py (whose JSON Schemas /openapi.json
publishes) keep the bounds the coordinator's handlers check."""

from __future__ import annotations

import pytest

from tidemq.coordinator import server
from tidemq.errors import InvalidRequest
from tidemq.wire import control
from tidemq.wire.fetch import FetchRequest


def test_session_timeout_bounds_match_the_coordinator() -> None:
    assert control.GROUP_SESSION_TIMEOUT_MS_MIN == server.GROUP_SESSION_TIMEOUT_MS_MIN
    assert control.GROUP_SESSION_TIMEOUT_MS_MAX == server.GROUP_SESSION_TIMEOUT_MS_MAX
    schema = control.schema(control.GroupHeartbeatRequest)["properties"]["session_timeout_ms"]
    assert (schema["minimum"], schema["maximum"]) == (
        server.GROUP_SESSION_TIMEOUT_MS_MIN,
        server.GROUP_SESSION_TIMEOUT_MS_MAX,
    )


def test_integers_may_be_integral_floats_but_not_strings_or_fractions() -> None:
    assert (
        control.check({"name": "t", "partitions": 3.0}, control.CreateTopicRequest).partitions == 3
    )
    for partitions in ("3", 3.5, True, None):
        with pytest.raises(InvalidRequest):
            control.check({"name": "t", "partitions": partitions}, control.CreateTopicRequest)
    body = b'{"partitions": [{"topic": "t", "partition": 2.0, "offset": 0}]}'
    assert control.decode(body, FetchRequest).partitions[0].partition == 2
    with pytest.raises(InvalidRequest):
        control.decode(body.replace(b"2.0", b"2.5"), FetchRequest)


@pytest.mark.parametrize(
    "body",
    [
        # The typed decode stops at the string id; the bytes after it are no JSON.
        b'{"broker_id": "2", "url": "https://127.0.0.1:1", "x": 02}',
        b'{"broker_id": 2.0, "url": "https://127.0.0.1:1", "x": [1,}',
        b'{"broker_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # msgspec: RecursionError
        b"[" * 100_000,
        # A valid typed prefix, then nesting deep enough for the first pass to recurse.
        b'{"broker_id": 1, "url": "https://a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"\xc3cluster_id": ""}',  # bad UTF-8 in a key (UnicodeDecodeError)
        b'{"url": "\xc3ftp://x", "broker_id": 1}',  # and in a string
        b'{"broker_id": "2", "url": "\xc3"}',  # in the second pass
    ],
)
def test_a_malformed_body_is_invalid_request_whichever_decode_sees_it(body: bytes) -> None:
    """Both of decode's passes turn malformed or too deep JSON into InvalidRequest
    (400), not an exception that escapes as a 500 (found by the body-check property
    test in tests/integration/test_request_channel.py)."""
    with pytest.raises(InvalidRequest, match="malformed JSON"):
        control.decode(body, control.BrokerRegistration)
