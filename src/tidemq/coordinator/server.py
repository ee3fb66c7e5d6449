"""The coordinator's HTTP shell: decodes requests, feeds :mod:`tidemq.core`, persists.

Owns: the coordinator endpoints of docs/PROTOCOL.md ("Coordinator API"), the
background tick (broker session expiry, failover, ISR expansion, rebalancing moves,
group member expiry) and the coordinator's Prometheus metrics.

Must always hold:

* every change of durable state is a command, checked, committed to the store and only
  then applied in memory and answered (persist before reply);
* writers are serialized by one lock held from the check to the apply, so the state a
  command was checked against is the state it is applied to;
* soft state (broker sessions and reports, group membership) never reaches the store;
* group membership changes (heartbeat, leave, expiry) also take the write lock, so an
  offset commit is checked against ownership and epoch under the lock that persists and
  applies it, and no grant can slip between its check and its apply;
* offset commits are group-committed: every commit waiting for the lock is checked,
  persisted in one transaction (one fsync) and applied by whichever request gets the
  lock first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector

from tidemq.coordinator.events import log_committed
from tidemq.coordinator.metrics import ClusterCollector, CoordinatorMetrics
from tidemq.coordinator.store import CommandStore
from tidemq.core.groups import (
    ConsumerGroup,
    HeartbeatResult,
    TopicPartition,
    recover_until_ms,
)
from tidemq.core.metadata import (
    AllocateProducerId,
    AlterIsr,
    CancelReassignment,
    ChangeIsr,
    ChangeLeader,
    ClusterState,
    Command,
    CommitOffsets,
    CompleteReassignment,
    CreateTopic,
    DeleteGroup,
    DeleteTopic,
    InitCluster,
    Liveness,
    PartitionReport,
    ReassignReplicas,
    RecordGroupSession,
    RegisterBroker,
    SetBrokerDraining,
    TopicState,
    check_bounds,
    check_group_room,
    plan_failover,
    plan_reelection,
    remembers_group,
)
from tidemq.core.placement import place_partitions
from tidemq.core.rebalance import RebalanceLimits, plan_rebalance
from tidemq.errors import (
    ClusterIdMismatch,
    ClusterStateConflict,
    InvalidRequest,
    InvariantViolation,
    NoBrokersAvailable,
    TideError,
    TopicExists,
    Unavailable,
    UnknownBroker,
    UnknownGroup,
    UnknownTopic,
)
from tidemq.logs import event
from tidemq.service.app import build_app
from tidemq.service.callers import ANY, CLIENTS, broker_self
from tidemq.service.http import (
    NAME_SCHEMA,
    Endpoint,
    check_int,
    check_name,
    int_schema,
    path_parameter,
    read_json_object,
)
from tidemq.tls import TlsFiles
from tidemq.wire import control

log = logging.getLogger(__name__)

REQUEST_BYTES_MAX = 1 << 20
# A broker's heartbeat lists every replica it holds (~150 bytes each).
BROKER_HEARTBEAT_BYTES_MAX = 8 << 20
MAX_PARTITIONS_PER_TOPIC = 10_000
MAX_REPLICATION_FACTOR = 100
BROKER_ID_MAX = (1 << 31) - 1
URL_CHARS_MAX = 2000
GROUP_SESSION_TIMEOUT_MS_DEFAULT = 10_000
GROUP_SESSION_TIMEOUT_MS_MIN = 100
# A group's largest session timeout is also how long it recovers after a coordinator
# restart (partitions do not move, commits wait), and that bound never shrinks.
GROUP_SESSION_TIMEOUT_MS_MAX = 300_000
# Offset commits waiting for the next group commit; more are refused (503, retriable).
OFFSET_COMMITS_PENDING_MAX = 10_000
# Group heartbeats and leaves waiting for (or holding) the write lock: past this, a
# retriable 503 (a client that retries after a timeout adds a waiter each time, and
# aiohttp does not cancel the abandoned one).
GROUP_REQUESTS_WAITING_MAX = 10_000
# Creating a topic under the name of one deleted so recently that a broker still holds
# its data waits this long for the brokers to drop it (their next heartbeat), then
# answers 503 (retriable).
DELETED_TOPIC_WAIT_S = 5.0
DELETED_TOPIC_POLL_S = 0.05
DROPPING_NAMES_MAX = 10_000
JSON_BODY = {"application/json": {"schema": {"type": "object"}}}


@dataclass(frozen=True)
class CoordinatorConfig:
    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    advertised_url: str | None = None
    tls: TlsFiles = field(default_factory=TlsFiles)
    plain_http: bool = False
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    default_partitions: int = 12
    default_replication_factor: int = 2
    snapshot_every: int = 1000
    # A broker dead this long (past its session) has its replicas re-created on live
    # brokers: a new follower copies each partition from its leader.
    replica_replacement_ms: int = 60_000
    rebalance_moves_max: int = 4  # partition moves in flight at once; 0: no rebalancing
    rebalance_moves_per_broker_max: int = 2  # moves adding to or removing from one broker
    # False: one transaction per offset commit (only to measure what group commit buys)
    offset_group_commit: bool = True

    @property
    def url(self) -> str:
        scheme = "http" if self.plain_http else "https"
        return self.advertised_url or f"{scheme}://{self.host}:{self.port}"


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Coordinator:
    """One coordinator: state, store, soft state and the endpoints over them."""

    def __init__(
        self,
        config: CoordinatorConfig,
        state: ClusterState,
        store: CommandStore,
        clock_ms: Callable[[], int] = monotonic_ms,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.clock_ms = clock_ms
        self.new_id = new_id
        self.liveness = Liveness(config.session_timeout_ms)
        now_ms = clock_ms()
        for broker_id in state.brokers:  # a fresh session for every known broker
            self.liveness.start_session(broker_id, now_ms)
        self.groups: dict[str, ConsumerGroup] = {}
        # Per deleted topic name: the brokers that held replicas of it and have not
        # yet sent a heartbeat without it (soft state; see _until_dropped).
        self.dropping: dict[str, set[int]] = {}
        self.heard: set[int] = set()  # brokers that heartbeated since this start
        self.rejected_brokers: dict[int, str] = {}  # broker id -> the cluster id it has
        # Group recovery after this start: each group's session bound as persisted by
        # earlier runs (bounds raised from now on concern members we will know).
        self.started_ms = now_ms
        self.recovery_bounds_ms = dict(state.group_session_ms)
        self._pending_commits: list[_PendingCommit] = []
        self._group_requests_waiting = 0
        self.ready = False
        self._write_lock = asyncio.Lock()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds
        self.metrics = CoordinatorMetrics(self.registry)
        self.collector = ClusterCollector(self, clock_ms)
        self.registry.register(self.collector)

    # -- lifecycle --

    async def start(self) -> None:
        if not self.state.cluster_id:
            await self.commit([InitCluster(self.new_id())])
        self.ready = True

    def app(self) -> web.Application:
        return build_app(
            "tidemq coordinator",
            self.endpoints(),
            self.registry,
            lambda: self.ready,
            BROKER_HEARTBEAT_BYTES_MAX,
        )

    async def tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_ms / 1000)
            await self.tick()

    async def tick(self) -> None:
        """Expires broker sessions and group members; repairs leaders and ISRs."""
        now_ms = self.clock_ms()
        for broker_id in self.liveness.expire(now_ms):
            event(
                log,
                "broker_declared_dead",
                f"broker {broker_id} missed its session of {self.config.session_timeout_ms} ms",
                logging.WARNING,
                broker_id=broker_id,
            )
        await self.reconcile()
        self.collector.sample_high_watermarks()
        async with self._write_lock:
            for name in list(self.groups):
                epoch_before = self.groups[name].group_epoch
                for member_id in self.groups[name].expire(now_ms):
                    log.info("group %s: member %s session expired", name, member_id)
                self.metrics.group_changed(name, epoch_before, self.groups[name].group_epoch)
                if not self.groups[name].members:
                    del self.groups[name]

    # -- writing --

    async def commit(self, commands: list[Command]) -> list[Any]:
        async with self._write_lock:
            return await self._commit_locked(commands)

    @property
    def write_lock(self) -> asyncio.Lock:
        return self._write_lock

    async def commit_locked(self, commands: list[Command]) -> list[Any]:
        """For a caller that planned ``commands`` under :attr:`write_lock` and holds it."""
        return await self._commit_locked(commands)

    async def _commit_locked(self, commands: list[Command]) -> list[Any]:
        """Check, persist (one transaction), then apply. Caller holds the write lock.

        A batch holds independent commands (at most one per partition), so checking
        each against the current state is checking it against the state it meets; an
        apply that fails after the commit is a bug and stops the process.
        """
        if not commands:
            return []
        check_bounds(self.state, commands)
        for command in commands:
            self.state.check(command)
        await self.store.append(commands)  # snapshots are written on the store's thread
        results = []
        for command in commands:
            self.metrics.before_apply(self.state, command)
            log_committed(self.state, command)
            results.append(self._apply_committed(command))
        return results

    def _apply_committed(self, command: Command) -> Any:
        try:
            return self.state.apply(command)
        except TideError as error:
            raise InvariantViolation(f"committed command {command} does not apply") from error

    async def reconcile(self) -> None:
        """Failover first, then the next steps of rebalancing moves, each from the
        state the last left. (ISR expansion is the leaders' job: they propose it with
        AlterIsr once a follower caught up.)"""
        async with self._write_lock:
            # Each committed command is logged as an event (coordinator/events.py).
            live = self.live_brokers()
            await self._commit_locked(plan_failover(self.state, live))
            replace = self.liveness.dead_for(self.clock_ms(), self.config.replica_replacement_ms)
            moves = plan_rebalance(self.state, live, self.rebalance_limits(), replace)
            self._log_moves(moves)
            await self._commit_locked(moves)

    async def alter_isr(self, request: control.AlterIsrRequest, broker_id: int) -> Any:
        command = AlterIsr(
            request.topic,
            request.partition,
            broker_id,
            request.leader_epoch,
            request.partition_epoch,
            tuple(request.isr),
        )
        async with self._write_lock:
            topic = self.state.topic(request.topic)
            if request.topic_id and request.topic_id != topic.topic_id:
                raise UnknownTopic(f"topic {request.topic!r} has another id now")
            [partition] = await self._commit_locked([command])  # logged as isr_changed
        return partition

    def check_cluster_id(self, broker_id: int, cluster_id: str) -> None:
        """A broker that joined another cluster is refused, loudly, and keeps its data."""
        if cluster_id and cluster_id != self.state.cluster_id:
            message = (
                f"broker {broker_id} belongs to cluster {cluster_id}, this coordinator "
                f"runs cluster {self.state.cluster_id}: refused (was the coordinator's "
                "data directory replaced?)"
            )
            self.rejected_brokers[broker_id] = cluster_id
            log.error("%s", message)
            raise ClusterIdMismatch(message)
        self.rejected_brokers.pop(broker_id, None)

    def rebalance_limits(self) -> RebalanceLimits:
        return RebalanceLimits(
            moves_in_flight_max=self.config.rebalance_moves_max,
            moves_per_broker_max=self.config.rebalance_moves_per_broker_max,
        )

    def _log_moves(self, commands: list[Command]) -> None:
        """One log line per step of a partition move (called before they apply)."""
        for command in commands:
            line = _move_step(self.state, command)
            if line is not None:
                log.info("%s", line)

    async def set_draining(self, broker_id: int, draining: bool) -> None:
        """Marks a broker draining (or not), then lets the planner start at once."""
        async with self._write_lock:
            if broker_id not in self.state.brokers:
                raise UnknownBroker(f"broker {broker_id} is not registered")
            if (broker_id in self.state.draining) != draining:
                await self._commit_locked([SetBrokerDraining(broker_id, draining)])
                log.info("broker %s %s", broker_id, "draining" if draining else "undrained")
        await self.reconcile()

    async def create_topic(
        self,
        name: str,
        partitions: int,
        replication_factor: int | None,
        min_insync_replicas: int | None = None,
    ) -> TopicState:
        await self._until_dropped(name)
        async with self._write_lock:
            if name in self.state.topics:
                raise TopicExists(f"topic {name!r} exists")
            lingering = self.lingering(name)
            if lingering:
                raise Unavailable(
                    f"topic {name!r} was deleted and broker(s) {lingering} still hold "
                    f"its data: retry once they have dropped it (about a heartbeat)"
                )
            live = sorted(self.live_brokers() - self.state.draining)
            if not live:
                raise NoBrokersAvailable("no live, undrained broker to place partitions on")
            if replication_factor is None:
                replication_factor = min(self.config.default_replication_factor, len(live))
            load, leaders = self.state.replica_load()
            hint = zlib.crc32(name.encode())
            placement = place_partitions(partitions, replication_factor, live, load, hint, leaders)
            assignments = tuple(tuple(replicas) for replicas in placement)
            if min_insync_replicas is None:
                min_insync_replicas = 2 if replication_factor >= 3 else 1
            command = CreateTopic(
                name,
                partitions,
                replication_factor,
                assignments,
                self.new_id(),
                min_insync_replicas,
            )
            await self._commit_locked([command])
            log.info(
                "topic %s created: id %s, %s partitions, replication factor %s",
                name,
                command.topic_id,
                partitions,
                replication_factor,
            )
            return self.state.topic(name)

    async def delete_topic(self, name: str) -> None:
        async with self._write_lock:
            held = {b for p in self.state.topic(name).partitions for b in p.replicas}
            await self._commit_locked([DeleteTopic(name)])
            self.dropping.pop(name, None)
            self.dropping[name] = held
            for oldest in list(self.dropping)[:-DROPPING_NAMES_MAX]:  # brokers dead for good
                del self.dropping[oldest]

    def note_reports(self, broker_id: int, topics: set[str]) -> None:
        """A broker's heartbeat named replicas of ``topics``: it has dropped every
        deleted topic it no longer names."""
        for name in [name for name, held in self.dropping.items() if broker_id in held]:
            if name not in topics:
                self.dropping[name].discard(broker_id)
                if not self.dropping[name]:
                    del self.dropping[name]

    def lingering(self, name: str) -> list[int]:
        """Live brokers that may still hold a deleted topic ``name``'s data: those that
        held its replicas and have not heartbeated without it since the deletion, and
        any whose last heartbeat reported it."""
        alive = self.liveness.alive_ids()
        held = self.dropping.get(name, set()) & alive
        if name in self.state.recreated_epochs:  # deleted once, maybe before this start:
            held |= alive - self.heard  # a broker not heard from since may hold it
        return sorted(held | set(self.liveness.hosting(name)))

    async def _until_dropped(self, name: str) -> None:
        """Waits (up to DELETED_TOPIC_WAIT_S, without the write lock) until no live
        broker may hold a deleted incarnation of topic ``name``: a broker learns of a
        deletion at its next heartbeat, and until then it would take requests that
        name no leader epoch (REST clients) for the new topic into the old log, which
        it then deletes, acknowledged writes and all. Kafka refuses to create a topic
        marked for deletion."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DELETED_TOPIC_WAIT_S
        while name not in self.state.topics and self.lingering(name):
            if loop.time() >= deadline:
                return  # create_topic answers Unavailable (retriable)
            await asyncio.sleep(DELETED_TOPIC_POLL_S)

    # -- consumer groups --

    def group(self, name: str) -> ConsumerGroup:
        """The group's live state, or a new one (not registered yet). A group new in
        memory recovers until its persisted session bound has passed since this
        coordinator started: members it forgot may still be fetching until then."""
        group = self.groups.get(name)
        if group is None:
            bound_ms = self.recovery_bounds_ms.get(name, 0)
            until_ms = recover_until_ms(self.started_ms, bound_ms)
            group = ConsumerGroup(name, recover_until_ms=until_ms)
        return group

    async def group_heartbeat(
        self,
        name: str,
        member_id: str | None,
        member_epoch: int,
        topics: list[str],
        owned: list[TopicPartition],
        session_timeout_ms: int,
    ) -> HeartbeatResult:
        async with self._group_lock():
            group = self.group(name)
            now_ms = self.clock_ms()  # one time for the check and the heartbeat
            # A refused heartbeat persists nothing (a late one of a deleted group's
            # member would bring the group back): judged before the session bound.
            group.check_heartbeat(member_id, member_epoch, owned, now_ms)
            if session_timeout_ms > self.state.group_session_ms.get(name, 0):
                if not remembers_group(self.state, name):
                    check_group_room(self.state, [name])
                # persisted before any member may rely on it (see core.groups)
                await self._commit_locked([RecordGroupSession(name, session_timeout_ms)])
            epoch_before = group.group_epoch
            result = group.heartbeat(
                member_id,
                member_epoch,
                topics,
                owned,
                now_ms,
                _PartitionCounts(self.state.topics),
                self.new_id(),
                session_timeout_ms,
            )
            self.groups.setdefault(name, group)
            self.metrics.group_changed(name, epoch_before, group.group_epoch)
            return result

    async def group_leave(self, name: str, member_id: str) -> None:
        async with self._group_lock():
            group = self.groups.get(name)
            if group is not None:
                epoch_before = group.group_epoch
                group.leave(member_id)
                self.metrics.group_changed(name, epoch_before, group.group_epoch)
                if not group.members:
                    del self.groups[name]

    async def delete_group(self, name: str) -> None:
        """Forgets a group's committed offsets and session bound; refused while it has
        a member, or may have one this coordinator has not heard from since it started
        (it is recovering: retry once the group's session bound has passed)."""
        async with self._group_lock():
            group = self.group(name)
            if group.members:
                raise ClusterStateConflict(
                    f"group {name!r} has {len(group.members)} member(s): stop them first"
                )
            now_ms = self.clock_ms()
            if group.recovering(now_ms):
                raise Unavailable(
                    f"group {name!r} may have members from before the coordinator "
                    f"restarted (for {group.recover_until_ms - now_ms} ms more): retry"
                )
            if not remembers_group(self.state, name):
                raise UnknownGroup(f"no group {name!r}")
            await self._commit_locked([DeleteGroup(name)])
            self.groups.pop(name, None)
            self.recovery_bounds_ms.pop(name, None)
            self.metrics.group_deleted(name)

    @contextlib.asynccontextmanager
    async def _group_lock(self) -> AsyncIterator[None]:
        """The write lock for a heartbeat or leave, at most
        ``GROUP_REQUESTS_WAITING_MAX`` of them waiting or holding it at once."""
        if self._group_requests_waiting >= GROUP_REQUESTS_WAITING_MAX:
            raise Unavailable(
                f"{GROUP_REQUESTS_WAITING_MAX} group heartbeats and leaves are waiting: retry"
            )
        self._group_requests_waiting += 1
        try:
            async with self._write_lock:
                yield
        finally:
            self._group_requests_waiting -= 1

    async def commit_offsets(
        self,
        name: str,
        member_id: str | None,
        member_epoch: int | None,
        offsets: tuple[tuple[str, int, int], ...],
    ) -> int:
        """Queues the commit and joins the next group commit (see the module doc)."""
        if len(self._pending_commits) >= OFFSET_COMMITS_PENDING_MAX:
            raise Unavailable(f"{OFFSET_COMMITS_PENDING_MAX} offset commits are pending: retry")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = _PendingCommit(CommitOffsets(name, offsets), member_id, member_epoch, future)
        self._pending_commits.append(entry)
        try:
            async with self._write_lock:
                if not entry.future.done():
                    await self._commit_pending_offsets(
                        None if self.config.offset_group_commit else entry
                    )
        except asyncio.CancelledError:
            entry.future.cancel()
            raise
        return await entry.future

    async def _commit_pending_offsets(self, only: _PendingCommit | None = None) -> None:
        """Checks every pending commit (or ``only`` that one), persists the valid ones
        in one transaction, applies them and answers each. Caller holds the write lock."""
        if only is None:
            batch, self._pending_commits = self._pending_commits, []
        else:
            self._pending_commits.remove(only)
            batch = [only]
        now_ms = self.clock_ms()
        accepted: list[_PendingCommit] = []
        new_groups: set[str] = set()  # the batch's groups the state does not remember
        for entry in batch:
            if entry.future.done():  # its request was cancelled
                continue
            command = entry.command
            new = not remembers_group(self.state, command.group)
            try:
                partitions = [(topic, partition) for topic, partition, _ in command.offsets]
                self.group(command.group).validate_commit(
                    entry.member_id, entry.member_epoch, partitions, now_ms
                )
                self.state.check(command)
                if new:
                    check_group_room(self.state, new_groups | {command.group})
            except TideError as error:
                entry.future.set_exception(error)
                continue
            accepted.append(entry)
            if new:
                new_groups.add(command.group)
        try:
            results = await self._commit_locked([entry.command for entry in accepted])
        except Exception as error:
            for entry in accepted:
                if not entry.future.done():
                    entry.future.set_exception(error)
            return
        for entry, result in zip(accepted, results, strict=True):
            if not entry.future.done():
                entry.future.set_result(result)

    # -- reading --

    def live_brokers(self) -> set[int]:
        return self.liveness.alive_ids() & set(self.state.brokers)

    def topic_json(self, topic: TopicState) -> dict[str, Any]:
        return {
            "name": topic.name,
            "topic_id": topic.topic_id,
            "replication_factor": topic.replication_factor,
            "min_insync_replicas": topic.min_insync_replicas,
            "partitions": [
                self.partition_json(topic.name, index) for index in range(len(topic.partitions))
            ],
        }

    def partition_json(self, topic: str, index: int) -> dict[str, Any]:
        partition = self.state.partition(topic, index)
        leader = partition.leader_id
        move = self.state.reassignments.get((topic, index))
        return {
            "partition": index,
            "leader_id": leader,
            "leader_url": None if leader is None else self.state.brokers.get(leader),
            "leader_epoch": partition.leader_epoch,
            "partition_epoch": partition.partition_epoch,
            "replicas": list(partition.replicas),
            "isr": list(partition.isr),
            "adding_replicas": [] if move is None else list(move.adding),
            "removing_replicas": [] if move is None else list(move.removing),
        }

    def brokers_json(self) -> list[dict[str, Any]]:
        replicas, leaders = self.state.replica_load()
        return [
            {
                "id": broker_id,
                "url": url,
                "alive": self.liveness.is_alive(broker_id),
                "partitions": replicas.get(broker_id, 0),
                "leaders": leaders.get(broker_id, 0),
                "draining": broker_id in self.state.draining,
            }
            for broker_id, url in sorted(self.state.brokers.items())
        ]

    def reassignments_json(self) -> dict[str, Any]:
        moves = []
        for (topic, index), move in sorted(self.state.reassignments.items()):
            partition = self.state.partition(topic, index)
            moves.append(
                {
                    "topic": topic,
                    "partition": index,
                    "from": list(move.original),
                    "to": list(move.target),
                    "adding": list(move.adding),
                    "removing": list(move.removing),
                    "replicas": list(partition.replicas),
                    "isr": list(partition.isr),
                    "leader_id": partition.leader_id,
                    "step": _step_name(move.target, partition.isr, partition.leader_id),
                }
            )
        return {"draining": sorted(self.state.draining), "reassignments": moves}

    def high_watermark(self, topic: str, partition: int) -> int | None:
        """The high watermark the partition's leader last reported, if any."""
        topic_state = self.state.topics.get(topic)
        if topic_state is None or not 0 <= partition < len(topic_state.partitions):
            return None
        leader = topic_state.partitions[partition].leader_id
        report = None if leader is None else self.liveness.report(leader, topic, partition)
        return None if report is None else report.high_watermark

    def endpoints(self) -> list[Endpoint]:
        return _Handlers(self).endpoints()


