"""The request channel's frames (docs/PROTOCOL.md "Request channel"): pure encoding,
shared by the server (service/channel.py) and the client (transport.py).

Binary WebSocket messages, big-endian::

    request:  id u32 | target_length u16 | target ("POST /v1/produce", UTF-8)
              | query_length u16 | query (URL-encoded) | body
    answer:   id u32 | status u16 | type_length u16 | content type
              | headers_length u16 | headers (JSON object, or empty) | body

The server's first frame is a hello, an answer with id 0 (``HELLO_ID``).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlencode

CHANNEL_PATH = "/v1/channel"
# The server's first frame, an answer with this id, says its body limit (JSON body
# ``{"max_body_bytes": N}``); requests never use the id.
HELLO_ID = 0
# A request frame's head (id, target, query) is below this: a peer takes frames
# shorter than its body limit plus this.
FRAME_HEAD_MAX = 64 * 1024
_REQUEST_HEAD = struct.Struct(">IH")
_U16 = struct.Struct(">H")
_ANSWER_HEAD = struct.Struct(">IHH")


class ChannelRequest(NamedTuple):
    request_id: int
    target: str  # "METHOD /path"
    query: str
    body: bytes


class ChannelAnswer(NamedTuple):
    request_id: int
    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes


@functools.lru_cache(maxsize=256)
def _encoded_query(items: tuple[tuple[str, str], ...]) -> bytes:
    """A query's bytes, remembered: a client sends the same few queries (a
    producer's ``acks``) thousands of times a second, and urlencode is a
    microsecond of pure Python each time."""
    return urlencode(items).encode()


def encode_request(
    request_id: int, target: str, query: Mapping[str, str] | None, body: bytes
) -> bytes:
    target_bytes = target.encode()
    query_bytes = _encoded_query(tuple(query.items())) if query else b""
    # Strictly below: aiohttp refuses a message of exactly its max_msg_size (the body
    # limit plus FRAME_HEAD_MAX), which would close the whole channel.
    if _REQUEST_HEAD.size + len(target_bytes) + _U16.size + len(query_bytes) >= FRAME_HEAD_MAX:
        raise ValueError(f"a channel request's target and query reach {FRAME_HEAD_MAX} bytes")
    return b"".join(
        (
            _REQUEST_HEAD.pack(request_id, len(target_bytes)),
            target_bytes,
            _U16.pack(len(query_bytes)),
            query_bytes,
            body,
        )
    )


def decode_request(frame: bytes) -> ChannelRequest:
    """Raises ValueError on a malformed frame."""
    try:
        request_id, target_length = _REQUEST_HEAD.unpack_from(frame)
        position = _REQUEST_HEAD.size
        target = frame[position : position + target_length].decode()
        position += target_length
        (query_length,) = _U16.unpack_from(frame, position)
        position += _U16.size
        query = frame[position : position + query_length].decode()
        position += query_length
    except (struct.error, UnicodeDecodeError) as error:
        raise ValueError(f"malformed channel request: {error}") from error
    if position > len(frame):
        raise ValueError("malformed channel request: truncated")
    return ChannelRequest(request_id, target, query, bytes(frame[position:]))


def encode_answer(answer: ChannelAnswer) -> bytes:
    content_type = answer.content_type.encode()
    headers = json.dumps(answer.headers).encode() if answer.headers else b""
    return b"".join(
        (
            _ANSWER_HEAD.pack(answer.request_id, answer.status, len(content_type)),
            content_type,
            _U16.pack(len(headers)),
            headers,
            answer.body,
        )
    )


def decode_answer(frame: bytes) -> ChannelAnswer:
    """Raises ValueError on a malformed frame."""
    try:
        request_id, status, type_length = _ANSWER_HEAD.unpack_from(frame)
        position = _ANSWER_HEAD.size
        content_type = frame[position : position + type_length].decode()
        position += type_length
        (headers_length,) = _U16.unpack_from(frame, position)
        position += _U16.size
        raw_headers = frame[position : position + headers_length]
        headers = json.loads(raw_headers) if raw_headers else {}
        position += headers_length
    except (struct.error, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"malformed channel answer: {error}") from error
    if position > len(frame) or not isinstance(headers, dict):
        raise ValueError("malformed channel answer")
    return ChannelAnswer(request_id, status, content_type, headers, bytes(frame[position:]))
