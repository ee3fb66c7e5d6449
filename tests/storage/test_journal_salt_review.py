"""Review of b914f12 (per-file CRC salt): adversarial cases."""

from __future__ import annotations

import subprocess
from pathlib import Path

from storage_helpers import START_MS, acknowledge, batch_of, journaled_log, open_log
from storage_helpers import replay_like_a_start

from tidemq.storage.journal import Journal, file_salt, journal_files, replay

KEY = "orders-0-x"


def test_journal_open_over_a_torn_tail_then_acknowledged_records_is_not_refused(
    tmp_path: Path,
) -> None:
    """Journal.open keeps existing files for replay; one ending in a torn (never
    acknowledged) record stays torn. The new file's intact first record then counts as
    proof that the torn bytes were durable: after a crash every start refuses.
    (Latent: Broker._open_journal deletes the files before Journal.open.)"""
    journal, log = journaled_log(tmp_path, KEY)
    log.append(batch_of([b"a"]), 0, START_MS)
    acknowledge(journal, log)
    log.append(batch_of([b"b"]), 0, START_MS)  # written, never synced
    for segment in log._segments:
        segment.close()
    first = journal._files[-1]
    journal.close(remove_files=False)
    with open(first.path, "r+b") as f:  # power loss: b's record torn
        f.truncate(first.path.stat().st_size - 3)
    # a caller that replays, then opens the journal over the existing files
    replayed = open_log(tmp_path / KEY)
    replay(tmp_path / "journal", lambda key: replayed if key == KEY else None, START_MS)
    replayed.close(mark_clean=False)
    reopened = Journal.open(tmp_path / "journal")
    log = open_log(tmp_path / KEY)
    log.attach_journal(reopened, KEY)
    log.append(batch_of([b"c"]), 0, START_MS)
    acknowledge(reopened, log)
    for segment in log._segments:
        segment.close()
    reopened.close(remove_files=False)
    replay_like_a_start(tmp_path)  # CorruptBatch: "proof: 0000...1.<salt>.journal"
    recovered = open_log(tmp_path / KEY)
    try:
        assert [b"a", b"c"] == [
            r.value
            for r in __import__("tidemq.wire.batch", fromlist=["x"]).decode_records(
                recovered.read(0, 1 << 20)
            )
        ]
    finally:
        recovered.close()


def test_an_older_version_does_not_see_salted_journal_files_as_documented(tmp_path: Path) -> None:
    """OPERATIONS.md says a version from before padding would take padding records
    for a torn tail; every version before b914f12 matches only <sequence>.journal, so
    it ignores a salted file entirely (replays nothing of it) and leaves it behind for
    a later upgrade to replay over newer history."""
    journal = Journal.open(tmp_path / "journal")
    journal.close(remove_files=False)
    old = subprocess.run(
        ["git", "show", "d8d932c:src/tidemq/storage/journal.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    import re

    old_name = re.compile(re.search(r'_NAME = re.compile\(r"(.*?)"\)', old).group(1))
    salted = journal_files(tmp_path / "journal")
    assert (
        salted and [p for p in salted if old_name.match(p.name)] == []
    )  # as OPERATIONS.md now says
