"""The broker with its journal (storage/journal.py): acknowledged records survive a
power loss that took the segment files' unsynced bytes; checkpoints delete old
journal files; a clean shutdown leaves no journal behind."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from tests.broker.test_broker_api import (
    _answer,
    batch,
    broker_client,
    follower_with_records,
    produce,
    run,
)
from tests.storage.storage_helpers import fail_once_with_eio

import tidemq.broker.syncer as syncer_module
from tidemq.broker.follower import _restart_at
from tidemq.broker.partition import (
    HIGH_WATERMARK_FILE,
    PartitionReplica,
    partition_directory_name,
)
from tidemq.broker.server import Broker, BrokerConfig
from tidemq.core.replica import Acks
from tidemq.storage import LogConfig, PartitionLog
from tidemq.storage.checkpoint import read_offset
from tidemq.storage.journal import JOURNAL_DIRECTORY, Journal, journal_files, spare_files
from tidemq.transport import HttpTransport
from tidemq.wire.batch import decode_records, patch_batch

TOPIC_ID = "0123456789abcdef0123456789abcdef"


def _start(data_dir: Path, journal: bool = True) -> Broker:
    config = BrokerConfig(
        1, data_dir, "http://127.0.0.1:1", "http://127.0.0.1:2", LogConfig(), journal=journal
    )
    broker = Broker(config, lambda: HttpTransport(False, {}, 4, 1000), CollectorRegistry())
    broker.reconcile(_answer())
    return broker


def test_acknowledged_records_survive_losing_the_segments_unsynced_bytes(
    tmp_path: Path,
) -> None:
    live = tmp_path / "live"
    crashed = tmp_path / "crashed"
    partition_dir = partition_directory_name("orders", 0, TOPIC_ID)

    async def scenario() -> None:
        async with broker_client(live) as (broker, client):
            segments = list((live / partition_dir).glob("*.log"))
            synced_sizes = {p.name: p.stat().st_size for p in segments}  # fsynced at open
            for start in range(0, 9, 3):
                response = await produce(client, batch(3, start), acks="all")
                assert response.status == 200, await response.text()
            assert broker.replicas[("orders", 0)].high_watermark == 9
            # The power loss, taken while the broker runs: the segments lose what was
            # never fsynced (everything since open), the journal keeps its synced bytes.
            shutil.copytree(live, crashed)
            for name, size in synced_sizes.items():
                os.truncate(crashed / partition_dir / name, size)

    run(scenario)
    assert journal_files(crashed / JOURNAL_DIRECTORY), "the journal held the records"
    restarted = _start(crashed)
    try:
        log = restarted.replicas[("orders", 0)].log
        records = list(decode_records(log.read(0, 1 << 20)))
        assert [r.value for r in records] == [f"v{i}".encode() for i in range(9)]
        # replayed, fsynced into the segments, and the old journal files are gone
        assert len(journal_files(crashed / JOURNAL_DIRECTORY)) == 1
    finally:
        run(restarted.close)
    assert journal_files(crashed / JOURNAL_DIRECTORY) == []  # clean shutdown: none left


def test_records_acknowledged_into_a_reused_journal_file_survive_losing_the_segments(
    tmp_path: Path,
) -> None:
    """Two checkpoints: the second rotation reuses the first file (a spare), written
    over its old records. A power loss then (segments back to their last fsync): the
    records acknowledged into the reused file replay, and none of its old ones."""
    live = tmp_path / "live"
    crashed = tmp_path / "crashed"
    partition_dir = partition_directory_name("orders", 0, TOPIC_ID)

    async def scenario() -> None:
        async with broker_client(live) as (broker, client):
            journal_dir = live / JOURNAL_DIRECTORY
            first = journal_files(journal_dir)[0]
            inode = first.stat().st_ino
            for start in range(0, 30, 3):  # a long first life: old records to reuse
                assert (await produce(client, batch(3, start), acks="all")).status == 200
            await broker.syncer.checkpoint()
            assert [p.stat().st_ino for p in spare_files(journal_dir)] == [inode]
            await broker.syncer.checkpoint()  # the new file is the reused one
            (reused,) = journal_files(journal_dir)
            assert reused.stat().st_ino == inode and reused.name != first.name
            segments = list((live / partition_dir).glob("*.log"))
            synced_sizes = {p.name: p.stat().st_size for p in segments}  # checkpointed
            response = await produce(client, batch(2, 30), acks="all")
            assert response.status == 200, await response.text()
            assert reused.stat().st_size > broker.syncer.journal._files[-1].written
            shutil.copytree(live, crashed)
            for name, size in synced_sizes.items():
                os.truncate(crashed / partition_dir / name, size)

    run(scenario)
    restarted = _start(crashed)
    try:
        log = restarted.replicas[("orders", 0)].log
        records = list(decode_records(log.read(0, 1 << 20)))
        assert [r.value for r in records] == [f"v{i}".encode() for i in range(32)]
    finally:
        run(restarted.close)
    assert list((crashed / JOURNAL_DIRECTORY).iterdir()) == []  # clean stop: no spare


def test_a_start_with_the_journal_off_deletes_a_spare_a_crash_left(tmp_path: Path) -> None:
    """A spare is kept only for a journal to reuse: a broker started with the journal
    off (--no-journal) would otherwise keep it for ever."""
    crashed = _crashed_with_two_records(tmp_path)
    journal_dir = crashed / JOURNAL_DIRECTORY
    spare = journal_dir / "00000000000000000007.0000abcd.spare"
    spare.write_bytes(b"old records")
    restarted = _start(crashed, journal=False)
    try:
        assert not spare.exists() and journal_files(journal_dir) == []
    finally:
        run(restarted.close)


def test_replayed_journal_files_stay_deleted_across_a_power_loss_with_the_journal_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start replays the journal and deletes its files. With the journal on, opening
    the new journal file fsyncs the directory; with it off (--no-journal, or a weaker
    fsync policy) nothing did, so a power loss could bring the deleted files back, and
    the next start would replay that stale journal over the history written since
    (undoing a later truncation, cutting the appends after it)."""
    crashed = _crashed_with_two_records(tmp_path)
    journal_dir = crashed / JOURNAL_DIRECTORY
    assert journal_files(journal_dir)
    watch = _UnlinkWatch(journal_dir, monkeypatch)
    restarted = _start(crashed, journal=False)
    monkeypatch.undo()
    try:
        assert journal_files(journal_dir) == []
        assert watch.not_durable == set()
    finally:
        run(restarted.close)


