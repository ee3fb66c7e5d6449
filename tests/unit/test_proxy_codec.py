"""tide proxy's pure codec: push bodies, session requests, rendering, SSE, seed text."""

from __future__ import annotations

import base64
import json

import pytest

from tidemq.client.proxy import codec
from tidemq.errors import InvalidRequest, UnknownPartition
from tidemq.wire.batch import Message


def test_one_record_or_many_with_per_record_encoding() -> None:
    one = codec.parse_push({"key": "k", "value": "héllo"}, 10)
    assert one == [codec.OutgoingRecord(b"k", "héllo".encode(), None, None)]
    many = codec.parse_push(
        {
            "encoding": "base64",
            "records": [
                {"key": base64.b64encode(b"\x00k").decode(), "value": "AQI="},
                {"key": None, "value": "plain", "encoding": "utf-8", "partition": 3},
                {"value": None, "headers": {"h": "aGk="}},
            ],
        },
        10,
    )
    assert many[0] == codec.OutgoingRecord(b"\x00k", b"\x01\x02", None, None)
    assert many[1] == codec.OutgoingRecord(None, b"plain", None, 3)
    assert many[2] == codec.OutgoingRecord(None, None, [("h", b"hi")], None)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "'value' is required"),
        ({"key": "k"}, "'value' is required"),
        ({"value": 5}, "value must be a string or null"),
        ({"value": "x", "partiton": 1}, "unknown field(s) partiton"),
        ({"value": "x", "partition": -1}, "partition must be a non-negative integer"),
        ({"value": "x", "partition": True}, "partition must be a non-negative integer"),
        ({"value": "x", "encoding": "latin-1"}, "encoding must be"),
        ({"value": "not base64!", "encoding": "base64"}, "not valid base64"),
        ({"value": "\ud800"}, "not valid Unicode"),
        ({"value": "x", "headers": ["h"]}, "headers must be an object"),
        ({"value": "x", "headers": {"h": None}}, "must be a string"),
        ({"value": "x", "headers": {"\ud800": "v"}}, "not valid Unicode"),
        ({"records": []}, "non-empty list"),
        ({"records": "x"}, "non-empty list"),
        ({"records": [{"value": "a"}], "key": "k"}, "unknown field(s) beside 'records'"),
        ({"records": [{"value": "a"}, 7]}, "records[1] must be an object"),
        ({"records": [{"value": "a"}] * 3}, "at most 2 records"),
    ],
)
def test_bad_push_bodies_are_refused_whole(body: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        codec.parse_push(body, 2)
    assert fragment in str(caught.value)


def test_explicit_partitions_are_checked_against_the_topic() -> None:
    records = codec.parse_push({"records": [{"value": "a", "partition": 1}]}, 5)
    codec.check_partitions(records, "t", 2)
    with pytest.raises(UnknownPartition, match="has 1 partitions, no partition 1"):
        codec.check_partitions(records, "t", 1)


def test_session_requests() -> None:
    spec = codec.parse_session_request({"group": "g", "topics": ["a", "b", "a"], "wait_ms": 5})
    assert spec == codec.SessionRequest("g", ("a", "b"), "earliest", 5)
    assert codec.parse_session_request({"group": "g", "topic": "a"}).topics == ("a",)
    for body in (
        {"topics": ["a"]},
        {"group": "g"},
        {"group": "g", "topics": []},
        {"group": "g", "topics": ["a b"]},
        {"group": "g", "topic": "a", "topics": ["a"]},
        {"group": "g", "topic": "a", "auto_offset_reset": "middle"},
        {"group": "g", "topic": "a", "wait_ms": 30_001},
        {"group": "g", "topic": "a", "wait_ms": "5"},
        {"group": "g", "topic": "a", "extra": 1},
        {"group": "g", "topics": [f"t{i}" for i in range(17)]},
    ):
        with pytest.raises(InvalidRequest):
            codec.parse_session_request(body)


def test_rendering_falls_back_to_base64_rather_than_altering_bytes() -> None:
    text = Message("t", 1, 7, b"k", "v€".encode(), 99, [("h", b"x")])
    assert codec.render_message(text, "utf-8") == {
        "topic": "t",
        "partition": 1,
        "offset": 7,
        "timestamp": 99,
        "key": "k",
        "value": "v€",
        "headers": {"h": "x"},
        "encoding": "utf-8",
    }
    binary = Message("t", 1, 8, None, b"\xff\x00", 99, [])
    rendered = codec.render_message(binary, "utf-8")
    assert rendered["encoding"] == "base64"
    assert base64.b64decode(rendered["value"]) == b"\xff\x00"
    assert rendered["key"] is None


def test_positions_and_sse_framing() -> None:
    messages = [Message("t", p, o, None, b"", 0, []) for p, o in [(0, 4), (1, 9), (0, 5)]]
    assert codec.next_positions(messages) == {("t", 0): 6, ("t", 1): 10}
    frame = codec.sse_event("message", {"a": "x\ny"}, "t/0/4").decode()
    assert frame == 'event: message\nid: t/0/4\ndata: {"a":"x\\ny"}\n\n'
    assert json.loads(frame.split("data: ")[1]) == {"a": "x\ny"}
    assert codec.sse_comment("keep-alive") == b": keep-alive\n\n"


def test_seed_text_forms() -> None:
    assert codec.parse_seed_push({"key": "1", "message": "2"}) == ("1", "2")
    for bad in ({"key": 1, "message": "2"}, {"key": "k"}, {"key": "k", "message": "\udfff"}):
        with pytest.raises(InvalidRequest):
            codec.parse_seed_push(bad)
    assert codec.seed_list([]) == "[]"
    messages = [Message("default", 0, i, b"k", str(i).encode(), 0, []) for i in range(2)]
    assert codec.seed_list(messages) == "[key:k-value:0, key:k-value:1]"


def test_listen_addresses() -> None:
    assert codec.parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert codec.parse_listen("[::1]:443") == ("::1", 443)
    for bad in ("8080", ":80", "host:", "host:0", "host:70000", "host:x"):
        with pytest.raises(ValueError):
            codec.parse_listen(bad)


def test_the_proxy_command_is_registered_and_checks_its_arguments() -> None:
    from click.testing import CliRunner

    from tidemq.cli.main import cli

    runner = CliRunner()
    assert "  proxy " in runner.invoke(cli, ["--help"]).output
    helped = runner.invoke(cli, ["proxy", "--help"])
    assert helped.exit_code == 0 and "--plain-http" in helped.output
    bad = runner.invoke(cli, ["proxy", "--listen", "nowhere"])
    assert bad.exit_code == 2 and "HOST:PORT" in bad.output
    no_cert = runner.invoke(cli, ["proxy", "--listen", "127.0.0.1:1"], env={"TIDE_CERT_FILE": ""})
    assert no_cert.exit_code == 2 and "--cert-file" in no_cert.output
