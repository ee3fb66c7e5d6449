"""The broker's HTTP API in-process: produce, fetch, long-poll, and every bad input.

Each bad input must get a 4xx with {"error": {"code", "message"}}, append nothing,
and leave the broker serving.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from tidemq.broker.partition import HIGH_WATERMARK_FILE
from tidemq.broker.server import BATCH_TYPE, Broker, BrokerConfig, create_app
from tidemq.errors import NotLeader, UnknownTopic
from tidemq.storage import FsyncPolicy, LogConfig
from tidemq.storage.checkpoint import read_offset
from tidemq.transport import HttpTransport
from tidemq.wire import control
from tidemq.wire.batch import build_batch, decode_records

BASE = "/v1/topics/orders/partitions/{}"


TOPIC_ID = "0123456789abcdef0123456789abcdef"


def _answer(epoch: int = 1, leader: int = 1) -> control.HeartbeatAnswer:
    def assignment(partition: int, leader_id: int, replicas: list[int]) -> dict[str, Any]:
        return {
            "topic": "orders",
            "partition": partition,
            "topic_id": TOPIC_ID,
            "leader_id": leader_id,
            "leader_url": "http://127.0.0.1:1",
            "leader_epoch": epoch,
            "partition_epoch": epoch,
            "replicas": replicas,
            "isr": replicas,
        }

    answer = {
        "cluster_id": "c1",
        "topics": {"orders": {"topic_id": TOPIC_ID, "partitions": 2}},
        "deleted_topic_ids": [],
        "heartbeat_interval_ms": 1000,
        "assignments": [assignment(0, leader, [1]), assignment(1, 2, [2, 1])],
    }
    return control.decode(json.dumps(answer).encode(), control.HeartbeatAnswer)


@asynccontextmanager
async def broker_client(
    data_dir: Path,
    fsync: FsyncPolicy = FsyncPolicy.ALWAYS,
    max_request_bytes: int = 1 << 20,
    journal: bool = True,
) -> AsyncIterator[tuple[Broker, TestClient[Any, Any]]]:
    config = BrokerConfig(
        broker_id=1,
        data_dir=data_dir,
        coordinator_url="http://127.0.0.1:1",
        advertised_url="http://127.0.0.1:2",
        log_config=LogConfig(fsync=fsync),
        max_request_bytes=max_request_bytes,
        journal=journal,
    )
    registry = CollectorRegistry()
    broker = Broker(config, lambda: HttpTransport(False, {}, 4, 1000), registry)
    broker.reconcile(_answer())
    broker.registered = True
    app = create_app(broker, registry)
    client = TestClient(TestServer(app))
    await client.start_server()
    syncer = asyncio.ensure_future(broker.syncer.run())
    try:
        yield broker, client
    finally:
        syncer.cancel()
        await client.close()
        await broker.close()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def batch(count: int, start: int = 0) -> bytes:
    return build_batch(
        [(f"k{i}".encode(), f"v{i}".encode()) for i in range(start, start + count)], 1000
    )


async def produce(
    client: TestClient[Any, Any], body: bytes, partition: int = 0, **query: str
) -> aiohttp.ClientResponse:
    return await client.post(
        BASE.format(partition) + "/records",
        data=body,
        params=query,
        headers={"Content-Type": BATCH_TYPE},
    )


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> None:
    assert response.status == status, await response.text()
    body = await response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]


def test_produce_then_fetch_binary_and_json(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (_broker, client):
            response = await produce(client, batch(3) + batch(2, 3))
            assert response.status == 200
            answer = await response.json()
            assert (answer["base_offset"], answer["last_offset"]) == (0, 4)
            assert answer["high_watermark"] == 5
            fetched = await client.get(
                BASE.format(0) + "/records",
                params={"offset": "1"},
                headers={"Accept": BATCH_TYPE},
            )
            assert fetched.headers["Tide-High-Watermark"] == "5"
            records = list(decode_records(await fetched.read(), min_offset=1))
            assert [r.offset for r in records] == [1, 2, 3, 4]
            assert records[0].key == b"k1" and records[-1].value == b"v4"
            as_json = await (await client.get(BASE.format(0) + "/records?offset=0")).json()
            assert [r["value"] for r in as_json["records"]] == [f"v{i}" for i in range(5)]
            assert as_json["next_offset"] == 5
            offsets = await (await client.get(BASE.format(0) + "/offsets")).json()
            assert offsets["log_end_offset"] == 5 and offsets["leader_epoch"] == 1

    run(scenario)


def test_json_produce(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (_, client):
            body = {
                "records": [
                    {"key": "a", "value": "hello", "headers": {"h": "1"}},
                    {"value": "aGk=", "key": None},
                ],
                "encoding": "utf-8",
            }
            response = await client.post(BASE.format(0) + "/records", json=body)
            assert response.status == 200, await response.text()
            fetched = await (await client.get(BASE.format(0) + "/records?offset=0")).json()
            assert fetched["records"][0]["key"] == "a"
            assert fetched["records"][0]["headers"] == {"h": "1"}
            assert fetched["records"][1]["key"] is None

    run(scenario)


def test_long_poll_returns_when_data_arrives(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (_, client):
            waiting = asyncio.ensure_future(
                client.get(
                    BASE.format(0) + "/records",
                    params={"offset": "0", "wait_ms": "10000"},
                    headers={"Accept": BATCH_TYPE},
                )
            )
            await asyncio.sleep(0)
            assert not waiting.done()
            assert (await produce(client, batch(1))).status == 200
            response = await asyncio.wait_for(waiting, 5)
            assert len(list(decode_records(await response.read()))) == 1

    run(scenario)


def test_long_poll_times_out_empty(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (_, client):
            response = await client.get(
                BASE.format(0) + "/records",
                params={"offset": "0", "wait_ms": "50"},
                headers={"Accept": BATCH_TYPE},
            )
            assert response.status == 200
            assert await response.read() == b""

    run(scenario)


def _corrupt_crc(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    return bytes(damaged)


def _wrong_length(data: bytes) -> bytes:
    damaged = bytearray(data)
    struct.pack_into(">I", damaged, 8, len(data) * 2)
    return bytes(damaged)


def _wrong_count(data: bytes) -> bytes:
    damaged = bytearray(data)
    struct.pack_into(">i", damaged, 57, 7)
    return bytes(damaged)


def _poison_record(data: bytes) -> bytes:
    """Valid CRC and record lengths, but record 1's key runs past its record (issue 6)."""
    damaged = bytearray(data)
    second = 61 + 4 + struct.unpack_from(">I", damaged, 61)[0]
    struct.pack_into(">i", damaged, second + 8, 200)
    struct.pack_into(">I", damaged, 17, zlib.crc32(memoryview(damaged)[21:]))
    return bytes(damaged)


