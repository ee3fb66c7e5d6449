"""One partition replica on this broker: its log, its role, its high watermark,
and the waiters (acks, long-poll fetches) that its progress releases.

Invariants:
* ``high_watermark <= durable_end`` where durable_end is the log's flushed offset
  under ``fsync=always`` and its log end offset otherwise: a consumer never sees a
  record a crash could take back, and an acknowledgement (acks=1/all) is sent only
  once the acknowledged offsets are below the high watermark.
* the high watermark never goes backwards while this broker stays leader.
* only the event loop thread calls into this object; ``sync`` of the log runs on a
  worker thread and is the one method of PartitionLog safe to call concurrently.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from tidemq.broker.idempotence import load_producer_state
from tidemq.errors import NotLeader, RequestTimedOut
from tidemq.storage import FsyncPolicy, LogConfig, PartitionLog


@dataclass(frozen=True)
class Assignment:
    """What the coordinator wants this broker to be for one partition."""

    topic: str
    partition: int
    leader_id: int | None
    leader_url: str | None
    leader_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


def partition_directory_name(topic: str, partition: int) -> str:
    return f"{topic}-{partition}"


def parse_partition_directory_name(name: str) -> tuple[str, int] | None:
    topic, _, number = name.rpartition("-")
    if not topic or not number.isdigit():
        return None
    return topic, int(number)


class PartitionReplica:
    def __init__(
        self, topic: str, partition: int, log: PartitionLog, config: LogConfig, directory: Path
    ) -> None:
        self.topic = topic
        self.directory = directory
        self.partition = partition
        self.log = log
        self.config = config
        self.leader_epoch = -1
        self.is_leader = False
        self.high_watermark = self._durable_end()
        self._progress = asyncio.Event()
        self.closed = False
        # Idempotent producers (broker/idempotence.py): rebuilt from the log on open.
        self.producers = load_producer_state(log)

    @classmethod
    def open(
        cls, data_dir: Path, topic: str, partition: int, config: LogConfig, now_ms: int
    ) -> PartitionReplica:
        directory = data_dir / partition_directory_name(topic, partition)
        log = PartitionLog.open(directory, config, now_ms)
        return cls(topic, partition, log, config, directory)

    def _durable_end(self) -> int:
        if self.config.fsync is FsyncPolicy.ALWAYS:
            return self.log.flushed_offset
        return self.log.log_end_offset

    def apply_assignment(self, assignment: Assignment, broker_id: int) -> None:
        self.is_leader = assignment.leader_id == broker_id
        if assignment.leader_epoch > self.leader_epoch:
            self.leader_epoch = assignment.leader_epoch

    def append(self, body: bytes, now_ms: int) -> tuple[int, int]:
        if not self.is_leader:
            raise NotLeader(f"broker does not lead {self.topic}/{self.partition}")
        first, last = self.log.append(body, self.leader_epoch, now_ms)
        self.advance_high_watermark()
        return first, last

    def advance_high_watermark(self) -> None:
        """Single-replica ISR: the high watermark is the durable end of the local log.

        Followers arrive with replication: then it becomes the minimum over the ISR.
        """
        durable = self._durable_end()
        if durable > self.high_watermark:
            self.high_watermark = durable
            self._progress.set()
            self._progress = asyncio.Event()

    async def wait_for_high_watermark(self, offset: int, timeout_s: float) -> None:
        """Returns once high_watermark >= offset; RequestTimedOut after timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.high_watermark < offset:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RequestTimedOut(
                    f"{self.topic}/{self.partition}: offset {offset} not committed in time"
                )
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                continue

    async def wait_for_data(self, offset: int, timeout_s: float) -> None:
        """Long-poll: returns when something at or after ``offset`` is visible, or on timeout."""
        if timeout_s <= 0 or self.high_watermark > offset:
            return
        try:
            await self.wait_for_high_watermark(offset + 1, timeout_s)
        except RequestTimedOut:
            return

    def stats(self) -> dict[str, object]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "role": "leader" if self.is_leader else "follower",
            "leader_epoch": self.leader_epoch,
            "log_start_offset": self.log.log_start_offset,
            "log_end_offset": self.log.log_end_offset,
            "high_watermark": self.high_watermark,
            "size_bytes": self.log.size_bytes,
        }

    def close(self) -> None:
        self.closed = True
        self.log.close()
        self._progress.set()

    def delete(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
