"""One partition replica on this broker: its log and the shell around its pure
replication core (:mod:`tidemq.core.replica`).

The core decides (high watermark, ISR proposals, which waiting request completes or
fails); this class only carries out its effects: it resolves asyncio futures, hands
ISR proposals to the broker, and checkpoints the high watermark. Nothing here waits
on an event that stays set: every waiter is one future answered exactly once, and
closing or demoting the replica fails the waiters at once (retriable NotLeader).

Invariants (the core's, plus):
* ``core.log_end_offset == log.log_end_offset`` and ``core.durable_offset`` is the
  log's flushed offset (``fsync=always``) or its log end (other policies) after every
  method returns;
* only the event loop thread calls into this object; ``sync`` of the log runs on a
  worker thread and is the one method of PartitionLog safe to call concurrently.

Directory: ``<topic>-<partition>-<topic_id>`` so that a topic deleted and created
again under the same name never meets the old incarnation's log; the high watermark
checkpoint ``high-watermark-checkpoint`` holds a value that is only ever too low.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tidemq.broker.idempotence import load_producer_state, record_replicated
from tidemq.core.replica import (
    Acks,
    Appended,
    Assigned,
    AwaitAck,
    AwaitData,
    Cancel,
    Closed,
    Complete,
    Effect,
    Event,
    Fail,
    Flushed,
    FollowerFetched,
    HighWatermarkAdvanced,
    LeaderAnswered,
    ProposeIsr,
    ReplicaAssignment,
    ReplicaCore,
    Truncated,
)
from tidemq.errors import NotLeader, RequestTimedOut
from tidemq.storage import FsyncPolicy, LogConfig, PartitionLog
from tidemq.storage.checkpoint import fsync_directory, read_offset, write_offset
from tidemq.storage.journal import Journal

log = logging.getLogger(__name__)

HIGH_WATERMARK_FILE = "high-watermark-checkpoint"
_DIRECTORY = re.compile(r"^(?P<topic>.+)-(?P<partition>\d+)-(?P<topic_id>[0-9a-f]{32})$")
_waiter_ids = itertools.count(1)

ProposalSink = Callable[["PartitionReplica", ProposeIsr], None]


def partition_directory_name(topic: str, partition: int, topic_id: str) -> str:
    return f"{topic}-{partition}-{topic_id}"


DELETED_SUFFIX = ".deleted"


def remove_replica_directory(directory: Path) -> None:
    """Renames the directory away (durably) before removing it: a crash midway through
    the removal leaves no half-deleted replica directory that a journal replay
    (storage/journal.py) would open and find short of its journaled tail."""
    doomed = directory.with_name(directory.name + DELETED_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)  # an earlier removal a crash cut short
    try:
        os.replace(directory, doomed)
    except FileNotFoundError:
        return
    except OSError:  # cannot rename (permissions?): remove in place, as before
        shutil.rmtree(directory, ignore_errors=True)
        return
    fsync_directory(directory.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def parse_partition_directory_name(name: str) -> tuple[str, int, str] | None:
    """(topic, partition, topic id) of a replica directory; None for anything else."""
    match = _DIRECTORY.match(name)
    if match is None:
        return None
    return match["topic"], int(match["partition"]), match["topic_id"]


async def until_done(future: asyncio.Future[None], timeout_s: float) -> None:
    """Waits until ``future`` is done (raising its exception) or ``timeout_s`` passed
    (then it is done with None). A long-poll's shared waiter: one timer instead of
    ``asyncio.wait`` or ``timeout`` + ``shield`` (their futures and callbacks are a
    measurable share of a replication round's CPU). Cancelling the caller cancels
    ``future``."""
    timer = asyncio.get_running_loop().call_later(timeout_s, _done_if_pending, future)
    try:
        await future
    finally:
        timer.cancel()


def _done_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Waiter(Protocol):
    """What a replica completes or fails for a waiter: an asyncio future, or anything
    that takes its result the same way (a fetch session's standing watch)."""

    def done(self) -> bool: ...

    def set_result(self, result: None, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class _TimedOut(Exception):
    """A waiter's time ran out (``PartitionReplica._wait``'s timer)."""


def _time_out(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_TimedOut())


class PartitionReplica:
    def __init__(
        self,
        broker_id: int,
        topic: str,
        partition: int,
        topic_id: str,
        log_: PartitionLog,
        config: LogConfig,
        directory: Path,
        lag_time_max_ms: int,
        propose: ProposalSink,
        clock_ms: Callable[[], int],
        journal: Journal | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.topic_id = topic_id
        self.directory = directory
        self.log = log_
        self.config = config
        self._journal = journal
        if journal is not None:
            log_.attach_journal(journal, directory.name)
        self._propose = propose
        self._clock_ms = clock_ms
        durable = self._durable_end()
        checkpoint = read_offset(directory / HIGH_WATERMARK_FILE) or 0
        self.core = ReplicaCore(
            broker_id=broker_id,
            log_end_offset=log_.log_end_offset,
            durable_offset=durable,
            high_watermark=min(checkpoint, durable),
            lag_time_max_ms=lag_time_max_ms,
        )
        self._checkpointed_high_watermark = checkpoint
        self._checkpoint_lock = threading.Lock()
        self._waiters: dict[int, Waiter] = {}
        self._durable_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.closed = False
        # Idempotent producers (broker/idempotence.py): rebuilt from the log on open.
        self.producers = load_producer_state(log_)

    @classmethod
    def open(
        cls,
        data_dir: Path,
        broker_id: int,
        assignment_key: tuple[str, int, str],
        config: LogConfig,
        lag_time_max_ms: int,
        propose: ProposalSink,
        clock_ms: Callable[[], int],
        journal: Journal | None = None,
    ) -> PartitionReplica:
        topic, partition, topic_id = assignment_key
        directory = data_dir / partition_directory_name(topic, partition, topic_id)
        log_ = PartitionLog.open(directory, config, clock_ms())
        return cls(
            broker_id,
            topic,
            partition,
            topic_id,
            log_,
            config,
            directory,
            lag_time_max_ms,
            propose,
            clock_ms,
            journal,
        )

    # -- reading --

    @property
    def is_leader(self) -> bool:
        return self.core.is_leader

    @property
    def leader_epoch(self) -> int:
        return self.core.leader_epoch

    @property
    def high_watermark(self) -> int:
        return self.core.high_watermark

    def _durable_end(self) -> int:
        if self.config.fsync is FsyncPolicy.ALWAYS:
            return self.log.flushed_offset
        return self.log.log_end_offset

    # -- feeding the core --

    def handle(self, event: Event) -> None:
        self._carry_out(self.core.handle(event, self._clock_ms()))

    def _carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Complete):
                future = self._waiters.pop(effect.waiter_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif isinstance(effect, Fail):
                future = self._waiters.pop(effect.waiter_id, None)
                if future is not None and not future.done():
                    future.set_exception(effect.error)
            elif isinstance(effect, ProposeIsr):
                self._propose(self, effect)
            elif isinstance(effect, HighWatermarkAdvanced):
                pass  # checkpointed by the maintenance loop; read from the core

    def assign(self, assignment: ReplicaAssignment) -> None:
        self.handle(Assigned(assignment))

    # -- leader --

    def append(self, body: bytes, acks: Acks, now_ms: int) -> tuple[int, int]:
        """Leader path: checks role and min ISR, appends, tells the core."""
        self.core.check_produce(acks)
        first, last = self.log.append(body, self.core.leader_epoch, now_ms)
        self._appended()
        return first, last

    def _appended(self) -> None:
        self.handle(Appended(self.log.log_end_offset))
        if self.config.fsync is not FsyncPolicy.ALWAYS:
            self.handle(Flushed(self.log.log_end_offset))

    async def wait_ack(self, end_offset: int, acks: Acks, timeout_s: float) -> None:
        await self._wait(
            lambda waiter_id: AwaitAck(waiter_id, end_offset, acks),
            timeout_s,
            f"offset {end_offset - 1} not acknowledged (acks={acks.value}) in time",
        )

    async def wait_for_data(self, offset: int, timeout_s: float, follower: bool) -> None:
        """Long-poll: returns when there is something to read at ``offset`` or on timeout."""
        if timeout_s <= 0:
            return
        try:
            await self._wait(lambda waiter_id: AwaitData(waiter_id, offset, follower), timeout_s)
        except RequestTimedOut:
            return

    def watch_data(self, offset: int, future: Waiter, follower: bool = True) -> int | None:
        """Long-poll over many partitions: ``future`` (shared by all of them: one
        multi-partition poll, a follower's or a consumer's) completes when there is
        data at ``offset`` here, or fails when this replica stops leading. Returns the
        waiter id for :meth:`unwatch`; None when answered at once. One future for the
        whole poll instead of a task per partition."""
        waiter_id = next(_waiter_ids)
        self._waiters[waiter_id] = future
        if self.core.watch_data(waiter_id, offset, follower):  # the common case: it waits
            return waiter_id
        self.handle(AwaitData(waiter_id, offset, follower))
        return waiter_id if waiter_id in self._waiters else None

    def unwatch(self, waiter_id: int) -> None:
        if self._waiters.pop(waiter_id, None) is not None:
            self.core.unwatch_data(waiter_id)

    async def _wait(self, make: Callable[[int], Event], timeout_s: float, what: str = "") -> None:
        waiter_id = next(_waiter_ids)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[waiter_id] = future
        self.handle(make(waiter_id))
        if future.done():
            self._waiters.pop(waiter_id, None)
            return future.result()
        # One timer on the waiter's future, not asyncio.timeout (a produce's share of
        # a replication round's CPU); it fails the future with _TimedOut.
        timer = asyncio.get_running_loop().call_later(timeout_s, _time_out, future)
        try:
            await future
        except _TimedOut:
            raise RequestTimedOut(f"{self.topic}/{self.partition}: {what or 'timed out'}") from None
        finally:
            timer.cancel()
            if self._waiters.pop(waiter_id, None) is not None:
                self.handle(Cancel(waiter_id))

    def follower_fetched(self, broker_id: int, fetch_offset: int, durable_offset: int) -> None:
        if not self.core.repeated_fetch(broker_id, fetch_offset, durable_offset, self._clock_ms()):
            self.handle(FollowerFetched(broker_id, fetch_offset, durable_offset))

    # -- follower --

    def append_replicated(self, body: bytes, now_ms: int) -> None:
        self.log.append_replicated(body, now_ms)
        record_replicated(self.producers, body)  # so that a new leader knows producers
        self._appended()

    def truncate_to(self, offset: int) -> None:
        log.info(
            "%s/%s: truncating from %s to %s (diverged from the leader in epoch %s)",
            self.topic,
            self.partition,
            self.log.log_end_offset,
            offset,
            self.core.leader_epoch,
        )
        self.log.truncate_to(offset)
        self.producers = load_producer_state(self.log)  # forget truncated batches
        self.handle(Truncated(self.log.log_end_offset))
        self._release_durable_waiters()

    def reset_to(self, offset: int, now_ms: int) -> None:
        """Follower: drop the whole log and start empty at ``offset`` (the leader's log
        start moved past our log end: what we lack no longer exists anywhere)."""
        if self._journal is not None:  # durable first: a replay restarts it too
            self._journal.reset(self.directory.name, offset)
        # Not while the maintenance pass writes the high watermark checkpoint in this
        # directory (a worker thread): its rename would find the directory gone.
        with self._checkpoint_lock:
            self.log.close()
            self.log = PartitionLog.recreate_empty(self.directory, offset, self.config, now_ms)
            if self._journal is not None:
                self.log.attach_journal(self._journal, self.directory.name)
            self._checkpointed_high_watermark = -1  # its file went with the old directory
        self.producers = load_producer_state(self.log)
        self.handle(Truncated(self.log.log_end_offset))
        self.handle(Flushed(self._durable_end()))
        self._release_durable_waiters()

    def leader_answered(self, high_watermark: int) -> None:
        self.handle(LeaderAnswered(high_watermark))

    async def wait_durable(self, offset: int) -> None:
        """Returns once everything below ``offset`` is durable here (follower fetch
        loop: it reports its durable end with its next fetch), or once the log was cut
        below ``offset`` (truncated or started over, by another fetch session after a
        leader move): what it waited for is gone, and its fsync may never come."""
        if self.core.durable_offset >= offset or self.closed:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._durable_waiters.append((offset, future))
        await future

    # -- fsync results --

    def flushed(self) -> None:
        """The syncer finished an fsync of this log."""
        if self.closed:
            return
        self.handle(Flushed(self._durable_end()))
        self._release_durable_waiters()

    def _release_durable_waiters(self) -> None:
        durable, end = self.core.durable_offset, self.log.log_end_offset
        pending = []
        for offset, future in self._durable_waiters:
            if offset <= durable or offset > end:
                if not future.done():
                    future.set_result(None)
            else:
                pending.append((offset, future))
        self._durable_waiters = pending

    # -- housekeeping --

    @property
    def checkpoint_due(self) -> bool:
        """Has the high watermark moved since it was last checkpointed?"""
        return not self.closed and self.core.high_watermark != self._checkpointed_high_watermark

    def checkpoint_high_watermark(self) -> None:
        """Writes the high watermark checkpoint (two fsyncs; the maintenance loop calls
        it on a worker thread, racing a close or delete of this replica)."""
        # One writer at a time: close() (the loop) and the maintenance pass (a thread)
        # share the file's temporary name, and one's rename would pull the file from
        # under the other (FileNotFoundError out of close(): fail-stop).
        with self._checkpoint_lock:
            high_watermark = self.core.high_watermark
            if self.closed or high_watermark == self._checkpointed_high_watermark:
                return
            try:
                write_offset(self.directory / HIGH_WATERMARK_FILE, high_watermark)
            except FileNotFoundError:
                if self.closed:
                    return  # deleted meanwhile
                raise
            self._checkpointed_high_watermark = high_watermark

    def stats(self) -> dict[str, object]:
        return {
            "topic": self.topic,
            "topic_id": self.topic_id,
            "partition": self.partition,
            "role": self.core.role.value,
            "leader_epoch": self.core.leader_epoch,
            "partition_epoch": self.core.partition_epoch,
            "isr": list(self.core.isr),
            "log_start_offset": self.log.log_start_offset,
            "log_end_offset": self.log.log_end_offset,
            "high_watermark": self.core.high_watermark,
            "size_bytes": self.log.size_bytes,
        }

    def close(self) -> None:
        """Fails every waiter at once, checkpoints, closes the log (which syncs)."""
        if self.closed:
            return
        self.handle(Closed())
        for _, future in self._durable_waiters:
            if not future.done():
                future.set_exception(NotLeader("partition closed"))
        self._durable_waiters.clear()
        self.checkpoint_high_watermark()
        self.closed = True
        self.log.close()

    def delete(self) -> None:
        self.close()
        remove_replica_directory(self.directory)
