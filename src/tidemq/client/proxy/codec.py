"""What ``tide proxy`` reads and writes, as pure functions (no I/O, no clock).

* push bodies (JSON) -> :class:`OutgoingRecord` lists, checked completely before
  anything is sent, so a bad request changes nothing;
* session requests -> :class:`SessionRequest`;
* consumed :class:`~tidemq.wire.batch.Message` -> JSON objects, with key, value and
  header values as UTF-8 text or base64 (a record that is not valid UTF-8 is sent as
  base64 even when UTF-8 was asked for, and says so in its ``encoding`` field: text
  is never altered silently);
* Server-Sent Events framing;
* the seed's text answers (``Pushed to Queue``, ``[key:K-value:V, ...]``).

docs/PROTOCOL.md ("tide proxy") documents every shape here.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tidemq.errors import InvalidRequest, UnknownPartition
from tidemq.service.http import check_name
from tidemq.wire.batch import Message

ENCODINGS = ("utf-8", "base64")
RECORD_FIELDS = frozenset({"key", "value", "headers", "partition", "encoding"})
MAX_TOPICS_PER_SESSION = 16
MAX_SESSION_WAIT_MS = 30_000
SEED_PUSHED = "Pushed to Queue"
SEED_SUBSCRIBED = "OK"

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    """One record of a push, decoded to bytes; ``partition`` None: by key hash."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    partition: int | None


@dataclass(frozen=True, slots=True)
class SessionRequest:
    group: str
    topics: tuple[str, ...]
    auto_offset_reset: str
    wait_ms: int


def check_encoding(raw: Any) -> str:
    if raw not in ENCODINGS:
        raise InvalidRequest(f"encoding must be 'utf-8' or 'base64', not {raw!r}")
    return str(raw)


def _decode_text(raw: Any, encoding: str, what: str) -> bytes | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidRequest(f"{what} must be a string or null")
    if encoding == "base64":
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as error:
            raise InvalidRequest(f"{what} is not valid base64") from error
    _check_text(raw, what)
    return raw.encode()


def _check_text(raw: str, what: str) -> None:
    try:
        raw.encode()
    except UnicodeEncodeError as error:  # a lone surrogate, from a JSON \\ud800 escape
        raise InvalidRequest(f"{what} is not valid Unicode text") from error


def _parse_headers(raw: Any, encoding: str, where: str) -> list[tuple[str, bytes]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: headers must be an object of strings")
    out = []
    for name, value in raw.items():
        _check_text(name, f"{where}: header name {name!r}")
        decoded = _decode_text(value, encoding, f"{where}: header {name!r}")
        if decoded is None:
            raise InvalidRequest(f"{where}: header {name!r} must be a string")
        out.append((name, decoded))
    return out or None


def json_int(raw: Any) -> int | None:
    """A JSON integer (3 or 3.0, as JSON Schema counts both), else None."""
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        return None
    return raw


def _parse_partition(raw: Any, where: str) -> int | None:
    if raw is None:
        return None
    partition = json_int(raw)
    if partition is None or partition < 0:
        raise InvalidRequest(f"{where}: partition must be a non-negative integer")
    return partition


def _parse_record(raw: Any, default_encoding: str, where: str) -> OutgoingRecord:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object")
    unknown = sorted(set(raw) - RECORD_FIELDS)
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {', '.join(unknown)}")
    if "value" not in raw:
        raise InvalidRequest(f"{where}: 'value' is required (null for none)")
    encoding = check_encoding(raw.get("encoding", default_encoding))
    return OutgoingRecord(
        key=_decode_text(raw.get("key"), encoding, f"{where}: key"),
        value=_decode_text(raw["value"], encoding, f"{where}: value"),
        headers=_parse_headers(raw.get("headers"), encoding, where),
        partition=_parse_partition(raw.get("partition"), where),
    )


def parse_push(body: dict[str, Any], max_records: int) -> list[OutgoingRecord]:
    """``{"records": [record, ...], "encoding"?}`` or one record ``{"key"?, "value",
    "headers"?, "partition"?, "encoding"?}``. Raises InvalidRequest for anything else."""
    if "records" not in body:
        return [_parse_record(body, "utf-8", "the record")]
    unknown = sorted(set(body) - {"records", "encoding"})
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) beside 'records': {', '.join(unknown)} "
            "(send one record, or a list of records)"
        )
    encoding = check_encoding(body.get("encoding", "utf-8"))
    records = body["records"]
    if not isinstance(records, list) or not records:
        raise InvalidRequest("records must be a non-empty list")
    if len(records) > max_records:
        raise InvalidRequest(f"at most {max_records} records per push, got {len(records)}")
    return [_parse_record(raw, encoding, f"records[{i}]") for i, raw in enumerate(records)]