BAD_PRODUCES: list[tuple[str, Callable[[bytes], bytes], dict[str, str], int, int, str]] = [
    ("crc", _corrupt_crc, {}, 0, 400, "corrupt_batch"),
    ("length", _wrong_length, {}, 0, 400, "corrupt_batch"),
    ("truncated", lambda b: b[:-3], {}, 0, 400, "corrupt_batch"),
    ("trailing garbage", lambda b: b + b"xyz", {}, 0, 400, "corrupt_batch"),
    ("record count", _wrong_count, {}, 0, 400, "corrupt_batch"),
    ("poison record", _poison_record, {}, 0, 400, "corrupt_batch"),
    ("empty body", lambda b: b"", {}, 0, 400, "corrupt_batch"),
    ("not leader", lambda b: b, {}, 1, 421, "not_leader"),
    ("stale epoch", lambda b: b, {"leader_epoch": "0"}, 0, 409, "fenced_leader_epoch"),
    ("future epoch", lambda b: b, {"leader_epoch": "9"}, 0, 409, "unknown_leader_epoch"),
    ("bad acks", lambda b: b, {"acks": "2"}, 0, 400, "invalid_request"),
]


@pytest.mark.parametrize(
    ("damage", "query", "partition", "status", "code"),
    [case[1:] for case in BAD_PRODUCES],
    ids=[case[0] for case in BAD_PRODUCES],
)
def test_bad_produce_appends_nothing(
    tmp_path: Path,
    damage: Callable[[bytes], bytes],
    query: dict[str, str],
    partition: int,
    status: int,
    code: str,
) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            assert (await produce(client, batch(2))).status == 200
            before = {key: r.log.log_end_offset for key, r in broker.replicas.items()}
            await expect_error(
                await produce(client, damage(batch(3)), partition, **query), status, code
            )
            after = {key: r.log.log_end_offset for key, r in broker.replicas.items()}
            assert after == before
            assert (await produce(client, batch(1))).status == 200  # still serving

    run(scenario)


