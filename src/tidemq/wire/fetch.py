"""Multi-partition fetch: one long-poll per broker instead of one per partition.

Request (``POST /v1/fetch``, JSON, :class:`FetchRequest`): the partitions a consumer
reads from this broker, each with its next offset, the leader epoch it believes in,
and a byte budget; ``wait_ms`` is how long to wait for *any* of them to have data.

Answer (``Content-Type: application/vnd.tidemq.fetch``), big-endian, one entry per
requested partition that has something to say (data or an error), back to back::

    topic_length u16 | topic (UTF-8) | partition u32 | high_watermark i64
    | log_start_offset i64 | error_length u16 | error (UTF-8 JSON {"code", "message"},
    empty when none) | batches_length u32 | batches (whole record batches, batch.py)

Partitions with neither data nor an error are left out. An empty body means nothing
arrived within ``wait_ms``. Why: a consumer of 12 partitions kept 12 long-polls open
and woke 12 times; one request per broker wakes once for whatever arrived first.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Annotated, NamedTuple

import msgspec

from tidemq.errors import CorruptBatch

FETCH_TYPE = "application/vnd.tidemq.fetch"
PARTITIONS_MAX = 10_000
_TOPIC_LENGTH = struct.Struct(">H")
_HEAD = struct.Struct(">IqqH")
_BATCHES_LENGTH = struct.Struct(">I")


class FetchPartition(msgspec.Struct, frozen=True):
    topic: Annotated[str, msgspec.Meta(min_length=1, max_length=249)]
    partition: Annotated[int, msgspec.Meta(ge=0, le=9_999)]
    offset: Annotated[int, msgspec.Meta(ge=0)]
    leader_epoch: Annotated[int, msgspec.Meta(ge=-1)] = -1
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=8 * 1024 * 1024)] = 1 << 20


class FetchRequest(msgspec.Struct, frozen=True):
    partitions: Annotated[list[FetchPartition], msgspec.Meta(min_length=1, max_length=10_000)]
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=30_000)] = 0
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=64 * 1024 * 1024)] = 8 * 1024 * 1024


class FetchEntry(NamedTuple):
    topic: str
    partition: int
    high_watermark: int
    log_start_offset: int
    error: dict[str, str] | None
    batches: bytes


def encode_fetch(entries: Iterable[FetchEntry]) -> bytes:
    out = bytearray()
    for entry in entries:
        topic = entry.topic.encode()
        error = b"" if entry.error is None else json.dumps(entry.error).encode()[:65535]
        out += _TOPIC_LENGTH.pack(len(topic))
        out += topic
        out += _HEAD.pack(entry.partition, entry.high_watermark, entry.log_start_offset, len(error))
        out += error
        out += _BATCHES_LENGTH.pack(len(entry.batches))
        out += entry.batches
    return bytes(out)


def decode_fetch(body: bytes) -> list[FetchEntry]:
    """Splits an answer into entries; CorruptBatch if the framing does not fit."""
    entries: list[FetchEntry] = []
    position, end = 0, len(body)
    while position < end:
        if len(entries) >= PARTITIONS_MAX:
            raise CorruptBatch(f"more than {PARTITIONS_MAX} entries in one fetch answer")
        (topic_length,) = _unpack(_TOPIC_LENGTH, body, position)
        position += _TOPIC_LENGTH.size
        topic = _text(body, position, topic_length)
        position += topic_length
        partition, high_watermark, log_start, error_length = _unpack(_HEAD, body, position)
        position += _HEAD.size
        error = json.loads(_text(body, position, error_length)) if error_length else None
        position += error_length
        (length,) = _unpack(_BATCHES_LENGTH, body, position)
        position += _BATCHES_LENGTH.size
        if position + length > end:
            raise CorruptBatch(f"batches of {topic}/{partition} overrun the fetch answer")
        batches = body[position : position + length]
        position += length
        entries.append(FetchEntry(topic, partition, high_watermark, log_start, error, batches))
    return entries


def _unpack(layout: struct.Struct, body: bytes, position: int) -> tuple[int, ...]:
    if position + layout.size > len(body):
        raise CorruptBatch(f"fetch entry at byte {position} is cut short")
    return layout.unpack_from(body, position)


def _text(body: bytes, position: int, length: int) -> str:
    if position + length > len(body):
        raise CorruptBatch(f"fetch entry at byte {position} is cut short")
    try:
        return body[position : position + length].decode()
    except UnicodeDecodeError as error:
        raise CorruptBatch("fetch answer text is not UTF-8") from error
