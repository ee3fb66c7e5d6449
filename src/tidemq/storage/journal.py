"""The broker-wide journal: one write-ahead file whose fsync makes every partition's
appends durable at once.

Why: with ``fsync=always`` each partition log used to be fsynced on its own. On this
machine one fdatasync of one file costs ~0.1 ms, twelve parallel fsyncs of twelve
files ~0.7 ms (p99 2-3 ms): a broker leading and following many partitions spent its
latency budget in the file system. RabbitMQ's quorum queues share one write-ahead log
for the same reason. Here every append (leader or follower) is written twice: to its
segment file (page cache only) and to the journal; one fdatasync of the journal makes
all of them durable (group commit across partitions). The segment files are fsynced
behind it, by a checkpoint: rotate to a new journal file, fsync every log that
appended to the old one, then delete the old file.

Files: ``<data-dir>/journal/<sequence 20 digits>.<salt 8 hex digits>.journal``,
records back to back::

    crc u32 | length u32 | kind u8 | key_length u16 | offset i64 | synced u64 | key | payload

``crc`` is CRC-32 of everything after it, started from the file's ``salt`` (random per
file, so a record embedded in a produced value cannot pass for one of the file's own:
replay takes an intact record as proof of damage); files written before salts are
named ``<sequence>.journal`` and use 0. ``length`` counts the bytes after it.
``synced`` is how many bytes of the file were known durable (fdatasynced) when the
record was written: the evidence replay needs to tell damage from a torn tail. It is
present when ``kind`` has bit 0x80 set (written since); journals written before carry
no such field (kind 1-3) and are still read. ``kind & 0x7F``: 1 = append (payload:
the whole record batches of one append, possibly several, offsets and epochs
assigned, as in the segment), 2 = truncate (the log was cut to ``offset``; no
payload), 3 = reset (the log was dropped and restarted empty at ``offset``: a
follower's ``reset_to``; no payload), 4 = padding (no key, offset 0, zeros up to the
next ``SECTOR_BYTES`` boundary of the file; replay skips it). ``key`` is the partition
directory's name under the data directory.

Invariants:

* a record is written to the journal after its batches were written to the segment
  and before anything is acknowledged; ``sync`` fdatasyncs journal files oldest first,
  and ``rotate`` syncs before the new file gets any byte, so what is durable in the
  journal is a prefix of what was written, across files too: a record of a newer file
  survives a power loss only if every older file survived whole (a gap in a log's
  records across files is corruption, not a lost tail);
* every fdatasync ends on a sector boundary: ``sync`` first pads the file with a
  padding record up to the next ``SECTOR_BYTES`` boundary, under the lock appends take,
  so no write after it touches a sector that holds durable bytes. Else the next
  record, written into the partly filled sector, made the disk rewrite that sector;
  a power loss tearing it took acknowledged bytes with it, and with the only later
  record torn too nothing proved they had been durable: replay took the damage for a
  torn tail and dropped acknowledged records without a word;
* a truncation is journaled and made durable *before* the segment is cut, so a replay
  never brings back records the log had dropped;
* a journal file is deleted only after every log that appended to it was fsynced
  (checkpoint), so the segments plus the remaining journal files hold every durable
  append;
* a checkpointed file may be kept as a *spare* instead (``<sequence>.<salt>.spare``,
  at most ``SPARES_MAX``, up to ``SPARE_BYTES_MAX``; replay never reads one) and reused
  as the next new file: renamed to the new name with a new salt and written from byte
  0 over its old records. Its blocks are allocated and written, so a padded
  fdatasync there commits no file system metadata (about half the cost of one into a
  new block, measured here; PostgreSQL recycles WAL segments for the same reason).
  The new salt differs from the old one, and a CRC started from another salt never
  matches a whole, unchanged record (CRC-32 of fixed-length data is a bijection of
  its start value): no old record decodes as one of the file's own, so replay stops
  at the end of the new ones and drops the old bytes after them as a torn tail, and
  no old record proves damage. The old records are values clients chose, which the
  proof scan reads after a crash: a candidate's CRC comes from prefix CRCs (a table
  step per hexadecimal digit of its claimed length), so fake record headers cost
  seconds, not the hours they did (zeroing spares instead cost ~5 ms of p99.9,
  measured). A start deletes the spares it finds;
* rotation cuts the older file to its written end (durably, before the new file gets
  a byte): a reused file is longer than what was written to it, and the old bytes
  left after an older file's last record would read as a bad record that the newer
  file's first record "proves" durable. So every file but the newest ends with its
  last record, and a spare holds only records of its own salt;
* replay is idempotent: an append whose bytes the segment already holds is skipped, one
  that differs cuts the log there and is re-appended; a torn record ends the replay
  (nothing after it was ever durable, by the prefix rule). A bad record is damage, not
  a torn tail, when a later record proves its bytes were durable: an intact record of
  the same file (found by scanning past the bad one, so a zeroed sector or a bad
  length does not hide it) whose ``synced`` is past the bad record's position, or any
  intact record in a later file (rotation synced the older file whole first). Then
  replay refuses (CorruptBatch, naming the file and byte) rather than drop
  acknowledged records. Intact records after a bad one that were all written before
  its bytes were synced are an ordinary torn tail of a power loss (a disk cache may
  keep a later unsynced page and lose an earlier one): dropped, never acknowledged;
* a truncation falls on a batch boundary (``truncate_to`` rounds down), possibly
  between two batches of one append record: replay keeps that record's batches below
  the cut. A cut inside a batch is corruption (CorruptBatch).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from tidemq.errors import CorruptBatch, invariant
from tidemq.logs import event
from tidemq.storage.checkpoint import fsync_directory
from tidemq.wire.batch import iter_headers

_log = logging.getLogger(__name__)

JOURNAL_DIRECTORY = "journal"
APPEND = 1
TRUNCATE = 2
RESET = 3
PAD = 4
# The unit a disk writes whole or tears: a file system block (4 KiB on ext4 and XFS),
# which also covers 512-byte sectors; or the memory page, where larger (64 KiB on some
# arm64 and ppc64le kernels), since writeback may rewrite a whole page.
SECTOR_BYTES = max(4096, mmap.PAGESIZE)
_HEAD = struct.Struct(">II")  # crc, length
_BODY = struct.Struct(">BHq")  # kind, key length, offset (records without ``synced``)
_BODY_SYNCED = struct.Struct(">BHqQ")  # kind | SYNCED_FLAG, key length, offset, synced
SYNCED_FLAG = 0x80
_KINDS = (APPEND, TRUNCATE, RESET, PAD)
# Where a record with ``synced`` may start: its kind byte follows the head.
# The kind byte of a record with ``synced`` (it follows the head): where the proof scan
# tries a candidate. A plain character class, so the scan over zeros or a torn tail
# runs at C speed (a look-ahead tried at every byte took 3.4 s for 64 MiB of zeros).
_SYNCED_KIND = re.compile(b"[%s]" % re.escape(bytes(kind | SYNCED_FLAG for kind in _KINDS)))
# ``<sequence>.<salt>.journal``; a journal written before salts: ``<sequence>.journal``.
_NAME = re.compile(r"^(\d{20})(?:\.([0-9a-f]{8}))?\.journal$")
# A checkpointed file kept for reuse (its old name's sequence and salt); never replayed.
_SPARE_NAME = re.compile(r"^(\d{20})\.([0-9a-f]{8})\.spare$")
# One spare covers the steady state: each checkpoint reuses one and frees one.
SPARES_MAX = 1
# Larger files are deleted, not kept: after a crash the proof scan reads a reused
# file's old records (~0.2 s for 16 MiB of ordinary ones, ~8-10 s at worst for 32 MiB
# of values crafted as record headers, measured here), and files this large come from
# throughput, where a sync's padding is a small share.
SPARE_BYTES_MAX = 32 * 1024 * 1024
# A key is a replica's directory name: printable ASCII, no space or slash. The proof
# scan skips candidates whose key is anything else without computing their CRC.
_KEY_BYTES = re.compile(rb"[\x21-\x2e\x30-\x7e]+")
KEY_BYTES_MAX = 0xFFFF
RECORD_BYTES_MAX = (1 << 31) - 1


class JournalRecord(NamedTuple):
    kind: int
    key: str
    offset: int
    payload: bytes
    synced: int | None = None  # None: a record written without the field


def encode_record(
    kind: int, key: str, offset: int, payload: bytes | bytearray, synced: int = 0, salt: int = 0
) -> bytes:
    return b"".join(_record_parts(kind, key, offset, payload, synced, salt))


def _record_parts(
    kind: int, key: str, offset: int, payload: bytes | bytearray, synced: int, salt: int
) -> tuple[bytes, bytes | bytearray]:
    """The record as (head, payload): written with one writev, the payload not copied."""
    key_bytes = key.encode()
    invariant(len(key_bytes) <= KEY_BYTES_MAX, f"journal key of {len(key_bytes)} bytes")
    prefix = _BODY_SYNCED.pack(kind | SYNCED_FLAG, len(key_bytes), offset, synced) + key_bytes
    length = len(prefix) + len(payload)
    invariant(length <= RECORD_BYTES_MAX, f"journal record of {length} bytes")
    crc = zlib.crc32(payload, zlib.crc32(prefix, salt))
    return _HEAD.pack(crc, length) + prefix, payload


PAD_BYTES_MIN = _HEAD.size + _BODY_SYNCED.size


def padding_record(position: int, synced: int, salt: int = 0) -> bytes:
    """A padding record from ``position`` to the next sector boundary (to the one
    after, when the gap is too short for a record); empty when already on one."""
    gap = -position % SECTOR_BYTES
    if gap == 0:
        return b""
    if gap < PAD_BYTES_MIN:
        gap += SECTOR_BYTES
    return encode_record(PAD, "", 0, bytes(gap - PAD_BYTES_MIN), synced, salt)


def decode_records(data: bytes, salt: int = 0) -> Iterator[tuple[JournalRecord, int]]:
    """Records of one file (``salt``: its name's, ``file_salt``) with the position after
    each, up to the first torn or corrupt one (excluded)."""
    position = 0
    while (decoded := _decode_at(data, position, salt)) is not None:
        yield decoded
        position = decoded[1]


def _intact_end(data: bytes, salt: int) -> int:
    """Where the file's whole, intact records end."""
    end = 0
    for _record, after in decode_records(data, salt):
        end = after
    return end


def _decode_at(data: bytes, position: int, salt: int) -> tuple[JournalRecord, int] | None:
    """The whole, intact record at ``position`` and the position after it, else None."""
    if position + _HEAD.size > len(data):
        return None
    crc, length = _HEAD.unpack_from(data, position)
    start = position + _HEAD.size
    end = start + length
    if length < _BODY.size or end > len(data):
        return None
    body = data[start:end]
    if zlib.crc32(body, salt) != crc:
        return None
    synced: int | None = None
    if body[0] & SYNCED_FLAG:
        if length < _BODY_SYNCED.size:
            return None
        kind, key_length, offset, synced = _BODY_SYNCED.unpack_from(body)
        kind &= ~SYNCED_FLAG
        fields = _BODY_SYNCED.size
    else:
        kind, key_length, offset = _BODY.unpack_from(body)
        fields = _BODY.size
    if kind not in _KINDS or fields + key_length > length:
        return None
    key = body[fields : fields + key_length].decode(errors="replace")
    return JournalRecord(kind, key, offset, body[fields + key_length :], synced), end


def _proof_of_damage(data: bytes, position: int, salt: int, later: list[Path]) -> str | None:
    """Where a record proves that the bytes at ``position`` (a bad record) had been
    made durable, so they are damage and not a torn tail: an intact record further in
    this file whose ``synced`` passes ``position`` (every candidate start is tried: a
    bad header hides where the next record starts), or any intact first record of a
    later file (rotation synced this file whole before that one got a byte). None: a
    torn tail (what follows it, if anything, was never durable)."""
    if position + _HEAD.size <= len(data):  # a journal written before ``synced``:
        _, length = _HEAD.unpack_from(data, position)  # its old rule, an intact
        after = position + _HEAD.size + length  # record where the bad one says
        decoded = _decode_at(data, after, salt) if length >= _BODY.size else None
        if decoded is not None and decoded[0].synced is None:
            return f"byte {after} (an older journal format: no sync record to tell)"
    fields_at = _HEAD.size
    crcs: _PrefixCrcs | None = None
    for match in _SYNCED_KIND.finditer(data, position + 1 + fields_at):
        start = match.start() - fields_at
        if start + fields_at + _BODY_SYNCED.size > len(data):
            break
        # The fields, unchecked, first: a candidate that could not prove anything is
        # not CRC'd (most candidates are bytes of payloads; a CRC each was quadratic).
        _, key_length, offset, synced = _BODY_SYNCED.unpack_from(data, start + fields_at)
        if not position < synced <= start:
            continue
        # The head next (a payload's bytes pass the test above often enough, e.g. a
        # batch's timestamp and producer id): a key a partition name could have, and a
        # length that holds it.
        length = _HEAD.unpack_from(data, start)[1]
        if not (key_length > 0 or data[start + fields_at] & ~SYNCED_FLAG == PAD):
            continue
        if key_length > KEY_BYTES_MAX or offset < 0:
            continue
        if length < _BODY_SYNCED.size + key_length or start + _HEAD.size + length > len(data):
            continue
        key_at = start + fields_at + _BODY_SYNCED.size
        if key_length and not _KEY_BYTES.fullmatch(data, key_at, key_at + key_length):
            continue
        # Its CRC from the file's prefix CRCs in O(1) (a candidate's claimed length is
        # client-chosen: CRC'd byte by byte, fake headers claiming long records made the
        # scan quadratic), the whole record decoded only when that matches.
        crcs = crcs or _PrefixCrcs(data)
        body_at = start + _HEAD.size
        if crcs.of(body_at, body_at + length, salt) != _HEAD.unpack_from(data, start)[0]:
            continue
        decoded = _decode_at(data, start, salt)
        if decoded is not None:
            return f"byte {start} (written once {synced} bytes were synced)"
    for path in later:
        if _decode_at(path.read_bytes(), 0, file_salt(path)) is not None:
            return path.name
    return None


_CRC_POLY = 0xEDB88320  # CRC-32 (zlib's), reflected


def _crc_multiply(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected, as zlib's multmodp)."""
    m = 1 << 31
    product = 0
    while a:
        if a & m:
            product ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


def _x_to_the_powers_of_two() -> list[int]:
    powers = [1 << 30]  # x^1
    for _ in range(63):
        powers.append(_crc_multiply(powers[-1], powers[-1]))
    return powers


_X_2N = _x_to_the_powers_of_two()  # x^(2^k) mod the polynomial
# Multiplication by x^(8 * nibble * 16^position), a linear map of 32 bits, as four
# tables of 256 (one per byte of the operand), built when first needed (at most 8 x 15).
_SHIFT_TABLES: dict[tuple[int, int], tuple[list[int], ...]] = {}


def _x_to_the_bytes(length: int) -> int:
    """x^(8 * length) modulo the polynomial (1 << 31 is x^0, reflected)."""
    power, k = 1 << 31, 3
    while length:
        if length & 1:
            power = _crc_multiply(_X_2N[k], power)
        length >>= 1
        k += 1
    return power


def _times(constant: int) -> tuple[list[int], ...]:
    tables: tuple[list[int], ...] = ()
    for byte in range(4):
        bits = [_crc_multiply(constant, 1 << (8 * byte + bit)) for bit in range(8)]
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            table[value] = table[value ^ low] ^ bits[low.bit_length() - 1]
        tables += (table,)
    return tables


def _crc_shift(crc: int, length: int) -> int:
    """``crc`` carried over ``length`` bytes of zeros without conditioning (zlib's
    crc32_combine: crc32(A + B) == _crc_shift(crc32(A), len(B)) ^ crc32(B)). One
    step per nonzero hexadecimal digit of ``length`` (at most 8): the claimed length
    is client-chosen, and a step per 1-bit cost ~3x more for lengths of many 1-bits."""
    position = 0
    while length:
        nibble = length & 15
        if nibble:
            key = (position, nibble)
            tables = _SHIFT_TABLES.get(key)
            if tables is None:
                tables = _SHIFT_TABLES[key] = _times(_x_to_the_bytes(nibble << (4 * position)))
            t0, t1, t2, t3 = tables
            crc = t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ t3[crc >> 24]
        length >>= 4
        position += 1
    return crc


class _PrefixCrcs:
    """CRC-32 of any slice of ``data`` from any start value in O(1): zlib.crc32 of
    every prefix ending on a ``_STEP`` boundary, then crc32(data[a:b], salt) ==
    shift(salt ^ crc32(data[:a]), b - a) ^ crc32(data[:b])."""

    _STEP = 4096

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.prefixes = [0]
        view = memoryview(data)
        for at in range(0, len(data) - self._STEP + 1, self._STEP):
            self.prefixes.append(zlib.crc32(view[at : at + self._STEP], self.prefixes[-1]))

    def _prefix(self, end: int) -> int:
        step = end // self._STEP
        return zlib.crc32(self.data[step * self._STEP : end], self.prefixes[step])

    def of(self, start: int, end: int, salt: int) -> int:
        return _crc_shift(salt ^ self._prefix(start), end - start) ^ self._prefix(end)


@dataclass
class _File:
    sequence: int
    path: Path
    fd: int
    salt: int = 0
    written: int = 0  # bytes written (page cache)
    synced: int = 0  # bytes known durable


def file_salt(path: Path) -> int:
    """The CRC salt of a journal file or a spare, from its name (0 for a file written
    before salts)."""
    match = _NAME.match(path.name) or _SPARE_NAME.match(path.name)
    return int(match.group(2), 16) if match and match.group(2) else 0


def journal_files(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    named = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [path for _, path in sorted(named)]


def spare_files(directory: Path) -> list[Path]:
    """Checkpointed journal files kept for reuse (never replayed)."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if _SPARE_NAME.match(p.name))


class Journal:
    """Appends from the owning (event loop) thread; the group commit's ``sync`` from it
    or, during a checkpoint or after a slow one, from a worker thread; ``discard`` (a
    checkpoint's step) from a worker thread. ``_lock`` guards the file list and
    counters, never I/O waits except the short ``os.write`` of an append."""

    def __init__(self, directory: Path, file_bytes_max: int) -> None:
        self.directory = directory
        self.file_bytes_max = file_bytes_max
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._files: list[_File] = []
        self._spares: list[Path] = []  # checkpointed files to reuse, under _lock
        self._closed = False
        self._failed: OSError | None = None  # a failed fdatasync: every later sync fails

    @classmethod
    def open(cls, directory: Path, file_bytes_max: int = 64 * 1024 * 1024) -> Journal:
        """A journal continuing after the files already there (replay them first; the
        broker deletes them after its replay instead). A torn tail the replay dropped
        is cut off them first, and every file after it emptied; damage that a record
        proves durable (the replay refused it) is an invariant violation here."""
        if not directory.exists():
            directory.mkdir(parents=True)
            fsync_directory(directory.parent)
        journal = cls(directory, file_bytes_max)
        existing = journal_files(directory)
        sequence = int(existing[-1].name.split(".")[0]) + 1 if existing else 0
        torn = False
        for path in existing:  # kept until the first checkpoint: still needed for replay
            # Cut what replay dropped as a torn tail (and every file after it): left in
            # place, the new file's first record would pass for proof that it was
            # durable, and every later start would refuse.
            data, salt = path.read_bytes(), file_salt(path)
            intact = 0 if torn else _intact_end(data, salt)
            if intact < len(data):
                if not torn:  # replay dropped it as a torn tail: else it refused
                    later = existing[existing.index(path) + 1 :]
                    proof = _proof_of_damage(data, intact, salt, later)
                    invariant(proof is None, f"Journal.open over damaged {path} ({proof})")
                torn = True
                descriptor = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(descriptor, intact)
                    os.fdatasync(descriptor)
                finally:
                    os.close(descriptor)
            journal._files.append(_File(int(path.name.split(".")[0]), path, -1, salt))
        for path in spare_files(directory):  # a crash's: only a running journal reuses
            path.unlink()
        journal._files.append(journal._create(sequence))
        fsync_directory(directory)
        return journal

    def _create(self, sequence: int) -> _File:
        """The new newest file: a spare renamed, else a new one. Written from byte 0
        at the descriptor's position (no O_APPEND: a spare is longer than what is
        written to it); every cut of a failed write moves the position back."""
        salt = secrets.randbits(32)
        spare = self._spares.pop() if self._spares else None
        if spare is not None:
            old_salt = file_salt(spare)
            while salt == old_salt:  # the old records must not decode (module docstring)
                salt = secrets.randbits(32)
        path = self.directory / f"{sequence:020d}.{salt:08x}.journal"
        if spare is not None:
            os.rename(spare, path)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        return _File(sequence, path, fd, salt)

    @property
    def current_bytes(self) -> int:
        return self._files[-1].written

    def append(self, key: str, base_offset: int, payload: bytes | bytearray) -> None:
        self._write(APPEND, key, base_offset, payload)

    def _write(self, kind: int, key: str, offset: int, payload: bytes | bytearray) -> None:
        """One record, on the owning thread (the only one that appends or rotates, so
        the current file cannot change under it; ``synced`` only grows, so reading it
        unlocked gives a true lower bound). OSError if the write failed or was short:
        then nothing of the record stays (or, if cutting it off failed, every later
        sync raises: a torn record must not have acknowledged ones behind it)."""
        files = self._files  # close() empties the list: check before indexing it
        invariant(not self._closed and bool(files), "journal used after close()")
        current = files[-1]
        parts = _record_parts(kind, key, offset, payload, current.synced, current.salt)
        size = len(parts[0]) + len(parts[1])
        with self._lock:
            invariant(not self._closed, "journal used after close()")
            invariant(current is self._files[-1], "journal rotated during an append")
            written = os.writev(current.fd, parts)
            if written != size:
                self._cut_short_write(current, written, size)
            current.written += written

    def _cut_short_write(self, current: _File, written: int, size: int) -> None:
        """A short writev (a full disk): cut the partial record off; under _lock."""
        error = OSError(errno.ENOSPC, f"short write to the journal: {written} of {size} bytes")
        try:  # durably: a sync skips a file with nothing new, so none would sync the cut
            os.ftruncate(current.fd, current.written)
            os.fdatasync(current.fd)
            os.lseek(current.fd, current.written, os.SEEK_SET)
        except OSError as cut:
            self._failed = cut
        raise error

    def truncate(self, key: str, offset: int) -> None:
        """Journals a truncation durably; call before cutting the segment."""
        self._write(TRUNCATE, key, offset, b"")
        self.sync()

    def reset(self, key: str, offset: int) -> None:
        """Journals durably that the log restarts empty at ``offset``; call before
        deleting it. Explicit: a truncation to past the journaled end cannot tell a
        reset when nothing of the log is journaled any more (after a checkpoint)."""
        self._write(RESET, key, offset, b"")
        self.sync()

    def sync(self) -> None:
        """Makes everything written so far durable: fdatasync of every file with
        unsynced bytes, oldest first. Thread-safe; raises OSError (fail-stop).

        Once one fdatasync failed every later call fails too: Linux reports a writeback
        error to one fsync of the open file only, and a later one succeeds although the
        pages never reached the disk ("fsyncgate"). A failure reported to a truncation
        (event loop) or a checkpoint (worker thread) reaches fail-stop only some loop
        turns later; a group commit in between must not mark anything durable."""
        with self._sync_lock:
            if self._failed is not None:
                raise OSError(
                    self._failed.errno, f"an earlier journal fdatasync failed: {self._failed}"
                )
            with self._lock:
                todo = [
                    (f, self._pad(f)) for f in self._files if f.fd >= 0 and f.written > f.synced
                ]
                descriptors = [os.dup(f.fd) for f, _ in todo]
            try:
                for descriptor in descriptors:
                    os.fdatasync(descriptor)
            except OSError as error:
                self._failed = error
                raise
            finally:
                for descriptor in descriptors:
                    os.close(descriptor)
            with self._lock:
                for journal_file, written in todo:
                    journal_file.synced = max(journal_file.synced, written)

    def _pad(self, journal_file: _File) -> int:
        """Pads the file to a sector boundary before it is synced (the invariant in the
        module's docstring); what the sync will cover. Under ``_lock``. A padding write
        that fails (a full disk) is cut off and fails this sync and every later one
        (fail-stop): covering the unpadded end would let the next write rewrite a block
        holding acknowledged bytes."""
        pad = padding_record(journal_file.written, journal_file.synced, journal_file.salt)
        if not pad:
            return journal_file.written
        try:
            written = os.write(journal_file.fd, pad)
        except OSError as error:
            written, failure = 0, error
        else:
            if written == len(pad):
                journal_file.written += written
                return journal_file.written
            failure = OSError(errno.ENOSPC, f"short write: {written} of {len(pad)} bytes")
        if written:
            try:
                os.ftruncate(journal_file.fd, journal_file.written)
                os.lseek(journal_file.fd, journal_file.written, os.SEEK_SET)
            except OSError as cut:
                self._failed = cut
                raise
        event(
            _log,
            "journal_padding_failed",
            f"{journal_file.path.name}: could not pad to a sector boundary before a "
            f"sync ({failure}); nothing of it is acknowledged",
            logging.WARNING,
            file=journal_file.path.name,
        )
        # Covering the unpadded end instead let the next write (a record, or the next
        # sync's padding) rewrite the block holding acknowledged bytes; a power loss
        # tearing it, with nothing intact after, lost them silently. Sticky, like a
        # failed fdatasync (fail-stop): a truncation or reset whose record is written
        # but not synced must not be followed by more appends.
        self._failed = OSError(failure.errno or errno.ENOSPC, f"journal padding failed: {failure}")
        raise self._failed

    def rotate(self) -> list[Path]:
        """Starts a new file; the older ones, to ``discard`` once every log that
        appended to them was fsynced. Owning thread (no append runs meanwhile).

        Syncs first, so the older files are durable before the new one gets a byte.
        Else a power loss could keep a record of the new file (its page written back)
        but not an unsynced one of an older file, a gap in some log's records that
        replay cannot close (CorruptBatch at every start); sync's oldest-first order
        only covers what a finished sync made durable. Costs one fdatasync on the
        owning thread per rotation (usually nothing is left to sync: group commits
        run every few loop turns).

        A reused file's old bytes after the end are cut off (module docstring), also
        before the new file gets a byte."""
        self.sync()
        with self._sync_lock:  # no padding write between the sync and the cut
            newest = self._files[-1]
            if newest.fd >= 0 and os.fstat(newest.fd).st_size > newest.written:
                try:
                    os.ftruncate(newest.fd, newest.written)
                    os.fdatasync(newest.fd)
                except OSError as error:
                    self._failed = error  # as a failed sync: the cut may be half done
                    raise
        with self._lock:
            sequence = self._files[-1].sequence + 1
            self._files.append(self._create(sequence))
            older = [f.path for f in self._files[:-1]]
        fsync_directory(self.directory)
        return older

    def discard(self, paths: list[Path]) -> None:
        """Deletes checkpointed files, or keeps them as spares (a worker thread). Their
        unsynced bytes are fsynced first, so durability stays a prefix even while
        deleting."""
        self.sync()
        with self._lock:
            gone = [f for f in self._files[:-1] if f.path in paths]
            self._files = [f for f in self._files if f not in gone]
        for journal_file in gone:  # oldest first, each durable before the next:
            if journal_file.fd >= 0:  # what survives a crash is a suffix of the journal
                os.close(journal_file.fd)
            with self._lock:
                keep = len(self._spares) < SPARES_MAX and not self._closed
            spare = self.directory / f"{journal_file.sequence:020d}.{journal_file.salt:08x}.spare"
            if keep:
                try:
                    keep = journal_file.path.stat().st_size <= SPARE_BYTES_MAX
                    if keep:
                        os.rename(journal_file.path, spare)
                except FileNotFoundError:  # deleted by hand: as unlink(missing_ok) allows
                    keep = False
            if not keep:
                journal_file.path.unlink(missing_ok=True)
            fsync_directory(self.directory)  # out of the journal (a spare is never replayed)
            if keep:
                with self._lock:  # reusable once the rename is durable
                    self._spares.append(spare)

    def close(self, remove_files: bool) -> None:
        """Closes the files; ``remove_files`` after a clean shutdown synced every log
        (and the spares)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            files, self._files = self._files, []
            spares, self._spares = self._spares, []
        for journal_file in files:
            if journal_file.fd >= 0:
                os.close(journal_file.fd)
            if remove_files:
                journal_file.path.unlink(missing_ok=True)
        if remove_files:
            for spare in spares:
                spare.unlink(missing_ok=True)
            fsync_directory(self.directory)


class ReplayTarget(Protocol):
    """What replay needs of one partition log (PartitionLog is one)."""

    @property
    def log_start_offset(self) -> int: ...

    @property
    def log_end_offset(self) -> int: ...

    def read(self, offset: int, max_bytes: int, max_offset: int | None = None) -> bytes: ...

    def truncate_to(self, offset: int) -> None: ...

    def append_replicated(
        self, batches: bytes | bytearray | memoryview, now_ms: int
    ) -> tuple[int, int]: ...


StartOver = Callable[[str, int], ReplayTarget]


def replay(
    directory: Path,
    open_log: Callable[[str], ReplayTarget | None],
    now_ms: int,
    start_over: StartOver | None = None,
) -> dict[str, int]:
    """Re-applies the journal files to their logs; how many batches were (re)written
    per key. ``open_log(key)`` returns the log of that partition directory, or None
    when it no longer exists (a deleted topic or moved replica: its records are
    skipped). ``start_over(key, offset)`` empties a log to restart it at ``offset``
    (a follower reset that a crash cut short).

    Each log's records are first folded into the *tail* they leave (storage state
    between journal records is never materialised: a segment may hold bytes of a later
    history than the record being replayed); then the log is cut at the first batch
    where it differs from the tail and the rest of the tail is appended. What the
    segment holds beyond an identical tail stays (it was fsynced by a checkpoint).
    """
    tails: dict[str, _Tail] = {}
    paths = journal_files(directory)
    for index, path in enumerate(paths):
        data = path.read_bytes()
        consumed = 0
        salt = file_salt(path)
        for record, end in decode_records(data, salt):
            consumed = end
            if record.kind == PAD:
                continue
            tails.setdefault(record.key, _Tail(record.key)).add(record)
        if consumed < len(data):
            proof = _proof_of_damage(data, consumed, salt, paths[index + 1 :])
            if proof is not None:
                later = " and move the later journal files away" if index + 1 < len(paths) else ""
                raise CorruptBatch(
                    f"journal {path}: the record at byte {consumed} is damaged, and it had "
                    f"been made durable (proof: {proof}): records after it may have been "
                    "acknowledged. Refusing to replay. To start anyway, accepting their "
                    f"loss (the records before byte {consumed} are kept): `truncate -s "
                    f"{consumed} {path}`{later} (docs/OPERATIONS.md, 'Damaged journal')"
                )
            event(
                _log,
                "journal_tail_dropped",
                f"{path.name}: {len(data) - consumed} bytes after the last whole record "
                "(never acknowledged: a torn tail, or a reused file's old records)",
                logging.WARNING,
                file=path.name,
                dropped_bytes=len(data) - consumed,
            )
            break  # by the prefix rule nothing later was durable
    applied: dict[str, int] = {}
    for key, tail in tails.items():
        target = open_log(key)
        if target is None:
            continue
        written = tail.apply(target, now_ms, start_over)
        if written:
            applied[key] = written
    return applied


class _Tail:
    """What a log's journal records leave from offset ``base`` on: contiguous batches."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.base: int | None = None
        self.end = 0
        self.batches: list[tuple[int, bytes]] = []
        self.restarted = False  # the base is a reset of the whole log, not a cut

    def add(self, record: JournalRecord) -> None:
        if record.kind == RESET:
            self.base = self.end = record.offset
            self.batches = []
            self.restarted = True
            return
        if record.kind == TRUNCATE:
            self._cut(record.offset)
            return
        if self.base is None:
            self.base = self.end = record.offset
        elif record.offset > self.end:
            raise CorruptBatch(
                f"journal of {self.key}: append at {record.offset} after the tail ends at "
                f"{self.end}"
            )
        elif record.offset < self.end:
            self._cut(record.offset)
        self.batches.append((record.offset, record.payload))
        self.end = _next_offset(record.payload, record.offset)

    def _cut(self, offset: int) -> None:
        if self.base is None or offset <= self.base or offset > self.end:
            # Below everything journaled, or past the end: only a reset (the follower
            # restarting empty at the leader's log start) moves a log forward.
            self.restarted = self.base is not None and offset > self.end
            self.base = self.end = offset
            self.batches = []
            return
        while self.batches and self.batches[-1][0] >= offset:
            self.batches.pop()
        if self.batches:
            record_offset, payload = self.batches[-1]
            if _next_offset(payload, record_offset) != offset:
                # One record holds all batches of one append: keep those below the cut.
                kept = _batches_ending_at(payload, offset)
                if kept is None:
                    raise CorruptBatch(f"journal of {self.key}: a cut at {offset} inside a batch")
                self.batches[-1] = (record_offset, kept)
        self.end = offset

    def _holds_the_restart(self, target: ReplayTarget) -> bool:
        """Whether the log already is the one a reset restarted at ``base``: it starts
        there, or retention (or a records deletion) has moved its start up since and the
        batch holding that start is the journaled one. A log the reset did not replace
        yet starts below ``base`` (it ended before the leader's log start) or holds
        another history there (it diverged below its own start)."""
        start = target.log_start_offset
        if start == self.base:
            return True
        if self.base is None or start < self.base:
            return False
        if start >= target.log_end_offset:  # retention emptied it after the reset
            return start == target.log_end_offset == self.end
        journaled = _batch_holding(self.batches, start)
        if journaled is None:
            return False
        return target.read(start, len(journaled))[: len(journaled)] == journaled

    def apply(self, target: ReplayTarget, now_ms: int, start_over: StartOver | None) -> int:
        """Makes the log end with this tail; how many batches were (re)written, or 1
        for a cut alone. Under the journal a log's durable end moves only with the
        journal's fsyncs (``PartitionLog.mark_durable``), so what the segment holds
        past the tail was never acknowledged and is cut."""
        assert self.base is not None
        if self.restarted and start_over is not None and not self._holds_the_restart(target):
            target = start_over(self.key, self.base)
        start = target.log_start_offset
        batches = [(offset, payload) for offset, payload in self.batches if offset >= start]
        base = batches[0][0] if batches else max(self.end, start)
        if target.log_end_offset < base:
            if start_over is None or not (self.restarted or start == target.log_end_offset):
                raise CorruptBatch(
                    f"journal of {self.key}: its tail starts at {base}, past the log end "
                    f"{target.log_end_offset}: a checkpointed segment lost data"
                )
            target = start_over(self.key, base)
        position = base
        kept = 0
        while kept < len(batches) and position < target.log_end_offset:
            offset, payload = batches[kept]
            held = target.read(offset, len(payload))
            if held[: len(payload)] != payload:
                break
            position = _next_offset(payload, offset)
            kept += 1
        changed = 0
        if position < target.log_end_offset:
            target.truncate_to(position)
            changed = 1
        for _, payload in batches[kept:]:
            target.append_replicated(payload, now_ms)
            changed += 1
        return changed


def _batch_holding(batches: list[tuple[int, bytes]], offset: int) -> bytes | None:
    """The one journaled batch whose records include ``offset``, else None."""
    for _, payload in batches:
        position = 0
        for header in iter_headers(payload):
            if header.base_offset <= offset < header.next_offset:
                return payload[position : position + header.size]
            position += header.size
    return None


def _batches_ending_at(payload: bytes, offset: int) -> bytes | None:
    """The leading batches of ``payload`` up to the one whose records end just below
    ``offset``; None when no batch ends there (a cut inside a batch)."""
    size = 0
    for header in iter_headers(payload):
        if header.next_offset > offset:
            return None
        size += header.size
        if header.next_offset == offset:
            return payload[:size]
    return None


def _next_offset(payload: bytes, offset: int) -> int:
    last = offset
    for header in iter_headers(payload):
        last = header.next_offset
    return last
