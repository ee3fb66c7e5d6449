"""The coordinator over real HTTP (plain, in-process) and a real SQLite store."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import astuple
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from tidemq.client.config import ConnectionConfig
from tidemq.client.transport import Transport
from tidemq.coordinator.main import CoordinatorConfig, command, run_coordinator
from tidemq.errors import ConnectionFailed
from tidemq.tls import TlsFiles, client_context, ensure_cluster_pki, server_context

DEADLINE_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self, method: str, path: str, body: Any = None, data: bytes | None = None
    ) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, json=body, data=data) as response:
            return response.status, await response.json()

    async def text(self, path: str) -> str:
        async with self.session.get(self.base + path) as response:
            return await response.text()


@asynccontextmanager
async def coordinator(data_dir: Path, **options: Any) -> AsyncIterator[Api]:
    port = free_port()
    config = CoordinatorConfig(data_dir=data_dir, port=port, plain_http=True, **options)
    task = asyncio.create_task(run_coordinator(config))
    async with aiohttp.ClientSession() as session:
        api = Api(session, f"http://127.0.0.1:{port}")

        async def ready() -> bool:
            if task.done():
                task.result()
            try:
                return (await api.call("GET", "/readyz"))[0] == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, "the coordinator to be ready")
        try:
            yield api
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


def scenario(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


async def register(api: Api, *broker_ids: int) -> None:
    for broker_id in broker_ids:
        status, body = await api.call(
            "POST",
            "/v1/brokers/register",
            {"broker_id": broker_id, "url": f"https://127.0.0.1:{9100 + broker_id}"},
        )
        assert status == 200 and body["broker_id"] == broker_id


def test_topics_brokers_and_restart(tmp_path: Path) -> None:
    async def run() -> None:
        async with coordinator(tmp_path) as api:
            await register(api, 1, 2, 3)
            status, body = await api.call("POST", "/v1/brokers/1/heartbeat", {"partitions": []})
            assert status == 200 and body["assignments"] == [] and body["topics"] == {}

            status, topic = await api.call(
                "POST", "/v1/topics", {"name": "orders", "partitions": 6, "replication_factor": 2}
            )
            assert status == 201 and len(topic["partitions"]) == 6
            first = topic["partitions"][0]
            assert first["leader_id"] == first["replicas"][0]
            assert first["leader_url"] == f"https://127.0.0.1:{9100 + first['leader_id']}"
            assert first["leader_epoch"] == 0 and first["isr"] == first["replicas"]
            assert len(topic["topic_id"]) == 32 and topic["min_insync_replicas"] == 1

            status, body = await api.call("POST", "/v1/topics", {"name": "orders"})
            assert (status, body["error"]["code"]) == (409, "topic_exists")

            status, body = await api.call("POST", "/v1/brokers/2/heartbeat", {"partitions": []})
            assert body["topics"] == {"orders": {"topic_id": topic["topic_id"], "partitions": 6}}
            assert body["cluster_id"] and body["deleted_topic_ids"] == []
            assert {a["partition"] for a in body["assignments"]} == {
                p["partition"] for p in topic["partitions"] if 2 in p["replicas"]
            }

            status, body = await api.call("GET", "/v1/topics")
            assert [t["name"] for t in body["topics"]] == ["orders"]
            assert (await api.call("GET", "/v1/topics/orders"))[1] == topic
            status, body = await api.call("GET", "/v1/brokers")
            assert [(b["id"], b["alive"], b["partitions"]) for b in body["brokers"]] == [
                (1, True, 4),
                (2, True, 4),
                (3, True, 4),
            ]

            status, body = await api.call("GET", "/v1/metadata?topics=orders,auto&auto_create=true")
            assert status == 200
            assert [
                (t["name"], len(t["partitions"]), t["replication_factor"]) for t in body["topics"]
            ] == [("orders", 6, 2), ("auto", 12, 2)]

            status, body = await api.call(
                "POST",
                "/v1/groups/g/offsets",
                {"offsets": [{"topic": "orders", "partition": 3, "offset": 42}]},
            )
            assert (status, body) == (200, {"committed": 1})
            status, body = await api.call("POST", "/v1/producers", {})
            assert (status, body) == (200, {"producer_id": 0, "producer_epoch": 0})

            status, body = await api.call("DELETE", "/v1/topics/auto")
            assert (status, body) == (200, {"deleted": "auto"})
            status, cluster = await api.call("GET", "/v1/cluster")
            assert cluster["topics"] == ["orders"] and cluster["controller"] == "coordinator"

        async with coordinator(tmp_path) as api:  # same data dir: everything survived
            status, again = await api.call("GET", "/v1/cluster")
            assert again["cluster_id"] == cluster["cluster_id"]
            assert again["topics"] == ["orders"]
            assert (await api.call("GET", "/v1/topics/orders"))[1] == topic
            status, body = await api.call("GET", "/v1/groups/g/offsets?topics=orders")
            assert body == {"offsets": [{"topic": "orders", "partition": 3, "offset": 42}]}
            status, body = await api.call("POST", "/v1/producers", {})
            assert body["producer_id"] == 1
            status, body = await api.call("GET", "/v1/brokers")
            assert all(b["alive"] for b in body["brokers"])  # a fresh session for each

    scenario(run)


def test_errors_change_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        async with coordinator(tmp_path) as api:
            status, body = await api.call("POST", "/v1/topics", {"name": "t"})
            assert (status, body["error"]["code"]) == (503, "no_brokers_available")
            await register(api, 1)
            status, body = await api.call("POST", "/v1/topics", data=b"{not json")
            assert (status, body["error"]["code"]) == (400, "malformed_json")
            # What json.loads refuses with a plain ValueError (an integer past 4,300
            # digits) or RecursionError (deep nesting) is malformed JSON too, not a 500.
            for unreadable in (
                b'{"name": "t", "partitions": ' + b"1" * 5000 + b"}",
                b"[" * 100_000,
            ):
                status, body = await api.call("POST", "/v1/topics", data=unreadable)
                assert (status, body["error"]["code"]) == (400, "malformed_json")
            for bad in (
                {"name": "t", "partitions": 0},
                {"name": "t", "partitions": "x"},
                {"name": "t", "partitions": 10_001},
                {"name": "bad name!"},
                {"name": "t", "partitions": 1.5},
            ):
                status, body = await api.call("POST", "/v1/topics", bad)
                assert (status, body["error"]["code"]) == (400, "invalid_request"), bad
            # Well-formed, but more replicas than live brokers: a conflict with the state.
            status, body = await api.call(
                "POST", "/v1/topics", {"name": "t", "replication_factor": 2}
            )
            assert (status, body["error"]["code"]) == (409, "cluster_state_conflict")
            assert (await api.call("GET", "/v1/topics"))[1] == {"topics": []}
            status, body = await api.call("GET", "/v1/topics/nope")
            assert (status, body["error"]["code"]) == (404, "unknown_topic")
            status, body = await api.call("DELETE", "/v1/topics/nope")
            assert (status, body["error"]["code"]) == (404, "unknown_topic")
            status, body = await api.call("GET", "/v1/metadata?topics=nope")
            assert (status, body["error"]["code"]) == (404, "unknown_topic")
            status, body = await api.call("POST", "/v1/brokers/7/heartbeat", {"partitions": []})
            assert (status, body["error"]["code"]) == (404, "unknown_broker")
            status, body = await api.call("GET", "/v1/groups/nope")
            assert (status, body["error"]["code"]) == (404, "unknown_group")
            status, body = await api.call(
                "POST",
                "/v1/groups/g/offsets",
                {"offsets": [{"topic": "nope", "partition": 0, "offset": 1}]},
            )
            assert (status, body["error"]["code"]) == (404, "unknown_topic")
            # A member id that is not text (a lone surrogate) would be echoed back in
            # answers no strict JSON reader accepts: refused, and no group is made.
            status, body = await api.call(
                "POST",
                "/v1/groups/g/heartbeat",
                {"member_id": "\ud800evil", "member_epoch": 0, "topics": ["t"]},
            )
            assert (status, body["error"]["code"]) == (400, "invalid_request"), body
            status, body = await api.call("GET", "/v1/groups")
            assert body == {"groups": []}

    scenario(run)


def test_consumer_group_over_http(tmp_path: Path) -> None:
    async def run() -> None:
        async with coordinator(tmp_path) as api:
            await register(api, 1, 2)
            await api.call("POST", "/v1/topics", {"name": "orders", "partitions": 4})

            async def beat(member: str | None, epoch: int, owned: list[Any]) -> dict[str, Any]:
                status, body = await api.call(
                    "POST",
                    "/v1/groups/g/heartbeat",
                    {
                        "member_id": member,
                        "member_epoch": epoch,
                        "topics": ["orders"],
                        "owned": owned,
                        "session_timeout_ms": 10_000,
                    },
                )
                assert status == 200, body
                return dict(body)

            a = await beat(None, 0, [])
            assert len(a["assignment"]) == 4 and a["member_epoch"] == 2
            b = await beat(None, 0, [])
            assert b["assignment"] == []
            a = await beat(a["member_id"], a["member_epoch"], a["assignment"])
            a = await beat(a["member_id"], a["member_epoch"], a["assignment"])
            b = await beat(b["member_id"], b["member_epoch"], [])
            assert len(a["assignment"]) == 2 and len(b["assignment"]) == 2

            b_partition = b["assignment"][0]["partition"]
            stale = {
                "member_id": b["member_id"],
                "member_epoch": b["member_epoch"] - 1,
                "offsets": [{"topic": "orders", "partition": b_partition, "offset": 1}],
            }
            status, body = await api.call("POST", "/v1/groups/g/offsets", stale)
            assert (status, body["error"]["code"]) == (409, "stale_member_epoch")
            ahead = {**stale, "member_epoch": b["member_epoch"] + 1}
            status, body = await api.call("POST", "/v1/groups/g/offsets", ahead)
            assert (status, body["error"]["code"]) == (409, "fenced_member")
            not_owner = {**stale, "member_id": a["member_id"], "member_epoch": a["member_epoch"]}
            status, body = await api.call("POST", "/v1/groups/g/offsets", not_owner)
            assert (status, body["error"]["code"]) == (409, "fenced_member")
            status, body = await api.call(
                "POST", "/v1/groups/g/offsets", {**stale, "member_epoch": b["member_epoch"]}
            )
            assert body == {"committed": 1}

            status, group = await api.call("GET", "/v1/groups/g")
            assert len(group["members"]) == 2
            assert group["offsets"] == [
                {
                    "topic": "orders",
                    "partition": b_partition,
                    "committed": 1,
                    "high_watermark": None,
                    "lag": None,
                }
            ]
            assert (await api.call("POST", "/v1/groups/g/leave", {"member_id": a["member_id"]}))[
                1
            ] == {"left": True}
            b = await beat(b["member_id"], b["member_epoch"], b["assignment"])
            assert len(b["assignment"]) == 4
            metrics = await api.text("/metrics")
            assert 'tide_consumer_group_members{group="g"} 1.0' in metrics

    scenario(run)


def test_failover_when_a_broker_stops_heartbeating(tmp_path: Path) -> None:
    async def run() -> None:
        options = {"session_timeout_ms": 300, "heartbeat_interval_ms": 50}
        async with coordinator(tmp_path, **options) as api:
            await register(api, 1, 2)
            _, topic = await api.call("POST", "/v1/topics", {"name": "t", "partitions": 2})
            led_by_1 = next(p for p in topic["partitions"] if p["leader_id"] == 1)
            report = {
                "topic": "t",
                "partition": led_by_1["partition"],
                "leader_epoch": 0,
                "log_start_offset": 0,
                "log_end_offset": 0,
                "high_watermark": 0,
            }

            async def follower_joined_isr() -> bool:
                for broker in (1, 2):
                    body = {"partitions": [report]}
                    await api.call("POST", f"/v1/brokers/{broker}/heartbeat", body)
                partition = (await api.call("GET", "/v1/topics/t"))[1]["partitions"][
                    led_by_1["partition"]
                ]
                return bool(partition["isr"] == [1, 2])

            await eventually(follower_joined_isr, "the caught-up follower to join the ISR")

            async def moved() -> bool:
                await api.call("POST", "/v1/brokers/2/heartbeat", {"partitions": []})
                partition = (await api.call("GET", "/v1/topics/t"))[1]["partitions"][
                    led_by_1["partition"]
                ]
                return bool(partition["leader_id"] == 2)

            await eventually(moved, "leadership to move to broker 2")
            partition = (await api.call("GET", "/v1/topics/t"))[1]["partitions"][
                led_by_1["partition"]
            ]
            assert partition["leader_epoch"] == led_by_1["leader_epoch"] + 1
            assert partition["isr"] == [2]
            metrics = await api.text("/metrics")
            assert "tide_brokers_alive 1.0" in metrics
            assert "tide_partitions_under_replicated 2.0" in metrics
            assert "tide_leader_elections_total 1.0" in metrics

    scenario(run)


def test_snapshots_compact_the_log_and_replay(tmp_path: Path) -> None:
    async def run() -> None:
        async with coordinator(tmp_path, snapshot_every=3) as api:
            await register(api, 1)
            for index in range(7):
                status, _ = await api.call(
                    "POST", "/v1/topics", {"name": f"t{index}", "partitions": 1}
                )
                assert status == 201
            await api.call("DELETE", "/v1/topics/t3")
            before = (await api.call("GET", "/v1/topics"))[1]
        async with coordinator(tmp_path, snapshot_every=3) as api:
            assert (await api.call("GET", "/v1/topics"))[1] == before

        import sqlite3

        with sqlite3.connect(tmp_path / "coordinator.sqlite") as connection:
            [(snapshot_seq,)] = connection.execute("SELECT seq FROM snapshot").fetchall()
            seqs = [row[0] for row in connection.execute("SELECT seq FROM commands")]
        connection.close()
        assert snapshot_seq >= 9 and all(seq > snapshot_seq for seq in seqs) and len(seqs) < 3

    scenario(run)


def test_cli_refuses_plain_http_unless_asked(tmp_path: Path) -> None:
    result = CliRunner().invoke(command, ["--data-dir", str(tmp_path), "--port", "1"])
    assert result.exit_code != 0 and "--plain-http" in result.output


@asynccontextmanager
async def tls_coordinator(
    tmp_path: Path, names: list[str]
) -> AsyncIterator[tuple[str, dict[str, TlsFiles], dict[str, Api]]]:
    """A coordinator under mutual TLS; its URL, the PKI files, one Api per certificate."""
    files = ensure_cluster_pki(tmp_path / "pki", ["coordinator", *names])
    port = free_port()
    config = CoordinatorConfig(data_dir=tmp_path / "data", port=port, tls=files["coordinator"])
    task = asyncio.create_task(run_coordinator(config))
    base = f"https://127.0.0.1:{port}"
    async with AsyncExitStack() as stack:
        apis: dict[str, Api] = {}
        for name in names:
            connector = aiohttp.TCPConnector(ssl=client_context(files[name]))
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            apis[name] = Api(session, base)

        async def ready() -> bool:
            if task.done():
                task.result()
            try:
                return (await apis[names[0]].call("GET", "/readyz"))[0] == 200
            except aiohttp.ClientConnectionError:
                return False

        try:
            await eventually(ready, "the TLS coordinator to be ready")
            yield base, files, apis
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


def test_mutual_tls(tmp_path: Path) -> None:
    """Without a certificate, or with one of another CA, the TLS handshake fails and the
    client raises ConnectionFailed; the cluster's client certificate gets in."""
    stranger = ensure_cluster_pki(tmp_path / "other-ca", ["client"])["client"]

    async def run() -> None:
        async with tls_coordinator(tmp_path, ["client"]) as (base, files, _):
            ca_file = files["client"].ca_file
            refused = [
                TlsFiles(ca_file),
                TlsFiles(ca_file, stranger.cert_file, stranger.key_file),
            ]
            for tls in refused:
                transport = Transport(ConnectionConfig((base,), *astuple(tls)))
                try:
                    with pytest.raises(ConnectionFailed):
                        await transport.coordinator("GET", "/v1/cluster")
                finally:
                    await transport.close()
            transport = Transport(ConnectionConfig((base,), *astuple(files["client"])))
            try:
                answer = await transport.coordinator("GET", "/v1/cluster")
                assert answer["cluster_id"]
            finally:
                await transport.close()

    scenario(run)


