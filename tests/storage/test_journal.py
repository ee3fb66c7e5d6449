"""The broker-wide journal (storage/journal.py): record framing, replay after a power
loss, truncations, checkpoints, and a randomized model of crashes at any point."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from storage_helpers import (
    START_MS,
    batch_of,
    fail_once_with_eio,
    kill_nine,
    numbered_values,
    open_log,
    read_all,
    replay_like_a_start,
)

import tidemq.storage.log as log_module
from tidemq.errors import CorruptBatch
from tidemq.storage import LogConfig, PartitionLog
from tidemq.storage.journal import (
    APPEND,
    SECTOR_BYTES,
    TRUNCATE,
    Journal,
    decode_records,
    encode_record,
    file_salt,
    journal_files,
    replay,
)
from tidemq.wire.batch import patch_batch

KEY = "topic-0-abc"
PAGE = SECTOR_BYTES  # the block a sync pads to


class PowerLoss(Exception):
    """The machine stops here: only what was fsynced before stays."""


class Crashable:
    """One partition log with a journal, and a simulated power loss: every file goes
    back to what was fsynced (segments to their size at the last sync; the journal to
    its synced bytes), optionally keeping a torn piece of the unsynced rest, with some
    of the journal pages written since the last sync torn (zeros)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.journal = Journal.open(root / "journal")
        self.log = open_log(root / KEY)
        self.log.attach_journal(self.journal, KEY)
        self.segment_synced: dict[Path, int] = self._segment_sizes()

    def _segment_sizes(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in (self.root / KEY).glob("*.log")}

    def sync_segments(self) -> None:
        self.log.sync()
        self.segment_synced = self._segment_sizes()

    def truncate(self, offset: int) -> None:
        """A truncation: the cut is fsynced before truncate_to returns."""
        self.log.truncate_to(offset)
        sizes = self._segment_sizes()
        self.segment_synced = {
            path: min(self.segment_synced.get(path, 0), size) for path, size in sizes.items()
        }

    def durable_end(self) -> int:
        """What an acknowledgement could have promised: journal-synced appends."""
        return self.log.flushed_offset

    def journal_sync(self) -> None:
        end, generation = self.log.log_end_offset, self.log.truncation_generation
        self.journal.sync()
        self.log.mark_durable(end, generation)

    def crash(
        self,
        rng: random.Random | None = None,
        recovery: Callable[[Path], PartitionLog] | None = None,
    ) -> PartitionLog:
        synced_journal = {f.path: f.synced for f in self.journal._files}
        for path in (self.root / KEY).glob("*.log"):
            keep = self.segment_synced.get(path, 0)
            size = path.stat().st_size
            if rng is not None and size > keep:
                keep = rng.randint(keep, size)  # some unsynced pages made it, torn
            os.truncate(path, keep)
        for path, synced in synced_journal.items():
            if not path.exists():
                continue
            size = path.stat().st_size
            keep = synced if rng is None or size <= synced else rng.randint(synced, size)
            os.truncate(path, keep)
            if rng is not None and size > synced:
                _tear_rewritten_pages(path, synced, keep, rng)
        return (recovery or recover)(self.root)


