"""Helpers shared by the storage tests: batches of known records, decoding reads."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from tidemq.storage import LogConfig, PartitionLog
from tidemq.storage.journal import SECTOR_BYTES, Journal, journal_files, replay
from tidemq.wire.batch import build_batch, decode_records, iter_headers

START_MS = 1_700_000_000_000


def batch_of(values: list[bytes], timestamp_ms: int = START_MS) -> bytes:
    return build_batch([(None, value) for value in values], timestamp_ms)


def numbered_values(first: int, count: int, size_bytes: int = 10) -> list[bytes]:
    return [str(first + index).encode().ljust(size_bytes, b".") for index in range(count)]


def read_all(log: PartitionLog, start_offset: int | None = None) -> list[tuple[int, bytes]]:
    """Every (offset, value) from start_offset to the log end, via read()."""
    offset = log.log_start_offset if start_offset is None else start_offset
    out: list[tuple[int, bytes]] = []
    while offset < log.log_end_offset:
        data = log.read(offset, 4096)
        assert data, f"empty read at {offset} < {log.log_end_offset}"
        for record in decode_records(data, offset):
            assert record.value is not None
            out.append((record.offset, record.value))
        last = list(iter_headers(data))[-1]
        offset = last.next_offset
    return out


def open_log(directory: Path, now_ms: int = START_MS, **config: int) -> PartitionLog:
    return PartitionLog.open(directory, LogConfig(**config), now_ms)  # type: ignore[arg-type]


def fail_once_with_eio(monkeypatch: pytest.MonkeyPatch, call: str) -> list[OSError]:
    """``os.<call>`` (fsync or fdatasync) fails once with EIO, as a disk's writeback
    error is reported, then works again. Returns the errors still to raise (empty once
    it failed)."""
    real = getattr(os, call)
    errors = [OSError(errno.EIO, "Input/output error")]

    def failing_once(fd: int) -> None:
        if errors:
            raise errors.pop()
        real(fd)

    monkeypatch.setattr(os, call, failing_once)
    return errors


def replay_like_a_start(root: Path, config: LogConfig | None = None) -> None:
    """What Broker._open_journal does with ``root/journal``: replay into the partition
    directories under ``root`` (with start_over), close the logs, delete the files."""
    logs: dict[str, PartitionLog] = {}
    config = config or LogConfig()

    def open_key(key: str) -> PartitionLog | None:
        if not (root / key).is_dir():
            return None
        logs[key] = PartitionLog.open(root / key, config, START_MS)
        return logs[key]

    def start_over(key: str, offset: int) -> PartitionLog:
        logs.pop(key).close(mark_clean=False)
        logs[key] = PartitionLog.recreate_empty(root / key, offset, config, START_MS)
        return logs[key]

    replay(root / "journal", open_key, START_MS, start_over)
    for log_ in logs.values():
        log_.close(mark_clean=False)
    for path in journal_files(root / "journal"):
        path.unlink()


def journaled_log(
    root: Path, key: str, journal: Journal | None = None
) -> tuple[Journal, PartitionLog]:
    """A partition log ``root/key`` appending to ``journal`` (a new one in
    ``root/journal`` by default), as a broker with the journal on."""
    journal = journal or Journal.open(root / "journal")
    log = open_log(root / key)
    log.attach_journal(journal, key)
    return journal, log


def acknowledge(journal: Journal, log: PartitionLog) -> None:
    """A group commit: the journal synced, the log durable up to its end."""
    end, generation = log.log_end_offset, log.truncation_generation
    journal.sync()
    log.mark_durable(end, generation)


def power_lost_file(
    rng: random.Random, durable: bytes, acknowledged: bytes, versions: list[bytes]
) -> tuple[bytes, bool]:
    """A file as a power loss may leave it, block by block: ``durable`` (what the last
    fdatasync began with) where no write touched a block since, else any version the
    block had since or a torn one (zeros); the length one the file had. Also whether a
    block holding ``acknowledged`` bytes (a prefix of ``durable``) was changed."""
    damaged = False
    length = rng.choice([len(durable), *(len(v) for v in versions)])
    out = bytearray()
    for start in range(0, length, SECTOR_BYTES):
        base = durable[start : start + SECTOR_BYTES].ljust(SECTOR_BYTES, b"\0")
        options = [v[start : start + SECTOR_BYTES].ljust(SECTOR_BYTES, b"\0") for v in versions]
        touched = any(option != base for option in options)
        choices = [base, *options] + ([bytes(SECTOR_BYTES)] if touched else [])
        block = rng.choice(choices)
        held = min(len(acknowledged), start + SECTOR_BYTES) - start
        if held > 0 and block[:held] != acknowledged[start : start + held]:
            damaged = True
        out += block
    return bytes(out[:length]), damaged


def kill_nine(journal: Journal, log: PartitionLog) -> None:
    """kill -9 (the page cache survives): close the segments and the journal without
    syncing or removing anything."""
    for segment in log._segments:
        segment.close()
    journal.close(remove_files=False)