def test_a_start_deletes_the_replayed_journal_files_one_durable_unlink_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_open_journal unlinked the replayed files oldest first and fsynced the directory
    once after the last: a power loss in between could keep an older file but not a
    newer one's unlink, and the next start would replay the older file alone over the
    history written since, cutting what the segments hold past it. Each unlink is
    durable before the next, so what survives is a suffix of the journal."""
    crashed = _crashed_with_two_records(tmp_path)
    journal_dir = crashed / JOURNAL_DIRECTORY
    last = int(journal_files(journal_dir)[-1].name.split(".")[0])
    for sequence in (last + 1, last + 2):  # rotated files a checkpoint had not deleted
        (journal_dir / f"{sequence:020d}.journal").write_bytes(b"")
    assert len(journal_files(journal_dir)) >= 3
    watch = _UnlinkWatch(journal_dir, monkeypatch)
    restarted = _start(crashed, journal=False)
    monkeypatch.undo()
    try:
        assert journal_files(journal_dir) == []
        pending = watch.pending
        assert len(pending) >= 3 and set(pending) == {0} and not watch.not_durable, pending
    finally:
        run(restarted.close)


def _crashed_with_two_records(tmp_path: Path) -> Path:
    """A copy of a broker's data directory taken while it ran (kill -9): the journal
    holds offsets 0-1."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"

    async def scenario() -> None:
        async with broker_client(live) as (_, client):
            assert (await produce(client, batch(2), acks="all")).status == 200
            shutil.copytree(live, crashed)

    run(scenario)
    return crashed