def _tear_rewritten_pages(path: Path, synced: int, size: int, rng: random.Random) -> None:
    """Pages a write since the last sync touched may be torn (zeros): the disk was
    rewriting them, the first one (which may also hold synced bytes) more often than
    not."""
    data = bytearray(path.read_bytes())
    first = synced // PAGE
    for page in range(first, max(first + 1, -(-size // PAGE))):
        if rng.random() < (0.75 if page == first else 0.5):
            start = page * PAGE
            data[start : start + PAGE] = bytes(len(data[start : start + PAGE]))
    path.write_bytes(bytes(data))


def recover(root: Path) -> PartitionLog:
    """What the broker does on start: replay into freshly opened logs."""
    logs: dict[str, PartitionLog] = {}

    def open_key(key: str) -> PartitionLog | None:
        if not (root / key).is_dir():
            return None
        logs[key] = open_log(root / key)
        return logs[key]

    replay(root / "journal", open_key, START_MS)
    for log_ in logs.values():
        log_.close(mark_clean=False)
    for path in journal_files(root / "journal"):
        path.unlink()
    return open_log(root / KEY)


def values(log: PartitionLog) -> list[bytes]:
    return [value for _, value in read_all(log)]


def test_records_round_trip_and_a_torn_or_corrupt_record_ends_the_file() -> None:
    first = encode_record(APPEND, KEY, 7, b"payload")
    second = encode_record(TRUNCATE, "other-1-x", 3, b"")
    decoded = [record for record, _ in decode_records(first + second)]
    assert [(r.kind, r.key, r.offset, r.payload) for r in decoded] == [
        (APPEND, KEY, 7, b"payload"),
        (TRUNCATE, "other-1-x", 3, b""),
    ]
    assert len(list(decode_records(first + second[:-1]))) == 1  # torn
    flipped = bytearray(first + second)
    flipped[len(first) + 12] ^= 0x01
    assert len(list(decode_records(bytes(flipped)))) == 1  # corrupt
    assert list(decode_records(b"\x00" * 64)) == []  # zeros: length 0 is never valid


def test_replay_restores_journaled_appends_a_power_loss_took_from_the_segment(
    tmp_path: Path,
) -> None:
    node = Crashable(tmp_path)
    for index in range(3):
        node.log.append(batch_of(numbered_values(index * 2, 2)), 1, START_MS)
    node.journal_sync()
    assert node.durable_end() == 6
    node.log.append(batch_of(numbered_values(6, 1)), 1, START_MS)  # never synced
    recovered = node.crash()
    assert values(recovered) == numbered_values(0, 6)
    assert recovered.epoch_entries() == [(1, 0)]
    recovered.close()


def test_replay_skips_what_the_segment_already_holds(tmp_path: Path) -> None:
    node = Crashable(tmp_path)
    node.log.append(batch_of(numbered_values(0, 3)), 0, START_MS)
    node.journal_sync()
    node.sync_segments()
    logs: dict[str, PartitionLog] = {}

    def open_key(key: str) -> PartitionLog:
        logs[key] = open_log(tmp_path / key)
        return logs[key]

    assert replay(tmp_path / "journal", open_key, START_MS) == {}  # nothing re-applied
    assert values(logs[KEY]) == numbered_values(0, 3)
    logs[KEY].close()


def test_a_truncation_is_journaled_before_the_cut_so_replay_never_undoes_it(
    tmp_path: Path,
) -> None:
    node = Crashable(tmp_path)
    node.log.append(batch_of(numbered_values(0, 2)), 1, START_MS)
    node.log.append(batch_of(numbered_values(2, 2)), 1, START_MS)
    node.journal_sync()
    node.sync_segments()  # the segment durably holds 0..3
    node.log.truncate_to(2)
    # The cut reached the segment file, but a power loss could revert it: make the
    # segment hold the old bytes again, as if the truncation never reached the disk.
    recovered = node.crash()
    assert values(recovered) == numbered_values(0, 2)
    recovered.close()


def test_segments_a_power_loss_brings_back_after_a_truncation_are_dropped_on_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """truncate_to unlinks the segments past the cut, then cuts and fsyncs the cut
    segment; only a later directory fsync makes the unlinks durable. A power loss
    before it brings the later segments back behind the cut one. With the recovery
    point still in the last segment, recovery trusted them: a gap at the cut, and
    replay's truncate_to could not find the cut offset (CorruptBatch at every start).
    The recovery point is lowered to the cut first, so recovery drops them."""
    journal = Journal.open(tmp_path / "journal")
    log = open_log(tmp_path / KEY, segment_bytes_max=300)
    log.attach_journal(journal, KEY)
    for start in range(0, 12, 2):
        log.append(batch_of(numbered_values(start, 2, size_bytes=40)), 0, START_MS)
    older = journal.rotate()  # a checkpoint: the recovery point moves to the last segment
    log.sync()
    journal.discard(older)
    assert log.segment_count >= 3
    durable = {p.name: p.read_bytes() for p in (tmp_path / KEY).glob("*.log")}

    def power_loss(*args: object) -> None:
        raise PowerLoss()

    monkeypatch.setattr(log_module, "write_epochs", power_loss)  # its directory fsync
    with pytest.raises(PowerLoss):
        log.truncate_to(2)  # journaled, later segments unlinked, the cut one cut + fsynced
    monkeypatch.undo()
    log._segments[0].close()
    journal.close(remove_files=False)
    for name, data in durable.items():  # the unlinks were never made durable
        if not (tmp_path / KEY / name).exists():
            (tmp_path / KEY / name).write_bytes(data)
    recovered = recover(tmp_path)
    assert values(recovered) == numbered_values(0, 2, size_bytes=40)
    recovered.close()


def test_appends_after_a_truncation_replay_on_top_of_it(tmp_path: Path) -> None:
    node = Crashable(tmp_path)
    node.log.append(batch_of(numbered_values(0, 4)), 1, START_MS)
    node.log.append(batch_of([b"old-a", b"old-b"]), 1, START_MS)
    node.journal_sync()
    node.log.truncate_to(4)
    node.log.append(batch_of([b"new-a"]), 2, START_MS)
    node.journal_sync()
    recovered = node.crash()
    assert values(recovered) == [*numbered_values(0, 4), b"new-a"]
    assert recovered.epoch_entries() == [(1, 0), (2, 4)]
    recovered.close()


def test_what_the_segment_holds_past_the_journal_was_never_acknowledged_and_is_cut(
    tmp_path: Path,
) -> None:
    node = Crashable(tmp_path)
    node.log.append(batch_of([b"a"]), 0, START_MS)
    node.journal_sync()
    node.log.append(batch_of([b"b"]), 0, START_MS)
    node.sync_segments()  # a checkpoint fsynced b's segment bytes...
    assert node.durable_end() == 1  # ...but only the journal's fsync acknowledges
    os.truncate(journal_files(tmp_path / "journal")[-1], node.journal._files[-1].synced)
    recovered = recover(tmp_path)
    assert values(recovered) == [b"a"]
    recovered.close()


def test_a_reset_cut_short_by_a_crash_starts_the_log_over(tmp_path: Path) -> None:
    node = Crashable(tmp_path)
    node.log.append(batch_of(numbered_values(0, 3)), 0, START_MS)
    node.journal_sync()
    # The follower's reset to the leader's log start 50, journaled, then a crash
    # before the directory was recreated; after it, appends from 50 were journaled.
    node.journal.truncate(KEY, 50)
    node.journal.append(KEY, 50, _at_offset(batch_of([b"fifty"]), 50))
    node.journal.sync()
    logs: dict[str, PartitionLog] = {}

    def open_key(key: str) -> PartitionLog:
        logs[key] = open_log(tmp_path / key)
        return logs[key]

    def start_over(key: str, offset: int) -> PartitionLog:
        logs.pop(key).close()
        logs[key] = PartitionLog.recreate_empty(tmp_path / key, offset, logs_config(), START_MS)
        return logs[key]

    with pytest.raises(CorruptBatch, match="past the log end"):
        replay(tmp_path / "journal", open_key, START_MS)  # no way to start over
    logs.pop(KEY).close()
    replay(tmp_path / "journal", open_key, START_MS, start_over)
    assert logs[KEY].log_start_offset == 50
    assert read_all(logs[KEY]) == [(50, b"fifty")]
    logs[KEY].close()


def logs_config() -> LogConfig:
    return LogConfig()


def test_retention_after_a_finished_reset_is_not_undone_by_the_replay(tmp_path: Path) -> None:
    """A follower reset (journaled at 100, the directory recreated), replicated records,
    then retention moved the log start past 100; killed before a checkpoint. Replay
    took the start != 100 for a reset cut short and recreated the log at 100 from the
    journal: the deleted records came back and the log start moved backwards. The
    batch at the log start is the journaled one, so the reset had finished."""
    config = LogConfig(segment_bytes_max=200, retention_bytes=1)
    journal = Journal.open(tmp_path / "journal")
    open_log(tmp_path / KEY).close()  # the follower's log before the reset
    journal.reset(KEY, 100)
    log = PartitionLog.recreate_empty(tmp_path / KEY, 100, config, START_MS)
    log.attach_journal(journal, KEY)
    for index in range(6):
        log.append_replicated(_at_offset(batch_of([bytes([65 + index]) * 80]), 100 + index), 0)
    journal.sync()
    assert log.apply_retention(START_MS, max_offset=106) > 0
    start = log.log_start_offset
    expected = read_all(log)
    assert start > 100
    kill_nine(journal, log)
    recovered = _recover_with_start_over(tmp_path)
    assert (recovered.log_start_offset, read_all(recovered)) == (start, expected)
    recovered.close()


def _at_offset(batch: bytes, offset: int) -> bytes:
    buffer = bytearray(batch)
    patch_batch(buffer, 0, offset, 0)
    return bytes(buffer)


def _fetched(first_offset: int, epochs_and_values: list[tuple[int, list[bytes]]]) -> bytes:
    """One replica fetch answer: a batch per (leader epoch, values), offsets assigned."""
    answer = bytearray()
    offset = first_offset
    for epoch, batch_values in epochs_and_values:
        one = bytearray(batch_of(batch_values))
        patch_batch(one, 0, offset, epoch)
        answer += one
        offset += len(batch_values)
    return bytes(answer)


def test_a_cut_between_two_batches_of_one_journal_record_replays(tmp_path: Path) -> None:
    """One append, so one journal record, may hold several batches (a replica fetch
    answer spanning two leader epochs). A newer leader makes the follower cut at the
    boundary between them: the replay must keep the record's batches below the cut,
    not refuse the cut as one inside a batch (CorruptBatch at every start)."""
    node = Crashable(tmp_path)
    node.log.append_replicated(_fetched(0, [(1, [b"a", b"b"]), (2, [b"c", b"d"])]), START_MS)
    node.journal_sync()
    node.truncate(2)  # the new leader's log diverges where epoch 1 ended
    node.log.append_replicated(_fetched(2, [(3, [b"C"])]), START_MS)
    node.journal_sync()
    recovered = node.crash()  # the segment's unsynced bytes are gone: all from the journal
    assert read_all(recovered) == [(0, b"a"), (1, b"b"), (2, b"C")]
    assert recovered.epoch_entries() == [(1, 0), (3, 2)]
    recovered.close()


def test_a_cut_inside_a_batch_of_a_journal_record_is_refused(tmp_path: Path) -> None:
    node = Crashable(tmp_path)
    node.log.append_replicated(_fetched(0, [(1, [b"a", b"b"]), (2, [b"c", b"d"])]), START_MS)
    node.journal_sync()
    node.journal.truncate(KEY, 3)  # the log never cuts there: truncate_to rounds down
    with pytest.raises(CorruptBatch, match="a cut at 3 inside a batch"):
        replay(tmp_path / "journal", lambda key: None, START_MS)
    node.log.close()


def test_nothing_after_a_torn_record_is_replayed(tmp_path: Path) -> None:
    node = Crashable(tmp_path)
    node.log.append(batch_of([b"a"]), 0, START_MS)
    node.log.append(batch_of([b"b"]), 0, START_MS)
    node.journal.sync()
    path = journal_files(tmp_path / "journal")[-1]
    data = path.read_bytes()
    first_end = next(decode_records(data, file_salt(path)))[1]
    os.truncate(path, first_end + 5)  # the second record torn
    os.truncate(next((tmp_path / KEY).glob("*.log")), 0)
    recovered = recover(tmp_path)
    assert values(recovered) == [b"a"]
    recovered.close()


def test_a_corrupt_record_an_intact_one_follows_is_not_taken_for_a_torn_tail(
    tmp_path: Path,
) -> None:
    """A flipped byte in a synced record with intact records after it: replay took it
    for a torn tail and dropped it and everything after it (acknowledged records),
    logging them as never acknowledged. It refuses instead; only an operator may
    accept the loss."""
    node = Crashable(tmp_path)
    ends = []
    for value in (b"a", b"b", b"c"):
        node.log.append(batch_of([value]), 0, START_MS)
        node.journal_sync()  # each acknowledged
        ends.append(node.journal._files[-1].written)
    path = journal_files(tmp_path / "journal")[-1]
    data = bytearray(path.read_bytes())
    data[ends[0] + 30] ^= 0xFF  # in b's payload: its header still says where c starts
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBatch, match=f"record at byte {ends[0]} is damaged"):
        replay(tmp_path / "journal", lambda key: None, START_MS)
    node.log.close()


def test_a_corrupt_last_record_of_an_older_journal_file_is_not_a_torn_tail(
    tmp_path: Path,
) -> None:
    """Rotation synced the older file whole before the newer one got a byte, so a bad
    record at its end is damage, not a torn tail, when the newer file holds a record."""
    node = Crashable(tmp_path)
    node.log.append(batch_of([b"a"]), 0, START_MS)
    older = node.journal.rotate()[-1]
    node.log.append(batch_of([b"b"]), 0, START_MS)
    node.journal_sync()
    data = bytearray(older.read_bytes())
    a_end = next(decode_records(bytes(data), file_salt(older)))[1]
    data[a_end - 1] ^= 0xFF  # the last byte of a's record
    older.write_bytes(bytes(data))
    with pytest.raises(CorruptBatch, match="record at byte 0 is damaged"):
        replay(tmp_path / "journal", lambda key: None, START_MS)
    node.log.close()


def test_a_gap_between_segment_and_journal_is_an_error(tmp_path: Path) -> None:
    directory = tmp_path / KEY
    journal = Journal.open(tmp_path / "journal")
    journal.append(KEY, 5, batch_of([b"x"]))
    journal.sync()
    log = open_log(directory)
    with pytest.raises(CorruptBatch, match="past the log end"):
        replay(tmp_path / "journal", lambda key: log, START_MS)
    log.close()
    journal.close(remove_files=True)


def test_records_of_a_deleted_partition_are_skipped(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "journal")
    journal.append("gone-0-x", 0, batch_of([b"x"]))
    journal.sync()
    assert replay(tmp_path / "journal", lambda key: None, START_MS) == {}
    journal.close(remove_files=True)
    assert journal_files(tmp_path / "journal") == []


def test_no_record_of_a_newer_journal_file_outlives_an_unsynced_one_of_an_older_file(
    tmp_path: Path,
) -> None:
    """A checkpoint rotates while a group commit is still pending; the next append goes
    to the new file. A power loss may then keep the new file's page but lose the older
    file's unsynced record at a record boundary: a gap in the log's records that replay
    cannot close (CorruptBatch at every start). Rotation syncs the older files first,
    so nothing of them can be lost once the new file holds a byte."""
    node = Crashable(tmp_path)
    node.log.append(batch_of([b"acknowledged"]), 0, START_MS)
    node.journal_sync()
    node.log.append(batch_of([b"in-the-older-file"]), 0, START_MS)  # group commit pending
    older = node.journal._files[-1]
    node.journal.rotate()
    assert older.synced == older.written
    node.log.append(batch_of([b"in-the-newer-file"]), 0, START_MS)
    newer = node.journal._files[-1]
    newer.synced = newer.written  # its page reached the disk by writeback, unsynced
    recovered = node.crash()  # the older file keeps what was fdatasynced
    assert values(recovered) == [b"acknowledged", b"in-the-older-file", b"in-the-newer-file"]
    recovered.close()


def test_a_checkpoint_deletes_old_files_only_with_their_logs_synced(tmp_path: Path) -> None:
    node = Crashable(tmp_path)
    node.log.append(batch_of(numbered_values(0, 3)), 0, START_MS)
    node.journal_sync()
    older = node.journal.rotate()
    assert len(older) == 1 and older[0].exists()
    node.log.append(batch_of(numbered_values(3, 2)), 0, START_MS)  # into the new file
    node.sync_segments()  # what the checkpoint does before discarding
    node.journal.discard(older)
    assert not older[0].exists() and len(journal_files(tmp_path / "journal")) == 1
    node.journal_sync()
    recovered = node.crash()
    assert values(recovered) == numbered_values(0, 5)
    recovered.close()


def test_mark_durable_is_void_after_a_truncation(tmp_path: Path) -> None:
    node = Crashable(tmp_path)
    node.log.append(batch_of(numbered_values(0, 2)), 0, START_MS)
    node.log.append(batch_of(numbered_values(2, 2)), 0, START_MS)
    end, generation = node.log.log_end_offset, node.log.truncation_generation
    node.log.truncate_to(2)
    node.log.append(batch_of([b"other"]), 1, START_MS)
    node.journal.sync()
    node.log.mark_durable(end, generation)  # noted before the cut: says nothing now
    assert node.log.flushed_offset <= 2
    node.log.mark_durable(node.log.log_end_offset, node.log.truncation_generation)
    assert node.log.flushed_offset == 3
    node.log.close()


OPERATION = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 3)),
    st.tuples(st.just("truncate"), st.integers(0, 100)),
    st.tuples(st.just("journal_sync"), st.just(0)),
    st.tuples(st.just("segment_sync"), st.just(0)),
    st.tuples(st.just("checkpoint"), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(operations=st.lists(OPERATION, max_size=25), seed=st.integers(0, 2**32))
def test_a_power_loss_at_any_point_keeps_every_durable_record(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[str, int]], seed: int
) -> None:
    """Model: the log's history as a list of values. After a crash with torn files,
    the recovered log is a prefix of the final history that holds everything that
    was durable (journal-synced and not cut since)."""
    root = tmp_path_factory.mktemp("crash")
    node = Crashable(root)
    model: list[bytes] = []
    durable = 0  # model prefix that any acknowledgement may have promised
    epoch = 0
    counter = 0
    for name, argument in operations:
        if name == "append":
            batch = [f"v{counter + i}".encode() for i in range(argument)]
            counter += argument
            node.log.append(batch_of(batch), epoch, START_MS)
            model.extend(batch)
        elif name == "truncate" and model:
            starts = [0]
            for header_end in _batch_ends(node.log):
                starts.append(header_end)
            cut = starts[argument % len(starts)]
            if cut < len(model):
                node.truncate(cut)
                del model[cut:]
                durable = min(durable, cut)
                epoch += 1  # a new leader's epoch after a divergence
        elif name == "journal_sync":
            node.journal_sync()
            durable = node.log.flushed_offset
        elif name == "segment_sync":
            node.sync_segments()
        elif name == "checkpoint":
            older = node.journal.rotate()
            node.sync_segments()
            node.journal.discard(older)
    assert node.log.flushed_offset <= len(model)
    recovered = node.crash(random.Random(seed))
    got = values(recovered)
    recovered.close()
    assert got[:durable] == model[:durable], "a durable record was lost or changed"
    assert len(got) >= durable
    # Truncations are durable before the cut, so nothing cut comes back: what survives
    # is a prefix of the final history.
    assert got == model[: len(got)], "a truncated record came back"