def test_tls_without_the_ca_file_is_refused(tmp_path: Path) -> None:
    files = ensure_cluster_pki(tmp_path / "pki", ["coordinator"])["coordinator"]
    assert files.cert_file and files.key_file
    tls_args = ["--cert-file", files.cert_file, "--key-file", files.key_file]
    result = CliRunner().invoke(command, ["--data-dir", str(tmp_path), "--port", "1", *tls_args])
    assert result.exit_code != 0 and "--ca-file" in result.output
    with pytest.raises(ValueError, match="CA"):
        server_context(TlsFiles(None, files.cert_file, files.key_file))


async def refused(api: Api, method: str, path: str, body: Any = None) -> str:
    status, answer = await api.call(method, path, body)
    assert (status, answer["error"]["code"]) == (403, "forbidden"), (method, path, answer)
    message: str = answer["error"]["message"]
    return message


def test_only_broker_n_acts_as_broker_n(tmp_path: Path) -> None:
    """A client certificate cannot register as broker 1 and send clients elsewhere."""

    async def run() -> None:
        names = ["client", "broker-1", "broker-2", "coordinator"]
        async with tls_coordinator(tmp_path, names) as (_, _, api):
            evil = {"broker_id": 1, "url": "https://evil.example:1"}
            for name in ("client", "broker-2", "coordinator"):
                await refused(api[name], "POST", "/v1/brokers/register", evil)
            assert (await api["client"].call("GET", "/v1/brokers"))[1]["brokers"] == []

            good = {"broker_id": 1, "url": "https://127.0.0.1:9101"}
            status, body = await api["broker-1"].call("POST", "/v1/brokers/register", good)
            assert (status, body["broker_id"]) == (200, 1)
            status, _ = await api["broker-1"].call(
                "POST", "/v1/brokers/1/heartbeat", {"partitions": []}
            )
            assert status == 200
            message = await refused(api["broker-2"], "POST", "/v1/brokers/register", evil)
            assert "'broker-2'" in message
            for name in ("client", "broker-2", "coordinator"):
                await refused(api[name], "POST", "/v1/brokers/1/heartbeat", {"partitions": []})
            _, body = await api["client"].call("GET", "/v1/brokers")
            assert [(b["id"], b["url"]) for b in body["brokers"]] == [(1, good["url"])]

    scenario(run)


