"""The coordinator's HTTP shell: decodes requests, feeds :mod:`tidemq.core`, persists.

Owns: the coordinator endpoints of docs/PROTOCOL.md ("Coordinator API"), the
background tick (broker session expiry, failover, ISR expansion, group member
expiry) and the coordinator's Prometheus metrics.

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
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from tidemq.coordinator.store import CommandStore
from tidemq.core.groups import ConsumerGroup, HeartbeatResult, TopicPartition
from tidemq.core.metadata import (
    AllocateProducerId,
    ChangeLeader,
    ClusterState,
    Command,
    CommitOffsets,
    CreateTopic,
    DeleteTopic,
    InitCluster,
    Liveness,
    PartitionReport,
    RecordGroupSession,
    RegisterBroker,
    TopicState,
    plan_failover,
    plan_isr_expansion,
)
from tidemq.core.placement import place_partitions
from tidemq.errors import (
    InvalidRequest,
    InvariantViolation,
    NoBrokersAvailable,
    TideError,
    TopicExists,
    Unavailable,
    UnknownBroker,
    UnknownGroup,
)
from tidemq.service.app import build_app
from tidemq.service.http import Endpoint, check_int, check_name, read_json_object
from tidemq.tls import TlsFiles

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
        # Group recovery after this start: each group's session bound as persisted by
        # earlier runs (bounds raised from now on concern members we will know).
        self.started_ms = now_ms
        self.recovery_bounds_ms = dict(state.group_session_ms)
        self._pending_commits: list[_PendingCommit] = []
        self.ready = False
        self._write_lock = asyncio.Lock()
        self.registry = CollectorRegistry()
        self.leader_elections = Counter(
            "tide_leader_elections_total",
            "Leader changes decided by the coordinator",
            registry=self.registry,
        )
        self.registry.register(_ClusterCollector(self))

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
            log.warning(
                "broker %s missed its session of %s ms", broker_id, self.config.session_timeout_ms
            )
        await self.reconcile()
        async with self._write_lock:
            for name in list(self.groups):
                for member_id in self.groups[name].expire(now_ms):
                    log.info("group %s: member %s session expired", name, member_id)
                if not self.groups[name].members:
                    del self.groups[name]

    # -- writing --

    async def commit(self, commands: list[Command]) -> list[Any]:
        async with self._write_lock:
            return await self._commit_locked(commands)

    async def _commit_locked(self, commands: list[Command]) -> list[Any]:
        """Check, persist (one transaction), then apply. Caller holds the write lock.

        A batch holds independent commands (at most one per partition), so checking
        each against the current state is checking it against the state it meets; an
        apply that fails after the commit is a bug and stops the process.
        """
        if not commands:
            return []
        for command in commands:
            self.state.check(command)
        await self.store.append(commands)
        results = [self._apply_committed(command) for command in commands]
        self.leader_elections.inc(sum(isinstance(c, ChangeLeader) for c in commands))
        return results

    def _apply_committed(self, command: Command) -> Any:
        try:
            return self.state.apply(command)
        except TideError as error:
            raise InvariantViolation(f"committed command {command} does not apply") from error

    async def reconcile(self) -> None:
        """Failover first, then ISR expansion, each from the state the last left."""
        async with self._write_lock:
            live = self.live_brokers()
            await self._commit_locked(plan_failover(self.state, live))
            await self._commit_locked(plan_isr_expansion(self.state, live, self.liveness))

    async def create_topic(
        self, name: str, partitions: int, replication_factor: int | None
    ) -> TopicState:
        async with self._write_lock:
            if name in self.state.topics:
                raise TopicExists(f"topic {name!r} exists")
            live = sorted(self.live_brokers())
            if not live:
                raise NoBrokersAvailable("no live broker to place partitions on")
            if replication_factor is None:
                replication_factor = min(self.config.default_replication_factor, len(live))
            load, leaders = self.state.replica_load()
            hint = zlib.crc32(name.encode())
            placement = place_partitions(partitions, replication_factor, live, load, hint, leaders)
            assignments = tuple(tuple(replicas) for replicas in placement)
            await self._commit_locked(
                [CreateTopic(name, partitions, replication_factor, assignments)]
            )
            return self.state.topic(name)

    # -- consumer groups --

    def group(self, name: str) -> ConsumerGroup:
        """The group's live state, or a new one (not registered yet). A group new in
        memory recovers until its persisted session bound has passed since this
        coordinator started: members it forgot may still be fetching until then."""
        group = self.groups.get(name)
        if group is None:
            bound_ms = self.recovery_bounds_ms.get(name, 0)
            group = ConsumerGroup(name, recover_until_ms=self.started_ms + bound_ms)
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
        async with self._write_lock:
            if session_timeout_ms > self.state.group_session_ms.get(name, 0):
                # persisted before any member may rely on it (see core.groups)
                await self._commit_locked([RecordGroupSession(name, session_timeout_ms)])
            group = self.group(name)
            result = group.heartbeat(
                member_id,
                member_epoch,
                topics,
                owned,
                self.clock_ms(),
                _PartitionCounts(self.state.topics),
                self.new_id(),
                session_timeout_ms,
            )
            self.groups.setdefault(name, group)
            return result

    async def group_leave(self, name: str, member_id: str) -> None:
        async with self._write_lock:
            group = self.groups.get(name)
            if group is not None:
                group.leave(member_id)
                if not group.members:
                    del self.groups[name]

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
        for entry in batch:
            if entry.future.done():  # its request was cancelled
                continue
            command = entry.command
            try:
                partitions = [(topic, partition) for topic, partition, _ in command.offsets]
                self.group(command.group).validate_commit(
                    entry.member_id, entry.member_epoch, partitions, now_ms
                )
                self.state.check(command)
            except TideError as error:
                entry.future.set_exception(error)
                continue
            accepted.append(entry)
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
            "replication_factor": topic.replication_factor,
            "partitions": [
                self.partition_json(topic.name, index) for index in range(len(topic.partitions))
            ],
        }

    def partition_json(self, topic: str, index: int) -> dict[str, Any]:
        partition = self.state.partition(topic, index)
        leader = partition.leader_id
        return {
            "partition": index,
            "leader_id": leader,
            "leader_url": None if leader is None else self.state.brokers.get(leader),
            "leader_epoch": partition.leader_epoch,
            "replicas": list(partition.replicas),
            "isr": list(partition.isr),
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
            }
            for broker_id, url in sorted(self.state.brokers.items())
        ]

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


class _ClusterCollector:
    """Computes the coordinator's gauges from its state at scrape time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily]:
        coordinator = self.coordinator
        state = coordinator.state
        partitions = [p for topic in state.topics.values() for p in topic.partitions]
        yield _gauge(
            "tide_brokers_alive",
            "Registered brokers with a live session",
            len(coordinator.live_brokers()),
        )
        yield _gauge("tide_topics", "Topics", len(state.topics))
        yield _gauge(
            "tide_partitions_offline",
            "Partitions without a leader",
            sum(p.leader_id is None for p in partitions),
        )
        yield _gauge(
            "tide_partitions_under_replicated",
            "Partitions whose ISR is smaller than their replica set",
            sum(len(p.isr) < len(p.replicas) for p in partitions),
        )
        members = GaugeMetricFamily(
            "tide_consumer_group_members", "Live members per consumer group", labels=["group"]
        )
        for name, group in sorted(coordinator.groups.items()):
            members.add_metric([name], len(group.members))
        yield members
        yield self._lag()

    def _lag(self) -> GaugeMetricFamily:
        lag = GaugeMetricFamily(
            "tide_consumer_lag",
            "Leader high watermark minus committed offset",
            labels=["group", "topic", "partition"],
        )
        for group, committed in sorted(self.coordinator.state.offsets.items()):
            for (topic, partition), offset in sorted(committed.items()):
                high_watermark = self.coordinator.high_watermark(topic, partition)
                if high_watermark is not None:
                    lag.add_metric([group, topic, str(partition)], max(0, high_watermark - offset))
        return lag


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


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


