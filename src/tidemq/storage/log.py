"""PartitionLog: one partition replica's log on disk. Kafka's ``Log``, in Python.

Directory layout (one directory per partition replica)::

    00000000000000000000.log     segment: concatenated record batches (segment.py)
    00000000000000000000.index   its sparse offset index (index.py), a cache
    00000000000000004711.log     the next segment starts at offset 4711 ...
    leader-epoch-checkpoint      "0\\n<count>\\n<epoch> <start_offset>\\n..."
    recovery-point-checkpoint    "<offset>\\n": every offset below it was fsynced
    log-start-offset-checkpoint  "<offset>\\n": first offset still visible
    clean-shutdown               exists only between close() and the next open()

Invariants:

* Offsets are dense: segment k+1 starts at segment k's next offset; inside a
  segment each batch starts where the previous one ended. The last segment is the
  active one; only it is appended to; it is never deleted by retention.
* ``log_start_offset <= flushed_offset <= log_end_offset`` except that the log start
  may pass the flushed offset (retention never deletes unflushed data: it never
  touches the active segment, and older segments were fsynced when rolled past).
* Checkpoints only ever under-state: the recovery point is written after the fsync
  it describes; the epoch checkpoint is written before the recovery point that
  relies on it; log start is persisted before segment files are unlinked; a
  truncation lowers the recovery point to its cut (durably) before it unlinks or cuts
  any segment, so recovery re-checks from the cut segment on whatever part of the
  truncation a crash undid.
* Recovery (``open``) re-validates with ``check_batch`` and offset continuity every
  batch from the start of the segment holding the recovery point (every segment
  when there is no recovery point), cuts the log at the first bad or torn batch,
  deletes later segments, rebuilds their indexes and the epochs above that point,
  then fsyncs the survivors so that flushed_offset == log_end_offset.
* Fail-stop: once any fsync of the log failed (a sync's, a truncation's, or the one
  cutting off an append whose journal write failed) every later ``sync`` raises.

The recovery-point checkpoint costs two extra fsyncs, so ``sync`` rewrites it only
when the flushed offset has moved into a newer segment (recovery starts at a
segment boundary, so a newer value inside the same segment would save no work),
on truncation and on close.

Threads: one owning thread calls everything except ``sync``, which any thread may
call concurrently with ``append`` (a group-commit worker). ``_lock`` guards the
few fields both touch and is held only for bookkeeping, never for I/O;
``_sync_lock`` serialises syncs and checkpoint writes against truncation.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from bisect import bisect_right
from pathlib import Path

from tidemq.errors import CorruptBatch, OffsetOutOfRange, invariant
from tidemq.logs import event
from tidemq.storage.checkpoint import (
    fsync_directory,
    read_epochs,
    read_offset,
    write_atomically,
    write_epochs,
    write_offset,
)
from tidemq.storage.config import LogConfig
from tidemq.storage.epochs import LeaderEpochCache
from tidemq.storage.index import U32_MAX
from tidemq.storage.journal import Journal
from tidemq.storage.segment import LOG_SUFFIX, LogSegment
from tidemq.wire.batch import BatchSpan, check_batch, iter_headers, patch_batch

RECOVERY_POINT_FILE = "recovery-point-checkpoint"
LOG_START_FILE = "log-start-offset-checkpoint"
EPOCH_FILE = "leader-epoch-checkpoint"
CLEAN_SHUTDOWN_FILE = "clean-shutdown"
APPEND_BYTES_MAX = (1 << 31) - 1

_log = logging.getLogger(__name__)
_SEGMENT_NAME = re.compile(r"^(\d{20})\.log$")


class PartitionLog:
    def __init__(self, directory: Path, config: LogConfig) -> None:
        self.directory = directory
        self.config = config
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._segments: list[LogSegment] = []
        self._base_offsets: list[int] = []
        self._dirty: set[LogSegment] = set()
        self._directory_dirty = False
        self._epochs = LeaderEpochCache()
        self._epochs_dirty = False
        self._log_start_offset = 0
        self._log_end_offset = 0
        self._flushed_offset = 0
        self._recovery_checkpoint_offset = 0
        self._truncation_generation = 0
        self._closed = False
        self._sync_failed: OSError | None = None  # a failed fsync: every later sync fails
        self._journal: Journal | None = None
        self._journal_key = ""
        self.recovered_truncated_bytes = 0  # for logs and metrics: what open() cut off
        self.opened_after_clean_shutdown = False

    # ----------------------------------------------------------------- open

    @classmethod
    def open(cls, directory: Path, config: LogConfig, now_ms: int) -> PartitionLog:
        directory = Path(directory)
        if not directory.exists():
            directory.mkdir(parents=True)
            fsync_directory(directory.parent)
        log = cls(directory, config)
        marker = directory / CLEAN_SHUTDOWN_FILE
        log.opened_after_clean_shutdown = marker.exists()
        base_offsets = _prepare_directory(directory)
        log_start = read_offset(directory / LOG_START_FILE)
        recovery_point = read_offset(directory / RECOVERY_POINT_FILE)
        if base_offsets:
            log._load_segments(base_offsets, log_start or 0, recovery_point, now_ms)
        else:
            log._start_empty(log_start or 0, now_ms)
        marker.unlink(missing_ok=True)
        log._directory_dirty = True
        log._sync(force_checkpoint=True)
        return log

    def _start_empty(self, start_offset: int, now_ms: int) -> None:
        segment = LogSegment.create(self.directory, start_offset, now_ms)
        self._segments, self._base_offsets = [segment], [start_offset]
        self._log_start_offset = self._log_end_offset = start_offset
        self._flushed_offset = self._recovery_checkpoint_offset = start_offset
        epochs = read_epochs(self.directory / EPOCH_FILE) or []
        self._epochs = LeaderEpochCache(epochs)
        self._epochs.truncate_from_end(start_offset)
        self._epochs_dirty = True
        write_offset(self.directory / LOG_START_FILE, start_offset)

    def _load_segments(
        self, base_offsets: list[int], log_start: int, recovery_point: int | None, now_ms: int
    ) -> None:
        base_offsets = _drop_segments_below(self.directory, base_offsets, log_start)
        segments = [
            LogSegment.open_existing(self.directory, base, next_base, now_ms)
            for base, next_base in zip(
                base_offsets, [*base_offsets[1:], base_offsets[-1]], strict=True
            )
        ]
        first_scanned = 0
        if recovery_point is not None:
            first_scanned = max(bisect_right(base_offsets, recovery_point) - 1, 0)
        scanned_epochs = self._recover_tail(segments, first_scanned)
        segments = [segment for segment in segments if segment.fd >= 0]
        self._segments = segments
        self._base_offsets = [segment.base_offset for segment in segments]
        self._log_end_offset = segments[-1].next_offset
        self._log_start_offset = min(max(log_start, segments[0].base_offset), self._log_end_offset)
        recovered_from = segments[first_scanned].base_offset
        self._flushed_offset = self._recovery_checkpoint_offset = recovered_from
        self._load_epochs(segments, first_scanned, scanned_epochs)
        self._dirty.update(segments[first_scanned:])

    def _recover_tail(
        self, segments: list[LogSegment], first_scanned: int
    ) -> list[tuple[int, int]]:
        """Validates segments[first_scanned:], cutting at the first damage; their epochs."""
        epochs: list[tuple[int, int]] = []
        expected = segments[first_scanned].base_offset
        for position in range(first_scanned, len(segments)):
            segment = segments[position]
            if segment.base_offset != expected:  # a gap or an overlap: unusable from here
                _delete_all(segments[position:])
                break
            result = segment.recover(self.config.index_interval_bytes)
            self.recovered_truncated_bytes += result.truncated_bytes
            epochs.extend(result.epochs)
            expected = segment.next_offset
            if result.truncated_bytes > 0 or segment.size_bytes == 0:
                _delete_all(segments[position + 1 :])
                break
            if position + 1 < len(segments):
                segment.write_index()
        return epochs

    def _load_epochs(
        self, segments: list[LogSegment], first_scanned: int, scanned: list[tuple[int, int]]
    ) -> None:
        loaded = read_epochs(self.directory / EPOCH_FILE)
        if loaded is None:  # lost or garbage: read the epochs back from batch headers
            loaded = []
            for segment in segments[:first_scanned]:
                for _, header in segment.walk_headers():
                    loaded.append((header.leader_epoch, header.base_offset))
        epochs = LeaderEpochCache(loaded)
        epochs.truncate_from_end(segments[first_scanned].base_offset)
        for epoch, start_offset in scanned:
            epochs.assign(epoch, start_offset)
        epochs.truncate_from_start(self._log_start_offset)
        epochs.truncate_from_end(self._log_end_offset)
        self._epochs = epochs
        self._epochs_dirty = True

    @classmethod
    def recreate_empty(
        cls, directory: Path, start_offset: int, config: LogConfig, now_ms: int
    ) -> PartitionLog:
        """Deletes the directory's log (closed) and starts it over, empty, at
        ``start_offset``: a follower whose leader's log start passed its log end."""
        shutil.rmtree(directory)
        fsync_directory(directory.parent)
        directory.mkdir(parents=True)
        fsync_directory(directory.parent)  # the new entry too: open() will not (it exists)
        write_offset(directory / LOG_START_FILE, start_offset)
        return cls.open(directory, config, now_ms)

    # ----------------------------------------------------------- properties

    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def log_end_offset(self) -> int:
        return self._log_end_offset

    @property
    def flushed_offset(self) -> int:
        return self._flushed_offset

    @property
    def truncation_generation(self) -> int:
        """Changes on every truncation: a durable end noted before it is void."""
        return self._truncation_generation

    @property
    def closed(self) -> bool:
        return self._closed

    # -------------------------------------------------------------- journal

    def attach_journal(self, journal: Journal, key: str) -> None:
        """From now on every append is also written to the broker-wide journal
        (storage/journal.py) under ``key``, and a truncation is journaled durably
        before the segment is cut; durability comes from ``mark_durable`` after the
        journal's fsync, the segment files are fsynced behind it by checkpoints."""
        self._journal, self._journal_key = journal, key

    def mark_durable(self, end_offset: int, generation: int) -> None:
        """The journal holding every append below ``end_offset`` was fsynced (noted at
        truncation generation ``generation``; a truncation since voids it)."""
        with self._lock:
            if generation == self._truncation_generation:
                end = min(end_offset, self._log_end_offset)
                self._flushed_offset = max(self._flushed_offset, end)

    @property
    def size_bytes(self) -> int:
        return sum(segment.size_bytes for segment in self._segments)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def segment_base_offsets(self) -> list[int]:
        """Base offset of each segment, oldest first (a copy)."""
        return list(self._base_offsets)

    # --------------------------------------------------------------- append

    def append(
        self, batches: bytes | bytearray | memoryview, leader_epoch: int, now_ms: int
    ) -> tuple[int, int]:
        """Leader path: assigns offsets and the epoch to validated batches; no fsync."""
        self._check_open()
        latest_epoch = self._epochs.latest_epoch()
        invariant(
            leader_epoch >= latest_epoch,
            f"append with leader epoch {leader_epoch} < latest {latest_epoch}",
        )
        buffer = bytearray(batches)
        spans, max_timestamp_ms = _patch_offsets(buffer, self._log_end_offset, leader_epoch)
        new_epochs = [(leader_epoch, spans[0].base_offset)] if leader_epoch > latest_epoch else []
        self._write(buffer, spans, max_timestamp_ms, new_epochs, now_ms)
        return spans[0].base_offset, spans[-1].next_offset - 1

    def append_replicated(
        self, batches: bytes | bytearray | memoryview, now_ms: int
    ) -> tuple[int, int]:
        """Follower path: batches keep their offsets and epochs; raises CorruptBatch."""
        self._check_open()
        buffer = bytes(batches)
        spans, max_timestamp_ms, new_epochs = _check_replicated(
            buffer, self._log_end_offset, self._epochs.latest_epoch()
        )
        self._write(buffer, spans, max_timestamp_ms, new_epochs, now_ms)
        return spans[0].base_offset, spans[-1].next_offset - 1

    def _write(
        self,
        buffer: bytes | bytearray,
        spans: list[BatchSpan],
        max_timestamp_ms: int,
        new_epochs: list[tuple[int, int]],
        now_ms: int,
    ) -> None:
        invariant(len(buffer) <= APPEND_BYTES_MAX, f"append of {len(buffer)} bytes")
        segment = self._active_segment(len(buffer), spans[-1].next_offset - 1, now_ms)
        start = segment.size_bytes
        segment.append(buffer, spans, self.config.index_interval_bytes)
        if self._journal is not None:
            try:
                self._journal.append(self._journal_key, spans[0].base_offset, buffer)
            except OSError:  # as a failed segment write: the append never happened
                self._undo_segment_append(segment, start, spans[0].base_offset)
                raise
        segment.note_timestamp(max_timestamp_ms)
        with self._lock:
            self._log_end_offset = spans[-1].next_offset
            self._dirty.add(segment)
            for epoch, start_offset in new_epochs:
                self._epochs_dirty |= self._epochs.assign(epoch, start_offset)

    def _undo_segment_append(self, segment: LogSegment, position: int, next_offset: int) -> None:
        """Cuts off an append whose journal write failed. If the cut's fsync fails the
        log is failed for good, as after any failed fsync: the disk that refused the
        journal write (ENOSPC, EIO) may have lost the segment's pages too, and a later
        fsync would report success over them (fsyncgate) and let a checkpoint delete the
        journal file that still holds this log's acknowledged appends."""
        try:
            segment.truncate(position, next_offset)
        except OSError as error:
            self._sync_failed = error
            raise

    def _active_segment(self, append_bytes: int, last_offset: int, now_ms: int) -> LogSegment:
        """The segment to append to, rolling first by size, age or offset range."""
        active = self._segments[-1]
        if active.size_bytes == 0:
            return active
        full = active.size_bytes + append_bytes > self.config.segment_bytes_max
        old = now_ms - active.created_ms >= self.config.segment_ms_max
        offsets_overflow = last_offset - active.base_offset > U32_MAX
        if not (full or old or offsets_overflow):
            return active
        active.write_index()
        active.recent.clear()  # its readers are catching up now: the index serves them
        segment = LogSegment.create(self.directory, self._log_end_offset, now_ms)
        with self._lock:
            self._segments.append(segment)
            self._base_offsets.append(segment.base_offset)
            self._directory_dirty = True
        return segment

    # ----------------------------------------------------------------- read

    def read(self, offset: int, max_bytes: int, max_offset: int | None = None) -> bytes:
        """Whole batches from the one holding offset, up to max_bytes (first one whole)."""
        self._check_open()
        if not self._log_start_offset <= offset <= self._log_end_offset:
            raise OffsetOutOfRange(
                f"offset {offset} is outside [{self._log_start_offset}, {self._log_end_offset}]"
            )
        if offset == self._log_end_offset or (max_offset is not None and offset >= max_offset):
            return b""
        slot = max(bisect_right(self._base_offsets, offset) - 1, 0)
        interval = self.config.index_interval_bytes
        for segment in self._segments[slot:]:
            data = segment.read(offset, max_bytes, max_offset, interval)
            if data is not None:
                return data
        return b""

    # ----------------------------------------------------------------- sync

    def sync(self) -> int:
        """fsyncs what was appended; returns the new flushed_offset. Thread-safe."""
        return self._sync(force_checkpoint=False)

    def _sync(self, force_checkpoint: bool) -> int:
        # Once an fsync failed every later one fails too: the failed segments were taken
        # off the dirty list, and Linux reports a writeback error to one fsync only, so a
        # later sync would "succeed" and move flushed_offset over pages that may be lost
        # (fsyncgate). The error that fail-stops may reach the broker some turns after a
        # sync from another path (a truncation, a checkpoint) saw it.
        with self._sync_lock:
            if self._sync_failed is not None:
                raise OSError(
                    self._sync_failed.errno,
                    f"an earlier fsync of {self.directory} failed: {self._sync_failed}",
                )
            with self._lock:
                end_offset = self._log_end_offset
                generation = self._truncation_generation
                descriptors = [os.dup(segment.fd) for segment in self._dirty]
                self._dirty.clear()
                directory_dirty, self._directory_dirty = self._directory_dirty, False
                epochs = self._epochs.entries() if self._epochs_dirty else None
                self._epochs_dirty = False
                moved_segment = self._segment_base(end_offset) != self._segment_base(
                    self._recovery_checkpoint_offset
                )
            try:
                for descriptor in descriptors:
                    os.fsync(descriptor)
                if directory_dirty:
                    fsync_directory(self.directory)
                if epochs is not None:
                    write_epochs(self.directory / EPOCH_FILE, epochs)
            except OSError as error:
                self._sync_failed = error
                raise
            finally:
                for descriptor in descriptors:
                    os.close(descriptor)
            with self._lock:
                # Under a journal only its fsyncs make appends count as durable
                # (mark_durable): replay then owes nothing past the journal's end.
                if generation == self._truncation_generation and self._journal is None:
                    self._flushed_offset = max(self._flushed_offset, end_offset)
            if (force_checkpoint or moved_segment) and generation == self._truncation_generation:
                write_offset(self.directory / RECOVERY_POINT_FILE, end_offset)
                self._recovery_checkpoint_offset = end_offset
            return self._flushed_offset

    def _segment_base(self, offset: int) -> int:
        return self._base_offsets[max(bisect_right(self._base_offsets, offset) - 1, 0)]

    # ------------------------------------------------------------- truncate

    def truncate_to(self, offset: int) -> None:
        """Drops every offset >= offset (rounded down to its batch start); durable."""
        self._check_open()
        if offset >= self._log_end_offset:
            return
        if offset < self._log_start_offset:
            raise OffsetOutOfRange(f"truncate to {offset} below log start {self.log_start_offset}")
        with self._sync_lock:
            slot = max(bisect_right(self._base_offsets, offset) - 1, 0)
            segment = self._segments[slot]
            found = segment.find_batch(offset, self.config.index_interval_bytes)
            if found is None:
                raise CorruptBatch(f"{segment.log_path}: offset {offset} not found")
            position, header = found
            if self._journal is not None:  # durable before the cut: replay never undoes it
                self._journal.truncate(self._journal_key, header.base_offset)
            self._lower_recovery_point(header.base_offset)
            with self._lock:
                removed = self._segments[slot + 1 :]
                del self._segments[slot + 1 :]
                del self._base_offsets[slot + 1 :]
                self._dirty.difference_update(removed)
                self._truncation_generation += 1
                self._log_end_offset = header.base_offset
                self._log_start_offset = min(self._log_start_offset, header.base_offset)
                self._flushed_offset = min(self._flushed_offset, header.base_offset)
                self._epochs.truncate_from_end(header.base_offset)
                self._epochs_dirty = False
                epochs = self._epochs.entries()
            for later in removed:
                later.delete()
            event(
                _log,
                "log_truncated",
                f"{self.directory.name}: truncated to offset {header.base_offset}",
                logging.WARNING,
                directory=self.directory.name,
                reason="truncate_to",
                log_end_offset=header.base_offset,
            )
            try:
                segment.truncate(position, header.base_offset)
            except OSError as error:  # the cut may not be durable: no later sync is
                self._sync_failed = error
                raise
            segment.write_index()
            write_epochs(self.directory / EPOCH_FILE, epochs)

    def _lower_recovery_point(self, cut: int) -> None:
        """Durably moves the recovery point down to a truncation's cut, before any
        segment is unlinked or cut. Recovery trusts every segment below the one holding
        the recovery point unchecked, so with it still above the cut a crash part way
        (killed between two unlinks; a power loss undoing unlinks that no directory
        fsync covered yet) reopens a log with a gap, or with the truncated records back
        past the cut segment. Recovery from the cut segment on finds either. Fail-stop
        on an error: the journal may already hold the cut that memory does not."""
        if self._recovery_checkpoint_offset <= cut:
            return
        try:
            write_offset(self.directory / RECOVERY_POINT_FILE, cut)
        except OSError as error:
            self._sync_failed = error
            raise
        self._recovery_checkpoint_offset = cut

    # ------------------------------------------------------------ retention

    def apply_retention(self, now_ms: int, max_offset: int | None = None) -> int:
        """Deletes whole old segments past retention_ms or retention_bytes; how many.

        Only segments wholly below ``max_offset`` (the broker passes the high watermark):
        a record not yet on every in-sync replica is never deleted, however old its
        timestamp or small the byte budget."""
        self._check_open()
        count = self._retention_victims(now_ms)
        if max_offset is not None:
            while count and self._segments[count].base_offset > max_offset:
                count -= 1
        if count:
            self._advance_log_start(self._segments[count].base_offset)
            self._delete_oldest(count)
        return count

    def _retention_victims(self, now_ms: int) -> int:
        retention_ms, retention_bytes = self.config.retention_ms, self.config.retention_bytes
        remaining_bytes = self.size_bytes
        count = 0
        for segment in self._segments[:-1]:
            expired = retention_ms >= 0 and now_ms - segment.largest_timestamp_ms() > retention_ms
            oversize = retention_bytes >= 0 and remaining_bytes - segment.size_bytes >= (
                retention_bytes
            )
            if not (expired or oversize):
                break
            remaining_bytes -= segment.size_bytes
            count += 1
        return count

    def delete_records_before(self, offset: int) -> None:
        """Moves log_start_offset up to offset; deletes segments wholly below it."""
        self._check_open()
        if offset > self._log_end_offset:
            raise OffsetOutOfRange(f"offset {offset} > log end offset {self._log_end_offset}")
        if offset <= self._log_start_offset:
            return
        self._advance_log_start(offset)
        count = 0
        while count + 1 < len(self._segments) and self._base_offsets[count + 1] <= offset:
            count += 1
        self._delete_oldest(count)

    def _advance_log_start(self, offset: int) -> None:
        write_offset(self.directory / LOG_START_FILE, offset)
        with self._lock:
            self._log_start_offset = offset
            self._epochs_dirty |= self._epochs.truncate_from_start(offset)
            # An entry must cover at least one stored offset, as after a reopen.
            self._epochs_dirty |= self._epochs.truncate_from_end(self._log_end_offset)

    def _delete_oldest(self, count: int) -> None:
        with self._lock:
            removed = self._segments[:count]
            del self._segments[:count]
            del self._base_offsets[:count]
            self._dirty.difference_update(removed)
        for segment in removed:
            segment.delete()

    # --------------------------------------------------------------- epochs

    def latest_epoch(self) -> int:
        return self._epochs.latest_epoch()

    def end_offset_for_epoch(self, epoch: int) -> int:
        """Start offset of the first epoch > epoch, log_end_offset for the latest, else -1."""
        return self._epochs.epoch_and_end_offset(epoch, self._log_end_offset)[1]

    def epoch_and_end_offset(self, epoch: int) -> tuple[int, int]:
        """(largest known epoch <= epoch, its end offset): the OffsetsForLeaderEpoch answer."""
        return self._epochs.epoch_and_end_offset(epoch, self._log_end_offset)

    def epoch_entries(self) -> list[tuple[int, int]]:
        return self._epochs.entries()

    # ---------------------------------------------------------------- close

    def close(self, mark_clean: bool = True) -> None:
        """Syncs, writes indexes and (unless ``mark_clean`` is False: a journal replay
        after a crash) the clean-shutdown marker, closes the files."""
        if self._closed:
            return
        self._sync(force_checkpoint=True)
        self._segments[-1].write_index()
        self._closed = True
        for segment in self._segments:
            segment.close()
        if mark_clean:
            write_atomically(self.directory / CLEAN_SHUTDOWN_FILE, "")

    def _check_open(self) -> None:
        invariant(not self._closed, f"{self.directory}: log used after close()")