def test_a_broker_registers_as_the_last_broker_id_its_body_names(tmp_path: Path) -> None:
    """JSON with a repeated key: the check and the handler both take the last value."""

    async def run() -> None:
        async with tls_coordinator(tmp_path, ["broker-1", "broker-2"]) as (_, _, api):
            twice = b'{"broker_id": 1, "url": "https://127.0.0.1:9102", "broker_id": 2}'
            status, _ = await api["broker-1"].call("POST", "/v1/brokers/register", data=twice)
            assert status == 403
            status, body = await api["broker-2"].call("POST", "/v1/brokers/register", data=twice)
            assert (status, body["broker_id"]) == (200, 2)

    scenario(run)


def test_only_the_leader_broker_proposes_its_isr_changes(tmp_path: Path) -> None:
    async def run() -> None:
        names = ["client", "broker-1", "broker-2"]
        async with tls_coordinator(tmp_path, names) as (_, _, api):
            for broker_id in (1, 2):
                registration = {"broker_id": broker_id, "url": f"https://127.0.0.1:910{broker_id}"}
                status, _ = await api[f"broker-{broker_id}"].call(
                    "POST", "/v1/brokers/register", registration
                )
                assert status == 200
            body = {"name": "t", "partitions": 1, "replication_factor": 2}
            status, topic = await api["client"].call("POST", "/v1/topics", body)
            assert status == 201
            partition = topic["partitions"][0]
            leader, follower = partition["leader_id"], 3 - partition["leader_id"]
            proposal = {
                "topic": "t",
                "partition": 0,
                "topic_id": topic["topic_id"],
                "leader_epoch": partition["leader_epoch"],
                "partition_epoch": partition["partition_epoch"],
                "isr": [leader],
            }
            path = f"/v1/brokers/{leader}/alter-isr"
            for name in ("client", f"broker-{follower}"):
                await refused(api[name], "POST", path, proposal)
            _, now = await api["client"].call("GET", "/v1/topics/t")
            assert now["partitions"][0] == partition, "a refused proposal changed the ISR"
            # The follower speaking for itself passes the check; the coordinator refuses it.
            status, answer = await api[f"broker-{follower}"].call(
                "POST", f"/v1/brokers/{follower}/alter-isr", proposal
            )
            assert status != 403 and answer["error"]["code"] != "forbidden"
            status, answer = await api[f"broker-{leader}"].call("POST", path, proposal)
            assert (status, answer["isr"]) == (200, [leader])

    scenario(run)


