"""Record batches: the unit that is produced, stored, replicated and fetched.

Byte layout (big-endian; docs/PROTOCOL.md is the normative copy)::

    offset size field
    0      8    base_offset        i64  patched by the leader
    8      4    batch_length       u32  bytes after this field (= total size - 12)
    12     4    leader_epoch       i32  patched by the leader
    16     1    magic              u8   = 1
    17     4    crc                u32  zlib CRC-32 of bytes [21, end)
    21     2    attributes         u16  0 (no compression)
    23     4    last_offset_delta  i32  = record_count - 1
    27     8    base_timestamp     i64  ms since the epoch
    35     8    max_timestamp      i64
    43     8    producer_id        i64  -1 when not idempotent
    51     2    producer_epoch     i16  -1 when not idempotent
    53     4    base_sequence      i32  -1 when not idempotent
    57     4    record_count       i32  >= 1
    61          records

    record := length u32 (bytes after this field) | timestamp_delta u32
              | key_length i32 (-1: null) | value_length i32 (-1: null)
              | header_count u16 | key | value
              | header_count x (name_length u16 | name | value_length u32 | value)

Offsets inside a batch are implicit: record i has offset base_offset + i.
The CRC does not cover base_offset, batch_length or leader_epoch, so the leader
can patch those without recomputing it. A broker checks the header, the CRC and
the record framing once per batch and then writes, replicates and serves the
same bytes; it never builds per-record objects.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from tidemq.errors import CorruptBatch

MAGIC = 1
HEADER = struct.Struct(">qIiBIHiqqqhii")
HEADER_SIZE = HEADER.size  # 61
LENGTH_PREFIX = 12  # base_offset + batch_length: bytes not counted by batch_length
CRC_START = 21
RECORD_HEADER = struct.Struct(">IIiiH")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 18
_RECORD_FIXED = RECORD_HEADER_SIZE - 4  # what `length` counts besides key/value/headers
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_I32 = struct.Struct(">i")
_HEADER_NAME = struct.Struct(">H")
_BATCH_LENGTH_AT = 8
_LEADER_EPOCH_AT = 12
MAX_RECORDS_PER_BATCH = 1 << 20

Headers = Sequence[tuple[str, bytes]]


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def size(self) -> int:
        return self.batch_length + LENGTH_PREFIX

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.record_count


class Message(NamedTuple):
    """One record as consumers see it (tidemq.Message)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: Sequence[tuple[str, bytes]]


Record = Message  # the name the storage and broker layers use


def _encode_headers(headers: Headers) -> bytes:
    out = bytearray()
    for name, value in headers:
        raw = name.encode()
        out += _HEADER_NAME.pack(len(raw))
        out += raw
        out += _U32.pack(len(value))
        out += value
    return bytes(out)


class BatchBuilder:
    """Accumulates records into one batch; ``build`` seals it.

    ``append`` is the producer's per-message cost, so it does one struct pack and
    at most two buffer appends, and nothing else.
    """

    __slots__ = ("_buffer", "base_timestamp", "count", "max_timestamp")

    def __init__(self, base_timestamp: int) -> None:
        self._buffer = bytearray(HEADER_SIZE)
        self.base_timestamp = base_timestamp
        self.max_timestamp = base_timestamp
        self.count = 0

    @property
    def size(self) -> int:
        return len(self._buffer)

    def append(
        self,
        key: bytes | None,
        value: bytes | None,
        timestamp: int,
        headers: Headers | None = None,
    ) -> int:
        """Adds one record; returns its index in the batch (its offset delta)."""
        key_length = -1 if key is None else len(key)
        value_length = -1 if value is None else len(value)
        extra = _encode_headers(headers) if headers else b""
        delta = timestamp - self.base_timestamp
        if delta < 0:
            delta = 0
        elif timestamp > self.max_timestamp:
            self.max_timestamp = timestamp
        buffer = self._buffer
        buffer += RECORD_HEADER.pack(
            _RECORD_FIXED
            + (key_length if key_length > 0 else 0)
            + (value_length if value_length > 0 else 0)
            + len(extra),
            delta,
            key_length,
            value_length,
            len(headers) if headers else 0,
        )
        if key:
            buffer += key
        if value:
            buffer += value
        if extra:
            buffer += extra
        index = self.count
        self.count = index + 1
        return index

    def build(
        self,
        producer_id: int = -1,
        producer_epoch: int = -1,
        base_sequence: int = -1,
    ) -> bytes:
        """Seals the batch: header and CRC filled in; base offset 0, epoch -1."""
        if self.count == 0:
            raise ValueError("cannot build an empty batch")
        buffer = self._buffer
        HEADER.pack_into(
            buffer,
            0,
            0,
            len(buffer) - LENGTH_PREFIX,
            -1,
            MAGIC,
            0,
            0,
            self.count - 1,
            self.base_timestamp,
            self.max_timestamp,
            producer_id,
            producer_epoch,
            base_sequence,
            self.count,
        )
        crc = zlib.crc32(memoryview(buffer)[CRC_START:])
        _U32.pack_into(buffer, 17, crc)
        return bytes(buffer)