class _UnlinkWatch:
    """Watches ``directory``: the unlinks in it a power loss could undo (no directory
    fsync since: ``not_durable``), and how many there were at each unlink (``pending``)."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.not_durable: set[str] = set()
        self.pending: list[int] = []
        inode = directory.stat().st_ino
        real_unlink, real_fsync = os.unlink, os.fsync

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            inside = Path(path).parent == directory
            if inside:
                self.pending.append(len(self.not_durable))
            real_unlink(path, *args, **kwargs)
            if inside:
                self.not_durable.add(Path(path).name)

        def fsync(fd: int) -> None:
            real_fsync(fd)
            if os.fstat(fd).st_ino == inode:
                self.not_durable.clear()

        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(os, "fsync", fsync)


def test_a_checkpoint_fsyncs_the_logs_then_deletes_the_older_journal_files(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            assert (await produce(client, batch(4), acks="all")).status == 200
            journal_dir = tmp_path / JOURNAL_DIRECTORY
            before = journal_files(journal_dir)
            assert len(before) == 1 and before[0].stat().st_size > 0
            log = broker.replicas[("orders", 0)].log
            await broker.syncer.checkpoint()
            after = journal_files(journal_dir)
            assert before[0] not in after and len(after) == 1
            assert log.flushed_offset == 4
            assert (await produce(client, batch(2, 4), acks="all")).status == 200
            assert after[0].stat().st_size > 0  # appends go to the new file

    run(scenario)


def test_without_the_journal_each_log_is_fsynced(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path, journal=False) as (broker, client):
            assert broker.syncer.journal is None
            assert (await produce(client, batch(2), acks="all")).status == 200
            assert broker.replicas[("orders", 0)].log.flushed_offset == 2
            assert journal_files(tmp_path / JOURNAL_DIRECTORY) == []

    run(scenario)


def test_appends_made_before_the_group_commit_runs_share_one_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's fdatasync runs on the event loop after the callbacks that were
    ready when the first append marked a log dirty: every append made before it is
    covered by that one sync; an append after it waits for the next."""

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            journal = broker.syncer.journal
            assert journal is not None
            syncs: list[tuple[int, int]] = []
            leader = broker.replicas[("orders", 0)]
            follower = broker.replicas[("orders", 1)]
            real_sync = journal.sync

            def counting_sync() -> None:
                syncs.append((leader.log.log_end_offset, follower.log.log_end_offset))
                real_sync()

            monkeypatch.setattr(journal, "sync", counting_sync)
            leader.append(batch(2), Acks.ALL, 0)
            broker.syncer.mark_dirty(leader)
            follower.append_replicated(batch(3), 0)
            broker.syncer.mark_dirty(follower)
            assert syncs == []  # deferred: nothing synced inside the appending callback
            assert (leader.log.flushed_offset, follower.log.flushed_offset) == (0, 0)
            await broker.syncer.sync_dirty()
            assert syncs == [(2, 3)]  # one fdatasync for both logs
            assert (leader.log.flushed_offset, follower.log.flushed_offset) == (2, 3)
            leader.append(batch(1, 2), Acks.ALL, 0)
            broker.syncer.mark_dirty(leader)
            await broker.syncer.sync_dirty()
            assert syncs == [(2, 3), (3, 3)]
            assert leader.log.flushed_offset == 3

    run(scenario)


class _PowerLoss(Exception):
    """Stands for the machine stopping at this point."""


def test_a_follower_reset_checkpoints_its_high_watermark_again(tmp_path: Path) -> None:
    """reset_to recreates the partition directory, and with it goes the high watermark
    checkpoint: the next maintenance pass must write it again even if the high
    watermark did not move (found by review: it counted as written)."""

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            follower = await follower_with_records(broker)
            follower.checkpoint_high_watermark()
            checkpoint = follower.directory / HIGH_WATERMARK_FILE
            assert read_offset(checkpoint) == 3 and not follower.checkpoint_due
            follower.reset_to(50, 0)
            assert not checkpoint.exists() and follower.checkpoint_due
            follower.checkpoint_high_watermark()
            assert read_offset(checkpoint) == follower.high_watermark
            assert not follower.checkpoint_due

    run(scenario)


