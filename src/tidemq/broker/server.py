"""The broker's HTTP shell: produce, fetch, offsets, and the link to the coordinator.

The broker is level-triggered: every heartbeat answer carries the complete desired
state for this broker (each partition it replicates, its leader and epoch, and the
partition count of every topic), and ``reconcile`` moves the local state towards
it. A lost heartbeat answer therefore heals with the next one.

Hot path (produce, fetch): the body is checked once per batch (header, CRC,
framing) and then the same bytes are written and served; no per-record objects.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tidemq.broker.idempotence import append_in_sequence
from tidemq.broker.partition import (
    Assignment,
    PartitionReplica,
    parse_partition_directory_name,
)
from tidemq.broker.syncer import GroupCommitSyncer
from tidemq.errors import (
    FencedLeaderEpoch,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    RequestTooLarge,
    TideError,
    UnknownBroker,
    UnknownLeaderEpoch,
    UnknownPartition,
    UnknownTopic,
    error_for_code,
)
from tidemq.service.app import build_app
from tidemq.service.http import Endpoint, check_int, query_int, read_json_object
from tidemq.storage import LogConfig
from tidemq.wire.batch import build_batch, check_batches, decode_records, iter_headers
from tidemq.wire.produce import PRODUCE_TYPE, ProduceEntry, decode_produce

log = logging.getLogger(__name__)

BATCH_TYPE = "application/vnd.tidemq.batches"
MAX_WAIT_MS = 30_000
MAX_FETCH_BYTES = 8 * 1024 * 1024
PRODUCE_TIMEOUT_S = 30.0


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


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class BrokerMetrics:
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
        self.fsync_seconds = Histogram(
            "tide_fsync_duration_seconds",
            "fsync latency of one partition log",
            registry=registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1),
        )
        self.partitions = Gauge(
            "tide_broker_partitions",
            "Partition replicas on this broker",
            ["role"],
            registry=registry,
        )
        self.log_size = Gauge(
            "tide_log_size_bytes",
            "Bytes stored per partition replica",
            ["topic", "partition"],
            registry=registry,
        )
        self.high_watermark = Gauge(
            "tide_partition_high_watermark",
            "High watermark per partition led here",
            ["topic", "partition"],
            registry=registry,
        )


class Broker:
    """State of one broker process; the HTTP handlers below are its only inputs."""

    def __init__(
        self,
        config: BrokerConfig,
        session_factory: Callable[[], aiohttp.ClientSession],
        registry: CollectorRegistry,
    ) -> None:
        self.config = config
        self.replicas: dict[tuple[str, int], PartitionReplica] = {}
        self.topic_partitions: dict[str, int] = {}
        self.metrics = BrokerMetrics(registry)
        self.syncer = GroupCommitSyncer(
            config.log_config.fsync,
            config.log_config.fsync_interval_ms,
            self.metrics.fsync_seconds,
        )
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self.registered = False
        self._directories_scanned = False
        self.heartbeat_interval_ms = config.heartbeat_interval_ms

    # ---- lookup -------------------------------------------------------------------

    def replica_for(self, topic: str, partition: int) -> PartitionReplica:
        replica = self.replicas.get((topic, partition))
        if replica is not None:
            return replica
        count = self.topic_partitions.get(topic)
        if count is None:
            raise UnknownTopic(f"unknown topic {topic!r}")
        if not 0 <= partition < count:
            raise UnknownPartition(f"topic {topic!r} has partitions 0..{count - 1}")
        raise NotLeader(f"broker {self.config.broker_id} does not host {topic}/{partition}")

    def leader_for(self, topic: str, partition: int, epoch: int | None) -> PartitionReplica:
        """The one epoch gate: every produce and consumer fetch passes here first."""
        replica = self.replica_for(topic, partition)
        if not replica.is_leader:
            raise NotLeader(f"broker {self.config.broker_id} does not lead {topic}/{partition}")
        if epoch is not None and epoch >= 0:
            if epoch < replica.leader_epoch:
                raise FencedLeaderEpoch(f"leader epoch {epoch} < {replica.leader_epoch}")
            if epoch > replica.leader_epoch:
                raise UnknownLeaderEpoch(f"leader epoch {epoch} > {replica.leader_epoch}")
        return replica

    # ---- produce ------------------------------------------------------------------

    async def produce(
        self, topic: str, partition: int, body: bytes, acks: str, epoch: int | None
    ) -> dict[str, Any]:
        replica = self.leader_for(topic, partition, epoch)
        headers = check_batches(body)
        # Idempotence: duplicates of retried batches get their original offsets.
        outcome = await append_in_sequence(replica, body, headers, _now_ms)
        if outcome.appended_bytes:
            self.syncer.mark_dirty(replica)
            self.metrics.messages_in.labels(topic).inc(outcome.appended_records)
            self.metrics.bytes_in.labels(topic).inc(outcome.appended_bytes)
        if acks != "0":
            await replica.wait_for_high_watermark(outcome.commit_offset, PRODUCE_TIMEOUT_S)
        return {
            "base_offset": outcome.base_offset,
            "last_offset": outcome.last_offset,
            "batch_base_offsets": outcome.batch_base_offsets,
            "log_end_offset": replica.log.log_end_offset,
            "high_watermark": replica.high_watermark,
        }

    async def produce_entry(self, entry: ProduceEntry, acks: str) -> dict[str, Any]:
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
        await replica.wait_for_data(offset, wait_ms / 1000)
        if offset < log_.log_start_offset:
            raise OffsetOutOfRange(f"offset {offset} was deleted by retention meanwhile")
        if offset >= replica.high_watermark:
            return b"", replica
        data = log_.read(offset, max_bytes, replica.high_watermark)
        if data:
            count = sum(h.record_count for h in iter_headers(data))
            self.metrics.messages_out.labels(topic).inc(count)
            self.metrics.bytes_out.labels(topic).inc(len(data))
        return data, replica

    # ---- coordinator link ---------------------------------------------------------

    def _session_open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._session_factory()
        return self._session

    async def _coordinator_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        session = self._session_open()
        url = self.config.coordinator_url.rstrip("/") + path
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_ms / 1000)
        async with session.post(url, json=body, timeout=timeout) as response:
            payload = await response.json(content_type=None)
            if response.status >= 400:
                error = payload.get("error", {}) if isinstance(payload, dict) else {}
                raise error_for_code(str(error.get("code")), str(error.get("message")))
            if not isinstance(payload, dict):
                raise InvalidRequest("coordinator answered with a non-object")
            return payload

    async def register(self) -> None:
        answer = await self._coordinator_call(
            "/v1/brokers/register",
            {"broker_id": self.config.broker_id, "url": self.config.advertised_url},
        )
        self.heartbeat_interval_ms = int(
            answer.get("heartbeat_interval_ms", self.heartbeat_interval_ms)
        )
        self.registered = True
        log.info("registered with the coordinator as broker %s", self.config.broker_id)

    async def heartbeat(self) -> None:
        # Only led partitions are reported: a follower that does not replicate yet
        # (follower fetching is the replication issue) must never look in sync to the
        # coordinator, which adds a reported, caught-up follower to the ISR.
        reports = [self._heartbeat_stats(r) for r in self.replicas.values() if r.is_leader]
        body = {"partitions": reports}
        path = f"/v1/brokers/{self.config.broker_id}/heartbeat"
        answer = await self._coordinator_call(path, body)
        self.reconcile(answer)

    @staticmethod
    def _heartbeat_stats(replica: PartitionReplica) -> dict[str, Any]:
        return {
            "topic": replica.topic,
            "partition": replica.partition,
            "leader_epoch": replica.leader_epoch,
            "log_start_offset": replica.log.log_start_offset,
            "log_end_offset": replica.log.log_end_offset,
            "high_watermark": replica.high_watermark,
        }

    async def coordinator_loop(self) -> None:
        """Registers, then heartbeats forever; re-registers when the coordinator forgot us."""
        backoff_s = 0.1
        while True:
            try:
                if not self.registered:
                    await self.register()
                await self.heartbeat()
                backoff_s = 0.1
                await asyncio.sleep(self.heartbeat_interval_ms / 1000)
            except UnknownBroker:
                self.registered = False
            except (TideError, aiohttp.ClientError, TimeoutError, ValueError) as error:
                log.warning("coordinator unreachable (%s); retrying in %.1fs", error, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)

    def reconcile(self, answer: dict[str, Any]) -> None:
        topics = answer.get("topics", {})
        previous_topics = set(self.topic_partitions)
        self.topic_partitions = {str(name): int(count) for name, count in topics.items()}
        # Deleted topics' directories: looked for at the first reconcile (topics deleted
        # while this broker was down) and whenever a topic disappears, not every beat.
        scan_directories = not self._directories_scanned or bool(
            previous_topics - set(self.topic_partitions)
        )
        wanted: dict[tuple[str, int], Assignment] = {}
        for item in answer.get("assignments", []):
            assignment = Assignment(
                topic=str(item["topic"]),
                partition=int(item["partition"]),
                leader_id=item.get("leader_id"),
                leader_url=item.get("leader_url"),
                leader_epoch=int(item["leader_epoch"]),
                replicas=tuple(item.get("replicas", [])),
                isr=tuple(item.get("isr", [])),
            )
            wanted[(assignment.topic, assignment.partition)] = assignment
        self._drop_unwanted(wanted)
        if scan_directories:
            self._remove_deleted_topic_directories()
            self._directories_scanned = True
        now_ms = _now_ms()
        for key, assignment in wanted.items():
            replica = self.replicas.get(key)
            if replica is None:
                replica = PartitionReplica.open(
                    self.config.data_dir, key[0], key[1], self.config.log_config, now_ms
                )
                self.replicas[key] = replica
            replica.apply_assignment(assignment, self.config.broker_id)
        self._update_partition_gauges()

    def _drop_unwanted(self, wanted: dict[tuple[str, int], Assignment]) -> None:
        for key in [k for k in self.replicas if k not in wanted]:
            replica = self.replicas.pop(key)
            if key[0] not in self.topic_partitions:
                log.info("topic %s deleted: removing %s/%s", key[0], key[0], key[1])
                replica.delete()
            else:
                log.info("no longer a replica of %s/%s: closing it", key[0], key[1])
                replica.close()
            for gauge in (self.metrics.log_size, self.metrics.high_watermark):
                try:
                    gauge.remove(key[0], str(key[1]))
                except KeyError:
                    pass

    def _remove_deleted_topic_directories(self) -> None:
        """Partition directories of topics the coordinator no longer has."""
        if not self.config.data_dir.exists():
            return
        for path in self.config.data_dir.iterdir():
            parsed = parse_partition_directory_name(path.name)
            if parsed is None or not path.is_dir() or parsed in self.replicas:
                continue
            if parsed[0] not in self.topic_partitions:
                shutil.rmtree(path, ignore_errors=True)

    def _update_partition_gauges(self) -> None:
        leaders = sum(1 for r in self.replicas.values() if r.is_leader)
        self.metrics.partitions.labels("leader").set(leaders)
        self.metrics.partitions.labels("follower").set(len(self.replicas) - leaders)

    async def maintenance_loop(self) -> None:
        """Retention and metrics, once a second or so."""
        while True:
            await asyncio.sleep(1.0)
            now_ms = _now_ms()
            for (topic, number), replica in list(self.replicas.items()):
                replica.log.apply_retention(now_ms)
                self.metrics.log_size.labels(topic, str(number)).set(replica.log.size_bytes)
                if replica.is_leader:
                    self.metrics.high_watermark.labels(topic, str(number)).set(
                        replica.high_watermark
                    )

    async def close(self) -> None:
        await self.syncer.close()
        for replica in self.replicas.values():
            replica.close()
        self.replicas.clear()
        if self._session is not None:
            await self._session.close()


# ---- HTTP handlers -------------------------------------------------------------------


def _path_partition(request: web.Request) -> tuple[str, int]:
    topic = request.match_info["topic"]
    partition = check_int(request.match_info["partition"], "partition", minimum=0)
    return topic, partition


def _acks_parameter(request: web.Request) -> str:
    acks = request.query.get("acks", "all")
    if acks not in ("0", "1", "all", "-1"):
        raise InvalidRequest("acks must be 0, 1 or all")
    return acks


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
    return raw.encode()


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
        raw_headers = record.get("headers") or {}
        if not isinstance(raw_headers, dict) or not all(
            isinstance(v, str) for v in raw_headers.values()
        ):
            raise InvalidRequest("headers must be an object of strings")
        headers.append([(str(k), v.encode()) for k, v in raw_headers.items()] or None)
    return build_batch(pairs, now_ms, headers)


def _render(raw: bytes | None, encoding: str) -> str | None:
    if raw is None:
        return None
    if encoding == "base64":
        return base64.b64encode(raw).decode()
    return raw.decode("utf-8", errors="replace")


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
        if request.content_type == "application/json":
            broker.leader_for(topic, partition, epoch)
            body = _json_records_to_batch(
                await read_json_object(request, broker.config.max_request_bytes), _now_ms()
            )
        else:
            body = await request.read()
        answer = await broker.produce(topic, partition, body, acks, epoch)
        return web.json_response(answer)

    async def produce_many(request: web.Request) -> web.Response:
        acks = _acks_parameter(request)
        entries = decode_produce(await request.read())
        results = await asyncio.gather(*(broker.produce_entry(entry, acks) for entry in entries))
        return web.json_response({"results": results})

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
        decoded = list(decode_records(data, min_offset=offset))
        records = [
            {
                "offset": r.offset,
                "timestamp": r.timestamp,
                "key": _render(r.key, encoding),
                "value": _render(r.value, encoding),
                "headers": {name: _render(v, encoding) for name, v in r.headers},
            }
            for r in decoded
        ]
        next_offset = decoded[-1].offset + 1 if decoded else offset
        body = {
            "records": records,
            "high_watermark": replica.high_watermark,
            "next_offset": next_offset,
        }
        return web.json_response(body, headers=headers, dumps=json.dumps)

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
    return [
        Endpoint(
            "POST",
            "/v1/produce",
            produce_many,
            "Append batches to several partitions led here; one result per entry",
            request_body={PRODUCE_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            responses={"200": "per-partition results", "400": "bad framing"},
        ),
        Endpoint(
            "POST",
            base + "/records",
            produce,
            "Append record batches (leader only)",
            request_body={
                BATCH_TYPE: {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object"}},
            },
            responses={
                "200": "appended (or, for a retried idempotent batch, its original offsets)",
                "400": "bad batch",
                "404": "unknown topic",
                "409": "stale leader epoch, or an idempotent producer's sequence/epoch error",
                "421": "not leader",
                "413": "too large",
            },
        ),
        Endpoint(
            "GET",
            base + "/records",
            fetch,
            "Read record batches below the high watermark",
            responses={"200": "batches or JSON records", "416": "offset out of range"},
        ),
        Endpoint("GET", base + "/offsets", offsets, "Log start, high watermark, log end"),
        Endpoint("GET", "/v1/partitions", partitions, "Partition replicas on this broker"),
    ]


def create_app(broker: Broker, registry: CollectorRegistry) -> web.Application:
    return build_app(
        f"tidemq broker {broker.config.broker_id}",
        make_endpoints(broker),
        registry,
        is_ready=lambda: broker.registered,
        max_body_bytes=broker.config.max_request_bytes,
    )
