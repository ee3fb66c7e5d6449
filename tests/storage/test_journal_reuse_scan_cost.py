"""Replay's proof scan reads client-chosen bytes after a crash; values made of fake
record headers must not make it slow (reviews of 151cece and 6b2d694).

* 151cece: a reused file's old records (values clients chose) are scanned after every
  crash, and fake headers claiming long records made that scan quadratic (hours for a
  64 MiB file);
* 6b2d694 (spares zeroed, since undone): the bytes after a torn record are
  client-chosen too, and a reused file's room after them let each fake header claim
  a record of up to the spare's size; each was CRC'd over that length (~25 min for
  one torn 8 MiB request).
A candidate's CRC now comes from prefix CRCs in O(1): both scans are linear."""

from __future__ import annotations

import os
import signal
import struct
from pathlib import Path

from storage_helpers import START_MS, acknowledge, batch_of, journaled_log, kill_nine

from tidemq.storage.journal import SECTOR_BYTES, journal_files, replay

KEY = "topic-0-abc"


def _fake_headers(count: int, claimed: int, synced: int) -> bytes:
    """Bytes that look like records with ``synced`` to the scan's cheap filters."""
    one = struct.pack(">II", 0, claimed) + struct.pack(">BHqQ", 0x81, 1, 0, synced) + b"k"
    return one * count


def _replay_within(root: Path, alarm_s: int = 30) -> None:
    """Replays, failing after ``alarm_s``: the quadratic scans took minutes to hours,
    the linear ones well under a second here (a bound, not a speed measurement)."""

    def too_slow(*_: object) -> None:
        raise TimeoutError(f"replay still scanning after {alarm_s} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(alarm_s)
    try:
        replay(root / "journal", lambda key: None, START_MS)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_replay_after_a_kill_is_not_quadratic_in_a_reused_files_old_payloads(
    tmp_path: Path,
) -> None:
    journal, log = journaled_log(tmp_path, KEY)
    # The spare's previous life: produced values of fake headers (8 MiB in all; a
    # journal file holds up to 64 MiB of them).
    for _ in range(8):
        value = _fake_headers(37000, 4 * 1024 * 1024, 8192)
        log.append(batch_of([value]), 0, START_MS)
        acknowledge(journal, log)
    for _ in range(2):  # a checkpoint keeps it as a spare, the next rotation reuses it
        older = journal.rotate()
        log.sync()
        journal.discard(older)
    log.append(batch_of([b"new"]), 0, START_MS)
    acknowledge(journal, log)
    kill_nine(journal, log)

    _replay_within(tmp_path)


def test_a_torn_record_of_fake_headers_in_a_reused_file_is_not_scanned_quadratically(
    tmp_path: Path,
) -> None:
    journal, log = journaled_log(tmp_path, KEY)
    for _ in range(23):  # a 23 MiB file of ordinary values: kept as the spare
        log.append(batch_of([bytes(1 << 20)]), 0, START_MS)
        acknowledge(journal, log)
    for _ in range(2):  # a checkpoint keeps it as a spare, the next rotation reuses it
        older = journal.rotate()
        log.sync()
        journal.discard(older)
    log.append(batch_of([b"acknowledged"]), 0, START_MS)
    acknowledge(journal, log)
    position = journal.current_bytes  # where the next record starts (a sector boundary)
    # A produced value (1 MiB, never acknowledged) of headers claiming 16 MiB records
    # written once ``position`` was synced.
    value = _fake_headers(1024 * 1024 // 30, 16 << 20, position + SECTOR_BYTES)
    log.append(batch_of([value]), 0, START_MS)
    end = journal.current_bytes
    # kill -9 in the middle of that writev: its second half never reached the file,
    # where the spare's old records stay.
    path = journal_files(tmp_path / "journal")[-1]
    middle = (position + end) // 2
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(descriptor, bytes(end - middle), middle)
    finally:
        os.close(descriptor)
    kill_nine(journal, log)

    _replay_within(tmp_path)
