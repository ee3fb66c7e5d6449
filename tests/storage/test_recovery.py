"""Recovery: torn tails, flipped bytes, lost or garbage indexes, checkpoints."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from storage_helpers import START_MS, batch_of, numbered_values, open_log, read_all

from tidemq.errors import CorruptBatch
from tidemq.storage import PartitionLog
from tidemq.storage.segment import LogSegment
from tidemq.wire.batch import HEADER_SIZE, iter_headers, patch_batch

BATCH_RECORDS = 4


def fill(log: PartitionLog, batch_count: int) -> list[tuple[int, bytes]]:
    """Appends batch_count batches of BATCH_RECORDS numbered records; the model."""
    expected: list[tuple[int, bytes]] = []
    for index in range(batch_count):
        values = numbered_values(index * BATCH_RECORDS, BATCH_RECORDS, size_bytes=20)
        first, _ = log.append(batch_of(values), leader_epoch=1, now_ms=START_MS)
        expected.extend(zip(range(first, first + BATCH_RECORDS), values, strict=True))
    return expected


def crash(log: PartitionLog) -> None:
    """Drops the log like a killed process: no sync, no clean-shutdown marker."""
    for segment in log._segments:
        segment.close()


def last_segment(directory: Path) -> Path:
    return sorted(directory.glob("*.log"))[-1]


def batch_positions(path: Path) -> list[tuple[int, int, int]]:
    """(position, size, base_offset) of every batch in a segment file."""
    data = path.read_bytes()
    out, position = [], 0
    for header in iter_headers(data):
        out.append((position, header.size, header.base_offset))
        position += header.size
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("segment_bytes_max", [600, 1 << 20])
def test_torn_last_batch_is_cut_and_appends_continue(
    tmp_path: Path, seed: int, segment_bytes_max: int
) -> None:
    log = open_log(tmp_path, segment_bytes_max=segment_bytes_max)
    expected = fill(log, 12)
    log.sync()
    log.close()
    path = last_segment(tmp_path)
    position, size, torn_base = batch_positions(path)[-1]
    cut_at = position + random.Random(seed).randrange(1, size)
    os.truncate(path, cut_at)

    log = open_log(tmp_path, segment_bytes_max=segment_bytes_max)
    assert log.log_end_offset == torn_base
    assert log.recovered_truncated_bytes == cut_at - position
    assert read_all(log) == expected[:torn_base]
    first, _ = log.append(batch_of([b"after"]), leader_epoch=2, now_ms=START_MS)
    assert first == torn_base
    assert read_all(log)[-1] == (torn_base, b"after")
    log.close()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("synced", [False, True])
def test_flipped_byte_cuts_the_log_at_that_batch(tmp_path: Path, seed: int, synced: bool) -> None:
    rng = random.Random(seed)
    log = open_log(tmp_path, segment_bytes_max=700)
    expected = fill(log, 15)
    if synced:
        log.sync()
    crash(log)
    path = last_segment(tmp_path)
    batches = batch_positions(path)
    position, size, corrupt_base = batches[rng.randrange(len(batches))]
    data = bytearray(path.read_bytes())
    data[position + rng.randrange(size)] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))

    log = open_log(tmp_path, segment_bytes_max=700)
    assert log.log_end_offset == corrupt_base
    assert read_all(log) == expected[:corrupt_base]
    assert log.append(batch_of([b"x"]), 1, START_MS)[0] == corrupt_base
    log.close()


def test_damage_in_an_earlier_segment_drops_every_later_one(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes_max=700)
    expected = fill(log, 15)
    crash(log)  # never synced: recovery scans every segment
    segments = sorted(tmp_path.glob("*.log"))
    assert len(segments) >= 3
    position, _, corrupt_base = batch_positions(segments[1])[1]
    with open(segments[1], "r+b") as file:
        file.seek(position + HEADER_SIZE + 3)
        file.write(b"\xff")

    log = open_log(tmp_path, segment_bytes_max=700)
    assert log.log_end_offset == corrupt_base
    assert log.segment_count == 2
    assert sorted(tmp_path.glob("*.log")) == segments[:2]
    assert read_all(log) == expected[:corrupt_base]
    log.close()


def test_reads_never_pass_a_corrupt_header_in_a_checkpointed_segment(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes_max=700, index_interval_bytes=0)
    fill(log, 15)
    log.close()
    first_segment = sorted(tmp_path.glob("*.log"))[0]
    position, _, damaged_base = batch_positions(first_segment)[2]
    with open(first_segment, "r+b") as file:
        file.seek(position + 8)  # batch_length: claim far more bytes than the file has
        file.write(b"\x7f\xff\xff\xff")

    log = open_log(tmp_path, segment_bytes_max=700, index_interval_bytes=0)
    before = log.read(0, 1 << 20)
    assert max(header.next_offset for header in iter_headers(before)) == damaged_base
    with pytest.raises(CorruptBatch):
        log.read(damaged_base, 1 << 20)
    log.close()


@pytest.mark.parametrize("damage", ["deleted", "random", "plausible", "truncated"])
def test_lost_or_garbage_index_is_rebuilt(tmp_path: Path, damage: str) -> None:
    config = {"segment_bytes_max": 2000, "index_interval_bytes": 100}
    log = open_log(tmp_path, **config)
    expected = fill(log, 40)
    log.close()
    indexes = sorted(tmp_path.glob("*.index"))
    assert len(indexes) >= 3 and all(path.stat().st_size > 0 for path in indexes)
    rng = random.Random(7)
    for path in indexes:
        if damage == "deleted":
            path.unlink()
        elif damage == "random":
            path.write_bytes(rng.randbytes(path.stat().st_size))
        elif damage == "plausible":  # increasing entries that point into the middle of batches
            path.write_bytes(b"".join(n.to_bytes(4, "big") * 2 for n in range(1, 9)))
        else:
            path.write_bytes(path.read_bytes()[:5])

    log = open_log(tmp_path, **config)
    assert read_all(log) == expected
    for offset in range(0, log.log_end_offset, 3):
        data = log.read(offset, 1)
        header = next(iter_headers(data))
        assert header.base_offset <= offset < header.next_offset
    log.close()


def test_checkpoints_and_marker(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    fill(log, 3)
    assert log.flushed_offset == 0
    assert log.sync() == 12
    assert log.sync() == 12  # nothing dirty: cheap no-op
    log.close()
    assert (tmp_path / "clean-shutdown").exists()
    assert (tmp_path / "recovery-point-checkpoint").read_text() == "12\n"
    assert (tmp_path / "leader-epoch-checkpoint").read_text() == "0\n1\n1 0\n"
    log = open_log(tmp_path)
    assert log.opened_after_clean_shutdown
    assert not (tmp_path / "clean-shutdown").exists()
    (tmp_path / "recovery-point-checkpoint").write_text("garbage")
    crash(log)
    log = open_log(tmp_path)
    assert not log.opened_after_clean_shutdown
    assert log.log_end_offset == log.flushed_offset == 12
    log.close()


def test_lost_epoch_checkpoint_is_rebuilt_from_headers(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes_max=300)
    for epoch in range(1, 6):
        log.append(batch_of([b"a" * 50]), epoch, START_MS)
        log.append(batch_of([b"b" * 50]), epoch, START_MS)
    entries = log.epoch_entries()
    log.close()
    (tmp_path / "leader-epoch-checkpoint").write_text("0\n99\nnonsense")
    log = open_log(tmp_path, segment_bytes_max=300)
    assert log.epoch_entries() == entries == [(epoch, 2 * (epoch - 1)) for epoch in range(1, 6)]
    log.close()


def test_truncation_inside_a_batch_puts_the_recovery_point_at_the_batch_start(
    tmp_path: Path,
) -> None:
    """Found by the model test: truncate_to(5) cuts back to the batch starting at 4, so
    the recovery point must be 4, not 5; otherwise a crash after a replicated batch
    with a new epoch at 4 recovers the epoch as starting at 5 (one batch a segment, so
    recovery re-reads only from the segment holding the recovery point)."""
    log = open_log(tmp_path, segment_bytes_max=1)
    log.append(batch_of([b"a", b"b", b"c", b"d"]), 0, START_MS)
    log.append(batch_of([b"e", b"f"]), 0, START_MS)  # offsets 4-5
    log.sync()
    log.truncate_to(5)
    assert log.log_end_offset == 4
    replicated = bytearray(batch_of([b"x"]))
    patch_batch(replicated, 0, 4, 1)  # as the leader wrote it: offset 4, epoch 1
    log.append_replicated(bytes(replicated), START_MS)
    log.append(batch_of([b"y"]), 1, START_MS)
    for segment in log._segments:  # a process crash: no close, no sync
        segment.close()
    again = open_log(tmp_path, segment_bytes_max=1)
    assert again.epoch_entries() == [(0, 0), (1, 4)]
    assert [value for _, value in read_all(again)] == [b"a", b"b", b"c", b"d", b"x", b"y"]
    again.close()


class Killed(Exception):
    """The process dies here."""


def test_a_kill_between_two_unlinks_of_a_truncation_reopens_a_dense_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """truncate_to unlinks the segments past the cut one by one. Killed after the first
    unlink, with the recovery point still in the last segment, the reopened log
    trusted every segment below it unchecked: a gap where the unlinked segment was,
    and the truncated records past it served again. The recovery point is lowered to
    the cut first, so recovery checks from the cut segment on and keeps a prefix of
    the log as it was before the truncation (which never returned: it is redone)."""
    log = open_log(tmp_path, segment_bytes_max=300)
    expected = fill(log, 6)
    log.sync()  # the recovery point moves into the last segment
    assert log.segment_count >= 4
    real_delete = LogSegment.delete
    deleted: list[int] = []

    def delete_then_die(segment: LogSegment) -> None:
        if deleted:
            raise Killed()
        real_delete(segment)
        deleted.append(segment.base_offset)

    segments = list(log._segments)
    monkeypatch.setattr(LogSegment, "delete", delete_then_die)
    with pytest.raises(Killed):
        log.truncate_to(BATCH_RECORDS)  # the second segment on goes
    monkeypatch.undo()
    for segment in segments:  # the process is gone: its files close, nothing else
        if segment.base_offset not in deleted:
            segment.close()
    again = open_log(tmp_path, segment_bytes_max=300)
    got = read_all(again)
    again.close()
    assert got == expected[: len(got)], "a gap: records past the unlinked segment are back"
    assert got and got[-1][0] < deleted[0]
