"""PartitionLog behaviour: reads, follower appends, sync from a thread, retention,
truncation and the leader-epoch cache."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from storage_helpers import (
    START_MS,
    batch_of,
    fail_once_with_eio,
    numbered_values,
    open_log,
    read_all,
)

from tidemq.errors import CorruptBatch, InvariantViolation, OffsetOutOfRange
from tidemq.storage import FsyncPolicy, LogConfig
from tidemq.storage.log import CLEAN_SHUTDOWN_FILE
from tidemq.wire.batch import decode_fetch, iter_headers, patch_batch

DAY_MS = 24 * 3600 * 1000


def test_empty_log(tmp_path: Path) -> None:
    log = open_log(tmp_path / "new" / "partition")
    assert (log.log_start_offset, log.log_end_offset, log.flushed_offset) == (0, 0, 0)
    assert log.read(0, 100) == b""
    assert log.latest_epoch() == -1
    assert log.end_offset_for_epoch(0) == -1
    with pytest.raises(OffsetOutOfRange):
        log.read(1, 100)
    log.close()
    log.close()  # idempotent
    with pytest.raises(InvariantViolation):
        log.read(0, 100)


def test_read_bounds_max_bytes_and_high_watermark(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    for index in range(5):
        log.append(batch_of(numbered_values(index * 2, 2, 100)), 0, START_MS)
    whole = log.read(0, 1 << 20)
    sizes = [header.size for header in iter_headers(whole)]
    assert len(sizes) == 5
    assert log.read(3, 1) == whole[sizes[0] : sizes[0] + sizes[1]]  # first batch always whole
    assert len(list(iter_headers(log.read(0, sizes[0] * 2 + 5)))) == 2
    assert log.read(0, 1 << 20, max_offset=5) == whole[: sum(sizes[:2])]  # batch 4..5 not visible
    assert log.read(4, 1 << 20, max_offset=5) == b""
    assert log.read(10, 100) == b""
    with pytest.raises(OffsetOutOfRange):
        log.read(11, 100)
    with pytest.raises(OffsetOutOfRange):
        log.read(-1, 100)
    log.close()


def test_append_patches_offsets_and_epoch_in_the_stored_bytes(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    body = batch_of([b"a", b"b"]) + batch_of([b"c"])
    assert log.append(body, 3, START_MS) == (0, 2)
    assert log.append(memoryview(batch_of([b"d"])), 3, START_MS) == (3, 3)
    headers = list(iter_headers(log.read(0, 1 << 20)))
    assert [(h.base_offset, h.leader_epoch) for h in headers] == [(0, 3), (2, 3), (3, 3)]
    with pytest.raises(InvariantViolation):
        log.append(batch_of([b"stale"]), 2, START_MS)
    log.close()


def test_append_replicated_checks_before_writing(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    good = bytearray(batch_of([b"a", b"b"]))
    patch_batch(good, 0, 0, 5)
    gap = bytearray(batch_of([b"c"]))
    patch_batch(gap, 0, 3, 5)
    corrupt = bytearray(good)
    corrupt[-1] ^= 1
    for bad in (bytes(gap), bytes(corrupt), bytes(good) + bytes(gap), b"", bytes(good[:-1])):
        with pytest.raises(CorruptBatch):
            log.append_replicated(bad, START_MS)
        assert log.log_end_offset == 0 and log.size_bytes == 0
    assert log.append_replicated(good, START_MS) == (0, 1)
    older = bytearray(batch_of([b"c"]))
    patch_batch(older, 0, 2, 4)
    with pytest.raises(CorruptBatch):
        log.append_replicated(older, START_MS)
    assert log.epoch_entries() == [(5, 0)]
    log.close()


def test_sync_from_a_thread_while_appending(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes_max=4096)
    stop = threading.Event()
    observed: list[tuple[int, int]] = []
    failures: list[BaseException] = []

    def syncer() -> None:
        try:
            while not stop.is_set():
                flushed = log.sync()
                observed.append((flushed, log.log_end_offset))
        except BaseException as exc:  # surfaced in the main thread below
            failures.append(exc)

    thread = threading.Thread(target=syncer)
    thread.start()
    try:
        for index in range(400):
            log.append(batch_of(numbered_values(index * 3, 3, 30)), 1, START_MS)
    finally:
        stop.set()
        thread.join()
    assert not failures
    assert len(observed) > 1
    flushed_values = [flushed for flushed, _ in observed]
    assert flushed_values == sorted(flushed_values)
    assert all(flushed <= end for flushed, end in observed)
    assert log.sync() == log.log_end_offset == 1200
    assert log.segment_count > 10
    log.close()
    log = open_log(tmp_path, segment_bytes_max=4096)
    assert len(read_all(log)) == 1200
    log.close()


def test_roll_by_age(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_ms_max=1000)
    log.append(batch_of([b"a"]), 0, START_MS)
    log.append(batch_of([b"b"]), 0, START_MS + 999)
    assert log.segment_count == 1
    log.append(batch_of([b"c"]), 0, START_MS + 1000)
    assert log.segment_count == 2
    log.close()


def test_retention_by_time_deletes_whole_old_segments_only(tmp_path: Path) -> None:
    config = {"segment_bytes_max": 500, "retention_ms": DAY_MS}
    log = open_log(tmp_path, **config)
    for day in range(6):
        for _ in range(3):
            log.append(batch_of([b"v" * 100], START_MS + day * DAY_MS), 0, START_MS)
    segments_before = log.segment_count
    assert segments_before >= 6
    assert log.apply_retention(START_MS) == 0
    now_ms = START_MS + 3 * DAY_MS + 1  # days 0, 1 are more than a day older than now
    deleted = log.apply_retention(now_ms)
    assert deleted > 0
    assert log.segment_count == segments_before - deleted
    start = log.log_start_offset
    assert start > 0 and (start - 1) // 3 <= 2  # every deleted record was from day 0..2
    oldest_end = log._base_offsets[1]
    assert (oldest_end - 1) // 3 >= 3  # the oldest kept segment holds a record of day 3+
    assert log.log_start_offset == int(sorted(tmp_path.glob("*.log"))[0].stem)
    assert log.apply_retention(START_MS + 100 * DAY_MS) == segments_before - deleted - 1
    assert log.segment_count == 1  # the active segment is never deleted
    assert log.log_end_offset == 18
    with pytest.raises(OffsetOutOfRange):
        log.read(0, 100)
    log.close()
    log = open_log(tmp_path, **config)
    assert log.log_start_offset == int(sorted(tmp_path.glob("*.log"))[0].stem)
    log.close()


def test_retention_by_size_keeps_at_least_retention_bytes(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes_max=1000, retention_bytes=2500, retention_ms=-1)
    for index in range(40):
        log.append(batch_of(numbered_values(index, 1, 150)), 0, START_MS)
    size_before = log.size_bytes
    deleted = log.apply_retention(START_MS)
    assert deleted > 0
    assert log.size_bytes - log._segments[0].size_bytes < 2500 <= log.size_bytes
    assert size_before - log.size_bytes > 0
    assert [value for _, value in read_all(log)] == [
        value
        for index in range(log.log_start_offset, 40)
        for value in numbered_values(index, 1, 150)
    ]
    log.close()


def test_delete_records_before(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes_max=300)
    for index in range(10):
        log.append(batch_of(numbered_values(index * 2, 2, 50)), 0, START_MS)
    log.delete_records_before(7)
    assert log.log_start_offset == 7
    assert read_all(log)[0][0] == 7
    assert all(int(path.stem) <= 7 for path in sorted(tmp_path.glob("*.log"))[:1])
    with pytest.raises(OffsetOutOfRange):
        log.delete_records_before(21)
    log.close()
    log = open_log(tmp_path, segment_bytes_max=300)
    assert log.log_start_offset == 7
    log.close()


def test_truncate_and_epoch_cache_across_reopen(tmp_path: Path) -> None:
    config = {"segment_bytes_max": 400}
    log = open_log(tmp_path, **config)
    for epoch, count in ((1, 4), (3, 3), (4, 5)):
        for _ in range(count):
            log.append(batch_of([b"x" * 40, b"y" * 40]), epoch, START_MS)
    assert log.epoch_entries() == [(1, 0), (3, 8), (4, 14)]
    assert log.latest_epoch() == 4
    assert [log.end_offset_for_epoch(epoch) for epoch in range(6)] == [0, 8, 8, 14, 24, 24]
    assert log.epoch_and_end_offset(2) == (1, 8)
    log.sync()

    log.truncate_to(15)  # inside batch 14..15: rounds down to 14
    assert log.log_end_offset == 14
    assert log.flushed_offset == 14
    assert log.epoch_entries() == [(1, 0), (3, 8)]
    assert log.end_offset_for_epoch(3) == 14
    log.append(batch_of([b"z"]), 6, START_MS)
    assert log.epoch_entries() == [(1, 0), (3, 8), (6, 14)]
    log.close()

    log = open_log(tmp_path, **config)
    assert log.epoch_entries() == [(1, 0), (3, 8), (6, 14)]
    assert log.log_end_offset == 15
    log.truncate_to(3)
    assert (log.log_end_offset, log.segment_count) == (2, 1)
    assert log.epoch_entries() == [(1, 0)]
    log.truncate_to(100)  # beyond the end: nothing to do
    crash_without_close = log._segments
    for segment in crash_without_close:
        segment.close()
    log = open_log(tmp_path, **config)
    assert log.log_end_offset == 2 and log.epoch_entries() == [(1, 0)]
    log.truncate_to(0)
    assert log.log_end_offset == 0 and log.epoch_entries() == []
    log.close()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        LogConfig(segment_bytes_max=0)
    with pytest.raises(ValueError):
        LogConfig(segment_bytes_max=1 << 31)
    with pytest.raises(ValueError):
        LogConfig(retention_ms=-2)
    assert LogConfig(fsync=FsyncPolicy("interval")).fsync is FsyncPolicy.INTERVAL


def test_epoch_entries_never_outlive_the_data_they_cover(tmp_path: Path) -> None:
    config = {"segment_bytes_max": 150, "retention_bytes": 0, "retention_ms": -1}
    log = open_log(tmp_path, **config)
    for _ in range(3):
        log.append(batch_of([b"v" * 40]), 0, START_MS)
    log.sync()
    log.truncate_to(2)
    assert log.apply_retention(START_MS) == 2
    assert (log.log_start_offset, log.log_end_offset, log.epoch_entries()) == (2, 2, [])
    for segment in log._segments:  # crash before the epoch checkpoint is rewritten
        segment.close()
    log = open_log(tmp_path, **config)
    assert (log.log_start_offset, log.log_end_offset, log.epoch_entries()) == (2, 2, [])
    log.close()


def test_retention_never_deletes_at_or_above_the_high_watermark(tmp_path: Path) -> None:
    """Review finding: an old producer timestamp (or a small byte budget) made a segment
    expire before followers had copied it."""
    log = open_log(tmp_path, segment_bytes_max=1, retention_ms=1)
    for number in range(5):  # one batch a segment, timestamps long past retention
        log.append(batch_of([f"v{number}".encode()], timestamp_ms=1), 0, START_MS)
    assert log.segment_count == 5
    assert log.apply_retention(START_MS + 10_000, max_offset=2) == 2  # segments 0, 1 only
    assert log.log_start_offset == 2
    assert log.apply_retention(START_MS + 10_000, max_offset=2) == 0
    assert log.apply_retention(START_MS + 10_000, max_offset=5) == 2  # the active one stays
    assert log.log_start_offset == 4
    log.close()


def test_after_a_failed_fsync_every_later_sync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux reports a writeback error to one fsync only, and the failed sync took its
    segments off the dirty list: a later sync (a group commit after a truncation or a
    checkpoint saw the error, before fail-stop) must not move flushed_offset over
    pages that may be lost (fsyncgate; `--no-journal` logs)."""
    log = open_log(tmp_path / "p0")
    log.append(batch_of(numbered_values(0, 2)), 0, START_MS)
    assert log.sync() == 2
    fail_once_with_eio(monkeypatch, "fsync")
    log.append(batch_of(numbered_values(2, 2)), 0, START_MS)
    with pytest.raises(OSError):
        log.sync()
    log.append(batch_of(numbered_values(4, 2)), 0, START_MS)
    with pytest.raises(OSError, match="earlier fsync"):
        log.sync()
    assert log.flushed_offset == 2
    monkeypatch.undo()
    with pytest.raises(OSError, match="earlier fsync"):
        log.close()  # nor is it closed as clean: the next start re-checks the tail
    assert not (tmp_path / "p0" / CLEAN_SHUTDOWN_FILE).exists()
    for segment in log._segments:  # the test's own cleanup
        segment.close()