def _step_name(target: tuple[int, ...], isr: list[int], leader_id: int | None) -> str:
    if any(broker not in isr for broker in target):
        return "copying"
    return "moving_leader" if leader_id not in target else "dropping"


@dataclass
class _PendingCommit:
    command: CommitOffsets
    member_id: str | None
    member_epoch: int | None
    future: asyncio.Future[int]


class _PartitionCounts(Mapping[str, int]):
    """Partition counts read lazily: a group heartbeat looks up only its own topics."""

    def __init__(self, topics: Mapping[str, TopicState]) -> None:
        self._topics = topics

    def __getitem__(self, name: str) -> int:
        return len(self._topics[name].partitions)

    def __iter__(self) -> Iterator[str]:
        return iter(self._topics)

    def __len__(self) -> int:
        return len(self._topics)


def _move_step(state: ClusterState, command: Command) -> str | None:
    """A log line for a command that is a step of a partition move, else None."""
    steps = (ReassignReplicas, ChangeIsr, ChangeLeader, CompleteReassignment, CancelReassignment)
    if not isinstance(command, steps):
        return None
    key = (command.topic, command.partition)
    move = state.reassignments.get(key)
    where = f"move {key[0]}/{key[1]}"
    if isinstance(command, ReassignReplicas):
        old = state.partition(*key).replicas
        added = [b for b in command.replicas if b not in old]
        return f"{where}: start {old} -> {list(command.replicas)}, adding {added}"
    if move is None:
        return None
    if isinstance(command, ChangeIsr):
        return f"{where}: isr now {list(command.isr)} (waiting for {list(move.target)})"
    if isinstance(command, ChangeLeader):
        old_leader = state.partition(*key).leader_id
        return f"{where}: leadership {old_leader} -> {command.leader_id}"
    if isinstance(command, CompleteReassignment):
        return f"{where}: done, dropped {list(move.removing)}, replicas {list(move.target)}"
    if isinstance(command, CancelReassignment):
        return f"{where}: cancelled, replicas back to {list(move.original)}"
    return None


