"""The broker's HTTP shell: produce, fetch, offsets, replication, and the link to the
coordinator.

The broker is level-triggered: every heartbeat answer carries the complete desired
state for this broker (each partition it replicates with its leader, epochs and ISR,
and every topic's id and partition count), and ``reconcile`` moves the local state
towards it. A lost heartbeat answer therefore heals with the next one.

Replication: per leader broker it follows partitions of, the broker runs one fetch
session (broker/follower.py) that long-polls the leader's ``/v1/replica/fetch`` for
all of them, appends what it gets (same bytes), waits until that is durable and
fetches again, which tells the leader the new durable ends. Decisions (high
watermark, ISR proposals, which request completes) are in each replica's pure core
(:mod:`tidemq.core.replica`).

Identity: the broker keeps the cluster id it first joined (``DATA_DIR/cluster-id``)
and refuses a coordinator with another one; it deletes a replica's data only when the
coordinator names that topic id as deleted, or names the topic id as live with this
broker no longer among its replicas (a completed move).

Hot path (produce, fetch): the body is checked once per batch (header, CRC,
framing) and then the same bytes are written and served; no per-record objects.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tidemq.broker.fetch_sessions import REFRESH_S_MAX, FetchSessions, FollowerSession
from tidemq.broker.follower import FetchSession
from tidemq.broker.idempotence import append_in_sequence
from tidemq.broker.partition import (
    DELETED_SUFFIX,
    PartitionReplica,
    parse_partition_directory_name,
    remove_replica_directory,
    until_done,
)
from tidemq.broker.syncer import GroupCommitSyncer
from tidemq.core.replica import (
    Acks,
    IsrAnswered,
    ProposeIsr,
    ReplicaAssignment,
    Tick,
    diverging_epoch,
)
from tidemq.errors import (
    BrokerBusy,
    ClusterIdMismatch,
    FencedLeaderEpoch,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    RequestTooLarge,
    StalePartitionEpoch,
    TideError,
    UnknownBroker,
    UnknownLeaderEpoch,
    UnknownPartition,
    UnknownTopic,
)
from tidemq.logs import event
from tidemq.service.app import build_app
from tidemq.service.callers import ANY, CLIENTS, broker_self
from tidemq.service.channel import Operation, Reply, channel_endpoint
from tidemq.service.failstop import fail_stop
from tidemq.service.http import (
    NAME_SCHEMA,
    Endpoint,
    check_int,
    int_schema,
    path_parameter,
    query_int,
    query_parameter,
    read_body,
    read_json_object,
)
from tidemq.storage import FsyncPolicy, LogConfig, PartitionLog
from tidemq.storage.checkpoint import fsync_directory, write_atomically
from tidemq.storage.journal import (
    JOURNAL_DIRECTORY,
    Journal,
    journal_files,
    replay,
    spare_files,
)
from tidemq.transport import HttpTransport
from tidemq.wire import control
from tidemq.wire.batch import build_batch, check_batches, decode_records, iter_headers
from tidemq.wire.fetch import FETCH_TYPE, FetchEntry, FetchPartition, FetchRequest, encode_fetch
from tidemq.wire.produce import PRODUCE_TYPE, ProduceEntry, decode_produce
from tidemq.wire.replica_fetch import (
    REPLICA_FETCH_TYPE,
    SESSION_HEADER,
    ReplicaFetchEntry,
    ReplicaFetchPartition,
    ReplicaFetchRequest,
    encode_replica_fetch,
)

log = logging.getLogger(__name__)

BATCH_TYPE = "application/vnd.tidemq.batches"
MAX_WAIT_MS = 30_000
LAG_TIME_MAX_MS_MIN = 100
MAX_FETCH_BYTES = 8 * 1024 * 1024
PRODUCE_TIMEOUT_S = 30.0
CLUSTER_ID_FILE = "cluster-id"
CLEAN_SHUTDOWN_FILE = "clean-shutdown"
REPLICA_FETCH_BYTES = 4 * 1024 * 1024
TICK_INTERVAL_S = 0.25
EARLY_HEARTBEAT_GAP_S = 0.01  # bounds the heartbeats requests can cause to 100/s
EARLY_HEARTBEAT_NAMES_MAX = 1024  # names remembered for "once per name per interval"

Key = tuple[str, int]


@dataclass
class BrokerConfig:
    broker_id: int
    data_dir: Path
    coordinator_url: str
    advertised_url: str
    log_config: LogConfig = field(default_factory=LogConfig)
    max_request_bytes: int = 8 * 1024 * 1024
    heartbeat_interval_ms: int = 1000
    request_timeout_ms: int = 5000
    replica_lag_time_max_ms: int = 10_000
    replica_fetch_wait_ms: int = 1000
    max_inflight_produce_bytes: int = 64 * 1024 * 1024
    max_inflight_replica_bytes: int = 64 * 1024 * 1024
    journal: bool = True  # under fsync=always: one broker-wide journal fsync per group

    def __post_init__(self) -> None:
        if self.replica_lag_time_max_ms < LAG_TIME_MAX_MS_MIN:
            # A replica fetch waits at most half of it: below this, followers would
            # send requests in a loop (and could never stay in the ISR anyway).
            raise ValueError(
                f"replica_lag_time_max_ms must be at least {LAG_TIME_MAX_MS_MIN}, "
                f"not {self.replica_lag_time_max_ms}"
            )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_acks(raw: str) -> Acks:
    if raw in ("all", "-1"):
        return Acks.ALL
    if raw == "1":
        return Acks.LEADER
    if raw == "0":
        return Acks.NONE
    raise InvalidRequest("acks must be 0, 1 or all")


PRODUCER_ACTIVE_WINDOW_MS = 60_000
PRODUCERS_TRACKED_MAX = 100_000


class BrokerMetrics:
    """The broker's Prometheus metrics (docs/OPERATIONS.md, "Metrics"): traffic per
    topic, partitions by role, log size and segments per partition, fsync latency,
    disk space, and the idempotent producers seen in the last minute."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages_in = Counter(
            "tide_messages_in_total", "Records appended as leader", ["topic"], registry=registry
        )
        self.bytes_in = Counter(
            "tide_bytes_in_total", "Batch bytes appended as leader", ["topic"], registry=registry
        )
        self.messages_out = Counter(
            "tide_messages_out_total", "Records served by fetch", ["topic"], registry=registry
        )
        self.bytes_out = Counter(
            "tide_bytes_out_total", "Batch bytes served by fetch", ["topic"], registry=registry
        )
        self.replicated_bytes = Counter(
            "tide_replication_bytes_in_total",
            "Batch bytes appended as follower",
            ["topic"],
            registry=registry,
        )
        self.fsync_seconds = Histogram(
            "tide_fsync_duration_seconds",
            "fsync latency: one group commit of the journal (or of one partition log without it)",
            registry=registry,
            buckets=(
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                1,
            ),
        )
        self.partitions = Gauge(
            "tide_broker_partitions",
            "Partition replicas on this broker",
            ["role"],
            registry=registry,
        )
        self.under_replicated = Gauge(
            "tide_broker_under_replicated_partitions",
            "Partitions led here whose ISR is smaller than their replica set",
            registry=registry,
        )
        self.log_size = Gauge(
            "tide_log_size_bytes",
            "Bytes stored per partition replica",
            ["topic", "partition"],
            registry=registry,
        )
        self.log_segments = Gauge(
            "tide_log_segments",
            "Segment files per partition replica",
            ["topic", "partition"],
            registry=registry,
        )
        self.high_watermark = Gauge(
            "tide_partition_high_watermark",
            "High watermark per partition led here",
            ["topic", "partition"],
            registry=registry,
        )
        self.disk_free = Gauge(
            "tide_disk_free_bytes",
            "Free bytes on the file system of the broker's data directory",
            registry=registry,
        )
        self.disk_size = Gauge(
            "tide_disk_size_bytes",
            "Size of the file system of the broker's data directory",
            registry=registry,
        )
        self.producers_active = Gauge(
            "tide_producers_active",
            "Idempotent producer ids that produced here in the last minute",
            registry=registry,
        )
        self.isr_proposals = Counter(
            "tide_isr_proposals_total",
            "ISR changes proposed by leaders on this broker, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.fetch_sessions = Gauge(
            "tide_replica_fetch_sessions",
            "Incremental replica fetch sessions held here as leader (one per follower broker)",
            registry=registry,
        )
        self.fetch_sessions_opened = Counter(
            "tide_replica_fetch_sessions_opened_total",
            "Incremental replica fetch sessions opened here as leader (a steady rate: churn)",
            registry=registry,
        )
        self._producers_seen_ms: dict[int, int] = {}
        # Per-topic children of the traffic counters (topics' counters are never removed).
        self._in: dict[str, tuple[Any, Any]] = {}
        self._out: dict[str, tuple[Any, Any]] = {}
        self._replicated: dict[str, Any] = {}

    def count_in(self, topic: str, records: int, size: int) -> None:
        """Records and bytes appended as leader (the labelled children looked up once
        per topic: ``labels()`` is most of the cost of an increment)."""
        children = self._in.get(topic)
        if children is None:
            children = self._in[topic] = (
                self.messages_in.labels(topic),
                self.bytes_in.labels(topic),
            )
        children[0].inc(records)
        children[1].inc(size)

    def count_out(self, topic: str, records: int, size: int) -> None:
        """Records and bytes served by fetch (children cached as in ``count_in``)."""
        children = self._out.get(topic)
        if children is None:
            children = self._out[topic] = (
                self.messages_out.labels(topic),
                self.bytes_out.labels(topic),
            )
        children[0].inc(records)
        children[1].inc(size)

    def count_replicated(self, topic: str, size: int) -> None:
        child = self._replicated.get(topic)
        if child is None:
            child = self._replicated[topic] = self.replicated_bytes.labels(topic)
        child.inc(size)

    def producer_seen(self, producer_id: int, now_ms: int) -> None:
        if producer_id < 0:
            return
        seen = self._producers_seen_ms
        if producer_id in seen or len(seen) < PRODUCERS_TRACKED_MAX:
            seen[producer_id] = now_ms

    def update_producers(self, now_ms: int) -> None:
        """Forgets producers idle for a minute; sets the gauge."""
        cutoff = now_ms - PRODUCER_ACTIVE_WINDOW_MS
        seen = self._producers_seen_ms
        for producer_id in [p for p, at in seen.items() if at < cutoff]:
            del seen[producer_id]
        self.producers_active.set(len(seen))

    def update_disk(self, data_dir: Path) -> None:
        try:
            usage = shutil.disk_usage(data_dir)
        except OSError:
            return
        self.disk_free.set(usage.free)
        self.disk_size.set(usage.total)

    def forget_partition(self, topic: str, partition: int) -> None:
        for gauge in (self.log_size, self.log_segments, self.high_watermark):
            try:
                gauge.remove(topic, str(partition))
            except KeyError:
                pass