def test_reads_of_recent_batches_skip_the_index_walk_and_stay_right_after_a_truncation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tidemq.storage import segment as segment_module

    log = open_log(tmp_path)
    for index in range(80):  # more batches than RECENT_BATCHES
        log.append(batch_of(numbered_values(index * 2, 2, 30)), 0, START_MS)
    whole = log.read(0, 1 << 20)
    [segment] = log._segments
    assert len(segment.recent) == segment_module.RECENT_BATCHES
    walks: list[int] = []
    real_walk = segment_module.LogSegment._walk_to

    def counting_walk(self, offset, position, expected):  # type: ignore[no-untyped-def]
        walks.append(offset)
        return real_walk(self, offset, position, expected)

    monkeypatch.setattr(segment_module.LogSegment, "_walk_to", counting_walk)
    headers = list(iter_headers(whole))
    for header in headers[-10:]:  # a follower or consumer reading from where it stopped
        position = sum(h.size for h in headers if h.base_offset < header.base_offset)
        assert log.read(header.base_offset, 1) == whole[position : position + header.size]
    assert len(walks) == 10  # one header each: found where the append put it
    assert log.read(2, 1) == whole[headers[0].size : headers[0].size + headers[1].size]
    assert log.read(5, 1 << 20) == whole[sum(h.size for h in headers[:2]) :]  # mid-batch

    log.truncate_to(150)  # a new leader's log diverged: later batches differ in size
    for index in range(5):
        log.append(batch_of(numbered_values(1000 + index, 1, 200 + index)), 1, START_MS)
    tail = log.read(150, 1 << 20)
    tail_headers = list(iter_headers(tail))
    assert [h.base_offset for h in tail_headers] == [150, 151, 152, 153, 154]
    position = 0
    for header in tail_headers:
        assert log.read(header.base_offset, 1) == tail[position : position + header.size]
        position += header.size
    log.close()


