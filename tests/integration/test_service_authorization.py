"""The authorization middleware over real mutual TLS, on a dummy service.

Dummy endpoints declare each kind of caller rule (a broker id in the path, in the
query, in the JSON body; clients only; brokers only; a union). Each is called with
certificates of the cluster CA: ``coordinator``, ``broker-1``, ``broker-2``,
``client``, and ``broker-01`` (not a broker name: a client). Every refusal must be a
403 ``{"error": {"code": "forbidden", "message"}}`` and must not reach the handler.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from tidemq.service.app import build_app
from tidemq.service.callers import ANONYMOUS, ANY, BROKERS, CLIENTS, broker_self
from tidemq.service.http import Endpoint, read_json_object
from tidemq.tls import TlsFiles, client_context, ensure_cluster_pki, server_context

NAMES = ["coordinator", "broker-1", "broker-2", "client", "broker-01"]
MONITORING = ["/healthz", "/readyz", "/metrics", "/openapi.json"]


class Service:
    """The dummy service: its URL, one session per certificate, the handler calls."""

    def __init__(self, base: str, sessions: dict[str, aiohttp.ClientSession]) -> None:
        self.base = base
        self.sessions = sessions
        self.handled: list[str] = []

    async def call(
        self, name: str, method: str, path: str, body: Any = None, data: bytes | None = None
    ) -> tuple[int, Any]:
        session = self.sessions[name]
        async with session.request(method, self.base + path, json=body, data=data) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text.startswith("{") else text)

    async def refused(
        self, name: str, method: str, path: str, body: Any = None, data: bytes | None = None
    ) -> str:
        """Asserts a 403 forbidden that never reached a handler; returns its message."""
        before = len(self.handled)
        status, answer = await self.call(name, method, path, body, data)
        assert status == 403, (name, method, path, status, answer)
        assert set(answer) == {"error"} and answer["error"]["code"] == "forbidden"
        assert len(self.handled) == before, "a refused request reached its handler"
        message: str = answer["error"]["message"]
        return message


def dummy_endpoints(handled: list[str]) -> list[Endpoint]:
    async def ok(request: web.Request) -> web.Response:
        handled.append(request.path)
        return web.json_response({"ok": True})

    async def register(request: web.Request) -> web.Response:
        body = await read_json_object(request)  # the middleware read it first
        handled.append(request.path)
        return web.json_response({"broker_id": body["broker_id"]})

    return [
        Endpoint(
            "POST",
            "/v1/brokers/{broker_id}/alter-thing",
            ok,
            "a broker acting on its own behalf, named in the path",
            callers=broker_self(path="broker_id"),
        ),
        Endpoint(
            "GET",
            "/v1/replica/{topic}/{partition}/records",
            ok,
            "a follower fetch, broker named in the query",
            callers=broker_self(query="broker_id"),
        ),
        Endpoint(
            "POST",
            "/v1/register",
            register,
            "broker named in the JSON body",
            callers=broker_self(body="broker_id"),
        ),
        Endpoint("GET", "/v1/client-only", ok, "clients", callers=CLIENTS),
        Endpoint("GET", "/v1/brokers-only", ok, "any broker", callers=BROKERS),
        Endpoint(
            "GET", "/v1/either", ok, "clients or broker N", callers=CLIENTS | broker_self(query="b")
        ),
        Endpoint("GET", "/v1/any", ok, "any certificate", callers=ANY),
        Endpoint("GET", "/v1/open", ok, "clients, with or without", callers=CLIENTS | ANONYMOUS),
    ]


@asynccontextmanager
async def dummy_service(
    tmp_path: Path, plain_http: bool = False, require_client_cert: bool = True
) -> AsyncIterator[Service]:
    files = ensure_cluster_pki(tmp_path / "pki", NAMES)
    handled: list[str] = []
    app = build_app("dummy", dummy_endpoints(handled), CollectorRegistry(), lambda: True, 1 << 16)
    server = TestServer(app)
    async with AsyncExitStack() as stack:
        if plain_http:
            await server.start_server()
            sessions = {"anonymous": aiohttp.ClientSession()}
        else:
            context = server_context(files["coordinator"], require_client_cert)
            await server.start_server(ssl=context)
            sessions = {
                name: aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=client_context(files[name]))
                )
                for name in NAMES
            }
            no_certificate = TlsFiles(files["client"].ca_file)
            sessions["anonymous"] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_context(no_certificate))
            )
        stack.push_async_callback(server.close)
        for session in sessions.values():
            stack.push_async_callback(session.close)
        service = Service(str(server.make_url("")).rstrip("/"), sessions)
        service.handled = handled
        yield service


def scenario(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_broker_self_in_the_path(tmp_path: Path) -> None:
    async def run() -> None:
        async with dummy_service(tmp_path) as service:
            assert (await service.call("broker-1", "POST", "/v1/brokers/1/alter-thing"))[0] == 200
            assert (await service.call("broker-2", "POST", "/v1/brokers/2/alter-thing"))[0] == 200
            message = await service.refused("broker-2", "POST", "/v1/brokers/1/alter-thing")
            assert "'broker-2'" in message and "broker-{path.broker_id}" in message
            for name in ("client", "coordinator", "broker-01"):
                await service.refused(name, "POST", "/v1/brokers/1/alter-thing")
            await service.refused("broker-1", "POST", "/v1/brokers/one/alter-thing")

    scenario(run)


def test_broker_self_in_the_query(tmp_path: Path) -> None:
    async def run() -> None:
        async with dummy_service(tmp_path) as service:
            path = "/v1/replica/orders/0/records"
            assert (await service.call("broker-2", "GET", path + "?broker_id=2&offset=0"))[0] == 200
            await service.refused("broker-2", "GET", path + "?broker_id=1&offset=0")
            await service.refused("broker-2", "GET", path + "?offset=0")  # names no broker
            await service.refused("broker-2", "GET", path + "?broker_id=two")
            await service.refused("broker-2", "GET", path + "?broker_id=1&broker_id=2")
            for name in ("client", "coordinator", "broker-01"):
                await service.refused(name, "GET", path + "?broker_id=1")

    scenario(run)


def test_broker_self_in_the_body_leaves_the_body_to_the_handler(tmp_path: Path) -> None:
    async def run() -> None:
        async with dummy_service(tmp_path) as service:
            status, answer = await service.call(
                "broker-1", "POST", "/v1/register", {"broker_id": 1, "url": "https://x"}
            )
            assert (status, answer) == (200, {"broker_id": 1})
            await service.refused("broker-2", "POST", "/v1/register", {"broker_id": 1})
            await service.refused("broker-1", "POST", "/v1/register", {"broker_id": True})
            await service.refused("broker-1", "POST", "/v1/register", ["broker_id", 1])
            await service.refused("broker-1", "POST", "/v1/register", data=b'{"broker_id": 1')
            await service.refused("client", "POST", "/v1/register", {"broker_id": 1})
            status, answer = await service.call(
                "broker-1", "POST", "/v1/register", data=b"x" * (1 << 17)
            )
            assert (status, answer["error"]["code"]) == (413, "request_too_large")

    scenario(run)


def test_role_grants_and_unions(tmp_path: Path) -> None:
    async def run() -> None:
        async with dummy_service(tmp_path) as service:
            for name in ("client", "broker-01"):  # any name that is not a service's
                assert (await service.call(name, "GET", "/v1/client-only"))[0] == 200
                await service.refused(name, "GET", "/v1/brokers-only")
            for name in ("broker-1", "broker-2"):
                assert (await service.call(name, "GET", "/v1/brokers-only"))[0] == 200
                await service.refused(name, "GET", "/v1/client-only")
            await service.refused("coordinator", "GET", "/v1/client-only")
            await service.refused("coordinator", "GET", "/v1/brokers-only")
            assert (await service.call("client", "GET", "/v1/either"))[0] == 200
            assert (await service.call("broker-1", "GET", "/v1/either?b=1"))[0] == 200
            await service.refused("broker-1", "GET", "/v1/either?b=2")

    scenario(run)


def test_monitoring_is_open_to_every_certificate_and_documents_callers(tmp_path: Path) -> None:
    async def run() -> None:
        async with dummy_service(tmp_path) as service:
            for name in NAMES:
                for path in MONITORING:
                    assert (await service.call(name, "GET", path))[0] == 200, (name, path)
            assert (await service.call("client", "GET", "/v1/nowhere"))[0] == 404
            _, document = await service.call("client", "GET", "/openapi.json")
            paths = document["paths"]
            assert paths["/healthz"]["get"]["x-callers"] == ["public"]
            alter = paths["/v1/brokers/{broker_id}/alter-thing"]["post"]
            assert alter["x-callers"] == ["broker-{path.broker_id}"]
            assert alter["responses"]["403"] == {"description": "forbidden"}
            replica = paths["/v1/replica/{topic}/{partition}/records"]["get"]
            assert replica["x-callers"] == ["broker-{query.broker_id}"]
            assert paths["/v1/register"]["post"]["x-callers"] == ["broker-{body.broker_id}"]
            assert paths["/v1/either"]["get"]["x-callers"] == ["client", "broker-{query.b}"]

    scenario(run)


def test_a_certificate_of_another_ca_or_none_cannot_connect(tmp_path: Path) -> None:
    stranger = ensure_cluster_pki(tmp_path / "other-ca", ["client"])["client"]

    async def run() -> None:
        async with dummy_service(tmp_path) as service:
            cluster_ca = str(tmp_path / "pki" / "ca.pem")
            for files in (
                TlsFiles(cluster_ca, stranger.cert_file, stranger.key_file),  # another CA's
                TlsFiles(cluster_ca),  # no certificate at all
            ):
                connector = aiohttp.TCPConnector(ssl=client_context(files))
                async with aiohttp.ClientSession(connector=connector) as session:
                    try:
                        async with session.get(service.base + "/healthz") as response:
                            raise AssertionError(f"got in with {files}: {response.status}")
                    except aiohttp.ClientError:
                        pass

    scenario(run)


def test_without_a_certificate_where_none_is_required_the_caller_is_anonymous(
    tmp_path: Path,
) -> None:
    """A server that does not demand certificates (the proxy's --client-auth optional):
    callers without one reach PUBLIC and ANONYMOUS endpoints only."""

    async def run() -> None:
        async with dummy_service(tmp_path, require_client_cert=False) as service:
            for path in MONITORING:
                assert (await service.call("anonymous", "GET", path))[0] == 200, path
            assert (await service.call("anonymous", "GET", "/v1/open"))[0] == 200
            assert (await service.call("client", "GET", "/v1/open"))[0] == 200
            await service.refused("broker-1", "GET", "/v1/open")
            for path in ("/v1/any", "/v1/client-only", "/v1/brokers-only", "/v1/either?b=1"):
                await service.refused("anonymous", "GET", path)
            await service.refused("anonymous", "POST", "/v1/register", {"broker_id": 1})
            assert (await service.call("broker-1", "GET", "/v1/any"))[0] == 200

    scenario(run)


def test_plain_http_has_no_identity_and_checks_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        async with dummy_service(tmp_path, plain_http=True) as service:
            for method, path in [
                ("POST", "/v1/brokers/1/alter-thing"),
                ("GET", "/v1/replica/orders/0/records?broker_id=1"),
                ("GET", "/v1/client-only"),
                ("GET", "/v1/brokers-only"),
            ]:
                assert (await service.call("anonymous", method, path))[0] == 200, path
            status, answer = await service.call(
                "anonymous", "POST", "/v1/register", {"broker_id": 7}
            )
            assert (status, answer) == (200, {"broker_id": 7})

    scenario(run)