# --- request parsing (pure helpers) -------------------------------------------------


def _field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise InvalidRequest(f"field {name!r} is required")
    return body[name]


def _list(raw: Any, name: str, limit: int) -> list[Any]:
    if not isinstance(raw, list):
        raise InvalidRequest(f"{name} must be a list")
    if len(raw) > limit:
        raise InvalidRequest(f"{name} holds more than {limit} entries")
    return raw


def _object(raw: Any, name: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"each {name} entry must be an object")
    return raw


def _member_id(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not 1 <= len(raw) <= 200:
        raise InvalidRequest("member_id must be null or a string of 1 to 200 characters")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): not text any client reads back
        raise InvalidRequest("member_id must be valid Unicode text") from None
    return raw


def _topic_partitions(raw: Any, name: str) -> list[tuple[str, int]]:
    out = []
    for entry in _list(raw, name, 1_000_000):
        entry = _object(entry, name)
        topic = check_name(_field(entry, "topic"), "topic")
        out.append((topic, check_int(_field(entry, "partition"), "partition", 0)))
    return out


def _topic_list(raw: str | None) -> list[str] | None:
    if raw is None or raw == "":
        return None
    return [check_name(name, "topic") for name in raw.split(",")]


def _query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"{name} must be true or false, got {raw!r}")
    return raw in ("true", "1")