def test_only_the_active_segment_keeps_recent_batch_positions(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes_max=400)
    for index in range(12):
        log.append(batch_of(numbered_values(index * 2, 2, 40)), 0, START_MS)
    assert log.segment_count > 2
    *rolled, active = log._segments
    assert [len(segment.recent) for segment in rolled] == [0] * len(rolled)
    assert active.recent  # the bound on memory: one segment's hints per partition
    for offset in (0, 4, 6):  # rolled segments are read by their index
        assert [h.base_offset for h in iter_headers(log.read(offset, 1))] == [offset]
    log.close()


def test_a_truncation_whose_fsync_fails_leaves_memory_like_the_file_and_fails_later_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a journal the cut is fsynced by the segment. If that fsync fails, the
    segment's size, index and recent positions must already match the cut file (later
    appends land right after the cut and read back), and no later sync may report
    anything durable (the failed fsync may have lost the cut)."""
    log = open_log(tmp_path / "p0")
    for start in (0, 2, 4):
        log.append(batch_of(numbered_values(start, 2)), 0, START_MS)
    assert log.sync() == 6
    fail_once_with_eio(monkeypatch, "fsync")
    with pytest.raises(OSError):
        log.truncate_to(2)
    monkeypatch.undo()
    assert log.log_end_offset == 2

    def on_disk() -> int:
        return sum(f.stat().st_size for f in (tmp_path / "p0").glob("*.log"))

    assert log.size_bytes == on_disk()
    log.append(batch_of(numbered_values(20, 2)), 0, START_MS)
    assert log.size_bytes == on_disk()
    fetched = decode_fetch(log.read(0, 1 << 20))
    assert fetched.undecodable is None
    assert [(m.offset, m.value) for m in fetched.messages] == list(
        enumerate(numbered_values(0, 2) + numbered_values(20, 2))
    )
    with pytest.raises(OSError, match="earlier fsync"):
        log.sync()
