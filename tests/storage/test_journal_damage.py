"""What replay does with a damaged or torn journal, after crashes, power losses, full
disks and retention (an adversarial review of the journal's crash-safety fixes found
each sequence): it refuses only where a record proves the damaged bytes had been
durable, and never cuts an acknowledged record silently."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import (
    START_MS,
    acknowledge,
    batch_of,
    journaled_log,
    kill_nine,
    open_log,
    read_all,
    replay_like_a_start,
)

import tidemq.storage.journal as journal_module
from tidemq.errors import CorruptBatch, InvariantViolation
from tidemq.storage import LogConfig, PartitionLog
from tidemq.storage.journal import (
    APPEND,
    SECTOR_BYTES,
    SPARES_MAX,
    Journal,
    replay,
    spare_files,
)
from tidemq.wire.batch import patch_batch

KEY = "topic-0-abc"
PAGE = SECTOR_BYTES  # the block a sync pads to


def recover(root: Path, config: LogConfig | None = None) -> PartitionLog:
    """What a broker start does (replay, delete the files); then the log of KEY."""
    replay_like_a_start(root, config)
    return PartitionLog.open(root / KEY, config or LogConfig(), START_MS)


def values(log: PartitionLog) -> list[bytes]:
    return [value for _, value in read_all(log)]


def _node(root: Path) -> tuple[Journal, PartitionLog]:
    return journaled_log(root, KEY)


def _power_loss_zeroing_pages(root: Path, journal: Journal, pages: set[int]) -> None:
    """Power loss: the journal's ``pages`` read back as zeros (lost or torn); the
    segments lose everything never fsynced (none was: no checkpoint)."""
    path = journal._files[-1].path
    journal.close(remove_files=False)
    data = bytearray(path.read_bytes())
    for page in pages:
        start = page * PAGE
        data[start : start + PAGE] = bytes(len(data[start : start + PAGE]))
    path.write_bytes(bytes(data))
    for segment_path in (root / KEY).glob("*.log"):
        segment_path.write_bytes(b"")  # never fsynced


def _power_loss_keeping_pages(root: Path, journal: Journal, lost_pages: set[int]) -> None:
    """The journal keeps its unsynced bytes except the pages in ``lost_pages`` (a
    disk's volatile cache persists any subset of the writes not yet flushed)."""
    synced = journal._files[-1].synced
    assert all(page * PAGE >= synced for page in lost_pages), "only unsynced pages may be lost"
    _power_loss_zeroing_pages(root, journal, lost_pages)


def test_a_power_loss_tearing_an_unacknowledged_multi_page_record_is_a_torn_tail(
    tmp_path: Path,
) -> None:
    """Record a is fdatasynced (acknowledged); a 9 KB append b and a small append c
    are written, never synced. The power loss keeps the page with b's header and the
    page with c, not b's middle page. 'b bad, c intact after it' made replay refuse
    on every start although nothing after a was acknowledged: c was written before
    b's bytes were synced, so it proves nothing, and this is a torn tail."""
    journal, log = _node(tmp_path)
    log.append(batch_of([b"a"]), 0, START_MS)
    acknowledge(journal, log)
    b_at = journal._files[-1].written
    log.append(batch_of([b"x" * 3000, b"y" * 3000, b"z" * 3000]), 0, START_MS)
    b_end = journal._files[-1].written
    log.append(batch_of([b"c"]), 0, START_MS)  # never synced either
    b_page = b_at // PAGE  # the sync padded a's page: b starts on the next one
    assert b_at == journal._files[-1].synced == PAGE and b_end // PAGE == b_page + 2
    for segment in log._segments:
        segment.close()
    _power_loss_keeping_pages(tmp_path, journal, lost_pages={b_page + 1})
    recovered = recover(tmp_path)
    assert values(recovered) == [b"a"]
    recovered.close()


def _power_loss_tearing_rewritten_pages(root: Path, journal: Journal) -> None:
    """Every page of the journal that a write since the last sync touched was being
    rewritten and is torn (zeros), synced bytes on it or not."""
    synced, written = journal._files[-1].synced, journal._files[-1].written
    _power_loss_zeroing_pages(root, journal, set(range(synced // PAGE, -(-written // PAGE))))


def test_a_power_loss_tearing_a_page_rewritten_after_a_sync_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    """Records a and b are fdatasynced (acknowledged); c is written and never synced.
    c went into the page holding b's last bytes, so the disk rewrote that page, and a
    power loss tore it: b was lost with c, and with nothing written after c nothing
    proved that b had been durable; replay took it for a torn tail and dropped an
    acknowledged record without a word. A sync now pads the file to a page boundary
    first, so c starts on a fresh page and the tear takes only what was never
    acknowledged."""
    journal, log = _node(tmp_path)
    for value in (b"a", b"b"):
        log.append(batch_of([value]), 0, START_MS)
        acknowledge(journal, log)
    assert journal._files[-1].synced % PAGE == 0  # the sync ended on a page boundary
    log.append(batch_of([b"c"]), 0, START_MS)
    for segment in log._segments:
        segment.close()
    _power_loss_tearing_rewritten_pages(tmp_path, journal)
    recovered = recover(tmp_path)
    assert values(recovered) == [b"a", b"b"]
    recovered.close()


def test_following_the_refusal_message_keeps_the_acknowledged_records_before_the_damage(
    tmp_path: Path,
) -> None:
    """The refusal told the operator to move the file away, which also threw away the
    acknowledged records before the bad one (the segments lost them in the power loss).
    It now names the byte to cut the file at: doing so keeps them."""
    journal, log = _node(tmp_path)
    for value in (b"a", b"b", b"c"):
        log.append(batch_of([value]), 0, START_MS)
        acknowledge(journal, log)  # each acknowledged
    b_at = journal._files[-1].written
    log.append(batch_of([b"d"]), 0, START_MS)
    acknowledge(journal, log)
    log.append(batch_of([b"e"]), 0, START_MS)
    acknowledge(journal, log)
    for segment in log._segments:
        segment.close()
    path = journal._files[-1].path
    journal.close(remove_files=False)
    data = bytearray(path.read_bytes())
    data[b_at + 30] ^= 0xFF  # d's payload: e was written after d was synced
    path.write_bytes(bytes(data))
    for segment_path in (tmp_path / KEY).glob("*.log"):
        segment_path.write_bytes(b"")  # a power loss: no checkpoint had synced them
    with pytest.raises(CorruptBatch, match=f"record at byte {b_at} is damaged") as refused:
        recover(tmp_path)
    command = re.search(r"`(truncate -s \d+ \S+)`", str(refused.value))
    assert command is not None, refused.value
    subprocess.run(command.group(1).split(), check=True)  # what the operator is told
    recovered = recover(tmp_path)
    got = values(recovered)
    recovered.close()
    assert got == [b"a", b"b", b"c"]


@pytest.mark.parametrize("damage", ["zeroed_sector", "flipped_length_byte"])
def test_damage_to_a_synced_record_header_is_refused_not_cut(tmp_path: Path, damage: str) -> None:
    """kill -9 (the segment holds every record) plus bad bytes in the synced journal: a
    512-byte sector reads back as zeros, or a length byte flips. The bad header no
    longer says where the next record starts, so replay took it for a torn tail,
    dropped the records after it and cut them from the segment too. The scan past it
    finds a later record written after the damaged bytes were synced: refused."""
    journal, log = _node(tmp_path)
    ends = []
    expected = []
    for index in range(40):
        value = f"record-{index:03d}".encode()
        log.append(batch_of([value]), 0, START_MS)
        acknowledge(journal, log)  # each acknowledged
        ends.append(journal._files[-1].written)
        expected.append(value)
    path = journal._files[-1].path
    kill_nine(journal, log)
    data = bytearray(path.read_bytes())
    at = ends[len(ends) // 2]  # a record starts here, synced, with records after it
    if damage == "zeroed_sector":
        data[at : at + 512] = bytes(512)
    else:
        data[at + 5] ^= 0x10  # its length field (crc u32 | length u32)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBatch, match="is damaged"):
        recover(tmp_path)
    log = PartitionLog.open(tmp_path / KEY, LogConfig(), START_MS)
    assert values(log) == expected  # and the segment was not cut
    log.close()


def _at_offset(batch: bytes, offset: int) -> bytes:
    buffer = bytearray(batch)
    patch_batch(buffer, 0, offset, 0)
    return bytes(buffer)


def test_retention_that_emptied_a_reset_log_is_not_undone_by_replay(tmp_path: Path) -> None:
    """32e6140 tells a finished reset by the batch at the log start, but when
    retention moved the start to the log end (the active segment empty after a
    follower truncation to its base) there is no batch there: replay takes the reset
    for unfinished, recreates the log at 100 and re-appends the journaled records:
    the log start moves backwards (105 -> 100) and deleted records are served again."""
    config = LogConfig(segment_bytes_max=200, retention_ms=1)
    journal = Journal.open(tmp_path / "journal")
    open_log(tmp_path / KEY).close()
    journal.reset(KEY, 100)
    log = PartitionLog.recreate_empty(tmp_path / KEY, 100, config, START_MS)
    log.attach_journal(journal, KEY)
    for index in range(6):
        log.append_replicated(_at_offset(batch_of([bytes([65 + index]) * 80]), 100 + index), 0)
    journal.sync()
    log.truncate_to(105)  # follower truncation at the active segment's base: it is empty
    assert log.apply_retention(START_MS + 60_000, max_offset=105) > 0
    assert log.log_start_offset == log.log_end_offset == 105
    kill_nine(journal, log)
    recovered = recover(tmp_path, config)
    state = (recovered.log_start_offset, recovered.log_end_offset)
    recovered.close()
    assert state == (105, 105)


def test_checkpointed_journal_files_are_deleted_one_durable_unlink_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files were unlinked oldest first with one directory fsync after the last: a power
    loss could keep an older file but not a newer one's unlink, and replaying the older
    one alone cuts what the segment holds past it (acknowledged records). Each unlink
    is now durable before the next, so what survives is a suffix of the journal. A file
    kept as a spare leaves the journal by a rename, under the same rule."""
    journal, log = _node(tmp_path)
    for value in (b"a", b"b", b"c"):
        log.append(batch_of([value]), 0, START_MS)
        acknowledge(journal, log)
        older = journal.rotate()
    pending: list[int] = []  # removals not yet durable, seen at each removal
    removed: list[str] = []
    not_durable: set[str] = set()
    real_unlink, real_rename = Path.unlink, os.rename
    real_fsync_directory = journal_module.fsync_directory

    def unlink(path: Path, *args: Any, **kwargs: Any) -> None:
        pending.append(len(not_durable))
        real_unlink(path, *args, **kwargs)
        not_durable.add(path.name)
        removed.append(path.name)

    def rename(source: Path, target: Path) -> None:
        pending.append(len(not_durable))
        real_rename(source, target)
        not_durable.add(Path(source).name)
        removed.append(Path(source).name)

    def fsync_directory(directory: Path) -> None:
        real_fsync_directory(directory)
        not_durable.clear()

    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(journal_module, "fsync_directory", fsync_directory)
    log.sync()
    journal.discard(older)
    monkeypatch.undo()
    assert removed == [path.name for path in older]  # oldest first
    assert pending == [0, 0, 0] and not not_durable
    assert len(spare_files(tmp_path / "journal")) == SPARES_MAX
    log.close()
    journal.close(remove_files=True)


def test_a_short_journal_write_leaves_no_torn_record_before_acknowledged_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """writev on a nearly full disk returns a short count. It raised InvariantViolation
    (not OSError: the append was not undone) and left a torn record in the journal,
    which stayed usable: records of other partitions acknowledged after it were
    dropped by replay as a torn tail. The partial record is now cut off and the append
    fails with OSError (ENOSPC), undone like any failed write."""
    journal, log = _node(tmp_path)
    log.append(batch_of([b"a"]), 0, START_MS)
    acknowledge(journal, log)
    real_writev = os.writev
    short = [True]

    def writev_short_once(fd: int, buffers: list[bytes]) -> int:
        if short and fd == journal._files[-1].fd:
            short.clear()
            data = b"".join(bytes(b) for b in buffers)
            return os.write(fd, data[: len(data) // 2])  # space ran out mid-record
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev_short_once)
    with pytest.raises(OSError, match="short write"):
        log.append(batch_of([b"b" * 200]), 0, START_MS)
    assert os.path.getsize(journal._files[-1].path) == journal._files[-1].written
    log2_dir = tmp_path / "topic-1-abc"  # another partition, served meanwhile
    other = open_log(log2_dir)
    other.attach_journal(journal, "topic-1-abc")
    other.append(batch_of([b"acked-after"]), 0, START_MS)
    acknowledge(journal, other)
    acknowledged = other.flushed_offset
    for segment in [*log._segments, *other._segments]:  # fail-stop, then a power loss:
        segment.close()
        segment.log_path.write_bytes(b"")  # segments never fsynced (no checkpoint yet)
    journal.close(remove_files=False)  # its bytes were all fdatasynced
    recover(tmp_path).close()
    again = open_log(log2_dir)
    end = again.log_end_offset
    again.close()
    assert end >= acknowledged, "an acknowledged record of another partition was cut"


def test_a_journal_written_before_the_synced_field_still_replays(tmp_path: Path) -> None:
    """Records without ``synced`` (kind 1-3, the format before it) are read as before: a
    broker upgraded after a crash replays the journal its older version left."""
    import struct
    import zlib

    def old_record(kind: int, key: str, offset: int, payload: bytes) -> bytes:
        body = struct.pack(">BHq", kind, len(key), offset) + key.encode() + payload
        return struct.pack(">II", zlib.crc32(body), len(body)) + body

    open_log(tmp_path / KEY).close()
    (tmp_path / "journal").mkdir()
    first, second = batch_of([b"a"]), _at_offset(batch_of([b"b"]), 1)
    (tmp_path / "journal" / f"{0:020d}.journal").write_bytes(
        old_record(1, KEY, 0, first) + old_record(1, KEY, 1, second)
    )
    recovered = recover(tmp_path)
    assert values(recovered) == [b"a", b"b"]
    recovered.close()


def test_an_append_to_a_closed_journal_is_an_invariant_violation(tmp_path: Path) -> None:
    """33cd706 reads the current file before taking the lock, and close() empties the
    list: an append after close raised IndexError instead of the invariant's error."""
    journal = Journal.open(tmp_path / "journal")
    journal.close(remove_files=True)
    with pytest.raises(InvariantViolation, match="journal used after close"):
        journal.append(KEY, 0, batch_of([b"a"]))


def _fail_the_padding_write(monkeypatch: pytest.MonkeyPatch, failure: str) -> Any:
    """Every journal padding write (the only os.write) fails: ENOSPC, or short (10
    bytes written). Returns the real os.write."""
    real_write = os.write

    def failing_write(fd: int, data: bytes) -> int:
        if failure == "enospc":
            raise OSError(28, "No space left on device")
        return real_write(fd, data[:10])

    monkeypatch.setattr(os, "write", failing_write)
    return real_write


@pytest.mark.parametrize("failure", ["enospc", "short"])
def test_a_padding_write_a_full_disk_refuses_leaves_the_records_and_the_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The padding write before a sync fails (ENOSPC) or is short: the partial padding
    is cut off and the sync fails without acknowledging anything, and so does every
    later one (fail-stop); after the broker stops, a replay reads every record."""
    journal, log = _node(tmp_path)
    log.append(batch_of([b"a"]), 0, START_MS)
    before = journal._files[-1].written
    real_write = _fail_the_padding_write(monkeypatch, failure)
    with pytest.raises(OSError, match="journal padding failed"):
        acknowledge(journal, log)  # acknowledges nothing: a would share its block
    monkeypatch.setattr(os, "write", real_write)
    assert log.flushed_offset == 0 and journal._files[-1].written == before
    assert journal._files[-1].path.stat().st_size == before  # nothing partial left
    with pytest.raises(OSError, match="journal padding failed"):
        acknowledge(journal, log)  # sticky: fail-stop, as after a failed fdatasync
    log.append(batch_of([b"b"]), 0, START_MS)  # before the broker stops
    kill_nine(journal, log)
    for segment_path in (tmp_path / KEY).glob("*.log"):
        segment_path.write_bytes(b"")  # all from the journal
    recovered = recover(tmp_path)
    assert values(recovered) == [b"a", b"b"]
    recovered.close()


def test_a_padding_record_written_after_damaged_bytes_were_synced_proves_the_damage(
    tmp_path: Path,
) -> None:
    """a is synced (padded), then b is synced (padded); both records go bad and only
    b's padding is left intact. That padding was written once a's and b's bytes were
    synced: replay refuses instead of dropping them as a torn tail."""
    journal, log = _node(tmp_path)
    log.append(batch_of([b"a"]), 0, START_MS)
    acknowledge(journal, log)
    b_at = journal._files[-1].written
    log.append(batch_of([b"b"]), 0, START_MS)
    acknowledge(journal, log)
    for segment in log._segments:
        segment.close()
    path = journal._files[-1].path
    journal.close(remove_files=False)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # a's record
    data[b_at + 20] ^= 0xFF  # b's record: only b's padding is intact after it
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBatch, match="record at byte 0 is damaged"):
        recover(tmp_path)


@pytest.mark.parametrize("failure", ["enospc", "short"])
def test_after_a_failed_padding_write_no_record_shares_a_block_with_acknowledged_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Review of a1605a7 (FAILS there). The padding write before a's sync fails (a full
    disk), so the sync covers a's unpadded end and a is acknowledged. Space comes back;
    b is appended, into the block holding a's durable bytes, and never synced. A power
    loss tears that block as the disk rewrites it: a is gone, and with nothing intact
    after it nothing proves it was durable: replay drops the acknowledged a as a torn
    tail, silently. (Writing the owed padding before b does not help: the padding
    itself rewrites the block.) A sync that cannot pad must not acknowledge."""
    journal, log = _node(tmp_path)
    log.append(batch_of([b"a"]), 0, START_MS)
    real_write = _fail_the_padding_write(monkeypatch, failure)
    try:
        acknowledge(journal, log)
    except OSError:  # a sync that could not pad may refuse to acknowledge a
        pass
    monkeypatch.setattr(os, "write", real_write)
    acknowledged = log.flushed_offset
    log.append(batch_of([b"b"]), 0, START_MS)  # the disk has room again
    for segment in log._segments:
        segment.close()
    _power_loss_tearing_rewritten_pages(tmp_path, journal)
    recovered = recover(tmp_path)
    assert values(recovered)[:acknowledged] == [b"a"][:acknowledged]
    recovered.close()


def test_a_produced_value_holding_a_journal_record_does_not_pose_as_proof(
    tmp_path: Path,
) -> None:
    """a is acknowledged; b, never synced, carries a value that is itself a valid
    journal record claiming that b's bytes were synced. A power loss tears b's head:
    the scan past it found the record inside b's value and refused every start
    (a false proof; nothing acknowledged was lost). Each file's records are now
    checked with a salt from its name, which a produced value cannot know."""
    journal, log = _node(tmp_path)
    log.append(batch_of([b"a"]), 0, START_MS)
    acknowledge(journal, log)
    b_at = journal._files[-1].written
    forged = journal_module.encode_record(APPEND, "orders-0-x", 0, b"x", synced=b_at + 1)
    log.append(batch_of([b"value:" + forged]), 0, START_MS)  # never synced
    for segment in log._segments:
        segment.close()
    path = journal._files[-1].path
    journal.close(remove_files=False)
    data = bytearray(path.read_bytes())
    assert bytes(forged) in data
    data[b_at + 1] ^= 0xFF  # b's head torn by the power loss
    path.write_bytes(bytes(data))
    for segment_path in (tmp_path / KEY).glob("*.log"):
        segment_path.write_bytes(b"")  # never fsynced
    recovered = recover(tmp_path)
    assert values(recovered) == [b"a"]
    recovered.close()


def test_journal_open_over_a_torn_tail_then_acknowledged_records_is_not_refused(
    tmp_path: Path,
) -> None:
    """Journal.open keeps existing files for replay; one ending in a torn (never
    acknowledged) record stays torn. The new file's intact first record then counts as
    proof that the torn bytes were durable: after a crash every start refuses.
    (Latent: Broker._open_journal deletes the files before Journal.open. Found by
    review of b914f12.) Journal.open now cuts the torn tail off first."""
    journal, log = _node(tmp_path)
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
    assert values(recovered) == [b"a", b"c"]
    recovered.close()
