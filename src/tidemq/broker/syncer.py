"""Group commit: fsync each appended partition log as soon as the last fsync of
that log is done, with fsyncs of different logs running concurrently.

Per partition the rule is: at most one fsync in flight; appends that arrive while
it runs mark the log dirty again and share the next one. So under load many
produce requests share one fsync per partition (DESIGN: ~280 us per fsync here,
so 200k msg/s durable needs dozens of messages per fsync), and at low load a
record waits for one fsync, not for a round over every partition.

Different partitions fsync in parallel on a small thread pool: their latencies
overlap and the file system can fold them into one journal commit, where one
sequential round over 12 partitions cost ~8 ms here.

With the broker-wide journal (storage/journal.py, the default under ``always``) the
unit of group commit is the journal instead: one fdatasync covers every partition that
appended since the previous one. It runs ON the event loop, ``SYNC_AFTER_TURNS`` loop
turns after the first append marked a log dirty, so after every callback that was
ready then (the appends of all requests already read share it) and after the follower
answers those appends woke (their copy overlaps this fsync); each covered log's
durable end then moves (``mark_durable``, void if the log was truncated meanwhile).
Why on the loop: handing the fdatasync to a worker thread cost more than the fdatasync
itself (~0.1-0.3 ms here): the thread hand-off, and the worker waiting for a core and
the GIL to report back while the loop thread is busy (a shorter GIL switch interval
did not help); measured side by side, p99 end-to-end fell from 27 to 18 ms at 2,000
msg/s (docs/BENCHMARKS.md). The price: the loop does nothing else during the
fdatasync. That deviates from DESIGN.md ("File I/O never blocks the event loop for an
fsync"), so it is bounded: while a checkpoint fsyncs segments (the journal's fdatasync
can wait behind that writeback) and for ``SLOW_SYNC_COOLDOWN_S`` after an fdatasync
slower than ``SLOW_SYNC_S``, group commits go to a worker thread as before; a slow
disk stalls the loop once per cool-down, not once per commit. A checkpoint, every
``CHECKPOINT_INTERVAL_S`` or when the journal file passes its size bound, rotates the
journal, fsyncs the logs that appended to the older files and deletes those files.

Under ``fsync=interval`` every dirty log is synced every ``fsync_interval_ms``;
under ``never`` only at shutdown. Segment fsyncs (``--no-journal``, checkpoints) run
on a thread pool: the loop never blocks on those. A
failed fsync is fatal (as in Kafka): ``run`` raises it and the broker stops,
because the log's durable state is no longer known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client import Histogram

from tidemq.broker.partition import PartitionReplica
from tidemq.service.failstop import fail_stop
from tidemq.storage import FsyncPolicy, PartitionLog
from tidemq.storage.journal import Journal

log = logging.getLogger(__name__)

FSYNC_THREADS = 8
# The journal's fdatasync waits this many event-loop turns after the append that
# asked for it: a follower fetch that the append woke takes two turns to send its
# answer (the shared future's callback, then the task step), so it leaves before the
# leader blocks in fdatasync and the follower's copy and fsync overlap the leader's.
# Measured, 1 partition RF 2 at 2,000 msg/s: p50 2.87 -> 2.41 ms, p99 5.39 -> 4.54 ms.
SYNC_AFTER_TURNS = 2
# An on-loop fdatasync that took longer than this (normal here: 0.1-3 ms; the
# TideFsyncSlow alert's bound) moves group commits to a worker thread for the next
# SLOW_SYNC_COOLDOWN_S: a slow disk stalls the loop once per cool-down, not per commit.
SLOW_SYNC_S = 0.05
SLOW_SYNC_COOLDOWN_S = 10.0
CHECKPOINT_INTERVAL_S = 10.0
_CHECKPOINT_POLL_S = 0.5
# (replica, its log then, the log end covered, the log's truncation generation then)
_Covered = tuple[PartitionReplica, PartitionLog, int, int]


class GroupCommitSyncer:
    def __init__(
        self,
        policy: FsyncPolicy,
        interval_ms: int,
        fsync_seconds: Histogram,
        journal: Journal | None = None,
    ) -> None:
        self.policy = policy
        self.interval_ms = interval_ms
        self._fsync_seconds = fsync_seconds
        self._dirty: dict[int, PartitionReplica] = {}
        self._in_flight: dict[int, asyncio.Future[None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="fsync")
        self.journal = journal if policy is FsyncPolicy.ALWAYS else None
        self._journal_sync: asyncio.Future[None] | None = None
        self._journaled: dict[int, PartitionReplica] = {}  # appended since the last rotation
        self._checkpoint_wanted = asyncio.Event()
        self._checkpointing = False  # a checkpoint's segment fsyncs are running
        self._on_thread_until = 0.0  # monotonic: group commits on a thread until then

    def mark_dirty(self, replica: PartitionReplica) -> None:
        if self.journal is not None:
            key = id(replica)
            self._dirty[key] = replica
            self._journaled[key] = replica
            if self._journal_sync is None:
                self._start_journal_sync()
            return
        key = id(replica)
        self._dirty[key] = replica
        if self.policy is FsyncPolicy.ALWAYS and key not in self._in_flight:
            self._start(replica)

    def _start(self, replica: PartitionReplica) -> None:
        key = id(replica)
        self._dirty.pop(key, None)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._sync_one, replica)
        self._in_flight[key] = future
        future.add_done_callback(lambda done: self._finished(replica, done))

    def _finished(self, replica: PartitionReplica, done: asyncio.Future[None]) -> None:
        key = id(replica)
        self._in_flight.pop(key, None)
        error = done.exception()
        if error is not None:
            # Fail-stop: the log's durable state is unknown, and retrying fsync is unsafe
            # (the failed call may have dropped dirty pages). Exit now, before anything
            # writes a recovery point or a clean-shutdown marker.
            fail_stop(f"fsync of {replica.topic}/{replica.partition} failed: {error!r}")
        replica.flushed()
        if self.policy is FsyncPolicy.ALWAYS and key in self._dirty:
            self._start(replica)

    # -- the journal --

    def _start_journal_sync(self) -> None:
        """Schedules one journal fdatasync: on the event loop, ``SYNC_AFTER_TURNS`` turns
        on (after the callbacks ready now, so the appends of every request already read
        share it, and the follower answers they woke); on a worker thread while a
        checkpoint fsyncs segments or for ``SLOW_SYNC_COOLDOWN_S`` after a slow one."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[None] = loop.create_future()
        self._journal_sync = pending
        if self._checkpointing or time.monotonic() < self._on_thread_until:
            self._sync_on_thread(pending)
            return
        loop.call_soon(self._sync_journal, pending, SYNC_AFTER_TURNS)

    def _sync_on_thread(self, pending: asyncio.Future[None]) -> None:
        """Runs the fdatasync on a worker thread; ``pending`` ends when it is applied."""
        covered = self._take_covered()
        started = time.perf_counter()
        journal = self.journal
        assert journal is not None
        synced = asyncio.get_running_loop().run_in_executor(self._executor, journal.sync)
        synced.add_done_callback(lambda done: self._thread_synced(pending, covered, started, done))

    def _take_covered(self) -> list[_Covered]:
        """The dirty logs and their ends now: what an fdatasync starting now covers."""
        covered: list[_Covered] = [
            (replica, replica.log, replica.log.log_end_offset, replica.log.truncation_generation)
            for replica in self._dirty.values()
            if not replica.closed
        ]
        self._dirty.clear()
        return covered

    def _sync_journal(self, future: asyncio.Future[None], turns_left: int) -> None:
        if turns_left > 0:  # see SYNC_AFTER_TURNS
            asyncio.get_running_loop().call_soon(self._sync_journal, future, turns_left - 1)
            return
        if self._checkpointing:  # a checkpoint started during those turns
            self._sync_on_thread(future)
            return
        journal = self.journal
        assert journal is not None
        covered = self._take_covered()
        started = time.perf_counter()
        try:
            journal.sync()
        except Exception as exc:  # OSError, or a bug: a callback's error would be lost
            # Fail-stop, as for a segment fsync (see _finished).
            self._fail(future, exc)
            fail_stop(f"fsync of the journal failed: {exc!r}")
            return  # (fail_stop does not return; a test's stand-in does)
        took = time.perf_counter() - started
        if took > SLOW_SYNC_S:
            self._on_thread_until = time.monotonic() + SLOW_SYNC_COOLDOWN_S
            log.warning(
                "a journal fdatasync took %.0f ms on the event loop: syncing on a worker "
                "thread for the next %.0f s (a slow disk; see TideFsyncSlow)",
                took * 1000,
                SLOW_SYNC_COOLDOWN_S,
            )
        self._journal_synced(future, covered, took)

    def _thread_synced(
        self,
        pending: asyncio.Future[None],
        covered: list[_Covered],
        started: float,
        done: asyncio.Future[None],
    ) -> None:
        error = done.exception()
        if error is not None:  # fail-stop, as for a segment fsync (see _finished)
            self._fail(pending, error)
            fail_stop(f"fsync of the journal failed: {error!r}")
            return  # (fail_stop does not return; a test's stand-in does)
        self._journal_synced(pending, covered, time.perf_counter() - started)

    def _journal_synced(
        self, future: asyncio.Future[None], covered: list[_Covered], took: float
    ) -> None:
        """After an fdatasync that covered ``covered``: their durable ends move."""
        journal = self.journal
        assert journal is not None
        self._fsync_seconds.observe(took)
        try:
            for replica, log_, end, generation in covered:
                if replica.log is log_ and not log_.closed:
                    log_.mark_durable(end, generation)
                    replica.flushed()
        except Exception as exc:  # nothing above would see it, and acks would stall
            self._fail(future, exc)
            fail_stop(f"applying a journal fsync failed: {exc!r}")
            return
        self._journal_sync = None  # first: nothing below can leave it set
        if not future.done():
            future.set_result(None)
        if self._dirty:
            self._start_journal_sync()
        if journal.current_bytes > journal.file_bytes_max:
            self._checkpoint_wanted.set()

    def _fail(self, future: asyncio.Future[None], error: BaseException) -> None:
        """Ends this sync as failed (``sync_dirty`` stops waiting for it); fail_stop, the
        caller's next step, ends the process."""
        self._journal_sync = None
        if not future.done():
            future.set_exception(error)
            future.exception()  # retrieved: fail_stop reports it, not the finalizer

    async def _checkpoints(self, journal: Journal) -> None:
        last = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(_CHECKPOINT_POLL_S):
                    await self._checkpoint_wanted.wait()
            except TimeoutError:
                pass
            due = time.monotonic() - last >= CHECKPOINT_INTERVAL_S
            if not (self._checkpoint_wanted.is_set() or (due and journal.current_bytes)):
                continue
            self._checkpoint_wanted.clear()
            last = time.monotonic()
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Rotates the journal (it fdatasyncs the current file first), fsyncs every log
        that appended to the older files, then deletes them. On the loop thread up to
        the rotation, so no append interleaves."""
        journal = self.journal
        if journal is None:
            return
        older = journal.rotate()
        logs = [replica.log for replica in self._journaled.values()]
        self._journaled.clear()
        loop = asyncio.get_running_loop()
        # Group commits go to a worker thread meanwhile: the journal's fdatasync can
        # wait behind the segments' writeback (ext4 data=ordered), and on the loop that
        # wait would stall everything the broker serves, not only the acks.
        self._checkpointing = True
        try:
            await loop.run_in_executor(self._executor, _checkpoint_logs, journal, logs, older)
        finally:
            self._checkpointing = False

    def _sync_one(self, replica: PartitionReplica) -> None:
        started = time.perf_counter()
        if replica.closed:
            return
        try:
            replica.log.sync()
        except (ValueError, OSError):
            if replica.closed:  # closed by reconcile while this fsync waited: nothing to do
                return
            raise
        self._fsync_seconds.observe(time.perf_counter() - started)

    async def run(self) -> None:
        """Under ``interval``, drives the periodic syncs; with the journal, its
        checkpoints; otherwise there is nothing to drive (a failed fsync ends the
        process in ``_finished``). A failed checkpoint raises (the broker stops)."""
        if self.journal is not None:
            await self._checkpoints(self.journal)
            return
        if self.policy is not FsyncPolicy.INTERVAL:
            return
        while True:
            await asyncio.sleep(self.interval_ms / 1000)
            await self.sync_dirty()

    async def sync_dirty(self) -> None:
        """Starts an fsync of every dirty log and waits until all are done."""
        if self.journal is not None:
            while self._journal_sync is not None or self._dirty:
                if self._journal_sync is None:
                    self._start_journal_sync()
                pending_sync = self._journal_sync
                assert pending_sync is not None
                await asyncio.wait([pending_sync])
            return
        for replica in list(self._dirty.values()):
            if id(replica) not in self._in_flight:
                self._start(replica)
        pending = list(self._in_flight.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        await self.sync_dirty()
        self._executor.shutdown(wait=True)

    def close_journal(self) -> None:
        """After every log was closed (synced): the journal's files are not needed."""
        if self.journal is not None:
            self.journal.close(remove_files=True)


def _checkpoint_logs(journal: Journal, logs: list[PartitionLog], older: list[Path]) -> None:
    for log_ in logs:
        if log_.closed:
            continue  # closing synced it
        try:
            log_.sync()
        except (ValueError, OSError):
            if log_.closed:  # closed (and so synced) while waiting here
                continue
            raise
    journal.discard(older)
