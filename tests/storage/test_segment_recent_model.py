"""A differential test of the segments' recent-batch positions (LogSegment.recent):
random histories of appends (some cut short by a full disk, in the segment or the
journal), truncations with new epochs, retention, and clean or crash-like reopens;
after every step each batch start and some offsets inside batches are read with the
positions and again without them, and both must equal a model of the stored bytes.
Written by the adversarial review of the change. Also: damage at a remembered
position reads as before; damage before it is no longer seen by that read (the
position skips the walk over it; recovery and a read through it still see it)."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import START_MS, batch_of, numbered_values, open_log

from tidemq.errors import CorruptBatch, OffsetOutOfRange
from tidemq.storage import PartitionLog
from tidemq.storage.journal import Journal
from tidemq.storage.log import _patch_offsets
from tidemq.wire.batch import iter_headers


def _outcome(fn: Callable[[], bytes]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except (CorruptBatch, OffsetOutOfRange) as error:
        return ("err", type(error).__name__)


def read_both(
    log: PartitionLog, offset: int, max_bytes: int, max_offset: int | None = None
) -> tuple[tuple[str, Any], tuple[str, Any]]:
    fast = _outcome(lambda: log.read(offset, max_bytes, max_offset))
    saved = [(s, dict(s.recent), s.index) for s in log._segments]
    for s, _, _ in saved:
        s.recent.clear()
    ref = _outcome(lambda: log.read(offset, max_bytes, max_offset))
    for s, r, _ in saved:
        s.recent.clear()
        s.recent.update(r)
    return fast, ref


class Model:
    def __init__(self) -> None:
        self.batches: list[tuple[int, bytes]] = []  # (base, stored bytes)

    def end(self) -> int:
        return self.batches[-1][0] + len(list(_recs(self.batches[-1][1]))) if self.batches else 0

    def truncate(self, offset: int) -> None:
        keep = []
        for base, data in self.batches:
            h = next(iter_headers(data))
            if h.next_offset <= offset:
                keep.append((base, data))
            else:
                break
        self.batches = keep

    def batch_at(self, offset: int) -> tuple[int, bytes] | None:
        for base, data in self.batches:
            h = next(iter_headers(data))
            if base <= offset < h.next_offset:
                return base, data
        return None


def _recs(data: bytes) -> range:
    h = next(iter_headers(data))
    return range(h.record_count)


def check_reads(log: PartitionLog, model: Model, rng: random.Random) -> None:
    # every batch start, plus a few mid-batch offsets, plus past-the-end
    offsets = [b for b, _ in model.batches if b >= log.log_start_offset]
    offsets += [rng.randrange(log.log_start_offset, log.log_end_offset + 1) for _ in range(5)]
    for offset in offsets:
        for max_bytes in (1, 200, 1 << 16):
            fast, ref = read_both(log, offset, max_bytes)
            assert fast == ref, (offset, max_bytes, fast, ref)
            assert fast[0] == "ok", (offset, fast)
            data = fast[1]
            if offset >= log.log_end_offset:
                assert data == b""
                continue
            got = model.batch_at(offset)
            assert got is not None
            assert data[: len(got[1])] == got[1], offset
            # every returned batch is the model's
            pos = 0
            for h in iter_headers(data):
                assert model.batch_at(h.base_offset)[1] == data[pos : pos + h.size]
                pos += h.size


def _half_write_then_full(real_write: Callable[[int, Any], int]) -> Callable[[int, Any], int]:
    calls = 0

    def half_write(fd: int, data: Any) -> int:  # a part, then the disk is full
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[: max(1, len(data) // 2)]))
        raise OSError(errno.ENOSPC, "full")

    return half_write


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("journal", [False, True])
def test_random_histories_read_the_same_with_and_without_the_positions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, journal: bool
) -> None:
    rng = random.Random(seed)
    directory = tmp_path / "p"
    config = {
        "segment_bytes_max": rng.choice([600, 2000, 1 << 20]),
        "index_interval_bytes": rng.choice([0, 100, 4096]),
    }
    log = open_log(directory, **config)
    jr = None
    if journal:
        jr = Journal.open(tmp_path / "journal")
        log.attach_journal(jr, "p")
    model = Model()
    epoch = 0
    value = 0
    real_write = os.write
    real_writev = os.writev
    for _ in range(120):
        op = rng.random()
        if op < 0.45:
            n = rng.randint(1, 3)
            body = b"".join(
                batch_of(numbered_values(value + i * 10, rng.randint(1, 4), rng.randint(5, 60)))
                for i in range(n)
            )
            value += 100
            fail = rng.random() < 0.15
            if fail:
                mode = rng.choice(["seg", "journal"] if journal else ["seg"])
                if mode == "seg":
                    monkeypatch.setattr(os, "write", _half_write_then_full(real_write))
                else:

                    def bad_writev(fd: int, parts: Any) -> int:
                        raise OSError(errno.ENOSPC, "full")

                    monkeypatch.setattr(os, "writev", bad_writev)
                with pytest.raises(OSError):
                    log.append(body, epoch, START_MS)
                monkeypatch.setattr(os, "write", real_write)
                monkeypatch.setattr(os, "writev", real_writev)
            else:
                buf = bytearray(body)
                spans, _ = _patch_offsets(buf, log.log_end_offset, epoch)
                log.append(body, epoch, START_MS)
                for span in spans:
                    stored = bytes(buf[span.position : span.position + span.size])
                    model.batches.append((span.base_offset, stored))
        elif op < 0.6 and log.log_end_offset > log.log_start_offset:
            cut = rng.randrange(log.log_start_offset, log.log_end_offset)
            log.truncate_to(cut)
            model.truncate(cut)
            assert model.end() == log.log_end_offset or not model.batches
            if rng.random() < 0.5:
                epoch += 1
        elif op < 0.68 and log.log_end_offset > log.log_start_offset:
            log.delete_records_before(rng.randrange(log.log_start_offset, log.log_end_offset + 1))
        elif op < 0.73:
            # reopen: clean or crash-like (no clean marker)
            if jr is not None:
                jr.close(remove_files=True)
            log.close(mark_clean=rng.random() < 0.5)
            log = open_log(directory, **config)
            if journal:
                jr = Journal.open(tmp_path / "journal")
                log.attach_journal(jr, "p")
        check_reads(log, model, rng)
    if jr is not None:
        jr.close(remove_files=True)
    log.close()


def test_header_corruption_at_recent_position_falls_back_like_before(tmp_path: Path) -> None:
    """Bytes changed on disk under a remembered position: same answer as without recent."""
    log = open_log(tmp_path / "p", index_interval_bytes=0)
    for i in range(10):
        log.append(batch_of(numbered_values(i * 3, 3, 20)), 0, START_MS)
    [seg] = log._segments
    pos = seg.recent[27]
    fd = os.open(seg.log_path, os.O_RDWR)
    os.pwrite(fd, b"\xff" * 8, pos)  # base offset field garbage
    os.close(fd)
    fast, ref = read_both(log, 27, 1)
    assert fast == ref and fast[0] == "err"


def test_damage_before_a_remembered_batch_is_not_seen_by_its_read(tmp_path: Path) -> None:
    """A damaged header between the index entry and the target: before, the read
    raised CorruptBatch; now a recent hit returns the target batch (right bytes)."""
    log = open_log(tmp_path / "p", index_interval_bytes=1 << 20)
    for i in range(10):
        log.append(batch_of(numbered_values(i * 3, 3, 20)), 0, START_MS)
    [seg] = log._segments
    pos = seg.recent[9]
    fd = os.open(seg.log_path, os.O_RDWR)
    os.pwrite(fd, b"\x00" * 12, pos)
    os.close(fd)
    fast, ref = read_both(log, 27, 1)
    assert ref == ("err", "CorruptBatch")
    assert fast[0] == "ok"