def test_malformed_json_and_bad_records(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            url = BASE.format(0) + "/records"
            headers = {"Content-Type": "application/json"}
            await expect_error(
                await client.post(url, data=b"{not json", headers=headers), 400, "malformed_json"
            )
            await expect_error(await client.post(url, json={"records": []}), 400, "invalid_request")
            await expect_error(
                await client.post(url, json={"records": [{"value": 5}]}), 400, "invalid_request"
            )
            await expect_error(await client.post(url, json=[1, 2]), 400, "invalid_request")
            await expect_error(
                await client.post(url, json={"records": [{"value": "@@"}], "encoding": "base64"}),
                400,
                "invalid_request",
            )
            assert broker.replicas[("orders", 0)].log.log_end_offset == 0

    run(scenario)


def test_oversized_request(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path, max_request_bytes=4096) as (broker, client):
            big = build_batch([(b"k", b"x" * 8000)], 1000)
            await expect_error(await produce(client, big), 413, "request_too_large")
            assert broker.replicas[("orders", 0)].log.log_end_offset == 0
            assert (await produce(client, batch(1))).status == 200

    run(scenario)


def test_unknown_topic_partition_and_bad_offsets(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (_, client):
            assert (await produce(client, batch(3))).status == 200
            await expect_error(
                await client.post(
                    "/v1/topics/nope/partitions/0/records",
                    data=batch(1),
                    headers={"Content-Type": BATCH_TYPE},
                ),
                404,
                "unknown_topic",
            )
            await expect_error(
                await produce(client, batch(1), partition=7), 404, "unknown_partition"
            )
            await expect_error(
                await client.get("/v1/topics/orders/partitions/-1/records?offset=0"),
                400,
                "invalid_request",
            )
            await expect_error(
                await client.get(BASE.format(0) + "/records?offset=-1"), 400, "invalid_request"
            )
            await expect_error(
                await client.get(BASE.format(0) + "/records?offset=4"), 416, "offset_out_of_range"
            )
            await expect_error(
                await client.get(BASE.format(0) + "/records?offset=abc"), 400, "invalid_request"
            )
            await expect_error(
                await client.get(BASE.format(0) + "/records?offset=0&wait_ms=999999"),
                400,
                "invalid_request",
            )
            await expect_error(await client.get("/v1/nothing"), 404, "not_found")
            ok = await client.get(BASE.format(0) + "/records?offset=3")
            assert ok.status == 200 and (await ok.json())["records"] == []

    run(scenario)


def test_fsync_never_and_interval_still_serve(tmp_path: Path) -> None:
    async def scenario() -> None:
        for policy in (FsyncPolicy.NEVER, FsyncPolicy.INTERVAL):
            async with broker_client(tmp_path / policy.value, fsync=policy) as (_, client):
                answer = await (await produce(client, batch(4))).json()
                assert answer["high_watermark"] == 4

    run(scenario)


def test_reassignment_and_topic_deletion(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            assert (await produce(client, batch(1))).status == 200
            broker.reconcile(_answer(epoch=2, leader=2))
            await expect_error(await produce(client, batch(1)), 421, "not_leader")
            broker.reconcile(_answer(epoch=3, leader=1))
            assert (await produce(client, batch(1), leader_epoch="3")).status == 200
            directory = tmp_path / f"orders-0-{TOPIC_ID}"
            assert directory.exists()
            # A coordinator that forgot the topic (not deleted it) never deletes data.
            forgot = control.HeartbeatAnswer("c1", [], {}, [], 1000)
            broker.reconcile(forgot)
            assert broker.replicas == {} and directory.exists()
            await expect_error(await produce(client, batch(1)), 404, "unknown_topic")
            # An explicit delete of this topic id does.
            broker.reconcile(control.HeartbeatAnswer("c1", [], {}, [TOPIC_ID], 1000))
            assert not directory.exists()

    run(scenario)


def test_metrics_and_openapi(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (_, client):
            assert (await produce(client, batch(2))).status == 200
            metrics = await (await client.get("/metrics")).text()
            assert 'tide_messages_in_total{topic="orders"} 2.0' in metrics
            assert "tide_fsync_duration_seconds_count" in metrics
            spec = await (await client.get("/openapi.json")).json()
            assert "/v1/topics/{topic}/partitions/{partition}/records" in spec["paths"]
            assert (await client.get("/readyz")).status == 200
            assert json.loads(await (await client.get("/healthz")).text())["status"] == "ok"

    run(scenario)


def test_multi_partition_produce_answers_per_partition(tmp_path: Path) -> None:
    from tidemq.wire.produce import PRODUCE_TYPE, encode_produce

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            body = encode_produce(
                [
                    ("orders", 0, 1, batch(2)),
                    ("orders", 1, 1, batch(1)),
                    ("orders", 0, -1, batch(3)),
                    ("nope", 0, -1, batch(1)),
                ]
            )
            headers = {"Content-Type": PRODUCE_TYPE}
            response = await client.post("/v1/produce", data=body, headers=headers)
            assert response.status == 200
            results = (await response.json())["results"]
            assert [r.get("base_offset") for r in results] == [0, None, 2, None]
            assert results[1]["error"]["code"] == "not_leader"
            assert results[3]["error"]["code"] == "unknown_topic"
            assert broker.replicas[("orders", 0)].log.log_end_offset == 5
            for damaged in (body[:-1], body + b"\x00", b""):
                await expect_error(
                    await client.post("/v1/produce", data=damaged, headers=headers),
                    400,
                    "corrupt_batch",
                )
            assert broker.replicas[("orders", 0)].log.log_end_offset == 5

    run(scenario)


def test_json_fetch_is_bounded_by_its_output_size(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (_, client):
            values = [(None, bytes([i % 256]) * 300) for i in range(40)]
            assert (await produce(client, build_batch(values, 1000))).status == 200
            # 40 records of 300 bytes are ~16 KB of base64 JSON from a ~12 KB batch
            offset, seen = 0, 0
            while offset < 40:
                response = await client.get(
                    BASE.format(0) + "/records",
                    params={"offset": str(offset), "max_bytes": "2000", "encoding": "base64"},
                )
                body = await response.json()
                assert 1 <= len(body["records"]) <= 5, "bounded by rendered size, not input"
                assert len(await response.read()) < 2000 + 5 * 200
                assert body["records"][0]["offset"] == offset
                offset = body["next_offset"]
                seen += len(body["records"])
            assert seen == 40

    run(scenario)


def test_produce_admission_control_refuses_past_the_in_flight_byte_limit(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            broker.config.max_inflight_produce_bytes = 1000
            # partition 0 now has a follower that never fetches: acks=all waits
            answer = _answer(epoch=2)
            first = answer.assignments[0]
            waiting = msgspec.structs.replace(first, replicas=[1, 2], isr=[1, 2])
            broker.reconcile(msgspec.structs.replace(answer, assignments=[waiting]))
            held = asyncio.ensure_future(produce(client, batch(20)))
            deadline = asyncio.get_running_loop().time() + 10
            while broker._inflight_produce_bytes == 0:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            big = batch(30)
            assert len(big) > 1000 - broker._inflight_produce_bytes
            await expect_error(await produce(client, big), 503, "broker_busy")
            assert broker.replicas[("orders", 0)].log.log_end_offset == 20
            held.cancel()

    run(scenario)


def test_multi_partition_fetch_waits_once_for_whichever_partition_has_data(
    tmp_path: Path,
) -> None:
    from tidemq.wire.fetch import FETCH_TYPE, decode_fetch

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            two_leaders = _answer(epoch=2)
            both = [
                msgspec.structs.replace(a, leader_id=1, replicas=[1], isr=[1])
                for a in two_leaders.assignments
            ]
            broker.reconcile(msgspec.structs.replace(two_leaders, assignments=both))
            request = {
                "wait_ms": 5000,
                "partitions": [
                    {"topic": "orders", "partition": 0, "offset": 0},
                    {"topic": "orders", "partition": 1, "offset": 0},
                ],
            }
            waiting = asyncio.ensure_future(client.post("/v1/fetch", json=request))
            await asyncio.sleep(0.2)  # let the fetch park on both partitions
            assert not waiting.done()
            assert (await produce(client, batch(3), partition=1)).status == 200
            response = await asyncio.wait_for(waiting, 5)
            assert response.status == 200 and response.content_type == FETCH_TYPE
            [entry] = decode_fetch(await response.read())
            assert (entry.topic, entry.partition, entry.error) == ("orders", 1, None)
            assert [r.value for r in decode_records(entry.batches)] == [b"v0", b"v1", b"v2"]
            assert entry.high_watermark == 3
            assert broker.replicas[("orders", 0)].core.waiting() == 0  # the other waiter left
            # errors come back at once, per partition, next to data
            request["partitions"].append({"topic": "orders", "partition": 7, "offset": 0})
            response = await client.post("/v1/fetch", json=request)
            entries = {e.partition: e for e in decode_fetch(await response.read())}
            assert entries[7].error is not None and entries[7].error["code"] == "unknown_partition"
            assert entries[1].batches and 0 not in entries
            bad = await client.post("/v1/fetch", json={"partitions": []})
            await expect_error(bad, 400, "invalid_request")

    run(scenario)


def test_any_failure_of_the_background_work_is_fail_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: an EIO outside the syncer ended the task group, and the broker
    then closed "cleanly" (syncing again, writing clean-shutdown markers)."""
    import errno

    import tidemq.broker.server as server_module

    stopped: list[str] = []  # the real fail_stop ends the process: record instead
    monkeypatch.setattr(server_module, "fail_stop", stopped.append)

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):

            async def disk_error() -> None:
                raise OSError(errno.EIO, "Input/output error")

            async def idle() -> None:
                await asyncio.sleep(3600)

            monkeypatch.setattr(broker, "maintenance_loop", disk_error)
            for name in ("coordinator_loop", "tick_loop"):
                monkeypatch.setattr(broker, name, idle)
            monkeypatch.setattr(broker.syncer, "run", idle)
            await asyncio.wait_for(broker.run(), 10)
            assert stopped and "Input/output error" in stopped[0]

    run(scenario)


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "per-log"])
def test_a_failed_fsync_is_fail_stop_and_nothing_is_marked_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: bool
) -> None:
    import tidemq.broker.syncer as syncer_module

    stopped: list[str] = []
    monkeypatch.setattr(syncer_module, "fail_stop", stopped.append)

    async def scenario() -> None:
        async with broker_client(tmp_path, journal=journal) as (broker, client):
            replica = broker.replicas[("orders", 0)]

            def eio() -> int:
                raise OSError(5, "Input/output error")

            if journal:
                assert broker.syncer.journal is not None
                monkeypatch.setattr(broker.syncer.journal, "sync", eio)
            else:
                monkeypatch.setattr(replica.log, "sync", eio)
            produced = asyncio.ensure_future(produce(client, batch(2)))
            deadline = asyncio.get_running_loop().time() + 10
            while not stopped:
                assert asyncio.get_running_loop().time() < deadline, "no fail-stop"
                await asyncio.sleep(0.01)
            assert ("fsync of the journal failed" if journal else "fsync of orders/0 failed") in (
                stopped[0]
            )
            assert replica.high_watermark == 0  # nothing acknowledged on a failed fsync
            produced.cancel()
            monkeypatch.undo()

    run(scenario)


def test_a_weak_fsync_broker_says_when_it_did_not_shut_down_cleanly(tmp_path: Path) -> None:
    def broker(fsync: FsyncPolicy) -> Broker:
        config = BrokerConfig(1, tmp_path, "http://c", "http://b", LogConfig(fsync=fsync))
        return Broker(config, lambda: HttpTransport(False, {}, 4, 1000), CollectorRegistry())

    assert broker(FsyncPolicy.INTERVAL).unclean_weak_fsync  # no marker: a crash, maybe
    clean = broker(FsyncPolicy.INTERVAL)
    asyncio.run(clean.close())
    assert not broker(FsyncPolicy.INTERVAL).unclean_weak_fsync  # closed cleanly
    assert broker(FsyncPolicy.INTERVAL).unclean_weak_fsync  # the last run "crashed"
    assert not broker(FsyncPolicy.ALWAYS).unclean_weak_fsync  # durable means durable


def test_maintenance_skips_replicas_dropped_while_it_awaits(tmp_path: Path) -> None:
    """A topic deleted while the maintenance pass waits for a checkpoint fsync: the
    pass skips the closed replicas (it used one, the broker failed-stop; schemathesis
    found it by creating and deleting topics)."""

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            loop = asyncio.get_running_loop()
            entered, passes, second_pass = asyncio.Event(), [0], asyncio.Event()
            released = threading.Event()
            first = broker.replicas[("orders", 0)]

            def checkpoint_blocks() -> None:
                if threading.current_thread() is threading.main_thread():
                    return  # the replica's own close(), on the event loop
                loop.call_soon_threadsafe(entered.set)  # the pass, in asyncio.to_thread
                released.wait(10)

            def count_pass(now_ms: int) -> None:
                passes[0] += 1
                if passes[0] == 2:
                    second_pass.set()

            first.checkpoint_high_watermark = checkpoint_blocks  # type: ignore[method-assign]
            first._checkpointed_high_watermark = -1  # as if its high watermark had moved
            broker.metrics.update_producers = count_pass  # type: ignore[method-assign]
            task = asyncio.ensure_future(broker.maintenance_loop())
            await asyncio.wait_for(entered.wait(), 10)
            deleted = msgspec.structs.replace(
                _answer(), assignments=[], topics={}, deleted_topic_ids=[TOPIC_ID]
            )
            broker.reconcile(deleted)
            assert broker.replicas == {}
            released.set()
            waiter = asyncio.ensure_future(second_pass.wait())
            done, _ = await asyncio.wait({task, waiter}, timeout=10, return_when="FIRST_COMPLETED")
            task.cancel()
            waiter.cancel()
            assert waiter in done, task.exception() if task.done() else "no second pass"

    run(scenario)


def test_maintenance_checkpoints_only_high_watermarks_that_moved(tmp_path: Path) -> None:
    """A checkpoint is two fsyncs on a worker thread; the pass hands over only the
    replicas whose high watermark moved since their last checkpoint (a broker with
    hundreds of idle partitions made hundreds of thread hops a second)."""

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            replica = broker.replicas[("orders", 0)]
            on_threads: list[str] = []
            passes: list[asyncio.Event] = [asyncio.Event() for _ in range(4)]
            real_checkpoint = replica.checkpoint_high_watermark

            def checkpoint() -> None:
                on_threads.append(threading.current_thread().name)
                real_checkpoint()

            def count_pass(now_ms: int) -> None:
                next(p for p in passes if not p.is_set()).set()

            replica.checkpoint_high_watermark = checkpoint  # type: ignore[method-assign]
            broker.metrics.update_producers = count_pass  # type: ignore[method-assign]
            task = asyncio.ensure_future(broker.maintenance_loop())
            checkpoint = replica.directory / HIGH_WATERMARK_FILE
            try:
                await asyncio.wait_for(passes[1].wait(), 10)  # a whole pass after the first
                assert not replica.checkpoint_due and on_threads == []
                answer = await produce(client, batch(2))  # the high watermark: 0 -> 2
                assert answer.status == 200 and replica.high_watermark == 2
                assert replica.checkpoint_due
                await asyncio.wait_for(passes[3].wait(), 10)
                assert len(on_threads) == 1 and on_threads[0] != "MainThread"
                assert read_offset(checkpoint) == 2 and not replica.checkpoint_due
                # A high watermark below the checkpointed one (a follower's truncation)
                # is due as well.
                replica._checkpointed_high_watermark = 7
                assert replica.checkpoint_due
            finally:
                task.cancel()

    run(scenario)


def test_a_close_and_the_maintenance_pass_write_the_checkpoint_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: both wrote high-watermark-checkpoint.tmp at once, and the
    first rename took the file from under the second (FileNotFoundError out of
    close(), which the broker treats as fatal)."""

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            replica = broker.replicas[("orders", 0)]
            assert (await produce(client, batch(2))).status == 200
            with checkpoint_on_a_thread(replica, monkeypatch) as most_at_once:
                replica.close()  # writes the same checkpoint (before this fix: at once)
            assert most_at_once[0] == 1
            assert read_offset(replica.directory / HIGH_WATERMARK_FILE) == 2

    run(scenario)


@contextmanager
def checkpoint_on_a_thread(replica: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Runs the maintenance pass's checkpoint write on a thread, each write made slow
    (0.2 s); the body runs while that write is under way. Yields the most writes
    that were under way at once; any exception on the thread fails the test."""
    import tidemq.broker.partition as partition_module

    writing, most, errors = [0], [0], []
    real_write = partition_module.write_offset

    def slow_write(path: Path, offset: int) -> None:
        writing[0] += 1
        most[0] = max(most[0], writing[0])
        try:
            threading.Event().wait(0.2)  # long enough for the other writer to come in
            real_write(path, offset)
        finally:
            writing[0] -= 1

    def checkpoint() -> None:
        try:
            replica.checkpoint_high_watermark()
        except BaseException as error:
            errors.append(error)

    monkeypatch.setattr(partition_module, "write_offset", slow_write)
    pass_ = threading.Thread(target=checkpoint)
    pass_.start()
    deadline = time.monotonic() + 10
    while writing[0] == 0:  # until the pass is inside its write
        assert time.monotonic() < deadline, "the pass never wrote"
        threading.Event().wait(0.001)
    yield most
    pass_.join(10)
    monkeypatch.setattr(partition_module, "write_offset", real_write)
    assert not pass_.is_alive() and errors == []


async def follower_with_records(broker: Broker) -> Any:
    """Partition 1's follower replica, holding 3 durable records, high watermark 3."""
    follower = broker.replicas[("orders", 1)]
    follower.append_replicated(batch(3), 0)
    broker.syncer.mark_dirty(follower)
    await broker.syncer.sync_dirty()
    follower.leader_answered(3)
    return follower


def test_a_follower_reset_waits_for_a_checkpoint_write_in_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by re-review: reset_to recreated the directory while the maintenance
    pass was writing the checkpoint there; the pass's rename failed
    (FileNotFoundError: the broker stops) or the pass recorded the checkpoint as
    written after reset_to had voided it."""

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, _):
            follower = await follower_with_records(broker)
            with checkpoint_on_a_thread(follower, monkeypatch):
                follower.reset_to(50, 0)
            assert follower.log.log_start_offset == 50
            assert follower.checkpoint_due  # the old directory's file is gone
            follower.checkpoint_high_watermark()
            checkpoint = follower.directory / HIGH_WATERMARK_FILE
            assert read_offset(checkpoint) == follower.high_watermark

    run(scenario)


def test_a_starting_broker_says_not_leader_not_unknown_topic(tmp_path: Path) -> None:
    """Seen by the fault suite: a restarted broker answered unknown_topic (final for a
    producer) until its first heartbeat answer told it the topics."""
    config = BrokerConfig(1, tmp_path, "http://c", "http://b", LogConfig())
    broker = Broker(config, lambda: HttpTransport(False, {}, 4, 1000), CollectorRegistry())
    with pytest.raises(NotLeader):
        broker.replica_for("orders", 0)
    broker.reconcile(_answer())
    with pytest.raises(UnknownTopic):
        broker.replica_for("nothing", 0)