def build_batch(
    records: Sequence[tuple[bytes | None, bytes | None]],
    timestamp: int,
    headers: Sequence[Headers | None] | None = None,
) -> bytes:
    """Convenience for tests and JSON produce: one batch from (key, value) pairs."""
    builder = BatchBuilder(timestamp)
    for i, (key, value) in enumerate(records):
        builder.append(key, value, timestamp, headers[i] if headers else None)
    return builder.build()


def read_header(data: bytes | bytearray | memoryview, position: int = 0) -> BatchHeader:
    return BatchHeader._make(HEADER.unpack_from(data, position))


def check_batch(data: bytes | bytearray | memoryview, position: int = 0) -> BatchHeader:
    """Validates one whole batch at ``position``: header, CRC, record framing.

    Raises CorruptBatch with a reason. Does not create per-record objects.
    """
    available = len(data) - position
    if available < HEADER_SIZE:
        raise CorruptBatch(f"batch at byte {position}: {available} bytes, header needs 61")
    header = read_header(data, position)
    size = header.batch_length + LENGTH_PREFIX
    if header.magic != MAGIC:
        raise CorruptBatch(f"batch at byte {position}: unknown magic {header.magic}")
    if size < HEADER_SIZE or size > available:
        raise CorruptBatch(
            f"batch at byte {position}: batch_length {header.batch_length} does not fit "
            f"the {available} bytes that remain"
        )
    if not 1 <= header.record_count <= MAX_RECORDS_PER_BATCH:
        raise CorruptBatch(f"batch at byte {position}: record_count {header.record_count}")
    if header.last_offset_delta != header.record_count - 1:
        raise CorruptBatch(f"batch at byte {position}: last_offset_delta != record_count - 1")
    view = memoryview(data)[position : position + size]
    crc = zlib.crc32(view[CRC_START:])
    if crc != header.crc:
        raise CorruptBatch(f"batch at byte {position}: CRC {crc:#010x} != {header.crc:#010x}")
    _check_record_framing(view, header.record_count, position)
    return header


def _check_record_framing(view: memoryview, count: int, position: int) -> None:
    """Every record's fields fit its length exactly, and the records fill the batch.

    This is the broker's per-record cost on produce (about 0.4 us a record): one
    unpack and a sum, plus a walk over headers when a record has any. A batch that
    passes decodes without error in every client.
    """
    cursor = HEADER_SIZE
    end = len(view)
    unpack = RECORD_HEADER.unpack_from
    for index in range(count):
        if cursor + RECORD_HEADER_SIZE > end:
            raise CorruptBatch(f"batch at byte {position}: record {index} overruns the batch")
        length, _, key_length, value_length, header_count = unpack(view, cursor)
        record_end = cursor + 4 + length
        if key_length < -1 or value_length < -1 or record_end > end:
            raise CorruptBatch(f"batch at byte {position}: record {index} has bad lengths")
        fields = _RECORD_FIXED + (key_length if key_length > 0 else 0)
        fields += value_length if value_length > 0 else 0
        if header_count:
            start = cursor + RECORD_HEADER_SIZE + fields - _RECORD_FIXED
            fields += _headers_size(view, start, record_end, header_count, position, index)
        if fields != length:
            raise CorruptBatch(
                f"batch at byte {position}: record {index} fields do not fill its length"
            )
        cursor = record_end
    if cursor != end:
        raise CorruptBatch(f"batch at byte {position}: records do not fill the batch exactly")


