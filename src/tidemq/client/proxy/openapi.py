"""The OpenAPI pieces of ``tide proxy``'s endpoint table: request schemas, query
parameters and response descriptions (docs/PROTOCOL.md, "tide proxy", in prose)."""

from __future__ import annotations

from typing import Any

from tidemq.client.proxy import codec

RECORD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {"type": ["string", "null"]},
        "value": {"type": ["string", "null"]},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "partition": {"type": "integer", "minimum": 0},
        "encoding": {"type": "string", "enum": list(codec.ENCODINGS)},
    },
    "required": ["value"],
    "additionalProperties": False,
}
PUSH_SCHEMA: dict[str, Any] = {
    "oneOf": [
        RECORD_SCHEMA,
        {
            "type": "object",
            "properties": {
                "records": {"type": "array", "items": RECORD_SCHEMA, "minItems": 1},
                "encoding": {"type": "string", "enum": list(codec.ENCODINGS)},
            },
            "required": ["records"],
            "additionalProperties": False,
        },
    ]
}
SESSION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "group": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,200}$"},
        "topics": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,200}$"},
            "minItems": 1,
            "maxItems": codec.MAX_TOPICS_PER_SESSION,
        },
        "topic": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,200}$"},
        "auto_offset_reset": {"type": "string", "enum": ["earliest", "latest"]},
        "wait_ms": {"type": "integer", "minimum": 0, "maximum": codec.MAX_SESSION_WAIT_MS},
    },
    "required": ["group"],
    "additionalProperties": False,
}
COMMIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"batch": {"type": "integer", "minimum": 0}},
    "additionalProperties": False,
}
SEED_PUSH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"key": {"type": "string"}, "message": {"type": "string"}},
    "required": ["key", "message"],
}
STATUS_TEXT = {
    "200": "OK",
    "201": "created",
    "400": "bad input: nothing changed",
    "404": "no such session (or topic)",
    "409": "the session is busy, or the commit names a stale batch",
    "413": "body too large",
    "429": "a limit was reached: retry later",
    "503": "the cluster or the proxy is not available",
    "504": "not acknowledged in time",
}


def responses(*codes: str) -> dict[str, str]:
    return {code: STATUS_TEXT[code] for code in codes}


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def query(name: str, kind: str, minimum: int, maximum: int) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "schema": {"type": kind, "minimum": minimum, "maximum": maximum},
    }


def encoding_parameter() -> dict[str, Any]:
    return {
        "name": "encoding",
        "in": "query",
        "schema": {"type": "string", "enum": ["utf-8", "base64"]},
    }