def _batch_ends(log: PartitionLog) -> list[int]:
    from tidemq.wire.batch import iter_headers

    ends = []
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        data = log.read(offset, 1 << 20)
        for header in iter_headers(data):
            ends.append(header.next_offset)
        offset = ends[-1]
    return ends


def test_a_failed_journal_write_leaves_the_segment_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC (or EIO) writing the journal record: the append fails and the log must
    be as if it never happened, as a failed segment write leaves it (segment.append
    cuts its partial bytes). Else the failed batch stays in the segment at the offsets
    the next append is given: reads and followers see the failed batch under the
    acknowledged one's offsets, and a replay later swaps them."""
    node = Crashable(tmp_path)
    real_writev = os.writev
    calls = 0

    def writev_failing_once(fd: int, buffers: list[bytes]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(28, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev_failing_once)
    with pytest.raises(OSError):
        node.log.append(batch_of([b"failed"]), 0, START_MS)
    assert node.log.append(batch_of([b"acknowledged"]), 0, START_MS) == (0, 0)
    node.journal_sync()
    assert values(node.log) == [b"acknowledged"]
    node.log.close()


def test_a_failed_fsync_undoing_a_failed_journal_write_fails_every_later_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal write fails (ENOSPC) and the segment's cut of the failed append
    fsyncs; if that fsync fails too, the log must fail every later sync, as after any
    failed fsync. Else the next checkpoint's fsync of the log "succeeds" over pages the
    disk may have dropped (fsyncgate) and deletes the journal file holding the log's
    acknowledged append."""
    node = Crashable(tmp_path)
    node.log.append(batch_of([b"acknowledged"]), 0, START_MS)
    node.journal_sync()
    real_writev = os.writev

    def writev_enospc(fd: int, buffers: list[bytes]) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", writev_enospc)
    fail_once_with_eio(monkeypatch, "fsync")
    with pytest.raises(OSError):
        node.log.append(batch_of([b"failed"]), 0, START_MS)
    monkeypatch.setattr(os, "writev", real_writev)
    node.journal.rotate()  # a checkpoint: the log's fsync must fail before any discard
    with pytest.raises(OSError, match="earlier fsync"):
        node.log.sync()
    node.journal.close(remove_files=False)


RESET_OPERATIONS = st.one_of(
    OPERATION,
    st.tuples(st.just("reset"), st.integers(1, 3)),  # a follower past its log end
    st.tuples(st.just("reset_below_start"), st.integers(0, 0)),  # a divergence below it
    st.tuples(st.just("rotate"), st.integers(0, 0)),  # a checkpoint still syncing logs
)


def _recover_with_start_over(root: Path) -> PartitionLog:
    replay_like_a_start(root)
    return open_log(root / KEY)


@settings(max_examples=150, deadline=None)
@given(
    operations=st.lists(RESET_OPERATIONS, max_size=25),
    cut_short=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_a_power_loss_at_any_point_with_follower_resets_keeps_every_durable_record(
    tmp_path_factory: pytest.TempPathFactory,
    operations: list[tuple[str, int]],
    cut_short: bool,
    seed: int,
) -> None:
    """As above, with follower resets (``reset_to``: journaled, then the directory
    recreated empty at the reset point), the last one possibly cut short by the crash
    right after its journal record. Model: offset -> value from the log start."""
    root = tmp_path_factory.mktemp("crash")
    node = Crashable(root)
    model: list[bytes | None] = []  # None below the log start
    start = durable = epoch = counter = 0

    def reset(offset: int, complete: bool) -> None:
        nonlocal model, start, durable
        node.journal.reset(KEY, offset)
        node.log.close()
        node.segment_synced = node._segment_sizes()  # close fsynced them
        model, start, durable = [None] * offset, offset, offset
        if complete:
            node.log = PartitionLog.recreate_empty(root / KEY, offset, logs_config(), START_MS)
            node.log.attach_journal(node.journal, KEY)
            node.segment_synced = node._segment_sizes()

    for name, argument in operations:
        if name == "append":
            batch = [f"v{counter + i}".encode() for i in range(argument)]
            counter += argument
            node.log.append(batch_of(batch), epoch, START_MS)
            model.extend(batch)
        elif name == "truncate" and len(model) > start:
            starts = [start, *_batch_ends(node.log)]
            cut = starts[argument % len(starts)]
            if cut < len(model):
                node.truncate(cut)
                del model[cut:]
                durable = min(durable, cut)
                epoch += 1
        elif name == "journal_sync":
            node.journal_sync()
            durable = max(durable, node.log.flushed_offset)
        elif name == "segment_sync":
            node.sync_segments()
        elif name == "checkpoint":
            older = node.journal.rotate()
            node.sync_segments()
            node.journal.discard(older)
        elif name == "reset":
            reset(len(model) + argument, complete=True)
        elif name == "reset_below_start" and start > 0 and node.log.log_end_offset > start:
            reset(start - 1, complete=True)
        elif name == "rotate":
            node.journal.rotate()
    if cut_short:  # a last reset, cut short right after its journal record
        target = len(model) + 1 if start == 0 or len(model) == start else start - 1
        reset(target, complete=False)
    if not cut_short:
        assert node.log.flushed_offset <= len(model)
    recovered = node.crash(random.Random(seed), _recover_with_start_over)
    got = read_all(recovered)
    got_start = recovered.log_start_offset
    recovered.close()
    assert got_start == start, "the log start moved"
    assert [value for _, value in got[: durable - start]] == model[start:durable], (
        "a durable record was lost or changed"
    )
    assert all(offset < len(model) and model[offset] == value for offset, value in got), (
        "a truncated record came back"
    )


def test_a_recreated_log_directory_is_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reset_to deletes the directory (parent fsynced) and makes it again: unless the
    parent is fsynced again, a power loss may take the new directory's entry, and with
    it the restarted log whose journal records a checkpoint already discarded."""
    import tidemq.storage.log as log_module

    directory = tmp_path / KEY
    open_log(directory).close()
    synced: list[tuple[Path, bool]] = []
    real = log_module.fsync_directory

    def recording(path: Path) -> None:
        synced.append((Path(path), directory.exists()))
        real(path)

    monkeypatch.setattr(log_module, "fsync_directory", recording)
    PartitionLog.recreate_empty(directory, 7, logs_config(), START_MS).close()
    assert (tmp_path, True) in synced, "the new directory's entry was never fsynced"


def test_a_new_journal_directory_is_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first start makes ``journal/``: unless the data directory is fsynced after,
    a power loss may take the directory entry and every journaled record with it."""
    import tidemq.storage.journal as journal_module

    synced: list[tuple[Path, bool]] = []
    real = journal_module.fsync_directory
    directory = tmp_path / "journal"

    def recording(path: Path) -> None:
        synced.append((Path(path), directory.exists()))
        real(path)

    monkeypatch.setattr(journal_module, "fsync_directory", recording)
    Journal.open(directory).close(remove_files=False)
    assert (tmp_path, True) in synced, "the journal directory's entry was never fsynced"


def test_a_reset_inside_an_earlier_incarnations_batch_replays(tmp_path: Path) -> None:
    """The replica moved away (directory deleted, its records still journaled) and
    back before a checkpoint: the new follower resets to the leader's log start, which
    may fall inside a batch of the old history. As a truncation record it read as a cut
    inside a batch (CorruptBatch at every start); a reset record restarts the tail."""
    node = Crashable(tmp_path)
    node.log.append(batch_of([b"old-0", b"old-1", b"old-2"]), 0, START_MS)
    node.journal_sync()
    node.log.close()
    shutil.rmtree(tmp_path / KEY)  # moved away
    node.log = open_log(tmp_path / KEY)  # and back: empty at 0
    node.log.attach_journal(node.journal, KEY)
    node.journal.reset(KEY, 2)  # reset_to(2)
    node.log.close()
    node.log = PartitionLog.recreate_empty(tmp_path / KEY, 2, logs_config(), START_MS)
    node.log.attach_journal(node.journal, KEY)
    node.log.append_replicated(_at_offset(batch_of([b"new-2"]), 2), START_MS)
    node.journal_sync()
    node.segment_synced = {}  # the new segment's bytes lost
    recovered = node.crash(recovery=_recover_with_start_over)
    assert read_all(recovered) == [(2, b"new-2")]
    recovered.close()


def test_after_a_failed_fdatasync_every_later_sync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux reports a writeback error to one fsync of the file only; a later one
    succeeds with the pages lost (fsyncgate). So the journal never says durable again:
    a sync, a truncation, a reset and a checkpoint's discard all fail from then on."""
    journal = Journal.open(tmp_path / "journal")
    errors = fail_once_with_eio(monkeypatch, "fdatasync")
    try:
        journal.append(KEY, 0, b"batch bytes")
        with pytest.raises(OSError):
            journal.sync()
        assert errors == []  # reported once: the fake succeeds from now on
        for step in (
            journal.sync,
            lambda: journal.truncate(KEY, 0),
            lambda: journal.reset(KEY, 5),
            lambda: journal.discard([]),
        ):
            with pytest.raises(OSError, match="earlier journal fdatasync failed"):
                step()
    finally:
        journal.close(remove_files=False)
