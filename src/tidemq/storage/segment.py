"""One segment of a partition log: a ``.log`` file of whole batches and its index.

Files, for a segment whose first offset is ``base_offset``::

    <base_offset:020d>.log    record batches (wire/batch.py format), concatenated,
                              offsets dense: each batch's base_offset is the
                              previous batch's base_offset + record_count
    <base_offset:020d>.index  sparse index (index.py), a rebuildable cache

Invariants this class keeps:

* ``size_bytes`` is the valid end of the file: every byte below it belongs to a
  batch that was appended by us or validated by :meth:`recover`. Reads never
  return bytes at or past it, whatever the file length says.
* ``next_offset`` is the offset after the last batch below ``size_bytes``.
* The file is opened ``O_APPEND`` and written with ``os.write``, unbuffered, so a
  byte the log has accepted is in the page cache before ``append`` returns and
  ``os.fsync`` (from any thread) covers it. A failed write is cut back off.
* Every batch reached from an index entry must carry the base offset the entry
  promises; otherwise the index is dropped and the segment is walked from byte 0.

Not thread-safe, except that ``fd`` may be ``os.dup``-ed and fsynced elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tidemq.errors import CorruptBatch
from tidemq.storage.index import SparseIndex
from tidemq.wire.batch import (
    HEADER_SIZE,
    MAGIC,
    MAX_RECORDS_PER_BATCH,
    BatchHeader,
    BatchSpan,
    check_batch,
    read_header,
)

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
SCAN_CHUNK_BYTES = 1 << 20  # recovery reads this much at a time
WALK_CHUNK_BYTES = 64 * 1024  # header walks from an index entry read this much
# Positions of the last batches appended, by base offset: followers and consumers read
# from where they stopped, which is almost always the start of a batch appended just
# now, so a read finds it in one header instead of a walk from the sparse index entry
# (~12 headers at 4 KiB per entry; ~5% of a busy broker's loop before this).
RECENT_BATCHES = 64


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}"


def header_is_sane(header: BatchHeader, available_bytes: int) -> bool:
    """The checks of check_batch that need no CRC: a header we can walk past."""
    size = header.size
    return (
        header.magic == MAGIC
        and HEADER_SIZE <= size <= available_bytes
        and 1 <= header.record_count <= MAX_RECORDS_PER_BATCH
        and header.last_offset_delta == header.record_count - 1
    )


def visible_length(data: bytes, base_offset: int, max_offset: int | None) -> int:
    """Bytes of the whole, contiguous batches at the start of data below max_offset."""
    position = 0
    expected = base_offset
    end = len(data)
    while position + HEADER_SIZE <= end:
        header = read_header(data, position)
        if not header_is_sane(header, end - position) or header.base_offset != expected:
            break
        if max_offset is not None and header.next_offset > max_offset:
            break
        position += header.size
        expected = header.next_offset
    return position


class _Window:
    """Reads a file forward through one buffer, never past ``end``."""

    __slots__ = ("_chunk_bytes", "_data", "_end", "_fd", "_start")

    def __init__(self, fd: int, end: int, chunk_bytes: int) -> None:
        self._fd = fd
        self._end = end
        self._chunk_bytes = chunk_bytes
        self._start = 0
        self._data = b""

    def get(self, position: int, length: int) -> tuple[bytes, int] | None:
        """(buffer, where position is in it) holding [position, position+length)."""
        if position + length > self._end:
            return None
        if position < self._start or position + length > self._start + len(self._data):
            wanted = min(max(length, self._chunk_bytes), self._end - position)
            self._data = os.pread(self._fd, wanted, position)
            self._start = position
            if len(self._data) < length:
                return None
        return self._data, position - self._start


@dataclass
class RecoveryResult:
    truncated_bytes: int
    epochs: list[tuple[int, int]] = field(default_factory=list)  # (epoch, first offset)


class LogSegment:
    __slots__ = (
        "base_offset",
        "bytes_since_index",
        "created_ms",
        "directory",
        "fd",
        "index",
        "max_timestamp_ms",
        "next_offset",
        "recent",
        "size_bytes",
    )

    def __init__(
        self, directory: Path, base_offset: int, fd: int, next_offset: int, created_ms: int
    ) -> None:
        self.directory = directory
        self.base_offset = base_offset
        self.fd = fd
        self.size_bytes = os.fstat(fd).st_size
        self.next_offset = next_offset
        self.created_ms = created_ms
        self.index: SparseIndex | None = None
        self.bytes_since_index = 0
        self.max_timestamp_ms: int | None = None
        self.recent: dict[int, int] = {}  # base offset -> position, RECENT_BATCHES newest

    @property
    def log_path(self) -> Path:
        return self.directory / (segment_name(self.base_offset) + LOG_SUFFIX)

    @property
    def index_path(self) -> Path:
        return self.directory / (segment_name(self.base_offset) + INDEX_SUFFIX)

    @classmethod
    def create(cls, directory: Path, base_offset: int, now_ms: int) -> LogSegment:
        path = directory / (segment_name(base_offset) + LOG_SUFFIX)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
        segment = cls(directory, base_offset, os.open(path, flags, 0o644), base_offset, now_ms)
        segment.index = SparseIndex()
        segment.max_timestamp_ms = -1
        try:
            os.unlink(segment.index_path)
        except FileNotFoundError:
            pass
        return segment

    @classmethod
    def open_existing(
        cls, directory: Path, base_offset: int, next_offset: int, now_ms: int
    ) -> LogSegment:
        """Opens without reading: next_offset is the caller's belief until recover()."""
        path = directory / (segment_name(base_offset) + LOG_SUFFIX)
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        return cls(directory, base_offset, fd, next_offset, now_ms)

    def append(self, data: bytes | bytearray, spans: Sequence[BatchSpan], interval: int) -> None:
        """Writes whole batches at the end; spans are positions in data, offsets patched."""
        start = self.size_bytes
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                written += os.write(self.fd, view[written:])
        except OSError:
            os.ftruncate(self.fd, start)
            raise
        index = self.index
        recent = self.recent
        for span in spans:
            if index is not None and self.bytes_since_index >= interval:
                index.append(span.base_offset - self.base_offset, start + span.position)
                self.bytes_since_index = 0
            self.bytes_since_index += span.size
            recent[span.base_offset] = start + span.position
        while len(recent) > RECENT_BATCHES:
            del recent[next(iter(recent))]  # the oldest (dicts keep insertion order)
        self.size_bytes = start + len(view)
        self.next_offset = spans[-1].next_offset

    def note_timestamp(self, max_timestamp_ms: int) -> None:
        if self.max_timestamp_ms is not None and max_timestamp_ms > self.max_timestamp_ms:
            self.max_timestamp_ms = max_timestamp_ms

    def recover(self, interval: int) -> RecoveryResult:
        """Validates every batch (header, CRC, framing, offset continuity) from byte 0.

        Cuts the file at the first bad or torn batch, rebuilds the index, and
        returns the epochs seen. Afterwards size_bytes/next_offset are the truth.
        """
        file_size = os.fstat(self.fd).st_size
        window = _Window(self.fd, file_size, SCAN_CHUNK_BYTES)
        index = SparseIndex()
        result = RecoveryResult(0)
        position, expected, since_index, max_timestamp = 0, self.base_offset, 0, -1
        while (header := _checked_batch_at(window, position, expected)) is not None:
            if since_index >= interval:
                index.append(header.base_offset - self.base_offset, position)
                since_index = 0
            since_index += header.size
            if not result.epochs or header.leader_epoch > result.epochs[-1][0]:
                result.epochs.append((header.leader_epoch, header.base_offset))
            max_timestamp = max(max_timestamp, header.max_timestamp)
            position += header.size
            expected = header.next_offset
        if position < file_size:
            os.ftruncate(self.fd, position)
            result.truncated_bytes = file_size - position
        self.size_bytes, self.next_offset, self.index = position, expected, index
        self.recent.clear()
        self.bytes_since_index, self.max_timestamp_ms = since_index, max_timestamp
        return result

    def walk_headers(self) -> Iterator[tuple[int, BatchHeader]]:
        """(position, header) of each batch from byte 0; stops at the first insane one."""
        window = _Window(self.fd, self.size_bytes, SCAN_CHUNK_BYTES)
        position = 0
        expected = self.base_offset
        while (got := window.get(position, HEADER_SIZE)) is not None:
            header = read_header(*got)
            if not header_is_sane(header, self.size_bytes - position):
                return
            if header.base_offset != expected:
                return
            yield position, header
            position += header.size
            expected = header.next_offset

    def ensure_index(self, interval: int) -> SparseIndex:
        """The index, loaded from its file or rebuilt from the headers if unusable."""
        if self.index is not None:
            return self.index
        try:
            with open(self.index_path, "rb") as file:
                data = file.read(self.size_bytes // HEADER_SIZE * 8 + 8)
            self.index = SparseIndex.decode(data, self.size_bytes)
        except FileNotFoundError:
            self.index = None
        if self.index is None:
            self.index = SparseIndex()
            since_index = 0
            for position, header in self.walk_headers():
                if since_index >= interval:
                    self.index.append(header.base_offset - self.base_offset, position)
                    since_index = 0
                since_index += header.size
        return self.index

    def largest_timestamp_ms(self) -> int:
        if self.max_timestamp_ms is None:
            self.max_timestamp_ms = max(
                (header.max_timestamp for _, header in self.walk_headers()), default=-1
            )
        return self.max_timestamp_ms

    def find_batch(self, offset: int, interval: int) -> tuple[int, BatchHeader] | None:
        """(position, header) of the batch holding offset; None if past the end."""
        position = self.recent.get(offset)
        if position is not None:
            try:  # checked as any walk: a sane header with exactly this base offset
                found = self._walk_to(offset, position, offset)
            except CorruptBatch:
                found = None
                self.recent.clear()
            if found is not None:
                return found
        relative_offset, position = self.ensure_index(interval).lookup(offset - self.base_offset)
        try:
            return self._walk_to(offset, position, self.base_offset + relative_offset)
        except CorruptBatch:
            if position == 0:
                raise
        self.index = None  # it pointed at a wrong place: distrust it, rebuild later
        return self._walk_to(offset, 0, self.base_offset)

    def _walk_to(self, offset: int, position: int, expected: int) -> tuple[int, BatchHeader] | None:
        window = _Window(self.fd, self.size_bytes, WALK_CHUNK_BYTES)
        while position < self.size_bytes:
            got = window.get(position, HEADER_SIZE)
            header = None if got is None else read_header(*got)
            if header is None or not header_is_sane(header, self.size_bytes - position):
                raise CorruptBatch(f"{self.log_path}: no valid batch at byte {position}")
            if header.base_offset != expected:
                raise CorruptBatch(
                    f"{self.log_path}: batch at byte {position} has base offset "
                    f"{header.base_offset}, expected {expected}"
                )
            if header.next_offset > offset:
                return position, header
            position += header.size
            expected = header.next_offset
        return None

    def read(
        self, offset: int, max_bytes: int, max_offset: int | None, interval: int
    ) -> bytes | None:
        """Whole batches from the one holding offset; None if offset is past the end."""
        found = self.find_batch(offset, interval)
        if found is None:
            return None
        position, first = found
        if max_offset is not None and first.next_offset > max_offset:
            return b""
        length = min(max(max_bytes, first.size), self.size_bytes - position)
        data = os.pread(self.fd, length, position)
        end = visible_length(data, first.base_offset, max_offset)
        if end == 0:
            raise CorruptBatch(f"{self.log_path}: batch at byte {position} changed under us")
        return data if end == len(data) else data[:end]

    def truncate(self, position: int, next_offset: int) -> None:
        """Cuts the file at a batch boundary and fsyncs the cut. What is in memory
        follows the file before the fsync, so a failed fsync leaves the two alike."""
        os.ftruncate(self.fd, position)
        self.size_bytes = position
        self.next_offset = next_offset
        self.recent.clear()  # positions past the cut would name other batches later
        if self.index is not None:
            self.index.truncate_to_position(position)
        self.bytes_since_index = 0
        self.max_timestamp_ms = None if position else -1
        os.fsync(self.fd)

    def write_index(self) -> None:
        """Rewrites the index file (no fsync: it is a cache, validated when loaded)."""
        if self.index is None:
            return
        with open(self.index_path, "wb") as file:
            file.write(self.index.encode())

    def close(self) -> None:
        os.close(self.fd)

    def delete(self) -> None:
        self.close()
        self.log_path.unlink(missing_ok=True)
        self.index_path.unlink(missing_ok=True)


def _checked_batch_at(window: _Window, position: int, expected: int) -> BatchHeader | None:
    """The fully checked batch at position with base offset expected, else None."""
    got = window.get(position, HEADER_SIZE)
    if got is None:
        return None
    header = read_header(*got)
    size = header.size
    whole = window.get(position, size) if size >= HEADER_SIZE else None
    if whole is None:
        return None
    try:
        header = check_batch(*whole)
    except CorruptBatch:
        return None
    return header if header.base_offset == expected else None
