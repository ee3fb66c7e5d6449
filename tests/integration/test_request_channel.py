"""The request channel (service/channel.py, transport.py) over real mutual TLS, on a
dummy service: the hot requests go over one WebSocket, with the endpoint's own
authorization, status codes and errors; anything the peer does not serve over a
channel (or a peer without one) goes over plain HTTP; bounds and a lost connection
give clear errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import tidemq.service.channel as channel_module
import tidemq.service.http as http_module
from tidemq.errors import (
    ConnectionFailed,
    Forbidden,
    InternalError,
    InvalidRequest,
    NotLeader,
    RequestTimedOut,
    RequestTooLarge,
    Unavailable,
)
from tidemq.service.app import build_app
from tidemq.service.callers import BROKERS, CLIENTS, broker_self
from tidemq.service.channel import Operation, Reply, channel_endpoint
from tidemq.service.http import Endpoint
from tidemq.tls import client_context as tls_client_context
from tidemq.tls import ensure_cluster_pki, server_context
from tidemq.transport import CHANNEL_BODY_DEFAULT, HELLO_WAIT_S, HttpTransport
from tidemq.wire import control
from tidemq.wire.channel import FRAME_HEAD_MAX, HELLO_ID, decode_answer, encode_request
from tidemq.wire.replica_fetch import ReplicaFetchRequest

NAMES = ["coordinator", "broker-1", "broker-2", "client"]


class Dummy:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (how, what)
        self.sizes: list[int] = []  # of the produce bodies served over the channel
        self.http_handler: Callable[[web.Request], Awaitable[web.Response]] | None = None
        self.release = asyncio.Event()
        self.drop_connections = False
        self.server: TestServer | None = None

    async def produce(self, query: Mapping[str, str], body: bytes) -> Reply:
        self.calls.append(("channel", "produce"))
        self.sizes.append(len(body))
        if body == b"not-leader":
            raise NotLeader("moved")
        return Reply(
            "application/json", json.dumps({"acks": query.get("acks"), "n": len(body)}).encode()
        )

    async def fetch(self, query: Mapping[str, str], body: bytes) -> Reply:
        self.calls.append(("channel", "fetch"))
        await self.release.wait()  # a long-poll
        return Reply("application/octet-stream", b"data:" + body, {"Tide-High-Watermark": "7"})

    async def replica(self, query: Mapping[str, str], body: bytes) -> Reply:
        self.calls.append(("channel", "replica"))
        return Reply("application/json", b"{}")

    def endpoints(self, with_channel: bool, serve_fetch: bool = True) -> list[Endpoint]:
        async def http(request: web.Request) -> web.Response:
            self.calls.append(("http", request.path))
            if self.http_handler is not None:
                return await self.http_handler(request)
            return web.json_response({"via": "http", "n": len(await request.read())})

        operations = [
            Operation("POST", "/v1/produce", self.produce, CLIENTS),
            Operation("POST", "/v1/replica/fetch", self.replica, broker_self(body="broker_id")),
        ]
        if serve_fetch:
            operations.append(Operation("POST", "/v1/fetch", self.fetch, CLIENTS))
        endpoints = [
            Endpoint("POST", "/v1/produce", http, "produce", callers=CLIENTS),
            Endpoint("POST", "/v1/fetch", http, "fetch", callers=CLIENTS),
            Endpoint("POST", "/v1/replica/fetch", http, "replica", callers=BROKERS),
        ]
        if with_channel:
            endpoints.append(channel_endpoint(operations, 1 << 16))
        return endpoints


@asynccontextmanager
async def service(
    tmp_path: Path, with_channel: bool = True, serve_fetch: bool = True, timeout_ms: int = 5000
) -> AsyncIterator[tuple[Dummy, str, dict[str, HttpTransport]]]:
    files = ensure_cluster_pki(tmp_path / "pki", NAMES)
    dummy = Dummy()
    app = build_app(
        "dummy",
        dummy.endpoints(with_channel, serve_fetch),
        CollectorRegistry(),
        lambda: True,
        1 << 16,
    )
    server = TestServer(app)
    dummy.server = server
    async with AsyncExitStack() as stack:
        await server.start_server(ssl=server_context(files["coordinator"], True))
        stack.push_async_callback(server.close)
        transports = {}
        for name in NAMES:
            transport = HttpTransport(tls_client_context(files[name]), {}, 4, timeout_ms)
            stack.push_async_callback(transport.close)
            transports[name] = transport
        yield dummy, str(server.make_url("")).rstrip("/"), transports


def run(test: object) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def test_hot_requests_go_over_the_channel_with_the_same_answers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            client = transports["client"]
            answer = await client.request_json(
                "POST", base + "/v1/produce", params={"acks": "all"}, data=b"12345"
            )
            assert answer == {"acks": "all", "n": 5}
            assert dummy.calls == [("channel", "produce")]
            with pytest.raises(NotLeader, match="moved"):  # the error, as over HTTP
                await client.request("POST", base + "/v1/produce", data=b"not-leader")
            # a long-poll in flight does not hold up other requests on the channel
            polling = asyncio.ensure_future(client.request("POST", base + "/v1/fetch", data=b"x"))
            for _ in range(20):
                await client.request("POST", base + "/v1/produce", data=b"y")
            assert not polling.done()
            dummy.release.set()
            body, headers = await polling
            assert body == b"data:x" and headers["Tide-High-Watermark"] == "7"
            assert all(how == "channel" for how, _ in dummy.calls)
            # anything else is plain HTTP
            await client.request("GET", base + "/healthz")

    run(scenario)


def test_the_endpoints_callers_apply_to_each_request(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            with pytest.raises(Forbidden):
                await transports["broker-1"].request("POST", base + "/v1/produce", data=b"x")
            replica = base + "/v1/replica/fetch"
            await transports["broker-2"].request(
                "POST", replica, data=json.dumps({"broker_id": 2}).encode()
            )
            with pytest.raises(Forbidden):  # broker-2 acting as broker 1
                await transports["broker-2"].request(
                    "POST", replica, data=json.dumps({"broker_id": 1}).encode()
                )
            with pytest.raises(Forbidden):
                await transports["client"].request(
                    "POST", replica, data=json.dumps({"broker_id": 1}).encode()
                )
            assert dummy.calls == [("channel", "replica")]  # refusals reached no handler

    run(scenario)


def test_a_role_grant_is_checked_once_per_channel_and_a_refusal_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A channel's certificate is fixed: a verdict that depends only on it (a role
    grant) is remembered for the target; a refusal, or a broker-self grant (it reads
    the request), is decided again for every request."""
    checked: list[str] = []
    authorize = channel_module._authorize

    def counting(operation: Operation, *args: object) -> bool:
        checked.append(operation.target)
        return authorize(operation, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(channel_module, "_authorize", counting)

    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            for _ in range(3):
                await transports["client"].request("POST", base + "/v1/produce", data=b"x")
            assert checked == ["POST /v1/produce"]
            for _ in range(2):
                with pytest.raises(Forbidden):
                    await transports["broker-1"].request("POST", base + "/v1/produce", data=b"x")
            replica = base + "/v1/replica/fetch"
            for claimed in (2, 2, 1):
                call = transports["broker-2"].request(
                    "POST", replica, data=json.dumps({"broker_id": claimed}).encode()
                )
                if claimed == 2:
                    await call
                else:
                    with pytest.raises(Forbidden):
                        await call
            assert checked == ["POST /v1/produce"] * 3 + ["POST /v1/replica/fetch"] * 3
            assert dummy.calls == [("channel", "produce")] * 3 + [("channel", "replica")] * 2

    run(scenario)


@pytest.mark.parametrize(
    "body",
    [
        b'{"broker_id": 2, "partitions": [{"topic": "t", "offset": 1}], "wait_ms": 0}',
        b'{"partitions": [], "broker_id": 1, "broker_id": 2}',  # the last one counts
        b'{"broker_id": 2, "n": ' + b"1" * 5000 + b"}",  # past json.loads' 4,300 digits
    ],
)
def test_the_channel_reads_a_broker_id_in_the_body_as_http_does(body: bytes) -> None:
    """The same bytes get the same verdict over the channel as over HTTP: both read
    the named fields with http.body_values (msgspec, as the handlers decode bodies),
    here broker-2 naming itself."""
    assert http_module.body_values(body, ("broker_id",)) == {"broker_id": 2}
    replica = Operation("POST", "/v1/replica/fetch", Dummy().replica, broker_self(body="broker_id"))
    broker_2 = channel_module.Identity.from_common_name("broker-2")
    assert channel_module._authorize(replica, broker_2, {}, body) is False  # allowed, per frame


@pytest.mark.parametrize(
    "body",
    [
        b'{"broker_id": 2, "n": ' + b"[" * 100_000,  # deep nesting, cut short
        b'{"broker_id": 2, "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deep nesting
        b'{"broker_id": 2, "hint": NaN}',  # no JSON (json.loads took it)
        b'\xef\xbb\xbf{"broker_id": 2}',  # a byte order mark (json.loads took it)
        b'{"broker_id": 2, "n": "\\ud800"}',  # a lone surrogate (json.loads took it)
        b'\xff{"broker_id": 2}',
        b'{"broker_id": "\xc3"}',  # bad UTF-8 in the value read: UnicodeDecodeError
        b"[2]",
    ],
)
def test_a_body_json_cannot_read_is_refused_alike_over_the_channel_and_http(body: bytes) -> None:
    """Bytes that are no JSON object a handler would decode name no broker, over
    either path: both refuse (403), and nothing raises past the check."""

    class Request(dict[str, Any]):
        match_info: dict[str, str] = {}
        query: dict[str, str] = {}

        async def read(self) -> bytes:
            return body

    assert http_module.body_values(body, ("broker_id",)) == {}
    callers = broker_self(body="broker_id")
    named = asyncio.run(http_module._named_values(Request(), callers))  # type: ignore[arg-type]
    assert named == {}
    replica = Operation("POST", "/v1/replica/fetch", Dummy().replica, callers)
    broker_2 = channel_module.Identity.from_common_name("broker-2")
    with pytest.raises(Forbidden):
        channel_module._authorize(replica, broker_2, {}, body)


_CLAIMS = [
    *("2", "1", "2.0", "2e0", "-0", "02", "2.5", '"2"', '"\\u0032"', "true", "null", "[2]"),
    *('{"broker_id": 2}', str(2**64 + 2), "4294967298", "1e400", "1.9999999999999999"),
]
_KEYS = ['"broker_id"', '"broker\\u005fid"', '"Broker_id"', '"broker_id "', '"broker-id"']
_REST = {
    ReplicaFetchRequest: '"partitions": [{"topic": "t", "partition": 0, "leader_epoch": 1, '
    '"offset": 0}]',
    control.BrokerRegistration: '"url": "https://127.0.0.1:9000"',
}


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_CLAIMS)), min_size=1, max_size=3),
    st.sampled_from(sorted(_REST, key=lambda kind: kind.__name__)),
    st.integers(0, 3),
)
def test_a_broker_the_check_lets_in_is_the_broker_the_handler_reads(
    claims: list[tuple[str, str]], kind: type[Any], rest_at: int
) -> None:
    """The promise of a body grant (the two endpoints that have one): if broker-2's
    certificate passes the check, the handler decodes broker_id 2 or refuses the
    body, whatever the keys' spelling, duplicates, order and the value's JSON type."""
    fields = [f"{key}: {value}" for key, value in claims]
    fields.insert(min(rest_at, len(fields)), _REST[kind])
    body = ("{" + ", ".join(fields) + "}").encode()
    broker_2 = channel_module.Identity.from_common_name("broker-2")
    named = http_module.body_values(body, ("broker_id",))
    allowed = broker_self(body="broker_id").allows(
        broker_2, {("body", k): v for k, v in named.items()}
    )
    try:
        decoded = control.decode(body, kind)
    except InvalidRequest:
        return
    assert not allowed or decoded.broker_id == 2, body
    if decoded.broker_id == 2:
        assert allowed, body  # and the rule does not refuse the broker the handler reads