def test_a_crash_in_a_follower_reset_after_a_checkpoint_still_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follower's log was checkpointed (no journal record of it left), then
    reset_to journals its restart and the machine stops before the directory is
    recreated: the only record of the log in the journal is that restart."""
    live = tmp_path / "live"
    crashed = tmp_path / "crashed"

    async def scenario() -> None:
        async with broker_client(live) as (broker, _):
            follower = broker.replicas[("orders", 1)]
            follower.append_replicated(batch(3), 0)
            broker.syncer.mark_dirty(follower)
            await broker.syncer.sync_dirty()
            await broker.syncer.checkpoint()  # the log fsynced, the journal file gone

            def stop(*_: object, **__: object) -> None:
                raise _PowerLoss

            monkeypatch.setattr(PartitionLog, "recreate_empty", stop)
            with pytest.raises(_PowerLoss):
                follower.reset_to(50, 0)
            shutil.copytree(live, crashed)
            monkeypatch.undo()

    run(scenario)
    restarted = _start(crashed)  # raised CorruptBatch: "past the log end 3"
    try:
        log = restarted.replicas[("orders", 1)].log
        assert (log.log_start_offset, log.log_end_offset) == (50, 50)
    finally:
        run(restarted.close)


def test_a_crash_while_deleting_a_replica_directory_still_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rmtree unlinks the segment files one by one, in directory order: the machine
    may stop with some of them gone and the directory still there, while the journal
    still holds appends of that partition."""
    live = tmp_path / "live"
    crashed = tmp_path / "crashed"

    def stop_midway(path: Path, *_: object, **__: object) -> None:
        # The segments from 3 on were unlinked (not yet the first one) when the
        # machine stopped; the journal's tail of the partition starts at 6.
        for name in ("00000000000000000003", "00000000000000000006"):
            for suffix in (".log", ".index"):
                (Path(path) / (name + suffix)).unlink(missing_ok=True)
        raise _PowerLoss

    async def scenario() -> None:
        async with broker_client(live) as (broker, client):
            replica = broker.replicas[("orders", 0)]
            for start in range(0, 6, 3):
                assert (await produce(client, batch(3, start), acks="all")).status == 200
                # every append rolls
                replica.log.config = dataclasses.replace(replica.log.config, segment_bytes_max=1)
            await broker.syncer.checkpoint()
            assert (await produce(client, batch(3, 6), acks="all")).status == 200
            assert replica.log.segment_base_offsets == [0, 3, 6]
            monkeypatch.setattr(shutil, "rmtree", stop_midway)
            with pytest.raises(_PowerLoss):
                broker._drop(("orders", 0), delete=True)  # the topic was deleted
            monkeypatch.undo()
            shutil.copytree(live, crashed)

    run(scenario)
    restarted = _start(crashed)  # raised CorruptBatch: "a checkpointed segment lost data"
    try:
        leftovers = [p.name for p in crashed.iterdir() if p.name.startswith("orders-0-")]
        assert leftovers == [partition_directory_name("orders", 0, TOPIC_ID)]
    finally:
        run(restarted.close)