class Broker:
    """State of one broker process; the HTTP handlers below are its only inputs."""

    def __init__(
        self,
        config: BrokerConfig,
        transport_factory: Callable[[], HttpTransport],
        registry: CollectorRegistry,
    ) -> None:
        self.config = config
        self.replicas: dict[Key, PartitionReplica] = {}
        self.topics: dict[str, control.TopicSummary] = {}
        self.metrics = BrokerMetrics(registry)
        self.syncer = GroupCommitSyncer(
            config.log_config.fsync,
            config.log_config.fsync_interval_ms,
            self.metrics.fsync_seconds,
            self._open_journal(),
        )
        self._transport_factory = transport_factory
        self._transport: HttpTransport | None = None
        self.registered = False
        self.cluster_id = self._read_cluster_id()
        self.unclean_weak_fsync = self._consume_clean_shutdown_marker()
        self.cluster_mismatch: str | None = None
        self._deleted_ids_scanned: set[str] | None = None
        self.heartbeat_interval_ms = config.heartbeat_interval_ms
        self._tasks: asyncio.TaskGroup | None = None
        # Each followed partition: (leader epoch, the session of its leader).
        self._followers: dict[Key, tuple[int, FetchSession]] = {}
        self._sessions: dict[tuple[int, str], tuple[FetchSession, asyncio.Task[None]]] = {}
        self._inflight_produce_bytes = 0
        self._inflight_replica_bytes = 0  # replica fetch answers read, not yet written
        self._fetch_sessions = FetchSessions(self.metrics.fetch_sessions_opened.inc)
        self.metrics.fetch_sessions.set_function(lambda: len(self._fetch_sessions))
        self._replica_bytes_released = asyncio.Event()
        self.reconciled = False  # no heartbeat answer yet: topics unknown, not absent
        # Set when a request names what this broker does not know yet (a new topic,
        # partition or leader epoch): the coordinator knows more, so the next heartbeat
        # goes now rather than at the end of the interval (client/admin.py relies on it).
        self._heartbeat_due = asyncio.Event()
        self._asked_early: dict[tuple[str, int, int], float] = {}  # name -> when (monotonic)

    @property
    def topic_partitions(self) -> dict[str, int]:
        return {name: summary.partitions for name, summary in self.topics.items()}

    # ---- lookup -------------------------------------------------------------------

    def replica_for(self, topic: str, partition: int) -> PartitionReplica:
        replica = self.replicas.get((topic, partition))
        if replica is not None:
            return replica
        if not self.reconciled:
            # Before its first heartbeat answer a (re)started broker knows no topic: not
            # a reason for a client to give up on one (unknown_topic is final).
            raise NotLeader(f"broker {self.config.broker_id} is starting: no assignments yet")
        summary = self.topics.get(topic)
        if summary is None:
            self._behind((topic, -1, -1))
            raise UnknownTopic(f"unknown topic {topic!r}")
        self._behind((topic, partition, -1))
        if not 0 <= partition < summary.partitions:
            raise UnknownPartition(f"topic {topic!r} has partitions 0..{summary.partitions - 1}")
        raise NotLeader(f"broker {self.config.broker_id} does not host {topic}/{partition}")

    def leader_for(self, topic: str, partition: int, epoch: int | None) -> PartitionReplica:
        """The one epoch gate: every produce, fetch and replica fetch passes here first."""
        replica = self.replica_for(topic, partition)
        if epoch is not None and epoch > replica.leader_epoch:
            self._behind((topic, partition, epoch))  # the caller knows a newer epoch
        if not replica.is_leader:
            raise NotLeader(f"broker {self.config.broker_id} does not lead {topic}/{partition}")
        if epoch is not None and epoch >= 0:
            if epoch < replica.leader_epoch:
                raise FencedLeaderEpoch(f"leader epoch {epoch} < {replica.leader_epoch}")
            if epoch > replica.leader_epoch:
                raise UnknownLeaderEpoch(f"leader epoch {epoch} > {replica.leader_epoch}")
        return replica

    def _behind(self, name: tuple[str, int, int]) -> None:
        """A request named what this broker does not know (topic, partition, leader
        epoch; -1 where it does not matter): heartbeat now, once per name per heartbeat
        interval. One answer tells whether the coordinator knows it; a client that
        keeps naming a deleted topic, a partition this broker no longer hosts or a
        bogus epoch made the broker heartbeat every EARLY_HEARTBEAT_GAP_S."""
        now = time.monotonic()
        interval_s = self.heartbeat_interval_ms / 1000
        asked = self._asked_early
        last = asked.get(name)
        if last is not None and now - last < interval_s:
            return
        if len(asked) >= EARLY_HEARTBEAT_NAMES_MAX:
            for key in [key for key, when in asked.items() if now - when >= interval_s]:
                del asked[key]
            if len(asked) >= EARLY_HEARTBEAT_NAMES_MAX:
                return  # many distinct unknown names at once: the regular heartbeat
        asked[name] = now
        self._heartbeat_due.set()

    # ---- produce ------------------------------------------------------------------

    async def produce(
        self, topic: str, partition: int, body: bytes, acks: Acks, epoch: int | None
    ) -> dict[str, Any]:
        replica = self.leader_for(topic, partition, epoch)
        headers = check_batches(body)
        # Idempotence: duplicates of retried batches get their original offsets.
        now_ms = _now_ms()
        outcome = await append_in_sequence(replica, body, headers, acks, _now_ms)
        for header in headers:
            self.metrics.producer_seen(header.producer_id, now_ms)
        if outcome.appended_bytes:
            self.syncer.mark_dirty(replica)
            self.metrics.count_in(topic, outcome.appended_records, outcome.appended_bytes)
        await replica.wait_ack(outcome.commit_offset, acks, PRODUCE_TIMEOUT_S)
        return {
            "base_offset": outcome.base_offset,
            "last_offset": outcome.last_offset,
            "batch_base_offsets": outcome.batch_base_offsets,
            "log_end_offset": replica.log.log_end_offset,
            "high_watermark": replica.high_watermark,
        }

    async def produce_entry(self, entry: ProduceEntry, acks: Acks) -> dict[str, Any]:
        """One partition of a multi-partition produce: its result or its error."""
        head: dict[str, Any] = {"topic": entry.topic, "partition": entry.partition}
        epoch = entry.leader_epoch if entry.leader_epoch >= 0 else None
        try:
            answer = await self.produce(
                entry.topic, entry.partition, bytes(entry.batches), acks, epoch
            )
        except TideError as error:
            return {**head, **error.to_json()}
        return {**head, **answer}

    # ---- fetch --------------------------------------------------------------------

    async def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_bytes: int,
        wait_ms: int,
        epoch: int | None,
    ) -> tuple[bytes, PartitionReplica]:
        replica = self.leader_for(topic, partition, epoch)
        log_ = replica.log
        if offset < log_.log_start_offset or offset > log_.log_end_offset:
            raise OffsetOutOfRange(
                f"offset {offset} outside [{log_.log_start_offset}, {log_.log_end_offset}]"
            )
        await replica.wait_for_data(offset, wait_ms / 1000, follower=False)
        if replica.closed:
            raise NotLeader(f"{topic}/{partition} closed while the fetch waited")
        if offset < log_.log_start_offset:
            raise OffsetOutOfRange(f"offset {offset} was deleted by retention meanwhile")
        if offset >= replica.high_watermark:
            return b"", replica
        data = log_.read(offset, max_bytes, replica.high_watermark)
        if data:
            count = sum(h.record_count for h in iter_headers(data))
            self.metrics.count_out(topic, count, len(data))
        return data, replica

    async def fetch_many(self, request: FetchRequest) -> list[FetchEntry]:
        """A consumer's multi-partition long-poll: answers at once with every partition
        that has data or an error, else waits up to ``wait_ms`` for the first of them
        to have data (each waiter is a future the replica core answers or cancels)."""
        entries = self._fetch_ready(request)
        if entries or request.wait_ms == 0:
            return entries
        # One future shared by every partition's waiter: no task per partition.
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        registered: list[tuple[PartitionReplica, int]] = []
        try:
            for wanted in request.partitions:
                replica = self.replicas.get((wanted.topic, wanted.partition))
                if replica is None or woken.done():
                    break  # gone meanwhile: the answer below says so
                waiter_id = replica.watch_data(wanted.offset, woken, follower=False)
                if waiter_id is not None:
                    registered.append((replica, waiter_id))
            else:
                with contextlib.suppress(TideError):  # leadership lost: the answer says so
                    await until_done(woken, request.wait_ms / 1000)
        finally:
            for replica, waiter_id in registered:
                replica.unwatch(waiter_id)
            if woken.done() and not woken.cancelled():
                woken.exception()  # a failed waiter (leadership lost): the answer says so
        return self._fetch_ready(request)

    def _fetch_ready(self, request: FetchRequest) -> list[FetchEntry]:
        entries: list[FetchEntry] = []
        budget = request.max_bytes
        for wanted in request.partitions:
            try:
                entry = self._fetch_entry(wanted, budget)
            except TideError as error:
                entries.append(
                    FetchEntry(
                        wanted.topic, wanted.partition, -1, -1, error.to_json()["error"], b""
                    )
                )
                continue
            if entry is not None:
                entries.append(entry)
                budget -= len(entry.batches)
                if budget <= 0:
                    break
        return entries

    def _fetch_entry(self, wanted: FetchPartition, budget: int) -> FetchEntry | None:
        epoch = wanted.leader_epoch if wanted.leader_epoch >= 0 else None
        replica = self.leader_for(wanted.topic, wanted.partition, epoch)
        log_ = replica.log
        if not log_.log_start_offset <= wanted.offset <= log_.log_end_offset:
            raise OffsetOutOfRange(
                f"offset {wanted.offset} outside [{log_.log_start_offset}, {log_.log_end_offset}]"
            )
        if wanted.offset >= replica.high_watermark:
            return None
        data = log_.read(wanted.offset, min(wanted.max_bytes, budget), replica.high_watermark)
        if data:
            count = sum(h.record_count for h in iter_headers(data))
            self.metrics.count_out(wanted.topic, count, len(data))
        return FetchEntry(
            wanted.topic,
            wanted.partition,
            replica.high_watermark,
            log_.log_start_offset,
            None,
            data,
        )

    @contextlib.contextmanager
    def admit_produce(self, content_length: int | None) -> Iterator[None]:
        """Admission control: produce bodies held in memory at once stay below
        ``max_inflight_produce_bytes``; past it, a retriable 503 broker_busy."""
        size = content_length if content_length is not None else self.config.max_request_bytes
        if self._inflight_produce_bytes and (
            self._inflight_produce_bytes + size > self.config.max_inflight_produce_bytes
        ):
            raise BrokerBusy(
                f"{self._inflight_produce_bytes} bytes of produce requests in flight "
                f"(limit {self.config.max_inflight_produce_bytes}): retry"
            )
        self._inflight_produce_bytes += size
        try:
            yield
        finally:
            self._inflight_produce_bytes -= size

    def _check_follower(
        self,
        topic: str,
        partition: int,
        request: ReplicaFetch | ReplicaFetchPartition,
        broker_id: int,
    ) -> tuple[PartitionReplica, tuple[int, int] | None]:
        """The checks every follower fetch passes first: the epoch gate, the topic id,
        the caller among the followers; then the follower's log against the epoch
        history: the (epoch, end offset) to tell a diverged follower, else None."""
        replica = self.leader_for(topic, partition, request.leader_epoch)
        if request.topic_id and request.topic_id != replica.topic_id:
            raise UnknownTopic(f"{topic} has topic id {replica.topic_id}, not {request.topic_id}")
        if broker_id not in replica.core.replicas or broker_id == self.config.broker_id:
            raise NotLeader(f"broker {broker_id} is not a follower of {topic}/{partition}")
        log_ = replica.log
        diverging = diverging_epoch(
            request.offset,
            request.last_fetched_epoch,
            log_.epoch_and_end_offset(request.last_fetched_epoch),
            log_.log_start_offset,
        )
        if diverging is None and request.offset > log_.log_end_offset:
            diverging = (log_.latest_epoch(), log_.log_end_offset)
        return replica, diverging

    async def replica_fetch(
        self, topic: str, partition: int, request: ReplicaFetch
    ) -> tuple[bytes, dict[str, str]]:
        """A follower's fetch of one partition (the per-partition endpoint, kept for
        followers of older versions): checked against the epoch history first (a
        diverged follower is told where to cut), then counted by the core, then served
        from the log up to its end (followers copy what is not committed yet)."""
        replica, diverging = self._check_follower(topic, partition, request, request.broker_id)
        log_ = replica.log
        headers = {"Tide-Log-Start-Offset": str(log_.log_start_offset)}
        if diverging is not None:
            headers["Tide-Diverging-Epoch"] = str(diverging[0])
            headers["Tide-Diverging-End-Offset"] = str(diverging[1])
            return b"", headers
        if request.offset < log_.log_start_offset:
            return b"", headers  # the follower starts over at the log start
        replica.follower_fetched(request.broker_id, request.offset, request.durable_offset)
        if request.offset >= log_.log_end_offset:
            await replica.wait_for_data(request.offset, self._poll_wait_s(request), follower=True)
        if replica.closed or not replica.is_leader:
            raise NotLeader(f"{topic}/{partition}: leadership moved while the fetch waited")
        data = log_.read(request.offset, request.max_bytes)
        headers["Tide-High-Watermark"] = str(replica.high_watermark)
        headers["Tide-Log-End-Offset"] = str(log_.log_end_offset)
        return data, headers

    async def replica_fetch_session(self, request: ReplicaFetchRequest) -> ReplicaAnswer:
        """A follower's fetch of every partition it follows here (one session per
        follower and leader): each partition is checked and its progress reported to
        its core exactly as by :meth:`replica_fetch`; the answer comes at once when any
        partition has data, a divergence, a log start reset or an error, else when the
        first one gets data (the core's follower data waiters), else empty after
        ``wait_ms``. Returns the entries, the bytes of batches they hold (which the
        caller releases with :meth:`release_replica_bytes` once the answer is
        written), and the incremental session the leader holds afterwards, if any
        (broker/fetch_sessions.py)."""
        if not request.incremental and (request.forgotten or not request.partitions):
            raise InvalidRequest("a whole replica fetch names every partition, forgets none")
        if request.session_id:
            return await self._session_fetch(request)
        if request.incremental:
            raise InvalidRequest("an incremental replica fetch names its session_id")
        entries: list[ReplicaFetchEntry] = []
        followed: list[tuple[ReplicaFetchPartition, PartitionReplica]] = []
        for wanted in request.partitions:
            self._look(wanted, request.broker_id, entries, followed)
        deadline = asyncio.get_running_loop().time() + self._poll_wait_s(request)
        while True:
            read, held = self._replica_reads(followed, request.max_bytes)
            entries += read
            remaining = deadline - asyncio.get_running_loop().time()
            if entries or remaining <= 0 or not followed:
                break
            await self._replica_wait(followed, remaining)
        if not entries:  # timed out: tell what moved meanwhile (lazily: no wake-up for it)
            entries = _moved_high_watermarks(followed)
        return ReplicaAnswer(entries, held)

    def _poll_wait_s(self, request: ReplicaFetch | ReplicaFetchRequest) -> float:
        """How long a replica fetch may wait here: ``wait_ms``, but at most half the
        ISR's lag bound. A follower's fetch times are refreshed only when its
        request arrives, so a caught-up follower parked longer than the bound would
        drop out of the ISR (and rejoin with its next request)."""
        return min(request.wait_ms, self.config.replica_lag_time_max_ms / 2) / 1000

    def _look(
        self,
        wanted: ReplicaFetchPartition,
        broker_id: int,
        entries: list[ReplicaFetchEntry],
        followed: list[tuple[ReplicaFetchPartition, PartitionReplica]],
    ) -> PartitionReplica | None:
        """One partition's step of a fetch: the checks, then either an entry to answer
        at once (an error, a divergence, a log start past the follower's log end) or
        the follower's progress counted and the partition added to ``followed``."""
        try:
            replica, diverging = self._check_follower(
                wanted.topic, wanted.partition, wanted, broker_id
            )
        except TideError as error:
            entries.append(_replica_error_entry(wanted, error))
            return None
        if diverging is not None or wanted.offset < replica.log.log_start_offset:
            entries.append(_replica_entry(wanted, replica, diverging))
            return None
        replica.follower_fetched(broker_id, wanted.offset, wanted.durable_offset)
        followed.append((wanted, replica))
        return replica

    async def _session_fetch(self, request: ReplicaFetchRequest) -> ReplicaAnswer:
        """The same answer as a whole request's, looking only at the partitions that
        may have something to say (see broker/fetch_sessions.py for why that is all)."""
        session = self._fetch_sessions.session_for(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._poll_wait_s(request)
        # Every held partition is looked at this often (its follower's fetch times
        # refreshed), far below the ISR's lag bound.
        refresh_s = min(REFRESH_S_MAX, self.config.replica_lag_time_max_ms / 8000)
        entries: list[ReplicaFetchEntry] = []
        looked: list[Key] = []
        held = 0
        arrived = True
        while True:
            keys, refresh = session.take(refresh_s, arrived)
            arrived = False
            followed: list[tuple[ReplicaFetchPartition, PartitionReplica]] = []
            for key in keys:
                one = session.partitions[key]
                if one.replica is not None and not refresh:
                    # Looked at since the follower named it last (its state is the same):
                    # a fired watch or an earlier answer only asks to read, as a waiting
                    # whole request would; the reads tell a lost leadership.
                    followed.append((one.wanted, one.replica))
                    continue
                one.replica = self._look(one.wanted, request.broker_id, entries, followed)
            looked += keys
            read, held_now = self._replica_reads(followed, request.max_bytes)
            entries += read
            held += held_now
            remaining = deadline - loop.time()
            if entries or remaining <= 0 or session.closed:
                break
            if self._replica_bytes_full():
                session.mark(keys)  # held back by the bound: read again once freed
                await self._replica_bytes_freed(remaining)
                continue
            session.watch(keys)
            await session.wait(remaining)
        if not entries:  # timed out: tell what moved meanwhile (lazily: no wake-up for it)
            entries = _moved_high_watermarks(
                (one.wanted, one.replica)
                for one in session.partitions.values()
                if one.replica is not None
            )
        if session.closed or not all(_tells_data(entry, session) for entry in entries):
            # Anything but data and high watermarks: the follower acts on it and opens a
            # new session, so that neither side guesses what the other did with it.
            self._fetch_sessions.close(session)
            return ReplicaAnswer(entries, held)
        answered = [(entry.topic, entry.partition) for entry in entries]
        session.mark(answered)  # looked at again next time, unless the follower moved on
        session.watch(looked)
        return ReplicaAnswer(entries, held, session.id)

    def _replica_reads(
        self, followed: list[tuple[ReplicaFetchPartition, PartitionReplica]], max_bytes: int
    ) -> tuple[list[ReplicaFetchEntry], int]:
        """Entries for the followed partitions that have data now (or lost their
        leadership meanwhile), within the answer's budget and the broker-wide bound on
        replica answer bytes in flight; the bytes read are held until released."""
        entries: list[ReplicaFetchEntry] = []
        free = self.config.max_inflight_replica_bytes - self._inflight_replica_bytes
        budget = min(max_bytes, free)
        held = 0
        for wanted, replica in followed:
            try:
                if replica.closed or not replica.is_leader:
                    raise NotLeader(f"{wanted.topic}/{wanted.partition}: leadership moved")
                if replica.leader_epoch != wanted.leader_epoch:
                    # Led again since its look (the same replica object; the log may
                    # have been cut and rewritten meanwhile): what the look checked
                    # against the epoch history no longer holds.
                    raise FencedLeaderEpoch(
                        f"{wanted.topic}/{wanted.partition}: leader epoch is now "
                        f"{replica.leader_epoch}, not {wanted.leader_epoch}"
                    )
                log_ = replica.log
                if wanted.offset < log_.log_start_offset:  # retention moved it meanwhile
                    entries.append(_replica_entry(wanted, replica, None))
                    continue
                if wanted.offset >= log_.log_end_offset or budget <= 0:
                    continue
                data = log_.read(wanted.offset, min(wanted.max_bytes, budget))
            except TideError as error:
                entries.append(_replica_error_entry(wanted, error))
                continue
            budget -= len(data)
            held += len(data)
            entries.append(_replica_entry(wanted, replica, None, data))
        self._inflight_replica_bytes += held
        return entries, held

    async def _replica_wait(
        self, followed: list[tuple[ReplicaFetchPartition, PartitionReplica]], timeout_s: float
    ) -> None:
        """Until the first followed partition has data past the follower's log end (or
        bytes in flight were released, when the bound held data back), or timeout."""
        if self._replica_bytes_full():
            await self._replica_bytes_freed(timeout_s)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watching: list[tuple[PartitionReplica, int]] = []
        try:
            for wanted, replica in followed:
                waiter_id = replica.watch_data(wanted.offset, woken)
                if waiter_id is None:
                    return
                watching.append((replica, waiter_id))
            with contextlib.suppress(TideError):  # a demoted partition: the next read says so
                await until_done(woken, timeout_s)
        finally:
            for replica, waiter_id in watching:
                replica.unwatch(waiter_id)
            if not woken.done():
                woken.cancel()
            elif not woken.cancelled():
                woken.exception()  # a demoted replica's NotLeader: seen by the next read

    def _replica_bytes_full(self) -> bool:
        return self._inflight_replica_bytes >= self.config.max_inflight_replica_bytes

    async def _replica_bytes_freed(self, timeout_s: float) -> None:
        """Until replica answer bytes in flight were released, or timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._replica_bytes_released.wait()

    def release_replica_bytes(self, count: int) -> None:
        self._inflight_replica_bytes -= count
        released, self._replica_bytes_released = self._replica_bytes_released, asyncio.Event()
        released.set()

    # ---- coordinator link ---------------------------------------------------------

    @property
    def transport(self) -> HttpTransport:
        if self._transport is None:
            self._transport = self._transport_factory()
        return self._transport

    async def _coordinator_call(self, path: str, message: Any) -> bytes:
        url = self.config.coordinator_url.rstrip("/") + path
        body, _ = await self.transport.request(
            "POST",
            url,
            data=control.encode(message),
            headers={"Content-Type": "application/json"},
        )
        return body

    def _read_cluster_id(self) -> str:
        path = self.config.data_dir / CLUSTER_ID_FILE
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            return ""

    def _adopt_cluster_id(self, cluster_id: str) -> None:
        if self.cluster_id == cluster_id:
            self.cluster_mismatch = None
            return
        if self.cluster_id:
            self.cluster_mismatch = (
                f"this broker belongs to cluster {self.cluster_id}; the coordinator at "
                f"{self.config.coordinator_url} runs cluster {cluster_id}"
            )
            raise ClusterIdMismatch(self.cluster_mismatch)
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.config.data_dir / CLUSTER_ID_FILE, cluster_id + "\n")
        self.cluster_id = cluster_id
        log.info("joined cluster %s", cluster_id)

    async def register(self) -> None:
        request = control.BrokerRegistration(
            broker_id=self.config.broker_id,
            url=self.config.advertised_url,
            cluster_id=self.cluster_id,
            unclean_weak_fsync=self.unclean_weak_fsync,
        )
        answer = control.decode(
            await self._coordinator_call("/v1/brokers/register", request),
            control.RegistrationAnswer,
        )
        self._adopt_cluster_id(answer.cluster_id)
        self.heartbeat_interval_ms = answer.heartbeat_interval_ms
        self.registered = True
        self.unclean_weak_fsync = False  # said once: the coordinator acted on it
        event(
            log,
            "broker_registered",
            f"registered with the coordinator as broker {self.config.broker_id}",
            broker_id=self.config.broker_id,
            url=self.config.advertised_url,
            cluster_id=self.cluster_id,
        )

    async def heartbeat(self) -> None:
        reports = [self._report(replica) for replica in self.replicas.values()]
        path = f"/v1/brokers/{self.config.broker_id}/heartbeat"
        request = control.BrokerHeartbeat(cluster_id=self.cluster_id, partitions=reports)
        answer = control.decode(
            await self._coordinator_call(path, request), control.HeartbeatAnswer
        )
        self._adopt_cluster_id(answer.cluster_id)
        self.reconcile(answer)

    @staticmethod
    def _report(replica: PartitionReplica) -> control.PartitionReport:
        return control.PartitionReport(
            topic=replica.topic,
            partition=replica.partition,
            topic_id=replica.topic_id,
            leader_epoch=replica.leader_epoch,
            log_start_offset=replica.log.log_start_offset,
            log_end_offset=replica.log.log_end_offset,
            high_watermark=replica.high_watermark,
        )

    async def coordinator_loop(self) -> None:
        """Registers, then heartbeats forever; re-registers when the coordinator forgot us."""
        backoff_s = 0.1
        while True:
            try:
                if not self.registered:
                    await self.register()
                self._heartbeat_due.clear()
                await self.heartbeat()
                backoff_s = 0.1
                await self._until_next_heartbeat()
            except UnknownBroker:
                self.registered = False
            except ClusterIdMismatch as error:
                self.registered = False
                log.critical("refusing the coordinator, keeping all data: %s", error)
                await asyncio.sleep(5.0)
            except TideError as error:
                log.warning("coordinator unreachable (%s); retrying in %.1fs", error, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)

    async def _until_next_heartbeat(self) -> None:
        """The heartbeat interval, cut short (at most one early heartbeat per
        EARLY_HEARTBEAT_GAP_S) when a request showed this broker is behind."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.heartbeat_interval_ms / 1000):
                await self._heartbeat_due.wait()
        except TimeoutError:
            return
        await asyncio.sleep(max(0.0, started + EARLY_HEARTBEAT_GAP_S - time.monotonic()))

    # ---- reconciling the desired state --------------------------------------------

    def reconcile(self, answer: control.HeartbeatAnswer) -> None:
        self.reconciled = True
        self.topics = dict(answer.topics)
        wanted = {(a.topic, a.partition): a for a in answer.assignments}
        deleted_ids = set(answer.deleted_topic_ids)
        self._drop_unwanted(wanted, deleted_ids)
        # Directories of deleted topics: looked for at the first reconcile (topics deleted
        # while this broker was down) and whenever a deletion is new, not every beat.
        if deleted_ids != self._deleted_ids_scanned:
            self._remove_deleted_topic_directories(deleted_ids)
            self._deleted_ids_scanned = deleted_ids
        for key, assignment in wanted.items():
            replica = self.replicas.get(key)
            if replica is not None and replica.topic_id != assignment.topic_id:
                self._drop(
                    key, delete=assignment.topic_id != "" and replica.topic_id in deleted_ids
                )
                replica = None
            if replica is None:
                replica = PartitionReplica.open(
                    self.config.data_dir,
                    self.config.broker_id,
                    (assignment.topic, assignment.partition, assignment.topic_id),
                    self.config.log_config,
                    self.config.replica_lag_time_max_ms,
                    self._propose_isr,
                    _now_ms,
                    self.syncer.journal,
                )
                self.replicas[key] = replica
                _log_recovery(replica)
            before = (replica.is_leader, replica.leader_epoch)
            replica.assign(_replica_assignment(assignment))
            self._steer_follower(replica, assignment)
            if (replica.is_leader, replica.leader_epoch) != before:
                _log_role(replica, assignment)
        self._update_partition_gauges(wanted)

    def _drop_unwanted(
        self, wanted: dict[Key, control.PartitionAssignment], deleted_ids: set[str]
    ) -> None:
        for key in [k for k in self.replicas if k not in wanted]:
            replica = self.replicas[key]
            summary = self.topics.get(replica.topic)
            moved_away = summary is not None and summary.topic_id == replica.topic_id
            self._drop(key, delete=replica.topic_id in deleted_ids or moved_away)

    def _drop(self, key: Key, delete: bool) -> None:
        replica = self.replicas.pop(key)
        self._stop_follower(key)
        if delete:
            event(
                log,
                "replica_deleted",
                f"removing {key[0]}/{key[1]} (topic id {replica.topic_id})",
                topic=key[0],
                partition=key[1],
                topic_id=replica.topic_id,
            )
            replica.delete()
        else:
            log.info("no longer a replica of %s/%s: closing it, keeping its data", *key)
            replica.close()
        self.metrics.forget_partition(key[0], key[1])

    def _remove_deleted_topic_directories(self, deleted_ids: set[str]) -> None:
        """Replica directories whose topic id the coordinator says was deleted."""
        if not self.config.data_dir.exists():
            return
        open_ids = {(r.topic, r.partition, r.topic_id) for r in self.replicas.values()}
        for path in self.config.data_dir.iterdir():
            if path.name.endswith(DELETED_SUFFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)  # a removal a crash cut short
                continue
            parsed = parse_partition_directory_name(path.name)
            if parsed is None or not path.is_dir() or parsed in open_ids:
                continue
            if parsed[2] in deleted_ids:
                log.info("removing %s: topic id %s was deleted", path.name, parsed[2])
                remove_replica_directory(path)

    def _update_partition_gauges(self, wanted: dict[Key, control.PartitionAssignment]) -> None:
        leaders = sum(1 for r in self.replicas.values() if r.is_leader)
        self.metrics.partitions.labels("leader").set(leaders)
        self.metrics.partitions.labels("follower").set(len(self.replicas) - leaders)
        self.metrics.under_replicated.set(
            sum(
                1
                for assignment in wanted.values()
                if assignment.leader_id == self.config.broker_id
                and len(assignment.isr) < len(assignment.replicas)
            )
        )

    # ---- ISR proposals ------------------------------------------------------------

    def _propose_isr(self, replica: PartitionReplica, proposal: ProposeIsr) -> None:
        if self._tasks is None:
            return  # not running (unit tests): the core retries on a later tick
        self._tasks.create_task(self._send_proposal(replica, proposal))

    async def _send_proposal(self, replica: PartitionReplica, proposal: ProposeIsr) -> None:
        request = control.AlterIsrRequest(
            topic=replica.topic,
            partition=replica.partition,
            topic_id=replica.topic_id,
            leader_epoch=proposal.leader_epoch,
            partition_epoch=proposal.partition_epoch,
            isr=list(proposal.isr),
        )
        path = f"/v1/brokers/{self.config.broker_id}/alter-isr"
        try:
            answer = control.decode(
                await self._coordinator_call(path, request), control.AlterIsrAnswer
            )
        except (StalePartitionEpoch, NotLeader, UnknownTopic) as error:
            log.info("%s/%s: ISR proposal refused: %s", replica.topic, replica.partition, error)
            self.metrics.isr_proposals.labels("refused").inc()
            replica.handle(IsrAnswered(False, proposal.partition_epoch))
            return
        except TideError as error:
            log.warning("%s/%s: ISR proposal failed: %s", replica.topic, replica.partition, error)
            self.metrics.isr_proposals.labels("failed").inc()
            replica.handle(IsrAnswered(False, proposal.partition_epoch))
            return
        log.info(
            "%s/%s: ISR %s -> %s (leader epoch %s, partition epoch %s)",
            replica.topic,
            replica.partition,
            list(replica.core.isr),
            answer.isr,
            answer.leader_epoch,
            answer.partition_epoch,
        )
        self.metrics.isr_proposals.labels("accepted").inc()
        replica.handle(
            IsrAnswered(
                True,
                proposal.partition_epoch,
                answer.leader_epoch,
                answer.partition_epoch,
                tuple(answer.isr),
            )
        )

    # ---- following ----------------------------------------------------------------

    def _steer_follower(
        self, replica: PartitionReplica, assignment: control.PartitionAssignment
    ) -> None:
        """Each followed partition is in the fetch session of its leader (one per
        leader broker, broker/follower.py), moved when the leader or its epoch moves."""
        key = (replica.topic, replica.partition)
        running = self._followers.get(key)
        follows = (
            assignment.leader_id is not None
            and assignment.leader_id != self.config.broker_id
            and assignment.leader_url is not None
        )
        if running is not None and (
            not follows
            or running[0] != assignment.leader_epoch
            or running[1].leader_url != assignment.leader_url
            or running[1].partitions.get(key) is None
            or running[1].partitions[key].replica is not replica
        ):
            self._stop_follower(key)
            running = None
        leader_id, leader_url = assignment.leader_id, assignment.leader_url
        tasks = self._tasks
        if follows and running is None and tasks is not None and leader_id is not None:
            session = self._session_for(tasks, leader_id, str(leader_url))
            session.add(key, replica, assignment.leader_epoch)
            self._followers[key] = (assignment.leader_epoch, session)

    def _session_for(
        self, tasks: asyncio.TaskGroup, leader_id: int, leader_url: str
    ) -> FetchSession:
        running = self._sessions.get((leader_id, leader_url))
        if running is not None:
            return running[0]
        session = FetchSession(
            self.config.broker_id,
            leader_id,
            leader_url,
            lambda: self.transport,
            self.syncer.mark_dirty,
            self.metrics.count_replicated,
            self.config.replica_fetch_wait_ms,
            self.config.request_timeout_ms,
        )
        self._sessions[(leader_id, leader_url)] = (session, tasks.create_task(session.run()))
        return session

    def _stop_follower(self, key: Key) -> None:
        running = self._followers.pop(key, None)
        if running is None:
            return
        session = running[1]
        session.remove(key)
        if not session.partitions:
            _, task = self._sessions.pop((session.leader_id, session.leader_url))
            task.cancel()

    # ---- housekeeping -------------------------------------------------------------

    async def run(self) -> None:
        """The broker's background work, in one task group: a failure of any part
        surfaces and stops the broker."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self.coordinator_loop())
                tasks.create_task(self.syncer.run())
                tasks.create_task(self.maintenance_loop())
                tasks.create_task(self.tick_loop())
        except* Exception as group:
            # A broken invariant, a failed fsync or write (EIO, ENOSPC) anywhere in the
            # background work: the state on disk is no longer known to be right. Exit at
            # once; run_broker's close() (which syncs and marks logs clean) never runs.
            fail_stop(f"the broker's background work failed: {group.exceptions!r}")

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            for replica in list(self.replicas.values()):
                if replica.is_leader:
                    replica.handle(Tick())

    async def maintenance_loop(self) -> None:
        """Retention, high watermark checkpoints and metrics, once a second or so."""
        while True:
            await asyncio.sleep(1.0)
            now_ms = _now_ms()
            self.metrics.update_producers(now_ms)
            self.metrics.update_disk(self.config.data_dir)
            self._fetch_sessions.expire()
            for (topic, number), replica in list(self.replicas.items()):
                if self.replicas.get((topic, number)) is not replica:
                    continue  # dropped (topic deleted, replica moved) while this pass awaited
                # Never past the high watermark: a follower may still need the records.
                replica.log.apply_retention(now_ms, replica.high_watermark)
                # Two fsyncs: off the event loop, so heartbeats are never late for it;
                # no thread hop for the many whose high watermark stood still.
                if replica.checkpoint_due:
                    await asyncio.to_thread(replica.checkpoint_high_watermark)
                if self.replicas.get((topic, number)) is not replica:
                    continue
                self.metrics.log_size.labels(topic, str(number)).set(replica.log.size_bytes)
                self.metrics.log_segments.labels(topic, str(number)).set(replica.log.segment_count)
                if replica.is_leader:
                    self.metrics.high_watermark.labels(topic, str(number)).set(
                        replica.high_watermark
                    )

    async def close(self) -> None:
        """A clean shutdown: every log synced and closed, then the broker-wide marker."""
        for key in list(self._followers):
            self._stop_follower(key)
        self._fetch_sessions.close_all()
        await self.syncer.close()
        for replica in self.replicas.values():
            replica.close()
        self.replicas.clear()
        self.syncer.close_journal()
        if self._transport is not None:
            await self._transport.close()
        if self.config.data_dir.exists():
            write_atomically(self.config.data_dir / CLEAN_SHUTDOWN_FILE, "")

    def _open_journal(self) -> Journal | None:
        """Replays what a crash left in the journal (storage/journal.py) into the
        partition logs, fsyncs them, deletes the old files durably; then a new journal when
        ``fsync=always`` and the journal is on. Before any replica opens."""
        directory = self.config.data_dir / JOURNAL_DIRECTORY
        opened: dict[str, PartitionLog] = {}

        def open_log(key: str) -> PartitionLog | None:
            path = self.config.data_dir / key
            if parse_partition_directory_name(key) is None or not path.is_dir():
                return None
            opened[key] = PartitionLog.open(path, self.config.log_config, _now_ms())
            return opened[key]

        def start_over(key: str, offset: int) -> PartitionLog:
            opened.pop(key).close(mark_clean=False)
            path = self.config.data_dir / key
            opened[key] = PartitionLog.recreate_empty(
                path, offset, self.config.log_config, _now_ms()
            )
            return opened[key]

        try:
            applied = replay(directory, open_log, _now_ms(), start_over)
        finally:
            for log_ in opened.values():
                log_.close(mark_clean=False)  # synced: the journal's files may go
        if applied:
            event(
                log,
                "journal_replayed",
                f"journal replay re-applied {sum(applied.values())} records "
                f"to {len(applied)} partition logs",
                logging.WARNING,
                records=sum(applied.values()),
                logs=len(applied),
            )
        # Oldest first, each unlink durable before the next (a stale journal replayed
        # later would undo history; a surviving suffix of the journal replays safely).
        for path in journal_files(directory):
            path.unlink()
            fsync_directory(directory)
        if not (self.config.journal and self.config.log_config.fsync is FsyncPolicy.ALWAYS):
            for path in spare_files(directory):  # a journal's spare: kept only for reuse
                path.unlink()
            return None
        return Journal.open(directory)  # deletes a spare a crash left

    def _consume_clean_shutdown_marker(self) -> bool:
        """True when this broker runs a weaker fsync policy than ``always`` and its last
        run did not end cleanly: an OS crash may have taken what it counted as durable.
        The marker is removed, so a crash of this run counts as unclean next time."""
        marker = self.config.data_dir / CLEAN_SHUTDOWN_FILE
        clean = marker.exists()
        marker.unlink(missing_ok=True)
        return not clean and self.config.log_config.fsync is not FsyncPolicy.ALWAYS


@dataclass(frozen=True)
class ReplicaFetch:
    broker_id: int
    topic_id: str
    leader_epoch: int
    offset: int
    last_fetched_epoch: int
    durable_offset: int
    wait_ms: int
    max_bytes: int


def _replica_entry(
    wanted: ReplicaFetchPartition,
    replica: PartitionReplica,
    diverging: tuple[int, int] | None,
    data: bytes = b"",
) -> ReplicaFetchEntry:
    log_ = replica.log
    return ReplicaFetchEntry(
        wanted.topic,
        wanted.partition,
        replica.high_watermark,
        log_.log_start_offset,
        log_.log_end_offset,
        diverging,
        None,
        data,
    )


def _replica_error_entry(wanted: ReplicaFetchPartition, error: TideError) -> ReplicaFetchEntry:
    return ReplicaFetchEntry(wanted.topic, wanted.partition, error=error.to_json()["error"])


def _moved_high_watermarks(
    followed: Iterable[tuple[ReplicaFetchPartition, PartitionReplica]],
) -> list[ReplicaFetchEntry]:
    """Entries for the partitions whose high watermark moved past what the follower
    knows (an answer that waited in vain says so, without a wake-up for it)."""
    return [
        _replica_entry(w, r, None)
        for w, r in followed
        if not r.closed
        and r.is_leader
        and r.leader_epoch == w.leader_epoch
        and min(r.high_watermark, w.offset) > w.high_watermark
    ]


def _tells_data(entry: ReplicaFetchEntry, session: FollowerSession) -> bool:
    """Whether ``entry`` says no more than "here are records and the high watermark"."""
    if entry.error is not None or entry.diverging is not None:
        return False
    held = session.partitions.get((entry.topic, entry.partition))
    return held is not None and entry.log_start_offset <= held.wanted.offset


def _session_header(answer: ReplicaAnswer) -> dict[str, str]:
    return {SESSION_HEADER: str(answer.session_id)} if answer.session_id else {}


class ReplicaAnswer(NamedTuple):
    entries: list[ReplicaFetchEntry]
    held_bytes: int  # batch bytes counted in flight until the answer is written
    session_id: int = 0  # the incremental session the leader holds now (0: none)


def _replica_assignment(assignment: control.PartitionAssignment) -> ReplicaAssignment:
    return ReplicaAssignment(
        leader_id=assignment.leader_id,
        leader_epoch=assignment.leader_epoch,
        partition_epoch=assignment.partition_epoch,
        replicas=tuple(assignment.replicas),
        isr=tuple(assignment.isr),
        min_insync_replicas=assignment.min_insync_replicas,
    )


def _log_recovery(replica: PartitionReplica) -> None:
    truncated = replica.log.recovered_truncated_bytes
    if truncated > 0:
        event(
            log,
            "log_truncated",
            f"{replica.topic}/{replica.partition}: recovery cut {truncated} bytes of torn tail",
            logging.WARNING,
            topic=replica.topic,
            partition=replica.partition,
            reason="recovery",
            truncated_bytes=truncated,
            log_end_offset=replica.log.log_end_offset,
        )


def _log_role(replica: PartitionReplica, assignment: control.PartitionAssignment) -> None:
    role = "leader" if replica.is_leader else "follower"
    event(
        log,
        "replica_role_changed",
        f"{replica.topic}/{replica.partition}: {role} at leader epoch {replica.leader_epoch}",
        topic=replica.topic,
        partition=replica.partition,
        role=role,
        leader_id=assignment.leader_id,
        leader_epoch=replica.leader_epoch,
        partition_epoch=assignment.partition_epoch,
        isr=assignment.isr,
    )


# ---- HTTP handlers -------------------------------------------------------------------


def _path_partition(request: web.Request) -> tuple[str, int]:
    topic = request.match_info["topic"]
    partition = check_int(request.match_info["partition"], "partition", minimum=0)
    return topic, partition


def _acks_parameter(request: web.Request) -> Acks:
    return parse_acks(request.query.get("acks", "all"))


def _optional_epoch(request: web.Request) -> int | None:
    raw = request.query.get("leader_epoch")
    return None if raw is None else check_int(raw, "leader_epoch", minimum=-1)


def _decode_text(raw: Any, encoding: str, what: str) -> bytes | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidRequest(f"{what} must be a string or null")
    if encoding == "base64":
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as error:
            raise InvalidRequest(f"{what} is not valid base64") from error
    return _utf8(raw, what)


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as error:  # a lone surrogate ("\ud800") is valid JSON
        raise InvalidRequest(f"{what} is not valid Unicode text") from error


def _json_records_to_batch(body: dict[str, Any], now_ms: int) -> bytes:
    encoding = body.get("encoding", "utf-8")
    if encoding not in ("utf-8", "base64"):
        raise InvalidRequest("encoding must be 'utf-8' or 'base64'")
    records = body.get("records")
    if not isinstance(records, list) or not records:
        raise InvalidRequest("records must be a non-empty list")
    if len(records) > 100_000:
        raise InvalidRequest("at most 100000 records per JSON request")
    pairs: list[tuple[bytes | None, bytes | None]] = []
    headers: list[list[tuple[str, bytes]] | None] = []
    for record in records:
        if not isinstance(record, dict):
            raise InvalidRequest("each record must be an object")
        pairs.append(
            (
                _decode_text(record.get("key"), encoding, "key"),
                _decode_text(record.get("value"), encoding, "value"),
            )
        )
        raw_headers = record.get("headers")
        raw_headers = {} if raw_headers is None else raw_headers  # false, [] are no headers
        if not isinstance(raw_headers, dict) or not all(
            isinstance(v, str) for v in raw_headers.values()
        ):
            raise InvalidRequest("headers must be an object of strings")
        for name in raw_headers:
            _utf8(name, "header name")
        headers.append([(k, _utf8(v, "header value")) for k, v in raw_headers.items()] or None)
    return build_batch(pairs, now_ms, headers)


def _json_records(data: bytes, offset: int, encoding: str, max_bytes: int) -> list[dict[str, Any]]:
    """Records as JSON objects, bounded by their *output* size (base64 and JSON escaping
    make text larger than the batches it comes from): at least one, then stop before
    ``max_bytes`` of keys, values and headers would be passed."""
    records: list[dict[str, Any]] = []
    size = 0
    for r in decode_records(data, min_offset=offset):
        key, value = _render(r.key, encoding), _render(r.value, encoding)
        headers = {name: _render(v, encoding) for name, v in r.headers}
        size += _JSON_RECORD_OVERHEAD + len(key or "") + len(value or "")
        size += sum(len(name) + len(text or "") for name, text in headers.items())
        if records and size > max_bytes:
            break
        records.append(
            {
                "offset": r.offset,
                "timestamp": r.timestamp,
                "key": key,
                "value": value,
                "headers": headers,
            }
        )
    return records


_JSON_RECORD_OVERHEAD = 80  # braces, field names, offset and timestamp digits


def _render(raw: bytes | None, encoding: str) -> str | None:
    if raw is None:
        return None
    if encoding == "base64":
        return base64.b64encode(raw).decode()
    return raw.decode("utf-8", errors="replace")


# /openapi.json's description of the parameters and JSON bodies the handlers read.
_PARTITION_PARAMETERS = [
    path_parameter("topic", NAME_SCHEMA),
    path_parameter("partition", int_schema(0)),
]
_EPOCH_PARAMETER = query_parameter("leader_epoch", int_schema(-1))
_ACKS_PARAMETER = query_parameter("acks", {"type": "string", "enum": ["0", "1", "all", "-1"]})
_FETCH_PARAMETERS = [
    query_parameter("offset", int_schema(0), required=True),
    query_parameter("max_bytes", int_schema(1, MAX_FETCH_BYTES)),
    query_parameter("wait_ms", int_schema(0, MAX_WAIT_MS)),
    query_parameter("encoding", {"type": "string", "enum": ["utf-8", "base64"]}),
]


def _records_schema(encoding: str, text: dict[str, Any]) -> dict[str, Any]:
    nullable_text = {"anyOf": [text, {"type": "null"}]}
    record = {
        "type": "object",
        "properties": {
            "key": nullable_text,
            "value": nullable_text,
            "headers": {
                "anyOf": [
                    {"type": "object", "additionalProperties": {"type": "string"}},
                    {"type": "null"},
                ]
            },
        },
    }
    return {
        "type": "object",
        "properties": {
            "encoding": {"const": encoding},
            "records": {"type": "array", "items": record, "minItems": 1, "maxItems": 100_000},
        },
        "required": ["records", "encoding"] if encoding == "base64" else ["records"],
    }


_BASE64 = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_JSON_RECORDS_SCHEMA = {
    "oneOf": [
        _records_schema("utf-8", {"type": "string"}),
        _records_schema("base64", {"type": "string", "pattern": _BASE64}),
    ]
}


def make_endpoints(broker: Broker) -> list[Endpoint]:
    async def produce(request: web.Request) -> web.Response:
        topic, partition = _path_partition(request)
        acks = _acks_parameter(request)
        epoch = _optional_epoch(request)
        if (
            request.content_length is not None
            and request.content_length > broker.config.max_request_bytes
        ):
            raise RequestTooLarge(
                f"body of {request.content_length} bytes exceeds {broker.config.max_request_bytes}"
            )
        with broker.admit_produce(request.content_length):
            return await produce_admitted(request, topic, partition, acks, epoch)

    async def produce_admitted(
        request: web.Request, topic: str, partition: int, acks: Acks, epoch: int | None
    ) -> web.Response:
        if request.content_type == "application/json":
            broker.leader_for(topic, partition, epoch)
            body = _json_records_to_batch(
                await read_json_object(request, broker.config.max_request_bytes), _now_ms()
            )
        else:
            body = await request.read()
        answer = await broker.produce(topic, partition, body, acks, epoch)
        return web.json_response(answer)

    async def _produce_many(acks: Acks, body: bytes) -> Reply:
        entries = decode_produce(body)
        if len(entries) == 1:  # the usual case at low rates: no task for one partition
            results = [await broker.produce_entry(entries[0], acks)]
        else:
            results = await asyncio.gather(
                *(broker.produce_entry(entry, acks) for entry in entries)
            )
        return Reply("application/json", msgspec.json.encode({"results": results}))

    async def produce_many_operation(query: Mapping[str, str], body: bytes) -> Reply:
        acks = parse_acks(query.get("acks", "all"))
        with broker.admit_produce(len(body)):
            return await _produce_many(acks, body)

    async def produce_many(request: web.Request) -> web.Response:
        acks = _acks_parameter(request)
        with broker.admit_produce(request.content_length):
            reply = await _produce_many(acks, await request.read())
        return web.Response(body=reply.body, content_type=reply.content_type)

    async def fetch(request: web.Request) -> web.StreamResponse:
        topic, partition = _path_partition(request)
        offset = query_int(request, "offset", minimum=0)
        max_bytes = query_int(request, "max_bytes", 1 << 20, minimum=1, maximum=MAX_FETCH_BYTES)
        wait_ms = query_int(request, "wait_ms", 0, minimum=0, maximum=MAX_WAIT_MS)
        epoch = _optional_epoch(request)
        data, replica = await broker.fetch(topic, partition, offset, max_bytes, wait_ms, epoch)
        headers = {
            "Tide-High-Watermark": str(replica.high_watermark),
            "Tide-Log-Start-Offset": str(replica.log.log_start_offset),
            "Tide-Log-End-Offset": str(replica.log.log_end_offset),
        }
        if BATCH_TYPE in request.headers.get("Accept", ""):
            return web.Response(body=data, content_type=BATCH_TYPE, headers=headers)
        encoding = request.query.get("encoding", "utf-8")
        if encoding not in ("utf-8", "base64"):
            raise InvalidRequest("encoding must be 'utf-8' or 'base64'")
        records = _json_records(data, offset, encoding, max_bytes)
        next_offset = records[-1]["offset"] + 1 if records else offset
        body = {
            "records": records,
            "high_watermark": replica.high_watermark,
            "next_offset": next_offset,
        }
        return web.json_response(body, headers=headers, dumps=json.dumps)

    async def fetch_many_operation(_: Mapping[str, str], body: bytes) -> Reply:
        entries = await broker.fetch_many(control.decode(body, FetchRequest))
        return Reply(FETCH_TYPE, encode_fetch(entries))

    async def fetch_many(request: web.Request) -> web.Response:
        reply = await fetch_many_operation(request.query, await request.read())
        return web.Response(body=reply.body, content_type=reply.content_type)

    async def replica_fetch(request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        partition = check_int(request.match_info["partition"], "partition", minimum=0)
        fetch = ReplicaFetch(
            broker_id=query_int(request, "broker_id", minimum=0),
            topic_id=request.query.get("topic_id", ""),
            leader_epoch=query_int(request, "leader_epoch", minimum=0),
            offset=query_int(request, "offset", minimum=0),
            last_fetched_epoch=query_int(request, "last_fetched_epoch", -1, minimum=-1),
            durable_offset=query_int(request, "durable_offset", 0, minimum=0),
            wait_ms=query_int(request, "wait_ms", 0, minimum=0, maximum=MAX_WAIT_MS),
            max_bytes=query_int(request, "max_bytes", 1 << 20, minimum=1, maximum=MAX_FETCH_BYTES),
        )
        data, headers = await broker.replica_fetch(topic, partition, fetch)
        return web.Response(body=data, content_type=BATCH_TYPE, headers=headers)

    async def replica_fetch_session(request: web.Request) -> web.StreamResponse:
        body = control.decode(
            await read_body(request, broker.config.max_request_bytes), ReplicaFetchRequest
        )
        answer = await broker.replica_fetch_session(body)
        # Written here, not by the server after the handler returns, so that the bytes
        # count as in flight until the connection took them (write drains).
        payload = encode_replica_fetch(answer.entries)
        response = web.StreamResponse(
            headers={"Content-Type": REPLICA_FETCH_TYPE, **_session_header(answer)}
        )
        response.content_length = len(payload)
        try:
            await response.prepare(request)
            await response.write(payload)
            await response.write_eof()
        except ConnectionError:
            pass  # the follower gave up (a new poll replaced this one): nothing to tell
        finally:
            broker.release_replica_bytes(answer.held_bytes)
        return response

    async def replica_fetch_operation(_: Mapping[str, str], body: bytes) -> Reply:
        if len(body) > broker.config.max_request_bytes:
            raise RequestTooLarge(f"body exceeds {broker.config.max_request_bytes} bytes")
        answer = await broker.replica_fetch_session(control.decode(body, ReplicaFetchRequest))
        # The bytes count as in flight until the channel has written the answer.
        return Reply(
            REPLICA_FETCH_TYPE,
            encode_replica_fetch(answer.entries),
            _session_header(answer) or None,
            done=lambda: broker.release_replica_bytes(answer.held_bytes),
        )

    async def offsets(request: web.Request) -> web.Response:
        topic, partition = _path_partition(request)
        replica = broker.leader_for(topic, partition, _optional_epoch(request))
        return web.json_response(
            {
                "log_start_offset": replica.log.log_start_offset,
                "high_watermark": replica.high_watermark,
                "log_end_offset": replica.log.log_end_offset,
                "leader_epoch": replica.leader_epoch,
            }
        )

    async def partitions(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "broker_id": broker.config.broker_id,
                "partitions": [r.stats() for r in broker.replicas.values()],
            }
        )

    base = "/v1/topics/{topic}/partitions/{partition}"
    # Served over the request channel too (service/channel.py): the hot paths.
    operations = [
        Operation("POST", "/v1/produce", produce_many_operation, CLIENTS),
        Operation("POST", "/v1/fetch", fetch_many_operation, CLIENTS),
        Operation(
            "POST", "/v1/replica/fetch", replica_fetch_operation, broker_self(body="broker_id")
        ),
    ]
    return [
        channel_endpoint(operations, broker.config.max_request_bytes),
        Endpoint(
            "POST",
            "/v1/produce",
            produce_many,
            "Append batches to several partitions led here; one result per entry",
            request_body={PRODUCE_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            parameters=[_ACKS_PARAMETER],
            responses={"200": "per-partition results", "400": "bad framing"},
            callers=CLIENTS,
        ),
        Endpoint(
            "POST",
            base + "/records",
            produce,
            "Append record batches (leader only)",
            request_body={
                BATCH_TYPE: {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": _JSON_RECORDS_SCHEMA},
            },
            parameters=[*_PARTITION_PARAMETERS, _ACKS_PARAMETER, _EPOCH_PARAMETER],
            responses={
                "200": "appended (or, for a retried idempotent batch, its original offsets)",
                "400": "bad batch",
                "404": "unknown topic",
                "409": "stale leader epoch, or an idempotent producer's sequence/epoch error",
                "421": "not leader",
                "413": "too large",
            },
            callers=CLIENTS,
        ),
        Endpoint(
            "GET",
            base + "/records",
            fetch,
            "Read record batches below the high watermark",
            parameters=[*_PARTITION_PARAMETERS, *_FETCH_PARAMETERS, _EPOCH_PARAMETER],
            responses={
                "200": "batches or JSON records",
                "404": "unknown topic or partition",
                "409": "stale leader epoch",
                "416": "offset out of range",
                "421": "not leader",
            },
            callers=CLIENTS,
        ),
        Endpoint(
            "POST",
            "/v1/fetch",
            fetch_many,
            "Long-poll several partitions led here at once; binary entries (PROTOCOL.md)",
            request_body={"application/json": {"schema": control.schema(FetchRequest)}},
            responses={"200": "entries with data or an error (none: nothing new)"},
            callers=CLIENTS,
        ),
        Endpoint(
            "GET",
            base + "/offsets",
            offsets,
            "Log start, high watermark, log end",
            parameters=[*_PARTITION_PARAMETERS, _EPOCH_PARAMETER],
            responses={
                "200": "OK",
                "404": "unknown topic or partition",
                "409": "stale leader epoch",
                "421": "not leader",
            },
            callers=ANY,
        ),
        Endpoint(
            "GET",
            "/v1/replica/{topic}/{partition}/records",
            replica_fetch,
            "Follower fetch (brokers only): log-end batches, divergence, high watermark",
            responses={
                "200": "batches (maybe none), or Tide-Diverging-End-Offset",
                "409": "fenced or unknown leader epoch",
                "421": "not leader, or the caller is not a follower",
            },
            callers=broker_self(query="broker_id"),
        ),
        Endpoint(
            "POST",
            "/v1/replica/fetch",
            replica_fetch_session,
            "Replica fetch session (brokers only): every partition a follower follows here, "
            "one long-poll; binary entries (PROTOCOL.md)",
            request_body={"application/json": {"schema": control.schema(ReplicaFetchRequest)}},
            responses={"200": "entries with data, a divergence, a log start or an error"},
            callers=broker_self(body="broker_id"),
        ),
        Endpoint(
            "GET", "/v1/partitions", partitions, "Partition replicas on this broker", callers=ANY
        ),
    ]


def create_app(broker: Broker, registry: CollectorRegistry) -> web.Application:
    return build_app(
        f"tidemq broker {broker.config.broker_id}",
        make_endpoints(broker),
        registry,
        is_ready=lambda: broker.registered,
        max_body_bytes=broker.config.max_request_bytes,
    )
