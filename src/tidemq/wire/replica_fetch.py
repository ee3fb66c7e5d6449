"""Replica fetch sessions: one long-poll per (follower, leader) pair of brokers.

Request (``POST /v1/replica/fetch``, JSON, :class:`ReplicaFetchRequest`): the follower
``broker_id`` (the caller's certificate must be ``broker-{broker_id}``), and for every
partition it follows on this leader the same fields as the per-partition follower
fetch (``GET /v1/replica/{topic}/{partition}/records``): topic id, the leader epoch it
follows, its log end (``offset``), the epoch of its last batch, its durable end and a
byte budget, plus the high watermark it knows; ``wait_ms`` bounds the wait for *any*
of them to have something to say, and ``max_bytes`` bounds the whole answer.

Answer (``Content-Type: application/vnd.tidemq.replica-fetch``), big-endian, one
entry per partition that has something to say (batches, a divergence, a log start
past the follower's log end, or an error), back to back::

    topic_length u16 | topic (UTF-8) | partition u32 | flags u8
    | high_watermark i64 | log_start_offset i64 | log_end_offset i64
    | diverging_epoch i64 | diverging_end_offset i64
    | error_length u16 | error (UTF-8 JSON {"code", "message"}, empty when none)
    | batches_length u32 | batches (whole record batches, batch.py)

``flags`` bit 0 (``DIVERGING``): the follower's log diverged; ``diverging_epoch`` (-1:
the leader no longer has any epoch that old) and ``diverging_end_offset`` say where
to cut (KIP-279, as the ``Tide-Diverging-*`` headers of the per-partition fetch).
Without it both are -1. The offsets are -1 in an error entry. An answer that waited
``wait_ms`` in vain holds the partitions whose high watermark moved past what the
follower knows (no data), or nothing. Why: a follower of 12 partitions on one leader
kept 12 long-polls open and woke 12 times; one session wakes once, and each request
reports the follower's new log end and durable end for every partition at once.

Incremental sessions (KIP-227; broker/fetch_sessions.py): with ``session_id`` set, a
request with ``session_epoch`` 0 opens a session on the leader, and later ones name
only the partitions whose fields changed plus the ``forgotten`` ones; the answer's
``Tide-Fetch-Session`` header names the session the leader holds afterwards.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Annotated, NamedTuple

import msgspec

from tidemq.errors import CorruptBatch

REPLICA_FETCH_TYPE = "application/vnd.tidemq.replica-fetch"
PARTITIONS_MAX = 10_000
PARTITION_BYTES_MAX = 8 * 1024 * 1024
ANSWER_BYTES_MAX = 64 * 1024 * 1024
WAIT_MS_MAX = 30_000
DIVERGING = 0x01
SESSION_ID_MAX = (1 << 63) - 1
# The answer's header naming the session the leader holds after this request (absent:
# it holds none, and the follower's next request is a whole one).
SESSION_HEADER = "Tide-Fetch-Session"
_TOPIC_LENGTH = struct.Struct(">H")
_HEAD = struct.Struct(">IBqqqqqH")
_BATCHES_LENGTH = struct.Struct(">I")


class ReplicaFetchPartition(msgspec.Struct, frozen=True):
    topic: Annotated[str, msgspec.Meta(min_length=1, max_length=249)]
    partition: Annotated[int, msgspec.Meta(ge=0, le=9_999)]
    leader_epoch: Annotated[int, msgspec.Meta(ge=0)]
    offset: Annotated[int, msgspec.Meta(ge=0)]
    topic_id: Annotated[str, msgspec.Meta(max_length=64)] = ""
    last_fetched_epoch: Annotated[int, msgspec.Meta(ge=-1)] = -1
    durable_offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    high_watermark: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=PARTITION_BYTES_MAX)] = 1 << 20


class ReplicaFetchForgotten(msgspec.Struct, frozen=True):
    topic: Annotated[str, msgspec.Meta(min_length=1, max_length=249)]
    partition: Annotated[int, msgspec.Meta(ge=0, le=9_999)]


class ReplicaFetchRequest(msgspec.Struct, frozen=True):
    broker_id: Annotated[int, msgspec.Meta(ge=0)]
    partitions: Annotated[list[ReplicaFetchPartition], msgspec.Meta(max_length=PARTITIONS_MAX)]
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=WAIT_MS_MAX)] = 0
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=ANSWER_BYTES_MAX)] = 16 * 1024 * 1024
    # Incremental fetch sessions (KIP-227): 0 = no session (a whole request, kept
    # nowhere); else the follower's id for the session, and the number of requests
    # the leader applied to it before this one (0 = open it with this whole request).
    session_id: Annotated[int, msgspec.Meta(ge=0, le=SESSION_ID_MAX)] = 0
    session_epoch: Annotated[int, msgspec.Meta(ge=0)] = 0
    forgotten: Annotated[list[ReplicaFetchForgotten], msgspec.Meta(max_length=PARTITIONS_MAX)] = (
        msgspec.field(default_factory=list)
    )

    @property
    def incremental(self) -> bool:
        return self.session_epoch > 0


class ReplicaFetchEntry(NamedTuple):
    topic: str
    partition: int
    high_watermark: int = -1
    log_start_offset: int = -1
    log_end_offset: int = -1
    diverging: tuple[int, int] | None = None  # (epoch, end offset)
    error: dict[str, str] | None = None
    batches: bytes = b""


def encode_replica_fetch(entries: Iterable[ReplicaFetchEntry]) -> bytes:
    out = bytearray()
    for entry in entries:
        topic = entry.topic.encode()
        error = b"" if entry.error is None else json.dumps(entry.error).encode()[:65535]
        epoch, end = (-1, -1) if entry.diverging is None else entry.diverging
        out += _TOPIC_LENGTH.pack(len(topic))
        out += topic
        out += _HEAD.pack(
            entry.partition,
            DIVERGING if entry.diverging is not None else 0,
            entry.high_watermark,
            entry.log_start_offset,
            entry.log_end_offset,
            epoch,
            end,
            len(error),
        )
        out += error
        out += _BATCHES_LENGTH.pack(len(entry.batches))
        out += entry.batches
    return bytes(out)


def decode_replica_fetch(body: bytes) -> list[ReplicaFetchEntry]:
    """Splits an answer into entries; CorruptBatch if the framing does not fit."""
    entries: list[ReplicaFetchEntry] = []
    position, end = 0, len(body)
    while position < end:
        if len(entries) >= PARTITIONS_MAX:
            raise CorruptBatch(f"more than {PARTITIONS_MAX} entries in one replica fetch answer")
        (topic_length,) = _unpack(_TOPIC_LENGTH, body, position)
        position += _TOPIC_LENGTH.size
        topic = _text(body, position, topic_length)
        position += topic_length
        partition, flags, high_watermark, log_start, log_end, epoch, diverging_end, error_length = (
            _unpack(_HEAD, body, position)
        )
        position += _HEAD.size
        error = json.loads(_text(body, position, error_length)) if error_length else None
        position += error_length
        (length,) = _unpack(_BATCHES_LENGTH, body, position)
        position += _BATCHES_LENGTH.size
        if position + length > end:
            raise CorruptBatch(f"batches of {topic}/{partition} overrun the replica fetch answer")
        batches = body[position : position + length]
        position += length
        diverging = (epoch, diverging_end) if flags & DIVERGING else None
        entries.append(
            ReplicaFetchEntry(
                topic, partition, high_watermark, log_start, log_end, diverging, error, batches
            )
        )
    return entries


def _unpack(layout: struct.Struct, body: bytes, position: int) -> tuple[int, ...]:
    if position + layout.size > len(body):
        raise CorruptBatch(f"replica fetch entry at byte {position} is cut short")
    return layout.unpack_from(body, position)


def _text(body: bytes, position: int, length: int) -> str:
    if position + length > len(body):
        raise CorruptBatch(f"replica fetch entry at byte {position} is cut short")
    try:
        return body[position : position + length].decode()
    except UnicodeDecodeError as error:
        raise CorruptBatch("replica fetch answer text is not UTF-8") from error