def test_a_crash_in_a_reset_below_the_log_start_still_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A diverged follower whose cut lies below its log start restarts there
    (``_restart_at(replica, cut)`` with cut < log start <= log end); the machine stops
    before the directory is recreated. The replay found the old log ending past the
    reset point and cut it there, below its log start: OffsetOutOfRange."""
    live = tmp_path / "live"
    crashed = tmp_path / "crashed"

    async def scenario() -> None:
        async with broker_client(live) as (broker, _):
            follower = broker.replicas[("orders", 1)]
            follower.append_replicated(batch(2), 0)
            follower.append_replicated(_at(batch(2, 2), 2), 0)
            broker.syncer.mark_dirty(follower)
            await broker.syncer.sync_dirty()
            follower.log.delete_records_before(2)  # log [2, 4)

            def stop(*_: object, **__: object) -> None:
                raise _PowerLoss

            monkeypatch.setattr(PartitionLog, "recreate_empty", stop)
            with pytest.raises(_PowerLoss):
                _restart_at(follower, 1)
            shutil.copytree(live, crashed)
            monkeypatch.undo()

    run(scenario)
    restarted = _start(crashed)
    try:
        log = restarted.replicas[("orders", 1)].log
        assert (log.log_start_offset, log.log_end_offset) == (1, 1)
    finally:
        run(restarted.close)


def _at(body: bytes, offset: int, epoch: int = 0) -> bytes:
    buffer = bytearray(body)
    patch_batch(buffer, 0, offset, epoch)
    return bytes(buffer)


def test_a_follower_cut_between_the_batches_of_one_fetched_answer_restarts(
    tmp_path: Path,
) -> None:
    """One fetch answer (one journal record) holds batches of epochs 0 and 1; a new
    leader makes the follower cut at the epoch boundary; kill -9 before a checkpoint.
    The replay keeps the record's first batch and the broker starts."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"

    async def scenario() -> None:
        async with broker_client(live) as (broker, _):
            follower = broker.replicas[("orders", 1)]
            follower.append_replicated(_at(batch(2), 0) + _at(batch(2, 2), 2, 1), 0)
            broker.syncer.mark_dirty(follower)
            await broker.syncer.sync_dirty()
            follower.truncate_to(2)
            follower.append_replicated(_at(batch(1, 100), 2, 2), 0)
            broker.syncer.mark_dirty(follower)
            await broker.syncer.sync_dirty()
            shutil.copytree(live, crashed)  # kill -9 (page cache intact)

    run(scenario)
    restarted = _start(crashed)
    try:
        log = restarted.replicas[("orders", 1)].log
        assert [r.value for r in decode_records(log.read(0, 1 << 20))] == [b"v0", b"v1", b"v100"]
        assert log.epoch_entries() == [(0, 0), (2, 2)]
    finally:
        run(restarted.close)