def test_the_body_check_reads_keys_that_are_no_python_names() -> None:
    assert http_module.body_values(b'{"a-b": 2, "": [1], "x y": null}', ("a-b", "", "x y")) == {
        "a-b": 2,
        "": [1],
        "x y": None,
    }


def test_a_peer_without_a_channel_or_without_that_target_gets_plain_http(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with service(tmp_path, with_channel=False) as (dummy, base, transports):
            answer = await transports["client"].request_json(
                "POST", base + "/v1/produce", data=b"abc"
            )
            assert answer == {"via": "http", "n": 3}
            assert dummy.calls == [("http", "/v1/produce")]
        async with service(tmp_path, serve_fetch=False) as (dummy, base, transports):
            client = transports["client"]
            assert (await client.request_json("POST", base + "/v1/fetch", data=b"ab"))["n"] == 2
            await client.request("POST", base + "/v1/fetch", data=b"ab")
            await client.request("POST", base + "/v1/produce", data=b"ab")
            assert dummy.calls == [
                ("http", "/v1/fetch"),
                ("http", "/v1/fetch"),  # remembered: not asked over the channel again
                ("channel", "produce"),
            ]

    run(scenario)


def test_requests_past_the_bound_are_refused_and_a_lost_channel_fails_its_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "REQUESTS_MAX", 2)

    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            client = transports["client"]
            polls = [
                asyncio.ensure_future(client.request("POST", base + "/v1/fetch", data=b"x"))
                for _ in range(2)
            ]
            deadline = asyncio.get_running_loop().time() + 5
            while len(dummy.calls) < 2:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            with pytest.raises(Unavailable, match="in flight"):
                await client.request("POST", base + "/v1/produce", data=b"x")
            # the channel breaks: whoever waits on it hears so at once
            channel = client._channels[base]
            await channel.socket.close()
            for poll in polls:
                with pytest.raises(ConnectionFailed):
                    await asyncio.wait_for(poll, 5)
            # and the next request opens a new channel
            assert (await client.request_json("POST", base + "/v1/produce", data=b"z"))["n"] == 1

    run(scenario)