def test_broker_certificates_reach_no_client_endpoint(tmp_path: Path) -> None:
    async def run() -> None:
        names = ["client", "broker-1", "coordinator"]
        async with tls_coordinator(tmp_path, names) as (_, _, api):
            await api["broker-1"].call(
                "POST", "/v1/brokers/register", {"broker_id": 1, "url": "https://127.0.0.1:9101"}
            )
            member = {"member_id": None, "member_epoch": 0, "topics": ["t"]}
            writes = [
                ("POST", "/v1/topics", {"name": "t", "partitions": 1, "replication_factor": 1}),
                ("DELETE", "/v1/topics/t", None),
                ("GET", "/v1/metadata?topics=t&auto_create=true", None),
                ("POST", "/v1/producers", {}),
                ("POST", "/v1/groups/g/heartbeat", member),
                ("POST", "/v1/groups/g/leave", {"member_id": "m"}),
                ("POST", "/v1/groups/g/offsets", {"offsets": []}),
            ]
            for name in ("broker-1", "coordinator"):
                for method, path, body in writes:
                    await refused(api[name], method, path, body)
            assert (await api["client"].call("GET", "/v1/topics"))[1]["topics"] == []
            status, _ = await api["client"].call("POST", "/v1/topics", writes[0][2])
            assert status == 201
            for name in names:  # reads of cluster state and monitoring: any certificate
                for path in ("/v1/topics", "/v1/topics/t", "/v1/cluster", "/v1/groups"):
                    assert (await api[name].call("GET", path))[0] == 200, (name, path)
                for path in ("/healthz", "/readyz", "/openapi.json"):
                    assert (await api[name].call("GET", path))[0] == 200, (name, path)
                assert "tide_" in await api[name].text("/metrics")
            _, document = await api["client"].call("GET", "/openapi.json")
            register = document["paths"]["/v1/brokers/register"]["post"]
            assert register["x-callers"] == ["broker-{body.broker_id}"]
            heartbeat = document["paths"]["/v1/brokers/{broker_id}/heartbeat"]["post"]
            assert heartbeat["x-callers"] == ["broker-{path.broker_id}"]
            assert document["paths"]["/v1/metadata"]["get"]["x-callers"] == ["client"]

    scenario(run)
