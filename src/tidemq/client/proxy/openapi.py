"""The OpenAPI pieces of ``tide proxy``'s endpoint table: request schemas, query
parameters and response descriptions (docs/PROTOCOL.md, "tide proxy", in prose)."""

from __future__ import annotations

from typing import Any

from tidemq.client.proxy import codec

BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_BASE64_TEXT: dict[str, Any] = {"type": ["string", "null"], "pattern": BASE64_PATTERN}
# What "encoding": "base64" asks of a record's key, value and header values.
_AS_BASE64: dict[str, Any] = {
    "properties": {
        "key": _BASE64_TEXT,
        "value": _BASE64_TEXT,
        "headers": {"additionalProperties": {"type": "string", "pattern": BASE64_PATTERN}},
    }
}
_ENCODING: dict[str, Any] = {"type": "string", "enum": list(codec.ENCODINGS)}


def _says(encoding: str) -> dict[str, Any]:
    return {"properties": {"encoding": {"const": encoding}}, "required": ["encoding"]}


RECORD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {"type": ["string", "null"]},
        "value": {"type": ["string", "null"]},
        "headers": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        "partition": {"type": ["integer", "null"], "minimum": 0},  # null: by key hash
        "encoding": _ENCODING,
    },
    "required": ["value"],
    "additionalProperties": False,
}
PUSH_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {**RECORD_SCHEMA, "if": _says("base64"), "then": _AS_BASE64},
        {
            "type": "object",
            "properties": {
                "records": {"type": "array", "items": RECORD_SCHEMA, "minItems": 1},
                "encoding": _ENCODING,
            },
            "required": ["records"],
            "additionalProperties": False,
            # A record's own encoding wins over the request's.
            "if": _says("base64"),
            "then": {
                "properties": {"records": {"items": {"if": _says("utf-8"), "else": _AS_BASE64}}}
            },
            "else": {
                "properties": {"records": {"items": {"if": _says("base64"), "then": _AS_BASE64}}}
            },
        },
    ]
}
NAME_PATTERN = "^[A-Za-z0-9._-]{1,200}$"
TOPIC_PARAMETER: dict[str, Any] = {
    "name": "topic",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": NAME_PATTERN},
}
SESSION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "group": {"type": "string", "pattern": NAME_PATTERN},
        "topics": {
            "type": "array",
            "items": {"type": "string", "pattern": NAME_PATTERN},
            "minItems": 1,
            "maxItems": codec.MAX_TOPICS_PER_SESSION,
        },
        "topic": {"type": "string", "pattern": NAME_PATTERN},
        "auto_offset_reset": {"type": "string", "enum": ["earliest", "latest"]},
        "wait_ms": {"type": "integer", "minimum": 0, "maximum": codec.MAX_SESSION_WAIT_MS},
    },
    "required": ["group"],
    "oneOf": [{"required": ["topics"]}, {"required": ["topic"]}],
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
    "409": "the session is busy, or the commit names a batch that is not the latest",
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