def test_a_failure_applying_a_journal_fsync_is_fail_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsync's completion runs as a callback: an error there would be lost and
    every later acknowledgement would stall. It stops the broker instead."""
    import tidemq.broker.syncer as syncer_module

    stopped: list[str] = []
    monkeypatch.setattr(syncer_module, "fail_stop", stopped.append)

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            replica = broker.replicas[("orders", 0)]

            def broken() -> None:
                raise RuntimeError("bookkeeping broke")

            monkeypatch.setattr(replica, "flushed", broken)
            produced = asyncio.ensure_future(produce(client, batch(1), acks="1"))
            deadline = asyncio.get_running_loop().time() + 10
            while not stopped:
                assert asyncio.get_running_loop().time() < deadline, "no fail-stop"
                await asyncio.sleep(0.01)
            assert "applying a journal fsync failed" in stopped[0]
            produced.cancel()
            monkeypatch.undo()

    run(scenario)


def test_no_log_is_durable_past_what_a_finished_journal_fdatasync_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An oracle over the races around a scheduled group commit (review of the move of
    the fdatasync onto the event loop): appends after it was scheduled, a truncation
    and a follower reset between its loop turns, a checkpoint rotating the journal
    before it ran, its replica closed. A replica's durable end never passes what a
    finished fdatasync covered (the log ends when it started, cut by truncations), and
    every scheduled sync ends."""
    import tidemq.broker.syncer as syncer_module

    stopped: list[str] = []
    monkeypatch.setattr(syncer_module, "fail_stop", stopped.append)

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            syncer = broker.syncer
            journal = syncer.journal
            assert journal is not None
            leader = broker.replicas[("orders", 0)]
            follower = broker.replicas[("orders", 1)]
            covered: dict[PartitionLog, int] = {}
            syncs: list[int] = []
            violations: list[str] = []
            real_sync = journal.sync

            def noting_sync() -> None:  # also the checkpoint's, on its worker thread
                ends = {r.log: r.log.log_end_offset for r in (leader, follower) if not r.closed}
                real_sync()
                syncs.append(1)
                for log_, end in ends.items():
                    covered[log_] = max(covered.get(log_, 0), end)

            def check(when: str) -> None:
                for replica in (leader, follower):
                    if replica.closed:
                        continue
                    bound = max(covered.get(replica.log, 0), replica.log.log_start_offset)
                    durable = (replica.core.durable_offset, replica.log.flushed_offset)
                    if max(durable) > bound:
                        violations.append(f"{when}: {replica.partition} {durable} > {bound}")

            def checked(replica: PartitionReplica) -> None:
                real_flushed = replica.flushed

                def flushed() -> None:
                    real_flushed()
                    check("flushed")

                monkeypatch.setattr(replica, "flushed", flushed)

            def truncated(replica: PartitionReplica) -> None:  # coverage above the cut is gone
                covered[replica.log] = min(covered.get(replica.log, 0), replica.log.log_end_offset)

            async def settle() -> None:
                await asyncio.wait_for(syncer.sync_dirty(), 10)
                assert syncer._journal_sync is None  # every scheduled sync ended
                check("settled")

            monkeypatch.setattr(journal, "sync", noting_sync)
            checked(leader)
            checked(follower)

            # Appends after the sync was scheduled, a truncation between its turns.
            leader.append(batch(2), Acks.ALL, 0)
            syncer.mark_dirty(leader)
            follower.append_replicated(batch(3), 0)
            syncer.mark_dirty(follower)
            await asyncio.sleep(0)  # one turn: scheduled, not run
            assert syncs == [] and syncer._journal_sync is not None
            leader.append(batch(1, 2), Acks.ALL, 0)
            syncer.mark_dirty(leader)
            follower.truncate_to(1)  # its own fdatasync, then the cut (to 0)
            truncated(follower)
            check("truncated")
            follower.append_replicated(batch(2), 0)
            syncer.mark_dirty(follower)
            await settle()
            assert (leader.log.flushed_offset, follower.log.flushed_offset) == (3, 2)

            # A follower reset between its turns.
            follower.append_replicated(_at(batch(2, 2), 2), 0)
            syncer.mark_dirty(follower)
            await asyncio.sleep(0)
            follower.reset_to(50, 0)
            check("reset")
            await settle()
            assert follower.core.durable_offset == follower.log.flushed_offset == 50

            # A checkpoint rotating the journal before the scheduled sync ran.
            leader.append(batch(2, 3), Acks.ALL, 0)
            syncer.mark_dirty(leader)
            synced_before = len(syncs)
            await syncer.checkpoint()
            await settle()
            assert len(syncs) > synced_before and leader.log.flushed_offset == 5
            assert len(journal_files(tmp_path / JOURNAL_DIRECTORY)) == 1

            # The replica closed (leadership moved away) before its sync ran.
            leader.append(batch(1, 5), Acks.ALL, 0)
            syncer.mark_dirty(leader)
            await asyncio.sleep(0)
            broker._drop(("orders", 0), delete=False)
            await settle()
            assert violations == [] and stopped == []

    run(scenario)