def _delete_all(segments: list[LogSegment]) -> None:
    for segment in segments:
        segment.delete()
        segment.fd = -1  # marks it dropped for the caller


def _prepare_directory(directory: Path) -> list[int]:
    """Removes temporaries and orphan indexes; the sorted segment base offsets."""
    base_offsets = []
    for path in directory.iterdir():
        if path.name.endswith(".tmp"):
            path.unlink()
        elif match := _SEGMENT_NAME.match(path.name):
            base_offsets.append(int(match.group(1)))
    for path in directory.glob("*.index"):
        if not path.with_suffix(LOG_SUFFIX).exists():
            path.unlink()
    return sorted(base_offsets)


def _drop_segments_below(directory: Path, base_offsets: list[int], log_start: int) -> list[int]:
    """Deletes segments that end at or below log_start (a retention cut short by a crash)."""
    keep = 0
    while keep + 1 < len(base_offsets) and base_offsets[keep + 1] <= log_start:
        name = f"{base_offsets[keep]:020d}"
        (directory / (name + LOG_SUFFIX)).unlink(missing_ok=True)
        (directory / (name + ".index")).unlink(missing_ok=True)
        keep += 1
    return base_offsets[keep:]


def _patch_offsets(
    buffer: bytearray, first_offset: int, leader_epoch: int
) -> tuple[list[BatchSpan], int]:
    """Gives each batch its base offset and the epoch; the spans and max timestamp."""
    spans = []
    position = 0
    offset = first_offset
    max_timestamp_ms = -1
    for header in iter_headers(buffer):
        patch_batch(buffer, position, offset, leader_epoch)
        spans.append(BatchSpan(position, header.size, offset, offset + header.record_count))
        max_timestamp_ms = max(max_timestamp_ms, header.max_timestamp)
        position += header.size
        offset += header.record_count
    invariant(bool(spans) and position == len(buffer), "append of unvalidated batches")
    return spans, max_timestamp_ms


