"""Checkpointed journal files kept as spares and reused (storage/journal.py, module
docstring): a reused file holds its old records after the new ones; none of them may
replay, prove damage, or hide a newer file's records."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from storage_helpers import START_MS, acknowledge, batch_of, journaled_log, kill_nine, read_all

from tidemq.storage import LogConfig, PartitionLog
from tidemq.storage.journal import (
    SECTOR_BYTES,
    SPARES_MAX,
    Journal,
    _crc_multiply,
    _crc_shift,
    _PrefixCrcs,
    _x_to_the_bytes,
    decode_records,
    file_salt,
    journal_files,
    replay,
    spare_files,
)

KEY = "topic-0-abc"


def _checkpoint(journal: Journal, log: PartitionLog) -> None:
    older = journal.rotate()
    log.sync()
    journal.discard(older)


def _recovered_values(root: Path) -> list[bytes]:
    logs: list[PartitionLog] = []

    def open_key(key: str) -> PartitionLog:
        logs.append(PartitionLog.open(root / key, LogConfig(), START_MS))
        return logs[-1]

    replay(root / "journal", open_key, START_MS)  # raises CorruptBatch on "damage"
    for log_ in logs:
        log_.close(mark_clean=False)
    log = PartitionLog.open(root / KEY, LogConfig(), START_MS)
    got = [value for _, value in read_all(log)]
    log.close()
    return got


def test_a_checkpoint_keeps_a_spare_and_the_next_rotation_reuses_its_blocks(
    tmp_path: Path,
) -> None:
    journal, log = journaled_log(tmp_path, KEY)
    log.append(batch_of([b"a" * 3000]), 0, START_MS)
    acknowledge(journal, log)
    first = journal._files[-1].path
    _checkpoint(journal, log)
    spares = spare_files(tmp_path / "journal")
    assert [p.name.split(".")[0] for p in spares] == [first.name.split(".")[0]]
    inode = spares[0].stat().st_ino
    _checkpoint(journal, log)  # the second rotation takes the spare
    newest = journal._files[-1].path
    assert newest.stat().st_ino == inode
    assert file_salt(newest) != file_salt(first)
    assert len(spare_files(tmp_path / "journal")) == SPARES_MAX
    log.close()
    journal.close(remove_files=True)
    assert list((tmp_path / "journal").iterdir()) == []  # a clean stop leaves nothing


def test_a_reused_files_old_records_never_replay(tmp_path: Path) -> None:
    """The reused file's old records, whole and intact under their old salt, follow the
    new ones: replay must stop at the new ones' end (they would bring back history)."""
    journal, log = journaled_log(tmp_path, KEY)
    old_salt = journal._files[-1].salt
    for index in range(20):  # a long first life, a block per record (each synced)
        log.append(batch_of([f"old{index}".encode() * 100]), 0, START_MS)
        acknowledge(journal, log)
    _checkpoint(journal, log)
    _checkpoint(journal, log)  # reuses the long file
    reused = journal._files[-1]
    assert reused.salt != old_salt
    log.append(batch_of([b"new"]), 0, START_MS)
    acknowledge(journal, log)
    data = reused.path.read_bytes()
    next_block = -(-reused.written // SECTOR_BYTES) * SECTOR_BYTES
    old = list(decode_records(data[next_block:], old_salt))
    assert len(old) >= 10  # the old life's records are there, whole, after the new ones
    assert [end for _, end in decode_records(data, reused.salt)][-1] == reused.written
    expected = [v for _, v in read_all(log)]
    kill_nine(journal, log)
    assert _recovered_values(tmp_path) == expected


def test_a_rotation_cuts_a_reused_files_old_bytes_so_a_newer_file_does_not_prove_damage(
    tmp_path: Path,
) -> None:
    """A reused file rotated out with its old records still after its end, then a
    newer file's first record synced, then a crash before the checkpoint deleted the
    older file: replay took the old bytes for a bad record that the newer file's
    record proved durable, and refused to start (CorruptBatch)."""
    journal, log = journaled_log(tmp_path, KEY)
    for index in range(20):
        log.append(batch_of([f"old{index}".encode() * 100]), 0, START_MS)
        acknowledge(journal, log)
    _checkpoint(journal, log)
    _checkpoint(journal, log)  # the newest file is the long one, reused
    log.append(batch_of([b"short life"]), 0, START_MS)
    acknowledge(journal, log)
    reused = journal._files[-1]
    journal.rotate()  # a checkpoint under way: logs not synced yet, nothing discarded
    assert reused.path.stat().st_size == reused.written
    log.append(batch_of([b"in the newer file"]), 0, START_MS)
    acknowledge(journal, log)
    expected = [v for _, v in read_all(log)]
    kill_nine(journal, log)
    assert len(journal_files(tmp_path / "journal")) == 2
    assert _recovered_values(tmp_path) == expected


def test_a_start_deletes_the_spares_a_crash_left(tmp_path: Path) -> None:
    """Only a running journal reuses its spares: a start deletes those a crash left
    (else they stayed for ever, and a broker started with the journal off kept them)."""
    journal, log = journaled_log(tmp_path, KEY)
    log.append(batch_of([b"x" * 5000]), 0, START_MS)
    acknowledge(journal, log)
    _checkpoint(journal, log)
    assert len(spare_files(tmp_path / "journal")) == 1
    log.append(batch_of([b"after"]), 0, START_MS)
    acknowledge(journal, log)
    expected = [v for _, v in read_all(log)]
    kill_nine(journal, log)
    assert _recovered_values(tmp_path) == expected
    for path in journal_files(tmp_path / "journal"):  # as the broker does after replay
        path.unlink()
    reopened = Journal.open(tmp_path / "journal")
    assert spare_files(tmp_path / "journal") == [] and reopened._spares == []
    assert reopened._files[-1].path.stat().st_size == 0  # a new file, not a spare
    reopened.close(remove_files=True)


@settings(max_examples=40, deadline=None)
@given(
    lives=st.lists(st.lists(st.integers(1, 6000), min_size=0, max_size=6), min_size=2, max_size=6),
    cut_rotation=st.booleans(),
)
def test_any_sequence_of_reuses_replays_exactly_the_acknowledged_records(
    tmp_path_factory: object, lives: list[list[int]], cut_rotation: bool
) -> None:
    """Files of any sizes reused in turn (each life's appends, then a checkpoint; the
    last one optionally cut short after its rotation): a kill -9 then replay gives
    back exactly the log, never an old record."""
    root = tmp_path_factory.mktemp("reuse")  # type: ignore[attr-defined]
    journal, log = journaled_log(root, KEY)
    counter = 0
    for number, life in enumerate(lives):
        for size in life:
            log.append(batch_of([f"v{counter}.".encode().ljust(size, b"-")]), 0, START_MS)
            counter += 1
            acknowledge(journal, log)
        if number < len(lives) - 1:
            _checkpoint(journal, log)
        elif cut_rotation:
            journal.rotate()
            log.append(batch_of([f"v{counter}".encode()]), 0, START_MS)
            acknowledge(journal, log)
    expected = [v for _, v in read_all(log)]
    kill_nine(journal, log)
    assert _recovered_values(root) == expected


def test_crc_from_another_salt_never_matches_a_whole_record() -> None:
    """What the reuse rests on: for data of a fixed length, CRC-32 maps start values
    one to one, so a record's CRC under its own salt differs under any other."""
    body = os.urandom(300)
    values = {zlib.crc32(body, salt) for salt in range(0, 1 << 16)}
    assert len(values) == 1 << 16


def test_a_checkpointed_file_deleted_by_hand_is_not_kept_and_does_not_fail_the_checkpoint(
    tmp_path: Path,
) -> None:
    """Deleting the file is what a checkpoint does anyway (unlink tolerates a missing
    one); keeping it as a spare must not fail where deleting it would not."""
    journal, log = journaled_log(tmp_path, KEY)
    log.append(batch_of([b"a"]), 0, START_MS)
    acknowledge(journal, log)
    older = journal.rotate()
    log.sync()
    older[0].unlink()
    journal.discard(older)
    assert spare_files(tmp_path / "journal") == [] and journal._spares == []
    log.close()
    journal.close(remove_files=True)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=20_000),
    bounds=st.tuples(st.integers(0, 20_000), st.integers(0, 20_000)),
    salt=st.integers(0, 2**32 - 1),
)
def test_the_proof_scans_crc_of_a_slice_from_prefix_crcs_is_zlibs(
    data: bytes, bounds: tuple[int, int], salt: int
) -> None:
    """The scan checks a candidate's CRC from the file's prefix CRCs (zlib's
    crc32_combine math), whatever the slice: across 4 KiB steps, empty, at the end."""
    start, end = sorted(min(b, len(data)) for b in bounds)
    assert _PrefixCrcs(data).of(start, end, salt) == zlib.crc32(data[start:end], salt)


@settings(max_examples=300, deadline=None)
@given(crc=st.integers(0, 2**32 - 1), length=st.integers(0, 2**31 - 1))
def test_the_crc_shift_by_table_steps_is_the_multiplication_by_x_to_the_length(
    crc: int, length: int
) -> None:
    """Any claimed length (a journal record's is up to 2^31 - 1): the hexadecimal-digit
    tables give crc * x^(8 * length), as the per-bit square-and-multiply does."""
    assert _crc_shift(crc, length) == _crc_multiply(_x_to_the_bytes(length), crc)
    assert _crc_shift(crc, length) == _crc_shift(_crc_shift(crc, length // 2), length - length // 2)


@settings(max_examples=60, deadline=None)
@given(value=st.integers(0, 2**32 - 1), length=st.integers(0, 1 << 21))
def test_the_crc_shift_is_zlibs_crc_of_zeros(value: int, length: int) -> None:
    """An oracle independent of the module's arithmetic: zlib's CRC of ``length`` zero
    bytes is the shift of its start register (conditioned by zlib)."""
    shifted = _crc_shift(value ^ 0xFFFFFFFF, length) ^ 0xFFFFFFFF
    assert zlib.crc32(bytes(length), value) == shifted