def _report(entry: control.PartitionReport) -> tuple[tuple[str, int], PartitionReport]:
    report = PartitionReport(
        leader_epoch=entry.leader_epoch,
        log_start_offset=entry.log_start_offset,
        log_end_offset=entry.log_end_offset,
        high_watermark=entry.high_watermark,
    )
    return (entry.topic, entry.partition), report


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def _message(message: Any) -> web.Response:
    return web.Response(body=control.encode(message), content_type="application/json")


def _schema_body(kind: Any) -> dict[str, Any]:
    return {"application/json": {"schema": control.schema(kind)}}


# --- handlers -----------------------------------------------------------------------


class _Handlers:
    """One method per endpoint: decode, call the coordinator, encode."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def endpoints(self) -> list[Endpoint]:
        created = {
            "201": "created",
            "409": "topic_exists, or cluster_state_conflict (more replicas than live brokers)",
            "503": "no_brokers_available",
        }
        return [
            Endpoint(
                "POST",
                "/v1/brokers/register",
                self.register_broker,
                "Register a broker (again)",
                _schema_body(control.BrokerRegistration),
                responses={"200": "OK", "409": "cluster_id_mismatch"},
                callers=broker_self(body="broker_id"),
            ),
            Endpoint(
                "POST",
                "/v1/brokers/{broker_id}/heartbeat",
                self.broker_heartbeat,
                "Broker heartbeat: reports in, assignments out",
                _schema_body(control.BrokerHeartbeat),
                parameters=[_BROKER_ID_PARAMETER],
                responses={"200": "OK", "404": "unknown_broker", "409": "cluster_id_mismatch"},
                callers=broker_self(path="broker_id"),
            ),
            Endpoint(
                "POST",
                "/v1/brokers/{broker_id}/alter-isr",
                self.alter_isr,
                "A leader proposes an ISR change (compare-and-set on both epochs)",
                _schema_body(control.AlterIsrRequest),
                parameters=[_BROKER_ID_PARAMETER],
                responses={
                    "200": "applied",
                    "409": "stale_partition_epoch",
                    "421": "not_leader",
                },
                callers=broker_self(path="broker_id"),
            ),
            Endpoint(
                "GET", "/v1/brokers", self.list_brokers, "Brokers and their liveness", callers=ANY
            ),
            Endpoint("GET", "/v1/cluster", self.describe_cluster, "Cluster overview", callers=ANY),
            Endpoint(
                "POST",
                "/v1/brokers/{broker_id}/drain",
                self.drain_broker,
                "Move every replica off a broker (scale-in)",
                parameters=[_BROKER_ID_PARAMETER],
                responses={
                    "200": "OK",
                    "404": "unknown_broker",
                    "409": "cluster_state_conflict (too few brokers would stay)",
                },
                callers=CLIENTS,
            ),
            Endpoint(
                "POST",
                "/v1/brokers/{broker_id}/undrain",
                self.undrain_broker,
                "Stop draining a broker; it takes a fair share again",
                parameters=[_BROKER_ID_PARAMETER],
                responses={"200": "OK", "404": "unknown_broker"},
                callers=CLIENTS,
            ),
            Endpoint(
                "GET",
                "/v1/reassignments",
                self.list_reassignments,
                "Partition moves in progress and draining brokers",
                callers=ANY,
            ),
            Endpoint(
                "POST",
                "/v1/topics",
                self.create_topic,
                "Create a topic",
                _schema_body(control.CreateTopicRequest),
                responses=created,
                callers=CLIENTS,
            ),
            Endpoint("GET", "/v1/topics", self.list_topics, "Every topic", callers=ANY),
            Endpoint(
                "GET",
                "/v1/topics/{name}",
                self.describe_topic,
                "One topic",
                parameters=[_NAME_PARAMETER],
                responses={"200": "OK", "404": "unknown_topic"},
                callers=ANY,
            ),
            Endpoint(
                "DELETE",
                "/v1/topics/{name}",
                self.delete_topic,
                "Delete a topic",
                parameters=[_NAME_PARAMETER],
                responses={"200": "OK", "404": "unknown_topic"},
                callers=CLIENTS,
            ),
            Endpoint(
                "GET",
                "/v1/metadata",
                self.metadata,
                "Brokers and topics for clients",
                parameters=_METADATA_PARAMETERS,
                responses={"200": "OK", "404": "unknown_topic (auto_create false)"},
                callers=CLIENTS,
            ),
            Endpoint(
                "POST",
                "/v1/producers",
                self.allocate_producer,
                "Allocate an idempotent producer id",
                _schema_body(control.AllocateProducerRequest),
                callers=CLIENTS,
            ),
            Endpoint(
                "POST",
                "/v1/groups/{group}/heartbeat",
                self.group_heartbeat,
                "Consumer group member heartbeat",
                _schema_body(control.GroupHeartbeatRequest),
                parameters=[_GROUP_PARAMETER],
                responses={
                    "200": "OK",
                    "409": "fenced_member",
                    "503": "unavailable: too many group requests waiting (retry)",
                },
                callers=CLIENTS,
            ),
            Endpoint(
                "POST",
                "/v1/groups/{group}/leave",
                self.group_leave,
                "Leave a consumer group",
                _schema_body(control.GroupLeaveRequest),
                parameters=[_GROUP_PARAMETER],
                responses={
                    "200": "OK",
                    "503": "unavailable: too many group requests waiting (retry)",
                },
                callers=CLIENTS,
            ),
            Endpoint(
                "POST",
                "/v1/groups/{group}/offsets",
                self.commit_offsets,
                "Commit offsets",
                _schema_body(control.CommitOffsetsRequest),
                parameters=[_GROUP_PARAMETER],
                responses={
                    "200": "OK",
                    "404": "unknown_topic",
                    "409": "fenced_member, or stale_member_epoch (resend with the current epoch)",
                    "503": "unavailable: the group is recovering, or too many commits pending",
                },
                callers=CLIENTS,
            ),
            Endpoint(
                "GET",
                "/v1/groups/{group}/offsets",
                self.fetch_offsets,
                "Committed offsets",
                parameters=[_GROUP_PARAMETER, _TOPICS_PARAMETER],
                callers=ANY,
            ),
            Endpoint("GET", "/v1/groups", self.list_groups, "Consumer groups", callers=ANY),
            Endpoint(
                "GET",
                "/v1/groups/{group}",
                self.describe_group,
                "Members, offsets and lag of a group",
                parameters=[_GROUP_PARAMETER],
                responses={"200": "OK", "404": "unknown_group"},
                callers=ANY,
            ),
            Endpoint(
                "DELETE",
                "/v1/groups/{group}",
                self.delete_group,
                "Forget a group's committed offsets (it must have no members)",
                parameters=[_GROUP_PARAMETER],
                responses={
                    "200": "OK",
                    "404": "unknown_group",
                    "409": "cluster_state_conflict (the group has members)",
                    "503": "unavailable: the group is recovering after a restart (retry)",
                },
                callers=CLIENTS,
            ),
        ]

    # -- brokers --

    async def register_broker(self, request: web.Request) -> web.Response:
        body = control.decode(await request.read(), control.BrokerRegistration)
        broker_id, url = body.broker_id, body.url
        self.c.check_cluster_id(broker_id, body.cluster_id)
        # A new broker process leads nothing in an epoch it led before it (re)started.
        # Planned under the write lock: from the state it will be applied to.
        async with self.c.write_lock:
            reelections = plan_reelection(
                self.c.state, broker_id, body.unclean_weak_fsync, self.c.live_brokers()
            )
            changed = self.c.state.brokers.get(broker_id) != url
            await self.c.commit_locked(
                [RegisterBroker(broker_id, url), *reelections] if changed else reelections
            )
        log.info(
            "broker %s registered at %s; %s partitions it leads get a new leader epoch",
            broker_id,
            url,
            len(reelections),
        )
        self.c.liveness.start_session(broker_id, self.c.clock_ms())
        await self.c.reconcile()
        answer = control.RegistrationAnswer(
            broker_id=broker_id,
            cluster_id=self.c.state.cluster_id,
            heartbeat_interval_ms=self.c.config.heartbeat_interval_ms,
            session_timeout_ms=self.c.config.session_timeout_ms,
        )
        return _message(answer)

    async def broker_heartbeat(self, request: web.Request) -> web.Response:
        broker_id = check_int(request.match_info["broker_id"], "broker_id", 0, BROKER_ID_MAX)
        body = control.decode(await request.read(), control.BrokerHeartbeat)
        self.c.check_cluster_id(broker_id, body.cluster_id)
        if broker_id not in self.c.state.brokers:
            raise UnknownBroker(f"broker {broker_id} is not registered: register again")
        reports = [_report(entry) for entry in body.partitions]
        self.c.heard.add(broker_id)
        if self.c.dropping:
            self.c.note_reports(broker_id, {entry.topic for entry in body.partitions})
        if self.c.liveness.heartbeat(broker_id, self.c.clock_ms(), reports):
            event(log, "broker_alive_again", f"broker {broker_id} is back", broker_id=broker_id)
            await self.c.reconcile()
        return _message(self._desired_state(broker_id))

    def _desired_state(self, broker_id: int) -> control.HeartbeatAnswer:
        state = self.c.state
        assignments = [
            control.PartitionAssignment(
                topic=name,
                partition=index,
                topic_id=topic.topic_id,
                leader_id=partition.leader_id,
                leader_url=(
                    None if partition.leader_id is None else state.brokers.get(partition.leader_id)
                ),
                leader_epoch=partition.leader_epoch,
                partition_epoch=partition.partition_epoch,
                replicas=list(partition.replicas),
                isr=list(partition.isr),
                min_insync_replicas=topic.min_insync_replicas,
            )
            for name, topic in sorted(state.topics.items())
            for index, partition in enumerate(topic.partitions)
            if broker_id in partition.replicas
        ]
        topics = {
            name: control.TopicSummary(topic.topic_id, len(topic.partitions))
            for name, topic in state.topics.items()
        }
        return control.HeartbeatAnswer(
            cluster_id=state.cluster_id,
            assignments=assignments,
            topics=topics,
            deleted_topic_ids=list(state.deleted_topic_ids),
            heartbeat_interval_ms=self.c.config.heartbeat_interval_ms,
        )

    async def alter_isr(self, request: web.Request) -> web.Response:
        broker_id = check_int(request.match_info["broker_id"], "broker_id", 0, BROKER_ID_MAX)
        body = control.decode(await request.read(), control.AlterIsrRequest)
        partition = await self.c.alter_isr(body, broker_id)
        return _message(
            control.AlterIsrAnswer(
                leader_epoch=partition.leader_epoch,
                partition_epoch=partition.partition_epoch,
                isr=list(partition.isr),
            )
        )

    async def list_brokers(self, _: web.Request) -> web.Response:
        return _json({"brokers": self.c.brokers_json()})

    async def drain_broker(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, True)

    async def undrain_broker(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, False)

    async def _set_draining(self, request: web.Request, draining: bool) -> web.Response:
        broker_id = check_int(request.match_info["broker_id"], "broker_id", 0, BROKER_ID_MAX)
        await self.c.set_draining(broker_id, draining)
        [broker] = [b for b in self.c.brokers_json() if b["id"] == broker_id]
        return _json(broker)

    async def list_reassignments(self, _: web.Request) -> web.Response:
        return _json(self.c.reassignments_json())

    async def describe_cluster(self, _: web.Request) -> web.Response:
        return _json(
            {
                "cluster_id": self.c.state.cluster_id,
                "brokers": self.c.brokers_json(),
                "topics": sorted(self.c.state.topics),
                "controller": "coordinator",
                "rejected_brokers": [
                    {"broker_id": broker, "cluster_id": cluster}
                    for broker, cluster in sorted(self.c.rejected_brokers.items())
                ],
            }
        )

    # -- topics --

    async def create_topic(self, request: web.Request) -> web.Response:
        body = await read_json_object(request, REQUEST_BYTES_MAX)
        control.check(body, control.CreateTopicRequest)
        name = check_name(_field(body, "name"), "topic")
        partitions = check_int(
            body.get("partitions", self.c.config.default_partitions),
            "partitions",
            1,
            MAX_PARTITIONS_PER_TOPIC,
        )
        raw_factor = body.get("replication_factor")
        factor = (
            None
            if raw_factor is None
            else check_int(raw_factor, "replication_factor", 1, MAX_REPLICATION_FACTOR)
        )
        raw_min_insync = body.get("min_insync_replicas")
        min_insync = (
            None
            if raw_min_insync is None
            else check_int(raw_min_insync, "min_insync_replicas", 1, MAX_REPLICATION_FACTOR)
        )
        topic = await self.c.create_topic(name, partitions, factor, min_insync)
        return _json(self.c.topic_json(topic), status=201)

    async def list_topics(self, _: web.Request) -> web.Response:
        topics = [self.c.topic_json(t) for _, t in sorted(self.c.state.topics.items())]
        return _json({"topics": topics})

    async def describe_topic(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["name"], "topic")
        return _json(self.c.topic_json(self.c.state.topic(name)))

    async def delete_topic(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["name"], "topic")
        await self.c.delete_topic(name)
        return _json({"deleted": name})

    async def metadata(self, request: web.Request) -> web.Response:
        names = _topic_list(request.query.get("topics"))
        auto_create = _query_bool(request, "auto_create")
        if names is None:
            topics = [t for _, t in sorted(self.c.state.topics.items())]
        else:
            topics = [await self._topic_or_create(name, auto_create) for name in names]
        return _json(
            {
                "brokers": self.c.brokers_json(),
                "topics": [self.c.topic_json(topic) for topic in topics],
            }
        )

    async def _topic_or_create(self, name: str, auto_create: bool) -> TopicState:
        if name in self.c.state.topics or not auto_create:
            return self.c.state.topic(name)
        try:
            return await self.c.create_topic(name, self.c.config.default_partitions, None)
        except TopicExists:  # created meanwhile by another request
            return self.c.state.topic(name)

    async def allocate_producer(self, request: web.Request) -> web.Response:
        control.check(
            await read_json_object(request, REQUEST_BYTES_MAX), control.AllocateProducerRequest
        )
        [producer_id] = await self.c.commit([AllocateProducerId()])
        return _json({"producer_id": producer_id, "producer_epoch": 0})

    # -- consumer groups --

    async def group_heartbeat(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        body = await read_json_object(request, REQUEST_BYTES_MAX)
        control.check(body, control.GroupHeartbeatRequest)
        member_id = _member_id(body.get("member_id"))
        member_epoch = check_int(
            body.get("member_epoch", 0), "member_epoch", 0, control.MEMBER_EPOCH_MAX
        )
        topics = [check_name(t, "topic") for t in _list(body.get("topics", []), "topics", 10_000)]
        owned = _topic_partitions(body.get("owned", []), "owned")
        session_timeout_ms = check_int(
            body.get("session_timeout_ms", GROUP_SESSION_TIMEOUT_MS_DEFAULT),
            "session_timeout_ms",
            GROUP_SESSION_TIMEOUT_MS_MIN,
            GROUP_SESSION_TIMEOUT_MS_MAX,
        )
        result = await self.c.group_heartbeat(
            name, member_id, member_epoch, topics, owned, session_timeout_ms
        )
        interval_ms = max(1, min(self.c.config.heartbeat_interval_ms, session_timeout_ms // 3))
        return _json(
            {
                "member_id": result.member_id,
                "member_epoch": result.member_epoch,
                "assignment": [{"topic": t, "partition": p} for t, p in result.assignment],
                "heartbeat_interval_ms": interval_ms,
            }
        )

    async def group_leave(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        body = await read_json_object(request, REQUEST_BYTES_MAX)
        control.check(body, control.GroupLeaveRequest)
        member_id = _member_id(_field(body, "member_id"))
        if member_id is not None:
            await self.c.group_leave(name, member_id)
        return _json({"left": True})

    async def commit_offsets(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        body = await read_json_object(request, REQUEST_BYTES_MAX)
        control.check(body, control.CommitOffsetsRequest)
        member_id = _member_id(body.get("member_id"))
        raw_epoch = body.get("member_epoch")
        member_epoch = (
            None
            if raw_epoch is None
            else check_int(raw_epoch, "member_epoch", 0, control.INT64_MAX)
        )
        offsets = []
        named: set[tuple[str, int]] = set()
        for entry in _list(_field(body, "offsets"), "offsets", 1_000_000):
            entry = _object(entry, "offsets")
            topic = check_name(_field(entry, "topic"), "topic")
            partition = check_int(_field(entry, "partition"), "partition", 0, control.INT64_MAX)
            if (topic, partition) in named:  # which one would count? refuse, change nothing
                raise InvalidRequest(f"offsets name {topic}/{partition} twice")
            named.add((topic, partition))
            offset = check_int(_field(entry, "offset"), "offset", 0, control.INT64_MAX)
            offsets.append((topic, partition, offset))
        committed = await self.c.commit_offsets(name, member_id, member_epoch, tuple(offsets))
        return _json({"committed": committed})

    async def fetch_offsets(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        topics = _topic_list(request.query.get("topics"))
        committed = self.c.state.offsets.get(name, {})
        offsets = [
            {"topic": topic, "partition": partition, "offset": offset}
            for (topic, partition), offset in sorted(committed.items())
            if topics is None or topic in topics
        ]
        return _json({"offsets": offsets})

    async def list_groups(self, _: web.Request) -> web.Response:
        """Live groups and every group the state remembers (what the bound counts)."""
        state = self.c.state
        names = set(self.c.groups) | set(state.offsets) | set(state.group_session_ms)
        return _json({"groups": sorted(names)})

    async def delete_group(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        await self.c.delete_group(name)
        return _json({"deleted": name})

    async def describe_group(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        group = self.c.groups.get(name)
        committed = self.c.state.offsets.get(name)
        if group is None and not remembers_group(self.c.state, name):
            raise UnknownGroup(f"no group {name!r}")
        members = (
            []
            if group is None
            else [
                {
                    "member_id": member.member_id,
                    "member_epoch": member.member_epoch,
                    "assignment": [
                        {"topic": t, "partition": p} for t, p in sorted(member.assignment)
                    ],
                }
                for _, member in sorted(group.members.items())
            ]
        )
        return _json(
            {"group": name, "members": members, "offsets": self._lag_rows(committed or {})}
        )

    def _lag_rows(self, committed: dict[tuple[str, int], int]) -> list[dict[str, Any]]:
        rows = []
        for (topic, partition), offset in sorted(committed.items()):
            high_watermark = self.c.high_watermark(topic, partition)
            lag = None if high_watermark is None else max(0, high_watermark - offset)
            rows.append(
                {
                    "topic": topic,
                    "partition": partition,
                    "committed": offset,
                    "high_watermark": high_watermark,
                    "lag": lag,
                }
            )
        return rows


_TOPICS_PARAMETER = {
    "name": "topics",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "pattern": "^([A-Za-z0-9._-]{1,200}(,[A-Za-z0-9._-]{1,200})*)?$"},
    "description": "comma-separated topic names",
}
_BROKER_ID_PARAMETER = path_parameter("broker_id", int_schema(0, BROKER_ID_MAX))
_NAME_PARAMETER = path_parameter("name", NAME_SCHEMA)
_GROUP_PARAMETER = path_parameter("group", NAME_SCHEMA)
_METADATA_PARAMETERS = [
    _TOPICS_PARAMETER,
    {"name": "auto_create", "in": "query", "required": False, "schema": {"type": "boolean"}},
]