def _check_replicated(
    buffer: bytes, expected_offset: int, latest_epoch: int
) -> tuple[list[BatchSpan], int, list[tuple[int, int]]]:
    """Checks CRC, framing, offset continuity and epoch order of replicated batches."""
    if not buffer:
        raise CorruptBatch("empty body: expected at least one record batch")
    spans: list[BatchSpan] = []
    new_epochs: list[tuple[int, int]] = []
    position = 0
    max_timestamp_ms = -1
    while position < len(buffer):
        header = check_batch(buffer, position)
        if header.base_offset != expected_offset:
            raise CorruptBatch(
                f"batch at byte {position}: base offset {header.base_offset}, "
                f"expected {expected_offset}"
            )
        if header.leader_epoch < latest_epoch:
            raise CorruptBatch(
                f"batch at byte {position}: leader epoch {header.leader_epoch} < {latest_epoch}"
            )
        if header.leader_epoch > latest_epoch:
            new_epochs.append((header.leader_epoch, header.base_offset))
            latest_epoch = header.leader_epoch
        spans.append(BatchSpan(position, header.size, header.base_offset, header.next_offset))
        max_timestamp_ms = max(max_timestamp_ms, header.max_timestamp)
        position += header.size
        expected_offset = header.next_offset
    return spans, max_timestamp_ms, new_epochs
