"""The broker under mutual TLS: client certificates produce and fetch; broker and
coordinator certificates cannot; only broker N fetches as follower N (the replica
endpoints, per partition and the session); every certificate of the cluster reaches
monitoring and read-only partition state. A refused produce appends nothing."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from tidemq.broker.server import BATCH_TYPE, Broker, BrokerConfig, create_app
from tidemq.storage import FsyncPolicy, LogConfig
from tidemq.tls import client_context, ensure_cluster_pki, server_context
from tidemq.transport import HttpTransport
from tidemq.wire import control
from tidemq.wire.batch import build_batch
from tidemq.wire.produce import PRODUCE_TYPE
from tidemq.wire.replica_fetch import decode_replica_fetch

NAMES = ["client", "broker-2", "broker-3", "coordinator"]
RECORDS = "/v1/topics/orders/partitions/0/records"
REPLICA = "/v1/replica/orders/0/records?leader_epoch=1&offset=0&broker_id="
TOPIC_ID = "0123456789abcdef0123456789abcdef"


def _assignment() -> control.HeartbeatAnswer:
    """Broker 1 leads orders/0; broker 2 follows; broker 3 holds no replica."""
    answer = {
        "cluster_id": "c1",
        "topics": {"orders": {"topic_id": TOPIC_ID, "partitions": 1}},
        "deleted_topic_ids": [],
        "heartbeat_interval_ms": 1000,
        "assignments": [
            {
                "topic": "orders",
                "partition": 0,
                "topic_id": TOPIC_ID,
                "leader_id": 1,
                "leader_url": "https://127.0.0.1:1",
                "leader_epoch": 1,
                "partition_epoch": 1,
                "replicas": [1, 2],
                "isr": [1, 2],
            }
        ],
    }
    return control.decode(json.dumps(answer).encode(), control.HeartbeatAnswer)


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, data: bytes | None, content_type: str
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type} if data is not None else {}
    async with session.request(method, url, data=data, headers=headers) as response:
        is_json = response.content_type == "application/json"
        return response.status, await (response.json() if is_json else response.read())


def test_only_client_certificates_produce_and_fetch(tmp_path: Path) -> None:
    files = ensure_cluster_pki(tmp_path / "pki", ["broker-1", *NAMES])

    async def run() -> None:
        config = BrokerConfig(
            broker_id=1,
            data_dir=tmp_path / "data",
            coordinator_url="https://127.0.0.1:1",
            advertised_url="https://127.0.0.1:2",
            log_config=LogConfig(fsync=FsyncPolicy.NEVER),
            max_request_bytes=1 << 20,
        )
        registry = CollectorRegistry()
        broker = Broker(config, lambda: HttpTransport(False, {}, 4, 1000), registry)
        broker.reconcile(_assignment())
        broker.registered = True
        server = TestServer(create_app(broker, registry))
        await server.start_server(ssl=server_context(files["broker-1"]))
        base = str(server.make_url("")).rstrip("/")
        async with AsyncExitStack() as stack:
            stack.push_async_callback(broker.close)
            stack.push_async_callback(server.close)
            session: dict[str, aiohttp.ClientSession] = {}
            for name in NAMES:
                connector = aiohttp.TCPConnector(ssl=client_context(files[name]))
                session[name] = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=connector)
                )
            batch = build_batch([(b"k", b"v")], 1000)
            attempts = [
                ("POST", RECORDS + "?acks=1", batch, BATCH_TYPE),
                ("POST", "/v1/produce?acks=1", b"\0" * 8, PRODUCE_TYPE),
                ("GET", RECORDS + "?offset=0", None, ""),
            ]
            for name in ("broker-2", "broker-3", "coordinator"):
                for method, path, data, content_type in attempts:
                    status, answer = await _call(
                        session[name], method, base + path, data, content_type
                    )
                    assert (status, answer["error"]["code"]) == (403, "forbidden"), (name, path)
                    assert repr(name) in answer["error"]["message"]
            assert broker.replicas[("orders", 0)].log.log_end_offset == 0

            status, _ = await _call(session["broker-2"], "GET", base + REPLICA + "2", None, "")
            assert status == 200  # follower 2 fetches as itself
            refused = [("broker-3", "2"), ("broker-2", "3"), ("client", "2"), ("coordinator", "2")]
            for name, claimed in refused:
                url = base + REPLICA + claimed
                status, answer = await _call(session[name], "GET", url, None, "")
                assert (status, answer["error"]["code"]) == (403, "forbidden"), (name, claimed)
            status, answer = await _call(session["broker-3"], "GET", base + REPLICA + "3", None, "")
            assert (status, answer["error"]["code"]) == (421, "not_leader")  # past the check

            # The replica fetch session: the same rule, the broker named in the JSON body.
            def session_body(broker_id: str) -> bytes:
                wanted = {"topic": "orders", "partition": 0, "leader_epoch": 1, "offset": 0}
                return json.dumps({"broker_id": int(broker_id), "partitions": [wanted]}).encode()

            fetch = base + "/v1/replica/fetch"
            for name, claimed in refused:
                status, answer = await _call(
                    session[name], "POST", fetch, session_body(claimed), "application/json"
                )
                assert (status, answer["error"]["code"]) == (403, "forbidden"), (name, claimed)
            status, answer = await _call(
                session["broker-2"], "POST", fetch, session_body("2"), "application/json"
            )
            assert status == 200 and decode_replica_fetch(answer) == []  # nothing new, no wait
            status, answer = await _call(
                session["broker-3"], "POST", fetch, session_body("3"), "application/json"
            )
            assert status == 200  # past the check: broker 3 is no follower of orders/0
            assert [e.error and e.error["code"] for e in decode_replica_fetch(answer)] == [
                "not_leader"
            ]

            client = session["client"]
            status, answer = await _call(client, "POST", base + attempts[0][1], batch, BATCH_TYPE)
            assert (status, answer["last_offset"]) == (200, 0), answer
            status, _ = await _call(client, "GET", base + RECORDS + "?offset=0", None, "")
            assert status == 200
            status, answer = await _call(client, "POST", base + "/v1/produce", b"\0", PRODUCE_TYPE)
            assert status == 400, answer  # past the authorization check: bad framing

            for name in NAMES:
                for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/partitions"):
                    status, _ = await _call(session[name], "GET", base + path, None, "")
                    assert status == 200, (name, path)
                status, answer = await _call(
                    session[name], "GET", base + RECORDS[: -len("records")] + "offsets", None, ""
                )
                assert (status, answer["log_end_offset"]) == (200, 1)

    asyncio.run(run())