def test_a_journal_fdatasync_error_seen_by_a_truncation_marks_nothing_durable_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsyncgate: Linux reports a writeback error to one fsync of the file only, and a
    later fdatasync succeeds with the pages lost. A follower's truncation gets the
    journal's EIO; in the broker that error reaches fail-stop through the fetch
    session's task group some loop turns later. The group commit already scheduled for
    a leader append runs before: its fdatasync "succeeds" and must not make that
    append durable (it did, and acks=all would have been answered)."""
    import tidemq.broker.syncer as syncer_module

    stopped: list[str] = []
    monkeypatch.setattr(syncer_module, "fail_stop", stopped.append)

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            leader = broker.replicas[("orders", 0)]
            follower = broker.replicas[("orders", 1)]
            follower.append_replicated(batch(3), 0)
            broker.syncer.mark_dirty(follower)
            await broker.syncer.sync_dirty()
            errors = fail_once_with_eio(monkeypatch, "fdatasync")
            leader.append(batch(2), Acks.ALL, 0)
            broker.syncer.mark_dirty(leader)  # its group commit runs two turns on
            with pytest.raises(OSError):
                follower.truncate_to(1)  # diverged: the truncation's fdatasync fails
            assert errors == []
            await asyncio.wait_for(broker.syncer.sync_dirty(), 10)
            assert (leader.log.flushed_offset, leader.core.durable_offset) == (0, 0)
            assert stopped and "fsync of the journal failed" in stopped[0]

    run(scenario)


def _noting_sync_threads(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> list[threading.Thread]:
    threads: list[threading.Thread] = []
    real_sync = journal.sync

    def noted_sync() -> None:
        threads.append(threading.current_thread())
        real_sync()

    monkeypatch.setattr(journal, "sync", noted_sync)
    return threads


def test_after_a_slow_fdatasync_on_the_loop_group_commits_move_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that stalls the loop once moves the fdatasyncs off it for a while: the
    loop stalls once per cool-down, not once per group commit."""
    monkeypatch.setattr(syncer_module, "SLOW_SYNC_S", 0.0)  # every fdatasync is "slow"

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            journal = broker.syncer.journal
            assert journal is not None
            threads = _noting_sync_threads(journal, monkeypatch)
            leader = broker.replicas[("orders", 0)]
            for start in (0, 2, 4):
                leader.append(batch(2, start), Acks.ALL, 0)
                broker.syncer.mark_dirty(leader)
                await broker.syncer.sync_dirty()
                assert leader.log.flushed_offset == start + 2
            loop_thread = threading.current_thread()
            assert threads[0] is loop_thread
            assert threads[1:] and all(t is not loop_thread for t in threads[1:]), threads

    run(scenario)