def check_partitions(records: Sequence[OutgoingRecord], topic: str, count: int) -> None:
    for i, record in enumerate(records):
        if record.partition is not None and record.partition >= count:
            raise UnknownPartition(
                f"record {i}: topic {topic} has {count} partitions, no partition {record.partition}"
            )


def parse_session_request(body: dict[str, Any]) -> SessionRequest:
    """``{"group", "topics": [..] | "topic", "auto_offset_reset"?, "wait_ms"?}``."""
    unknown = sorted(set(body) - {"group", "topics", "topic", "auto_offset_reset", "wait_ms"})
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
    group = check_name(body.get("group"), "group")
    if "topics" in body and "topic" in body:
        raise InvalidRequest("give 'topics' or 'topic', not both")
    raw_topics = body.get("topics", [body["topic"]] if "topic" in body else None)
    if not isinstance(raw_topics, list) or not 1 <= len(raw_topics) <= MAX_TOPICS_PER_SESSION:
        raise InvalidRequest(f"topics must be a list of 1 to {MAX_TOPICS_PER_SESSION} names")
    topics = tuple(dict.fromkeys(check_name(topic, "topic") for topic in raw_topics))
    reset = body.get("auto_offset_reset", "earliest")
    if reset not in ("earliest", "latest"):
        raise InvalidRequest(f"auto_offset_reset must be 'earliest' or 'latest', not {reset!r}")
    wait_ms = json_int(body.get("wait_ms", 0))
    if wait_ms is None:
        raise InvalidRequest("wait_ms must be an integer")
    if not 0 <= wait_ms <= MAX_SESSION_WAIT_MS:
        raise InvalidRequest(f"wait_ms must be between 0 and {MAX_SESSION_WAIT_MS}")
    return SessionRequest(group, topics, str(reset), wait_ms)


def _text(raw: bytes | None, encoding: str) -> str | None:
    if raw is None:
        return None
    if encoding == "base64":
        return base64.b64encode(raw).decode("ascii")
    return raw.decode("utf-8")  # UnicodeDecodeError: the caller falls back to base64


def render_message(message: Message, encoding: str) -> dict[str, Any]:
    """One consumed record as JSON; falls back to base64 for bytes that are not UTF-8."""
    try:
        return _render(message, encoding)
    except UnicodeDecodeError:
        return _render(message, "base64")


def _render(message: Message, encoding: str) -> dict[str, Any]:
    return {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "timestamp": message.timestamp,
        "key": _text(message.key, encoding),
        "value": _text(message.value, encoding),
        "headers": {name: _text(value, encoding) for name, value in message.headers},
        "encoding": encoding,
    }


def next_positions(messages: Iterable[Message]) -> dict[TopicPartition, int]:
    """The offset after the last of ``messages`` per partition (what a commit stores)."""
    out: dict[TopicPartition, int] = {}
    for message in messages:
        tp = (message.topic, message.partition)
        out[tp] = max(out.get(tp, 0), message.offset + 1)
    return out


def positions_json(positions: dict[TopicPartition, int]) -> list[dict[str, Any]]:
    return [
        {"topic": topic, "partition": partition, "offset": offset}
        for (topic, partition), offset in sorted(positions.items())
    ]


def sse_event(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One Server-Sent Event; ``data`` as one line of JSON (json.dumps has no newlines)."""
    head = f"event: {event}\n"
    if event_id is not None:
        head += f"id: {event_id}\n"
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def sse_comment(text: str) -> bytes:
    """A comment line: ignored by clients, keeps proxies from closing an idle stream."""
    return f": {text}\n\n".encode()


def parse_seed_push(body: dict[str, Any]) -> tuple[str, str]:
    """The seed's ``{"key": str, "message": str}``."""
    key, message = body.get("key"), body.get("message")
    if not isinstance(key, str) or not isinstance(message, str):
        raise InvalidRequest('expected {"key": string, "message": string}')
    _check_text(key, "key")
    _check_text(message, "message")
    return key, message


def seed_list(messages: Iterable[Message]) -> str:
    """A Java ``List<String>.toString()`` of ``key:K-value:V`` entries, as the seed's
    client service answered (``[]`` when empty). Not UTF-8 bytes are replaced."""
    entries = (f"key:{_lossy(message.key)}-value:{_lossy(message.value)}" for message in messages)
    return "[" + ", ".join(entries) + "]"


def _lossy(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", errors="replace")


def parse_listen(raw: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); ValueError otherwise."""
    host, separator, port_text = raw.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {raw!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1 to 65535, got {port}")
    return host, port