def _headers_size(
    view: memoryview, cursor: int, end: int, count: int, position: int, index: int
) -> int:
    """Bytes taken by ``count`` headers at ``cursor``, which must end by ``end``."""
    start = cursor
    for _ in range(count):
        if cursor + 2 > end:
            break
        (name_length,) = _HEADER_NAME.unpack_from(view, cursor)
        name_end = cursor + 2 + name_length
        if name_end + 4 > end:
            break
        try:
            bytes(view[cursor + 2 : name_end]).decode()
        except UnicodeDecodeError:
            raise CorruptBatch(
                f"batch at byte {position}: record {index} header name is not UTF-8"
            ) from None
        cursor = name_end + 4 + _U32.unpack_from(view, name_end)[0]
        if cursor > end:
            break
    else:
        return cursor - start
    raise CorruptBatch(f"batch at byte {position}: record {index} headers overrun it")


def check_batches(data: bytes | bytearray | memoryview) -> list[BatchHeader]:
    """Validates a body of one or more concatenated batches; returns their headers."""
    if len(data) == 0:
        raise CorruptBatch("empty body: expected at least one record batch")
    headers = []
    position = 0
    while position < len(data):
        header = check_batch(data, position)
        headers.append(header)
        position += header.size
    return headers


def patch_batch(buffer: bytearray, position: int, base_offset: int, leader_epoch: int) -> None:
    """The leader's only write into a batch: its base offset and leader epoch."""
    _I64.pack_into(buffer, position, base_offset)
    _I32.pack_into(buffer, position + _LEADER_EPOCH_AT, leader_epoch)


def iter_headers(data: bytes | bytearray | memoryview) -> Iterator[BatchHeader]:
    """Headers of consecutive batches; stops at a partial trailing batch."""
    position = 0
    end = len(data)
    while position + HEADER_SIZE <= end:
        header = read_header(data, position)
        size = header.batch_length + LENGTH_PREFIX
        if size < HEADER_SIZE or position + size > end:
            return
        yield header
        position += size


class UndecodableRecord(NamedTuple):
    """Where a fetch answer stops making sense: the first wanted record that cannot be
    decoded (CRC mismatch, bad framing), and the offset after its batch."""

    offset: int
    next_batch_offset: int
    reason: str


class FetchedRecords(NamedTuple):
    """A decoded fetch answer: the records before any undecodable one, the next
    offset to fetch (the undecodable record's, if any), and the undecodable record."""

    messages: list[Message]
    next_offset: int
    undecodable: UndecodableRecord | None