def _report(entry: Any) -> tuple[tuple[str, int], PartitionReport]:
    entry = _object(entry, "partitions")
    key = (
        check_name(_field(entry, "topic"), "topic"),
        check_int(entry.get("partition"), "partition", 0),
    )
    report = PartitionReport(
        leader_epoch=check_int(entry.get("leader_epoch", -1), "leader_epoch", -1),
        log_start_offset=check_int(entry.get("log_start_offset", 0), "log_start_offset", 0),
        log_end_offset=check_int(entry.get("log_end_offset", 0), "log_end_offset", 0),
        high_watermark=check_int(entry.get("high_watermark", 0), "high_watermark", 0),
    )
    return key, report


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


# --- handlers -----------------------------------------------------------------------


class _Handlers:
    """One method per endpoint: decode, call the coordinator, encode."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def endpoints(self) -> list[Endpoint]:
        created = {"201": "created", "409": "topic_exists", "503": "no_brokers_available"}
        return [
            Endpoint(
                "POST",
                "/v1/brokers/register",
                self.register_broker,
                "Register a broker (again)",
                JSON_BODY,
            ),
            Endpoint(
                "POST",
                "/v1/brokers/{broker_id}/heartbeat",
                self.broker_heartbeat,
                "Broker heartbeat: reports in, assignments out",
                JSON_BODY,
                responses={"200": "OK", "404": "unknown_broker"},
            ),
            Endpoint("GET", "/v1/brokers", self.list_brokers, "Brokers and their liveness"),
            Endpoint("GET", "/v1/cluster", self.describe_cluster, "Cluster overview"),
            Endpoint(
                "POST",
                "/v1/topics",
                self.create_topic,
                "Create a topic",
                JSON_BODY,
                responses=created,
            ),
            Endpoint("GET", "/v1/topics", self.list_topics, "Every topic"),
            Endpoint(
                "GET",
                "/v1/topics/{name}",
                self.describe_topic,
                "One topic",
                responses={"200": "OK", "404": "unknown_topic"},
            ),
            Endpoint(
                "DELETE",
                "/v1/topics/{name}",
                self.delete_topic,
                "Delete a topic",
                responses={"200": "OK", "404": "unknown_topic"},
            ),
            Endpoint(
                "GET",
                "/v1/metadata",
                self.metadata,
                "Brokers and topics for clients",
                parameters=_METADATA_PARAMETERS,
            ),
            Endpoint(
                "POST",
                "/v1/producers",
                self.allocate_producer,
                "Allocate an idempotent producer id",
                JSON_BODY,
            ),
            Endpoint(
                "POST",
                "/v1/groups/{group}/heartbeat",
                self.group_heartbeat,
                "Consumer group member heartbeat",
                JSON_BODY,
                responses={"200": "OK", "409": "fenced_member"},
            ),
            Endpoint(
                "POST",
                "/v1/groups/{group}/leave",
                self.group_leave,
                "Leave a consumer group",
                JSON_BODY,
            ),
            Endpoint(
                "POST",
                "/v1/groups/{group}/offsets",
                self.commit_offsets,
                "Commit offsets",
                JSON_BODY,
                responses={"200": "OK", "409": "fenced_member"},
            ),
            Endpoint(
                "GET",
                "/v1/groups/{group}/offsets",
                self.fetch_offsets,
                "Committed offsets",
                parameters=[_TOPICS_PARAMETER],
            ),
            Endpoint("GET", "/v1/groups", self.list_groups, "Consumer groups"),
            Endpoint(
                "GET",
                "/v1/groups/{group}",
                self.describe_group,
                "Members, offsets and lag of a group",
                responses={"200": "OK", "404": "unknown_group"},
            ),
        ]

    # -- brokers --

    async def register_broker(self, request: web.Request) -> web.Response:
        body = await read_json_object(request, REQUEST_BYTES_MAX)
        broker_id = check_int(_field(body, "broker_id"), "broker_id", 0, BROKER_ID_MAX)
        url = _field(body, "url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidRequest("url must be an http:// or https:// URL")
        if len(url) > URL_CHARS_MAX:
            raise InvalidRequest(f"url is longer than {URL_CHARS_MAX} characters")
        if self.c.state.brokers.get(broker_id) != url:
            await self.c.commit([RegisterBroker(broker_id, url)])
        self.c.liveness.start_session(broker_id, self.c.clock_ms())
        await self.c.reconcile()
        return _json(
            {
                "broker_id": broker_id,
                "cluster_id": self.c.state.cluster_id,
                "heartbeat_interval_ms": self.c.config.heartbeat_interval_ms,
                "session_timeout_ms": self.c.config.session_timeout_ms,
            }
        )

    async def broker_heartbeat(self, request: web.Request) -> web.Response:
        broker_id = check_int(request.match_info["broker_id"], "broker_id", 0, BROKER_ID_MAX)
        if broker_id not in self.c.state.brokers:
            raise UnknownBroker(f"broker {broker_id} is not registered: register again")
        body = await read_json_object(request, BROKER_HEARTBEAT_BYTES_MAX)
        entries = _list(body.get("partitions", []), "partitions", 1_000_000)
        reports = [_report(entry) for entry in entries]
        if self.c.liveness.heartbeat(broker_id, self.c.clock_ms(), reports):
            log.info("broker %s is back", broker_id)
            await self.c.reconcile()
        state = self.c.state
        assignments = [
            {"topic": name, **self.c.partition_json(name, index)}
            for name, topic in sorted(state.topics.items())
            for index, partition in enumerate(topic.partitions)
            if broker_id in partition.replicas
        ]
        return _json(
            {
                "assignments": assignments,
                "topics": {name: len(topic.partitions) for name, topic in state.topics.items()},
                "heartbeat_interval_ms": self.c.config.heartbeat_interval_ms,
            }
        )

    async def list_brokers(self, _: web.Request) -> web.Response:
        return _json({"brokers": self.c.brokers_json()})

    async def describe_cluster(self, _: web.Request) -> web.Response:
        return _json(
            {
                "cluster_id": self.c.state.cluster_id,
                "brokers": self.c.brokers_json(),
                "topics": sorted(self.c.state.topics),
                "controller": "coordinator",
            }
        )

    # -- topics --

    async def create_topic(self, request: web.Request) -> web.Response:
        body = await read_json_object(request, REQUEST_BYTES_MAX)
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
        topic = await self.c.create_topic(name, partitions, factor)
        return _json(self.c.topic_json(topic), status=201)

    async def list_topics(self, _: web.Request) -> web.Response:
        topics = [self.c.topic_json(t) for _, t in sorted(self.c.state.topics.items())]
        return _json({"topics": topics})

    async def describe_topic(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["name"], "topic")
        return _json(self.c.topic_json(self.c.state.topic(name)))

    async def delete_topic(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["name"], "topic")
        await self.c.commit([DeleteTopic(name)])
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
        await read_json_object(request, REQUEST_BYTES_MAX)
        [producer_id] = await self.c.commit([AllocateProducerId()])
        return _json({"producer_id": producer_id, "producer_epoch": 0})

    # -- consumer groups --

    async def group_heartbeat(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        body = await read_json_object(request, REQUEST_BYTES_MAX)
        member_id = _member_id(body.get("member_id"))
        member_epoch = check_int(body.get("member_epoch", 0), "member_epoch", 0)
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
        member_id = _member_id(_field(body, "member_id"))
        if member_id is not None:
            await self.c.group_leave(name, member_id)
        return _json({"left": True})

    async def commit_offsets(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        body = await read_json_object(request, REQUEST_BYTES_MAX)
        member_id = _member_id(body.get("member_id"))
        raw_epoch = body.get("member_epoch")
        member_epoch = None if raw_epoch is None else check_int(raw_epoch, "member_epoch", 0)
        offsets = []
        for entry in _list(_field(body, "offsets"), "offsets", 1_000_000):
            entry = _object(entry, "offsets")
            topic = check_name(_field(entry, "topic"), "topic")
            partition = check_int(_field(entry, "partition"), "partition", 0)
            offsets.append((topic, partition, check_int(_field(entry, "offset"), "offset", 0)))
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
        return _json({"groups": sorted(set(self.c.groups) | set(self.c.state.offsets))})

    async def describe_group(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["group"], "group")
        group = self.c.groups.get(name)
        committed = self.c.state.offsets.get(name)
        if group is None and committed is None:
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
    "schema": {"type": "string"},
    "description": "comma-separated topic names",
}
_METADATA_PARAMETERS = [
    _TOPICS_PARAMETER,
    {"name": "auto_create", "in": "query", "required": False, "schema": {"type": "boolean"}},
]