def _hold_checkpoints(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """A checkpoint's segment fsyncs (on its worker thread) wait until the test sets the
    event it returns, so the test can act while a checkpoint runs."""
    release = threading.Event()
    real_checkpoint_logs = syncer_module._checkpoint_logs

    def held_checkpoint_logs(*args: Any) -> None:
        if not release.wait(10.0):
            raise AssertionError("the test never released the checkpoint")
        real_checkpoint_logs(*args)

    monkeypatch.setattr(syncer_module, "_checkpoint_logs", held_checkpoint_logs)
    return release


def test_during_a_checkpoint_group_commits_run_on_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint fsyncs segments on a worker thread; the journal's fdatasync may wait
    behind that writeback, so meanwhile it must not wait on the event loop."""
    # No cool-down: one fdatasync over SLOW_SYNC_S on a loaded disk would keep the last
    # group commit on a thread and fail this test for the wrong reason.
    monkeypatch.setattr(syncer_module, "SLOW_SYNC_S", float("inf"))
    release = _hold_checkpoints(monkeypatch)

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            journal = broker.syncer.journal
            assert journal is not None
            leader = broker.replicas[("orders", 0)]
            leader.append(batch(2), Acks.ALL, 0)
            broker.syncer.mark_dirty(leader)
            await broker.syncer.sync_dirty()
            threads = _noting_sync_threads(journal, monkeypatch)
            checkpoint = asyncio.ensure_future(broker.syncer.checkpoint())
            try:
                await asyncio.sleep(0)  # the checkpoint rotated and waits on its thread
                leader.append(batch(2, 2), Acks.ALL, 0)
                broker.syncer.mark_dirty(leader)
                await broker.syncer.sync_dirty()
                assert leader.log.flushed_offset == 4
                assert threads and threads[-1] is not threading.current_thread()
            finally:
                release.set()
                await checkpoint
            leader.append(batch(2, 4), Acks.ALL, 0)  # after it: on the loop again
            broker.syncer.mark_dirty(leader)
            await broker.syncer.sync_dirty()
            assert threads[-1] is threading.current_thread()
            assert leader.log.flushed_offset == 6

    run(scenario)


def test_a_group_commit_scheduled_just_before_a_checkpoint_runs_on_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An on-loop fdatasync waits SYNC_AFTER_TURNS turns after the append that asked for
    it; a checkpoint starting in those turns must still move it off the loop (under load
    a group commit is pending when nearly every checkpoint starts)."""
    monkeypatch.setattr(syncer_module, "SLOW_SYNC_S", float("inf"))  # no cool-down here
    release = _hold_checkpoints(monkeypatch)

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            journal = broker.syncer.journal
            assert journal is not None
            threads = _noting_sync_threads(journal, monkeypatch)
            leader = broker.replicas[("orders", 0)]
            leader.append(batch(2), Acks.ALL, 0)
            broker.syncer.mark_dirty(leader)  # an on-loop sync, a few turns on
            checkpoint = asyncio.ensure_future(broker.syncer.checkpoint())  # starts first
            try:
                await broker.syncer.sync_dirty()
                assert leader.log.flushed_offset == 2
                loop_thread = threading.current_thread()
                # The rotation's own sync runs on the loop, before any segment fsync of
                # the checkpoint; the group commit's after it must not.
                assert threads[0] is loop_thread
                assert threads[1:] and all(t is not loop_thread for t in threads[1:]), threads
            finally:
                release.set()
                await checkpoint

    run(scenario)


def test_a_group_commit_on_a_thread_marks_durable_only_what_its_fdatasync_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the worker thread: nothing moves before the fdatasync returns; an append made
    while it runs stays dirty for the next one; a failed one marks nothing durable,
    reaches fail-stop and leaves no sync pending (sync_dirty returns)."""
    monkeypatch.setattr(syncer_module, "SLOW_SYNC_S", 0.0)  # the first sync starts a cool-down
    stopped: list[str] = []
    monkeypatch.setattr(syncer_module, "fail_stop", stopped.append)

    async def until(done: Any) -> None:
        async with asyncio.timeout(10):
            while not done():
                await asyncio.sleep(0.001)

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            syncer, journal = broker.syncer, broker.syncer.journal
            assert journal is not None
            leader = broker.replicas[("orders", 0)]
            leader.append(batch(2), Acks.ALL, 0)
            syncer.mark_dirty(leader)
            await syncer.sync_dirty()  # on the loop, "slow": the next ones on a thread
            assert leader.log.flushed_offset == 2
            real_sync = journal.sync
            entered: list[threading.Thread] = []
            outcomes = [threading.Event(), threading.Event()]  # set: go on; error: fail

            def held_sync() -> None:
                call = len(entered)
                entered.append(threading.current_thread())
                if call < len(outcomes):
                    if not outcomes[call].wait(10.0):
                        raise AssertionError("the test never released this sync")
                    if call == 1:
                        raise OSError(errno.EIO, "Input/output error")
                real_sync()

            monkeypatch.setattr(journal, "sync", held_sync)
            leader.append(batch(2, 2), Acks.ALL, 0)
            syncer.mark_dirty(leader)
            await until(lambda: len(entered) == 1)
            assert entered[0] is not threading.current_thread()
            leader.append(batch(2, 4), Acks.ALL, 0)  # after the sync took its ends
            syncer.mark_dirty(leader)
            await asyncio.sleep(0.05)
            assert leader.log.flushed_offset == 2  # the fdatasync has not returned
            outcomes[0].set()
            await until(lambda: leader.log.flushed_offset != 2)
            assert leader.log.flushed_offset == 4  # not 6: that append came later
            await until(lambda: len(entered) == 2)  # the next one, for the later append
            outcomes[1].set()  # it fails
            await asyncio.wait_for(syncer.sync_dirty(), 10)
            assert leader.log.flushed_offset == 4
            assert stopped and "fsync of the journal failed" in stopped[0]

    run(scenario)