def test_an_oversized_body_gets_413_as_over_http_and_breaks_no_other_request(
    tmp_path: Path,
) -> None:
    """The service takes bodies up to 64 KiB (its HTTP client_max_size and channel
    limit). Over HTTP a larger body gets 413 and nothing else notices. Over the
    channel a body a little larger was served; a much larger frame closed the whole
    WebSocket: every request waiting on it failed with ConnectionFailed (outcome
    unknown: a retry may duplicate), and a client retrying the big request kills it
    again and again."""

    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            client = transports["client"]
            poll = asyncio.ensure_future(client.request("POST", base + "/v1/fetch", data=b"x"))
            deadline = asyncio.get_running_loop().time() + 5
            while ("channel", "fetch") not in dummy.calls:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            for size in ((1 << 16) + 1, 4 << 16):
                with pytest.raises(RequestTooLarge):
                    await client.request("POST", base + "/v1/produce", data=b"x" * size)
            assert not poll.done(), "a long-poll on the same channel was failed"
            dummy.release.set()
            body, _ = await asyncio.wait_for(poll, 5)
            assert body == b"data:x"

    run(scenario)


def test_every_body_up_to_the_peers_limit_goes_over_the_channel_in_order(
    tmp_path: Path,
) -> None:
    """The peer's hello says its body limit (64 KiB here); bodies up to it, however
    large, go over the one channel and arrive in the order sent. Sent over several
    HTTP connections they could overtake each other: a producer's pipelined batches
    of a partition arrived out of sequence and were all sent again (the capped-link
    benchmark measured seconds without an acknowledgement)."""

    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            client = transports["client"]
            sizes = [1 << 16, 1, (1 << 16) - 1, 61 * 1024, 2, 1 << 16, 3]
            answers = await asyncio.gather(
                *(client.request_json("POST", base + "/v1/produce", data=b"x" * n) for n in sizes)
            )
            assert [answer["n"] for answer in answers] == sizes
            assert dummy.calls == [("channel", "produce")] * len(sizes)
            assert dummy.sizes == sizes  # served in the order sent
            with pytest.raises(RequestTooLarge):  # past the limit: HTTP's 413
                await client.request("POST", base + "/v1/produce", data=b"x" * ((1 << 16) + 1))
            assert dummy.calls[len(sizes) :] == [("http", "/v1/produce")]

    run(scenario)