def decode_fetch(
    data: bytes | bytearray | memoryview,
    min_offset: int = 0,
    topic: str = "",
    partition: int = -1,
) -> FetchedRecords:
    """Every record at or after ``min_offset`` in consecutive whole batches, checking
    each batch's CRC and each record's framing; stops at the first record that fails.

    A fetch may return batches that start before the requested offset; callers pass
    the offset they asked for so that they see each record once. Records below it are
    only walked past (their length), so a damaged record is reported only when it is
    wanted, or when the walk cannot get past it. A partial trailing batch is ignored.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    out: list[Message] = []
    position = 0
    end = len(data)
    next_offset = min_offset
    while position + HEADER_SIZE <= end:
        header = HEADER.unpack_from(data, position)
        batch_end = position + header[1] + LENGTH_PREFIX
        if batch_end > end or batch_end < position + HEADER_SIZE:
            break
        base_offset, record_count = header[0], header[12]
        batch_next = base_offset + record_count
        if batch_next <= min_offset:
            position = batch_end
            continue
        reason = _batch_problem(data, position, batch_end, header)
        first_bad = base_offset
        if reason is None:
            bad = _decode_batch(
                data, position, batch_end, header, min_offset, topic, partition, out
            )
            if bad is None:
                next_offset = max(next_offset, batch_next)
                position = batch_end
                continue
            index, reason = bad
            first_bad = base_offset + index
        offset = max(first_bad, min_offset)
        return FetchedRecords(out, offset, UndecodableRecord(offset, batch_next, reason))
    return FetchedRecords(out, next_offset, None)


def decode_records(
    data: bytes | bytearray | memoryview,
    min_offset: int = 0,
    topic: str = "",
    partition: int = -1,
) -> list[Message]:
    """Like :func:`decode_fetch`, but raises CorruptBatch at an undecodable record."""
    fetched = decode_fetch(data, min_offset, topic, partition)
    if fetched.undecodable is not None:
        bad = fetched.undecodable
        raise CorruptBatch(f"record at offset {bad.offset} cannot be decoded: {bad.reason}")
    return fetched.messages


def _batch_problem(
    data: bytes, position: int, batch_end: int, header: tuple[int, ...]
) -> str | None:
    """Why a whole batch cannot be trusted (magic, counts, CRC), or None."""
    if header[3] != MAGIC:
        return f"unknown magic {header[3]}"
    if not 1 <= header[12] <= MAX_RECORDS_PER_BATCH or header[6] != header[12] - 1:
        return f"bad record_count {header[12]}"
    crc = zlib.crc32(memoryview(data)[position + CRC_START : batch_end])
    if crc != header[4]:
        return f"CRC {crc:#010x} != {header[4]:#010x}"
    return None


def _decode_batch(
    data: bytes,
    position: int,
    batch_end: int,
    header: tuple[int, ...],
    min_offset: int,
    topic: str,
    partition: int,
    out: list[Message],
) -> tuple[int, str] | None:
    """Appends the batch's records at or after ``min_offset`` to ``out``; returns
    (index, reason) of the first record that does not decode, else None.

    This is the consumer's per-record cost, so the loop builds the tuples directly
    (about 1 us a record here) and shares one empty header tuple.
    """
    append = out.append
    unpack_record = RECORD_HEADER.unpack_from
    new = tuple.__new__
    no_headers: tuple[tuple[str, bytes], ...] = ()
    base_offset = header[0]
    base_timestamp = header[7]
    cursor = position + HEADER_SIZE
    for index in range(header[12]):
        if cursor + RECORD_HEADER_SIZE > batch_end:
            return index, "record overruns its batch"
        length, delta, key_length, value_length, header_count = unpack_record(data, cursor)
        record_end = cursor + 4 + length
        if record_end > batch_end:
            return index, "record length overruns its batch"
        offset = base_offset + index
        if offset < min_offset:
            cursor = record_end
            continue
        if key_length < -1 or value_length < -1:
            return index, "negative key or value length"
        field = cursor + RECORD_HEADER_SIZE
        key = None
        if key_length >= 0:
            key = data[field : field + key_length]
            field += key_length
        value = None
        if value_length >= 0:
            value = data[field : field + value_length]
            field += value_length
        headers: Sequence[tuple[str, bytes]] = no_headers
        if header_count:
            parsed: list[tuple[str, bytes]] = []
            try:
                field = _decode_headers(data, field, header_count, parsed, record_end)
            except (CorruptBatch, UnicodeDecodeError, struct.error):
                return index, "bad record headers"
            headers = parsed
        if field != record_end:
            return index, "record fields do not fill its length"
        cursor = record_end
        fields = (topic, partition, offset, key, value, base_timestamp + delta, headers)
        append(new(Message, fields))
    if cursor != batch_end:
        return header[12] - 1, "records do not fill the batch"
    return None


def _decode_headers(
    data: bytes, cursor: int, count: int, out: list[tuple[str, bytes]], end: int
) -> int:
    for _ in range(count):
        (name_length,) = _HEADER_NAME.unpack_from(data, cursor)
        cursor += 2
        name = data[cursor : cursor + name_length].decode()
        cursor += name_length
        (value_length,) = _U32.unpack_from(data, cursor)
        cursor += 4
        if cursor + value_length > end:
            raise CorruptBatch("header overruns its record")
        out.append((name, data[cursor : cursor + value_length]))
        cursor += value_length
    return cursor


@dataclass(frozen=True, slots=True)
class BatchSpan:
    """Where one batch sits in a buffer, with the offsets it covers."""

    position: int
    size: int
    base_offset: int
    next_offset: int
