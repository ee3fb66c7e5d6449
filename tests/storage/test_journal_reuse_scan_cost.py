"""Review of 151cece: a reused file's old records are scanned by replay's proof of
damage after *every* crash (kill -9 or fail-stop too, not only a torn tail), and those
bytes are produced values a client chose. Candidates whose header fields pass the
scan's filters are CRC'd over the length they claim: values made of fake headers
claiming long records make that quadratic, and the broker's next start after any
crash takes hours (below: an 8 MiB old life; the 20 s limit is ~40x what 8 MiB of ordinary
records costs, ~0.4 s)."""

from __future__ import annotations

import signal
import struct
import time
from pathlib import Path

from storage_helpers import START_MS, acknowledge, batch_of, journaled_log

from tidemq.storage.journal import replay

KEY = "topic-0-abc"


def _fake_headers(count: int, claimed: int, synced: int) -> bytes:
    """Bytes that look like records with ``synced`` to the scan's cheap filters."""
    one = struct.pack(">II", 0, claimed) + struct.pack(">BHqQ", 0x81, 1, 0, synced) + b"k"
    return one * count


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
    for segment in log._segments:  # kill -9: nothing torn, the page cache survives
        segment.close()
    journal.close(remove_files=False)

    def too_slow(*_: object) -> None:
        raise TimeoutError("replay after a kill -9 still scanning after 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    started = time.perf_counter()
    try:
        replay(tmp_path / "journal", lambda key: None, START_MS)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - started < 5