@pytest.fixture
def no_hello(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service answers as the previous version did: a channel, but no hello."""
    send = channel_module._send

    async def without_hello(socket: web.WebSocketResponse, answer: Any) -> None:
        if answer.request_id != HELLO_ID:
            await send(socket, answer)

    monkeypatch.setattr(channel_module, "_send", without_hello)


@pytest.mark.usefixtures("no_hello")
def test_a_peer_that_sends_no_hello_is_served_after_one_short_wait(tmp_path: Path) -> None:
    """A broker of the previous version (a rolling upgrade) has a channel but sends no
    hello: its channel is used after one wait of HELLO_WAIT_S, with the old 60 KiB
    limit (larger bodies over HTTP, as that version had it). Waiting a whole request
    timeout for the hello on every request timed every request out against such a
    peer: an upgraded follower could not replicate from a leader not yet upgraded."""

    async def scenario() -> None:
        async with service(tmp_path, timeout_ms=3000) as (dummy, base, transports):
            client = transports["client"]
            started = time.monotonic()
            assert (await client.request_json("POST", base + "/v1/produce", data=b"abc"))["n"] == 3
            assert HELLO_WAIT_S * 0.9 <= time.monotonic() - started < HELLO_WAIT_S + 1.0
            started = time.monotonic()
            big = b"x" * (CHANNEL_BODY_DEFAULT + 1)
            assert (await client.request_json("POST", base + "/v1/produce", data=big))["n"] == len(
                big
            )
            assert (await client.request_json("POST", base + "/v1/produce", data=b"abc"))["n"] == 3
            assert time.monotonic() - started < HELLO_WAIT_S  # not waited for again
            assert dummy.calls == [
                ("channel", "produce"), ("http", "/v1/produce"), ("channel", "produce")
            ]  # fmt: skip

    run(scenario)


@pytest.mark.usefixtures("no_hello")
def test_requests_to_a_peer_that_sends_no_hello_each_end_within_their_timeout(
    tmp_path: Path,
) -> None:
    """Concurrent requests share one connection attempt instead of queueing up behind
    one another's wait for a hello (they ended at 1, 2, 3 and 4 s with a 1 s
    timeout), and a request's own timeout bounds it, the wait for the channel
    included."""

    async def scenario() -> None:
        async with service(tmp_path, timeout_ms=1000) as (_dummy, base, transports):
            client = transports["client"]
            started = time.monotonic()
            answers = await asyncio.gather(
                *(client.request_json("POST", base + "/v1/produce", data=b"x") for _ in range(4))
            )
            assert [answer["n"] for answer in answers] == [1] * 4
            assert time.monotonic() - started < 1.0
            started = time.monotonic()
            with pytest.raises(RequestTimedOut):  # the fetch long-polls until released
                await client.request("POST", base + "/v1/fetch", data=b"x", timeout_ms=300)
            assert time.monotonic() - started < 0.8

    run(scenario)


def test_requests_that_wait_for_a_late_hello_leave_in_order_or_time_out_unsent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hello comes late (0.15 s): a big body waits for it, then goes over the
    channel with the hello's limit; a request with a shorter timeout behind it times
    out without being sent (it overtook the big one, and its expiry marked the peer
    as one without a hello)."""
    send = channel_module._send

    async def late_hello(socket: web.WebSocketResponse, answer: Any) -> None:
        if answer.request_id == HELLO_ID:
            await asyncio.sleep(0.15)
        await send(socket, answer)

    monkeypatch.setattr(channel_module, "_send", late_hello)

    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            client = transports["client"]
            big = b"x" * (CHANNEL_BODY_DEFAULT + 1)
            first = asyncio.ensure_future(client.request("POST", base + "/v1/produce", data=big))
            await asyncio.sleep(0.02)
            with pytest.raises(RequestTimedOut):
                await client.request("POST", base + "/v1/produce", data=b"s", timeout_ms=50)
            await first
            small = await client.request_json("POST", base + "/v1/produce", data=b"s")
            assert small["n"] == 1
            assert dummy.calls == [("channel", "produce")] * 2
            assert dummy.sizes == [len(big), 1]

    run(scenario)


