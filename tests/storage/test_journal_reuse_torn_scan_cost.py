"""Review of 6b2d694 (zeroed spares): zeroing removed the old life's client bytes, but
the bytes of the *current* life after a torn record are still client-chosen and still
scanned by replay's proof of damage, and the spare's zeros after them give every fake
record header in them room to claim a long record that "fits" the file. Each such
candidate is CRC'd over up to the spare's size (32 MiB: ~20 ms here), so one produced
value of fake headers torn by a kill -9 during its writev (a fatal signal ends a
regular file's write early, the rest of the spare keeps its zeros) or by a power loss
before its sync (its later pages written back, an earlier one not) makes the next
start take ~10 ms per 30 bytes of the value: ~25 min for one 8 MiB produce request
(the broker's max_request_bytes). In a new file (aa13e92) a fake header could claim at
most what was written after it."""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

from storage_helpers import START_MS, acknowledge, batch_of, journaled_log

from tidemq.storage.journal import SECTOR_BYTES, journal_files, replay

KEY = "topic-0-abc"


def _fake_headers(count: int, claimed: int, synced: int) -> bytes:
    one = struct.pack(">II", 0, claimed) + struct.pack(">BHqQ", 0x81, 1, 0, synced) + b"k"
    return one * count


def test_a_torn_record_of_fake_headers_in_a_reused_file_is_not_scanned_quadratically(
    tmp_path: Path,
) -> None:
    journal, log = journaled_log(tmp_path, KEY)
    for _ in range(23):  # a 23 MiB file of ordinary values: kept as the spare
        log.append(batch_of([bytes(1 << 20)]), 0, START_MS)
        acknowledge(journal, log)
    for _ in range(2):  # a checkpoint zeroes it as a spare, the next rotation reuses it
        older = journal.rotate()
        log.sync()
        journal.discard(older)
    log.append(batch_of([b"acknowledged"]), 0, START_MS)
    acknowledge(journal, log)
    position = journal.current_bytes  # where the next record starts (a sector boundary)
    # A produced value (256 KiB, never acknowledged) of headers claiming 16 MiB records
    # written once ``position`` was synced.
    value = _fake_headers(256 * 1024 // 30, 16 << 20, position + SECTOR_BYTES)
    log.append(batch_of([value]), 0, START_MS)
    end = journal.current_bytes
    # kill -9 in the middle of that writev: its second half never reached the file,
    # where the spare's zeros stay.
    path = journal_files(tmp_path / "journal")[-1]
    middle = (position + end) // 2
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(descriptor, bytes(end - middle), middle)
    finally:
        os.close(descriptor)
    for segment in log._segments:
        segment.close()
    journal.close(remove_files=False)

    def too_slow(*_: object) -> None:
        raise TimeoutError("replay after a torn record still scanning after 15 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(15)
    started = time.perf_counter()
    try:
        replay(tmp_path / "journal", lambda key: None, START_MS)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - started < 3