@pytest.mark.usefixtures("no_hello")
def test_a_big_request_to_a_peer_without_a_hello_ends_within_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for the channel and then HTTP each got the whole timeout (1.6 s for a
    0.8 s timeout): HTTP now gets what is left of it."""

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.json_response({})

    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            client = transports["client"]
            monkeypatch.setattr(dummy, "http_handler", hang)
            started = time.monotonic()
            with pytest.raises(RequestTimedOut):
                await client.request(
                    "POST", base + "/v1/produce", data=b"x" * (CHANNEL_BODY_DEFAULT + 1),
                    timeout_ms=800,
                )  # fmt: skip
            assert time.monotonic() - started < 1.0

    run(scenario)


def test_a_request_head_at_the_frame_limit_fails_alone_and_closes_no_channel(
    tmp_path: Path,
) -> None:
    """aiohttp refuses a message of exactly its max_msg_size (the body limit plus
    FRAME_HEAD_MAX): a head of exactly FRAME_HEAD_MAX with a body at the limit closed
    the whole channel, failing a long-poll waiting on it. Such a head is refused
    before anything is sent."""

    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            client = transports["client"]
            poll = asyncio.ensure_future(client.request("POST", base + "/v1/fetch", data=b"p"))
            while ("channel", "fetch") not in dummy.calls:
                await asyncio.sleep(0.01)
            head = 6 + len("POST /v1/produce") + 2 + len("q=")
            params = {"q": "a" * (FRAME_HEAD_MAX - head)}  # a head of FRAME_HEAD_MAX
            with pytest.raises(InternalError, match="target and query"):
                await client.request("POST", base + "/v1/produce", params=params, data=b"x")
            params = {"q": "a" * (FRAME_HEAD_MAX - head - 1)}  # one byte less: served
            body, _ = await client.request(
                "POST", base + "/v1/produce", params=params, data=b"x" * (1 << 16)
            )
            assert json.loads(body)["n"] == 1 << 16
            assert not poll.done()
            dummy.release.set()
            assert (await asyncio.wait_for(poll, 5))[0] == b"data:p"

    run(scenario)


def test_a_frame_with_a_body_past_the_limit_is_answered_413(tmp_path: Path) -> None:
    """A peer that frames a body a little past the service's limit (the frame limit
    leaves room for the head) gets 413, as over HTTP, not a served request."""

    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, _):
            files = ensure_cluster_pki(tmp_path / "pki", NAMES)
            async with aiohttp.ClientSession() as session:
                socket = await session.ws_connect(
                    base + "/v1/channel", ssl=tls_client_context(files["client"])
                )
                hello = decode_answer((await socket.receive(timeout=5)).data)
                frame = encode_request(9, "POST /v1/produce", {}, b"x" * ((1 << 16) + 1))
                await socket.send_bytes(frame)
                answer = decode_answer((await socket.receive(timeout=5)).data)
                await socket.close()
            assert (hello.request_id, hello.status) == (HELLO_ID, 200)
            assert json.loads(hello.body) == {"max_body_bytes": 1 << 16}
            assert (answer.request_id, answer.status) == (9, 413)
            assert dummy.calls == []

    run(scenario)


def test_a_server_shutting_down_closes_its_channels_and_their_waiters_hear_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with service(tmp_path) as (dummy, base, transports):
            client = transports["client"]
            await client.request("POST", base + "/v1/produce", data=b"x")  # channel open
            poll = asyncio.ensure_future(client.request("POST", base + "/v1/fetch", data=b"x"))
            deadline = asyncio.get_running_loop().time() + 5
            while ("channel", "fetch") not in dummy.calls:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            began = asyncio.get_running_loop().time()
            assert dummy.server is not None
            # closing waits for handlers: the channel must not hold it up
            await asyncio.wait_for(dummy.server.close(), 10)
            assert asyncio.get_running_loop().time() - began < 5
            with pytest.raises(ConnectionFailed):
                await asyncio.wait_for(poll, 5)

    run(scenario)
