"""``tide proxy``'s HTTP shell: the client library as a service for other languages.

What it owns:

* one :class:`~tidemq.client.Producer` shared by every push (``POST
  /v1/topics/{topic}/records``): a push answers once every record is acknowledged
  (``acks=all``), with the offsets, in request order;
* *sessions*: one :class:`~tidemq.client.Consumer` (a group member) per session,
  created by ``POST /v1/sessions``, read by pull (``POST .../pull``) or as
  Server-Sent Events (``GET .../events``), committed by ``POST .../commit``, closed
  by ``DELETE``, by being idle for ``idle_timeout_ms``, or by the disconnect of its
  event stream. Limits and idleness live in the pure :mod:`.sessions` table;
* the seed's client API under ``/api/python/``: one Consumer of group ``default``
  on topic ``default`` per proxy (as the seed's client service had one), pushes to
  topic ``default``, and the seed's text answers.

Threads: aiohttp runs on this process's event loop. The client classes are
synchronous (each runs its own loop thread), so every call that may block (``send``
learning a topic or waiting for buffer space, ``poll``, ``commit``, ``close``) runs
on a bounded thread pool, never on the event loop. A session handles one pull (or one
event stream) at a time, so the pool needs at most one thread per session.

Delivery (at-least-once): records handed out by a pull or an event are committed
when the client commits (an event stream waits for that commit before it sends the
next batch, unless ``ack=auto``). A session that ends hands its partitions back to
the group without committing (the consumer's ``delivery="manual"``): records it
handed out but its client did not commit go to the partition's next owner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from tidemq.client.accumulator import RecordFuture
from tidemq.client.admin import Admin
from tidemq.client.consumer import Consumer
from tidemq.client.fetch_buffer import Message
from tidemq.client.producer import Producer
from tidemq.client.proxy import codec, openapi
from tidemq.client.proxy.sessions import RequestSlots, SessionLimits, SessionTable
from tidemq.errors import (
    BatchMismatch,
    ClientClosed,
    InvalidRequest,
    SessionBusy,
    TideError,
    TooManyRequests,
    Unavailable,
    UnknownSession,
)
from tidemq.service.app import build_app
from tidemq.service.callers import ANONYMOUS, CLIENTS
from tidemq.service.http import (
    Endpoint,
    check_int,
    check_name,
    parse_json,
    query_int,
    read_body,
    read_json_object,
)

log = logging.getLogger("tidemq.proxy")

T = TypeVar("T")

SEED_TOPIC = "default"
SEED_GROUP = "default"
SEED_JOIN_WAIT_S = 10.0  # the first seed pull waits for the member to join
SEED_POLL_S = 1.0  # a seed pull long-polls this long when nothing is there
SEED_SUBSCRIBER_BATCH = 100
MAX_PULL_RECORDS = 5_000
MAX_WAIT_MS = 30_000
LIVENESS_CHECK_S = 1.0  # an event stream notices a closed connection within this
READY_CHECK_S = 5.0
SMALL_BODY_BYTES = 64 * 1024
# The proxy serves programs, not services: client certificates, and callers without
# one when --client-auth is optional or none (a broker's certificate is refused).
PROXY_CALLERS = CLIENTS | ANONYMOUS


@dataclass(frozen=True)
class ProxyConfig:
    """Limits of one proxy; ``client``: keyword arguments for the client classes
    (empty: configured from the TIDE_* environment like every client)."""

    limits: SessionLimits = field(default_factory=SessionLimits)
    max_request_bytes: int = 8 * 1024 * 1024
    max_records_per_push: int = 10_000
    max_pushes_per_client: int = 16
    max_pushes: int = 32  # with max_request_bytes: at most 256 MiB of bodies in memory
    keepalive_ms: int = 15_000
    client: Mapping[str, Any] = field(default_factory=dict)


class _Session:
    """A session's live half (the table holds the bookkeeping half)."""

    def __init__(self, session_id: str, spec: codec.SessionRequest, consumer: Consumer) -> None:
        self.session_id = session_id
        self.spec = spec
        self.consumer = consumer
        self.lock = asyncio.Lock()  # one poll or commit at a time
        self.pulling = False
        self.batch = 0  # number of the latest non-empty hand-out
        self.committed_batch = 0
        self.pending: dict[codec.TopicPartition, int] = {}  # handed out, not committed
        self.changed = asyncio.Event()  # commit or close: wakes a waiting event stream
        self.closed = False


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        registry: CollectorRegistry,
        clock_ms: Callable[[], int] = _monotonic_ms,
    ) -> None:
        self.config = config
        self._clock_ms = clock_ms
        self._table = SessionTable(config.limits)
        self._sessions: dict[str, _Session] = {}
        self._pushes = RequestSlots("pushes", config.max_pushes_per_client, config.max_pushes)
        self._seed_requests = RequestSlots("seed API requests", 8, 64)
        # One thread per session (a session runs one blocking call at a time), plus the
        # seed member and the readiness check; pushes have their own pool.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            config.limits.max_sessions + 4, thread_name_prefix="tide-proxy"
        )
        self._push_executor = concurrent.futures.ThreadPoolExecutor(
            8, thread_name_prefix="tide-proxy-push"
        )
        self._producer: Producer | None = None
        self._admin: Admin | None = None
        self._seed: Consumer | None = None
        self._seed_lock = asyncio.Lock()
        self._seed_poll_lock = asyncio.Lock()
        self._ready = False
        self._closing = False
        self._tasks: asyncio.TaskGroup | None = None
        self._late: list[asyncio.Future[None]] = []  # closes begun after the group ended
        self._records_in = Counter(
            "tide_proxy_records_in",
            "Records pushed through the proxy and acknowledged by the cluster",
            ["topic"],
            registry=registry,
        )
        self._records_out = Counter(
            "tide_proxy_records_out",
            "Records handed out by pulls and event streams",
            ["topic"],
            registry=registry,
        )
        sessions = Gauge("tide_proxy_sessions", "Open consumer sessions", registry=registry)
        sessions.set_function(lambda: len(self._table))
        pushes = Gauge(
            "tide_proxy_pushes_in_flight", "Push requests being served", registry=registry
        )
        pushes.set_function(lambda: self._pushes.in_flight)
        self._streams = Gauge(
            "tide_proxy_event_streams", "Open Server-Sent Event streams", registry=registry
        )
        self._closed = Counter(
            "tide_proxy_sessions_closed",
            "Sessions closed, by reason (deleted, idle, disconnected, shutdown)",
            ["reason"],
            registry=registry,
        )
        self._rejected = Counter(
            "tide_proxy_rejected_requests",
            "Requests refused because a limit was reached",
            ["limit"],
            registry=registry,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Creates the shared producer and admin client (ConfigurationError if the
        TIDE_* settings are missing or wrong)."""
        self._producer = await self._blocking(
            functools.partial(
                Producer, linger_ms=1, delivery_timeout_ms=30_000, **self.config.client
            )
        )
        self._admin = await self._blocking(
            functools.partial(Admin, request_timeout_ms=5_000, **self.config.client)
        )

    def app(self, registry: CollectorRegistry) -> web.Application:
        app = build_app(
            "tide proxy",
            self.endpoints(),
            registry,
            is_ready=lambda: self._ready,
            max_body_bytes=self.config.max_request_bytes,
        )
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def background(self) -> None:
        """Idle-session reaping and the readiness check, until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            tasks.create_task(self._reap_forever(), name="proxy-reaper")
            tasks.create_task(self._check_ready_forever(), name="proxy-readiness")

    async def _reap_forever(self) -> None:
        interval_s = min(1.0, self.config.limits.idle_timeout_ms / 4000)
        while True:
            for session_id in self._table.expired(self._clock_ms()):
                self._close_later(session_id, "idle")
            await asyncio.sleep(interval_s)

    async def _check_ready_forever(self) -> None:
        admin = self._admin
        while admin is not None:
            try:
                await self._blocking(admin.describe_cluster)
                self._ready = True
            except TideError as error:
                if self._ready:
                    log.warning("the cluster does not answer: %s", error)
                self._ready = False
            await asyncio.sleep(READY_CHECK_S if self._ready else 0.5)

    async def _on_shutdown(self, _: web.Application) -> None:
        self._closing = True
        for session in self._sessions.values():
            session.changed.set()
        await asyncio.gather(*(self._close(sid, "shutdown") for sid in list(self._sessions)))
        await asyncio.gather(*self._late)
        seed, self._seed = self._seed, None
        if seed is not None:
            await self._blocking(seed.close)

    async def _on_cleanup(self, _: web.Application) -> None:
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        if producer is not None:
            await self._blocking(producer.close, 10.0)
        if admin is not None:
            await self._blocking(admin.close)
        self._executor.shutdown(wait=False)
        self._push_executor.shutdown(wait=False)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Runs ``coroutine`` in the proxy's task group (its failure stops the proxy);
        once that group has finished (shutting down), in the shutdown's own list."""
        tasks = self._tasks
        if tasks is not None:
            try:
                tasks.create_task(coroutine)
                return
            except RuntimeError:  # the group has finished
                pass
        self._late.append(asyncio.ensure_future(coroutine))

    async def _blocking(
        self,
        function: Callable[..., T],
        *args: Any,
        executor: concurrent.futures.Executor | None = None,
    ) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(function, *args)
        return await loop.run_in_executor(executor or self._executor, call)

    # -- the endpoint table -------------------------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        session_path = "/v1/sessions/{session_id}"
        return [
            Endpoint(
                "POST",
                "/v1/topics/{topic}/records",
                self.push,
                "Push one record or many; answers once all are acknowledged",
                parameters=[openapi.TOPIC_PARAMETER],
                request_body=openapi.json_schema(openapi.PUSH_SCHEMA),
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "400", "404", "413", "429", "503", "504"),
            ),
            Endpoint(
                "POST",
                "/v1/sessions",
                self.create_session,
                "Open a session: a consumer group member run by the proxy",
                request_body=openapi.json_schema(openapi.SESSION_SCHEMA),
                callers=PROXY_CALLERS,
                responses=openapi.responses("201", "400", "413", "429", "503"),
            ),
            Endpoint(
                "GET",
                session_path,
                self.describe_session,
                "A session: group, topics, assignment, batches",
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "404"),
            ),
            Endpoint(
                "DELETE",
                session_path,
                self.delete_session,
                "Close a session: the member leaves its group",
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "404"),
            ),
            Endpoint(
                "POST",
                session_path + "/pull",
                self.pull,
                "Pull the next records of a session (long-polls up to timeout_ms)",
                parameters=[
                    openapi.query("max_records", "integer", 1, MAX_PULL_RECORDS),
                    openapi.query("timeout_ms", "integer", 0, MAX_WAIT_MS),
                    openapi.encoding_parameter(),
                ],
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "400", "404", "409", "503"),
            ),
            Endpoint(
                "GET",
                session_path + "/events",
                self.events,
                "Subscribe: the session's records as Server-Sent Events",
                parameters=[
                    openapi.query("max_records", "integer", 1, MAX_PULL_RECORDS),
                    openapi.query("keepalive_ms", "integer", 100, 60_000),
                    openapi.encoding_parameter(),
                    {
                        "name": "ack",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["manual", "auto"]},
                    },
                ],
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "400", "404", "409"),
            ),
            Endpoint(
                "POST",
                session_path + "/commit",
                self.commit,
                "Commit (acknowledge) every record the session has handed out",
                request_body=openapi.json_schema(openapi.COMMIT_SCHEMA),
                request_body_required=False,
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "400", "404", "409", "503"),
            ),
            Endpoint(
                "POST",
                "/api/python/push",
                self.seed_push,
                "Seed API: push {key, message} to topic default",
                request_body=openapi.json_schema(openapi.SEED_PUSH_SCHEMA),
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "400", "413", "429", "503", "504"),
            ),
            Endpoint(
                "POST",
                "/api/python/pull",
                self.seed_pull,
                "Seed API: the next message of topic default as [key:K-value:V] ([] if none)",
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "429", "503"),
            ),
            Endpoint(
                "POST",
                "/api/python/subscribe",
                self.seed_subscribe,
                "Seed API: make sure the proxy's member of group default has joined; OK",
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "429", "503"),
            ),
            Endpoint(
                "POST",
                "/api/python/pull-as-subscriber",
                self.seed_pull_as_subscriber,
                "Seed API: up to 100 messages as [key:K1-value:V1, key:K2-value:V2]",
                callers=PROXY_CALLERS,
                responses=openapi.responses("200", "429", "503"),
            ),
        ]

    # -- push ---------------------------------------------------------------------------

    async def push(self, request: web.Request) -> web.Response:
        topic = check_name(request.match_info["topic"], "topic")
        with self._slot(self._pushes, _client(request), "pushes"):
            body = await read_json_object(request, self.config.max_request_bytes)
            records = codec.parse_push(body, self.config.max_records_per_push)
            futures, failure = await self._send(topic, records)
        return self._push_answer(topic, len(records), futures, failure)

    async def _send(
        self, topic: str, records: Sequence[codec.OutgoingRecord]
    ) -> tuple[list[RecordFuture], TideError | None]:
        """Sends ``records`` and waits for every acknowledgement. ``failure``: why the
        records after ``futures`` were not sent (None: all were)."""
        futures, failure = await self._blocking(
            self._send_all, topic, records, executor=self._push_executor
        )
        await _all_done(futures)
        return futures, failure

    def _send_all(
        self, topic: str, records: Sequence[codec.OutgoingRecord]
    ) -> tuple[list[RecordFuture], TideError | None]:
        """On a pool thread: checks every record against the topic, then sends them."""
        producer = self._producer
        if producer is None:
            raise Unavailable("the proxy is starting or stopping")
        codec.check_partitions(records, topic, producer.partitions_for(topic))
        futures: list[RecordFuture] = []
        try:
            for record in records:
                futures.append(
                    producer.send(
                        topic,
                        record.value,
                        key=record.key,
                        headers=record.headers,
                        partition=record.partition,
                    )
                )
        except TideError as error:
            if not futures:
                raise
            return futures, error
        return futures, None

    def _push_answer(
        self, topic: str, count: int, futures: list[RecordFuture], failure: TideError | None
    ) -> web.Response:
        offsets: list[dict[str, Any]] = []
        first_error = None
        for future in futures:
            error = future.exception(0)
            if error is None:
                metadata = future.result(0)
                offsets.append({"partition": metadata.partition, "offset": metadata.offset})
            else:
                first_error = first_error or error
                offsets.append(error.to_json())
        if failure is not None:
            first_error = first_error or failure
            offsets.extend(failure.to_json() for _ in range(count - len(futures)))
        delivered = sum(1 for entry in offsets if "offset" in entry)
        if delivered:
            self._records_in.labels(topic).inc(delivered)
        if first_error is None:
            return web.json_response({"topic": topic, "offsets": offsets})
        body = {**first_error.to_json(), "topic": topic, "offsets": offsets}
        return web.json_response(body, status=first_error.http_status)

    # -- sessions -------------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        client = _client(request)
        body = await read_json_object(request, SMALL_BODY_BYTES)
        spec = codec.parse_session_request(body)
        if self._closing:
            raise Unavailable("the proxy is shutting down")
        session_id = secrets.token_urlsafe(18)
        with self._counting_rejections("sessions"):
            self._table.reserve(session_id, client, self._clock_ms())
        try:
            consumer = await self._blocking(
                functools.partial(
                    Consumer,
                    *spec.topics,
                    group=spec.group,
                    delivery="manual",  # only the client's commit commits
                    auto_offset_reset=spec.auto_offset_reset,
                    **self.config.client,
                )
            )
        except BaseException:
            self._table.remove(session_id)
            raise
        session = _Session(session_id, spec, consumer)
        self._sessions[session_id] = session
        log.info("session %s opened for %s: group %s", session_id, client, spec.group)
        if spec.wait_ms:
            with self._in_request(session_id, client):
                await self._blocking(consumer.wait_until_ready, spec.wait_ms / 1000)
        return web.json_response(self._describe(session), status=201)

    def _describe(self, session: _Session) -> dict[str, Any]:
        assignment = [] if session.closed else sorted(session.consumer.assignment())
        return {
            "session_id": session.session_id,
            "group": session.spec.group,
            "topics": list(session.spec.topics),
            "assignment": [{"topic": t, "partition": p} for t, p in assignment],
            "batch": session.batch,
            "committed_batch": session.committed_batch,
            "idle_timeout_ms": self.config.limits.idle_timeout_ms,
        }

    def _session(self, request: web.Request) -> _Session:
        session_id = request.match_info["session_id"]
        self._table.get(session_id, _client(request))
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"session {session_id} is still being opened")
        return session

    async def describe_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        self._table.touch(session.session_id, self._clock_ms())
        return web.json_response(self._describe(session))

    async def delete_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        await self._close(session.session_id, "deleted")
        return web.json_response({"session_id": session.session_id, "closed": True})

    async def _close(self, session_id: str, reason: str) -> None:
        session = self._detach(session_id, reason)
        if session is not None:
            await self._close_consumer(session)

    def _close_later(self, session_id: str, reason: str) -> None:
        """Frees the session's slot now; its member leaves the group in the background."""
        session = self._detach(session_id, reason)
        if session is not None:
            self._spawn(self._close_consumer(session))

    def _detach(self, session_id: str, reason: str) -> _Session | None:
        self._table.remove(session_id)
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        session.closed = True
        session.changed.set()
        self._closed.labels(reason).inc()
        log.info("session %s closed (%s)", session_id, reason)
        return session

    async def _close_consumer(self, session: _Session) -> None:
        try:
            await self._blocking(session.consumer.close)
        except TideError as error:
            log.warning("closing session %s: %s", session.session_id, error)

    async def pull(self, request: web.Request) -> web.Response:
        session = self._session(request)
        max_records = query_int(request, "max_records", 500, 1, MAX_PULL_RECORDS)
        timeout_ms = query_int(request, "timeout_ms", 1000, 0, MAX_WAIT_MS)
        encoding = codec.check_encoding(request.query.get("encoding", "utf-8"))
        self._check_not_streaming(session, _client(request))
        if session.pulling:
            raise SessionBusy(f"session {session.session_id} is already pulling")
        session.pulling = True
        try:
            with self._in_request(session.session_id, _client(request)):
                async with session.lock:
                    messages = await self._poll(session, timeout_ms / 1000, max_records)
        finally:
            session.pulling = False
        records = [codec.render_message(message, encoding) for message in messages]
        return web.json_response({"records": records, "batch": session.batch})

    def _check_not_streaming(self, session: _Session, client: str) -> None:
        if self._table.get(session.session_id, client).streaming:
            raise SessionBusy(
                f"session {session.session_id} has an open event stream: its records go there"
            )

    async def _poll(self, session: _Session, timeout_s: float, max_records: int) -> list[Message]:
        """Polls the session's consumer (the caller holds ``session.lock``)."""
        try:
            messages = await self._blocking(session.consumer.poll, timeout_s, max_records)
        except ClientClosed as error:
            raise UnknownSession(f"session {session.session_id} was closed") from error
        if session.closed:
            raise UnknownSession(f"session {session.session_id} was closed")
        if messages:
            session.batch += 1
            for tp, position in codec.next_positions(messages).items():
                session.pending[tp] = position
            for topic in {message.topic for message in messages}:
                self._records_out.labels(topic).inc(
                    sum(1 for message in messages if message.topic == topic)
                )
        return messages

    async def commit(self, request: web.Request) -> web.Response:
        session = self._session(request)
        batch = _batch_field(await _optional_json_object(request))
        with self._in_request(session.session_id, _client(request)):
            committed = await self._commit(session, batch)
        return web.json_response(
            {"committed": codec.positions_json(committed), "batch": session.batch}
        )

    async def _commit(self, session: _Session, batch: int | None) -> dict[Any, int]:
        async with session.lock:
            if batch is not None and batch != session.batch:
                if batch > session.batch:
                    raise BatchMismatch(
                        f"no batch {batch} yet: the latest handed out is {session.batch}"
                    )
                raise BatchMismatch(
                    f"batch {batch} is not the latest one handed out ({session.batch}); "
                    f"commit {session.batch}, or leave 'batch' out, to commit everything"
                )
            pending = dict(session.pending)
            try:
                await self._blocking(session.consumer.commit)
            except ClientClosed as error:
                raise UnknownSession(f"session {session.session_id} was closed") from error
            session.pending.clear()
            session.committed_batch = session.batch
            session.changed.set()
            return pending

    # -- Server-Sent Events -------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        client = _client(request)
        session = self._session(request)
        max_records = query_int(request, "max_records", 100, 1, MAX_PULL_RECORDS)
        keepalive_ms = query_int(request, "keepalive_ms", self.config.keepalive_ms, 100, 60_000)
        encoding = codec.check_encoding(request.query.get("encoding", "utf-8"))
        ack = request.query.get("ack", "manual")
        if ack not in ("manual", "auto"):
            raise InvalidRequest(f"ack must be 'manual' or 'auto', not {ack!r}")
        if session.pulling:
            raise SessionBusy(f"session {session.session_id} is pulling")
        self._table.attach_stream(session.session_id, client, self._clock_ms())
        self._streams.inc()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        ended = "disconnected"
        try:
            await response.prepare(request)
            await response.write(codec.sse_event("session", self._describe(session)))
            stream = _Stream(request, response, session, max_records, encoding, ack == "auto")
            try:
                ended = await self._stream(stream, keepalive_ms / 1000)
                end: dict[str, Any] = {"reason": ended}
            except UnknownSession:
                ended = "closed"
                end = {"reason": ended}
            except TideError as error:  # the stream ends; the session stays usable
                ended = "error"
                end = {"reason": ended, **error.to_json()}
            if ended != "disconnected":
                await response.write(codec.sse_event("end", end))
        except ConnectionError:
            ended = "disconnected"
        except asyncio.CancelledError:
            ended = "disconnected"
            raise
        finally:
            self._streams.dec()
            self._table.detach_stream(session.session_id, self._clock_ms())
            if ended == "disconnected":
                self._close_later(session.session_id, "disconnected")
        return response

    async def _stream(self, stream: _Stream, keepalive_s: float) -> str:
        """Writes batches until the session closes, the proxy stops or the client goes.
        Returns why it stopped: "closed", "shutdown" or "disconnected"."""
        session = stream.session
        last_write = time.monotonic()
        check_s = min(LIVENESS_CHECK_S, keepalive_s)
        while True:
            if session.closed:
                return "closed"
            if self._closing:
                return "shutdown"
            if stream.disconnected():
                return "disconnected"
            if stream.auto_ack or session.committed_batch >= session.batch:
                async with session.lock:
                    messages = await self._poll(session, check_s, stream.max_records)
                if messages:
                    await stream.response.write(stream.frame(messages))
                    last_write = time.monotonic()
                    if stream.auto_ack:
                        await self._commit(session, None)
            else:  # wait for the client's commit of the batch it has
                session.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(check_s):
                        await session.changed.wait()
            if time.monotonic() - last_write >= keepalive_s:
                await stream.response.write(codec.sse_comment("keep-alive"))
                last_write = time.monotonic()

    # -- the seed's client API ------------------------------------------------------------

    async def seed_push(self, request: web.Request) -> web.Response:
        with self._slot(self._pushes, _client(request), "pushes"):
            body = await read_json_object(request, self.config.max_request_bytes)
            key, message = codec.parse_seed_push(body)
            record = codec.OutgoingRecord(key.encode(), message.encode(), None, None)
            futures, failure = await self._send(SEED_TOPIC, [record])
        error = failure or futures[0].exception(0)
        if error is not None:
            raise error
        self._records_in.labels(SEED_TOPIC).inc()
        return web.Response(text=codec.SEED_PUSHED)

    async def seed_pull(self, request: web.Request) -> web.Response:
        messages = await self._seed_poll(_client(request), 1)
        return web.Response(text=codec.seed_list(messages))

    async def seed_subscribe(self, request: web.Request) -> web.Response:
        with self._slot(self._seed_requests, _client(request), "seed API requests"):
            await self._seed_consumer()
        return web.Response(text=codec.SEED_SUBSCRIBED)

    async def seed_pull_as_subscriber(self, request: web.Request) -> web.Response:
        messages = await self._seed_poll(_client(request), SEED_SUBSCRIBER_BATCH)
        return web.Response(text=codec.seed_list(messages))

    async def _seed_poll(self, client: str, max_records: int) -> list[Message]:
        with self._slot(self._seed_requests, client, "seed API requests"):
            consumer = await self._seed_consumer()
            async with self._seed_poll_lock:
                try:
                    messages = await self._blocking(consumer.poll, SEED_POLL_S, max_records)
                except ClientClosed as error:
                    raise Unavailable("the proxy is shutting down") from error
        if messages:
            self._records_out.labels(SEED_TOPIC).inc(len(messages))
        return messages

    async def _seed_consumer(self) -> Consumer:
        """The proxy's one member of group "default", created and joined on first use."""
        async with self._seed_lock:
            if self._closing:
                raise Unavailable("the proxy is shutting down")
            if self._seed is None:
                consumer = await self._blocking(
                    functools.partial(Consumer, SEED_TOPIC, group=SEED_GROUP, **self.config.client)
                )
                self._seed = consumer
                await self._blocking(consumer.wait_until_ready, SEED_JOIN_WAIT_S)
            return self._seed

    # -- limits -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _counting_rejections(self, limit: str) -> Iterator[None]:
        try:
            yield
        except TooManyRequests:
            self._rejected.labels(limit).inc()
            raise

    @contextlib.contextmanager
    def _slot(self, slots: RequestSlots, client: str, limit: str) -> Iterator[None]:
        with self._counting_rejections(limit):
            slots.acquire(client)
        try:
            yield
        finally:
            slots.release(client)

    @contextlib.contextmanager
    def _in_request(self, session_id: str, client: str) -> Iterator[None]:
        """Marks the session busy (never idle) for the duration of a request."""
        self._table.begin_request(session_id, client, self._clock_ms())
        try:
            yield
        finally:
            self._table.end_request(session_id, self._clock_ms())


class _Stream:
    """One open event stream: where it writes and how it frames a batch."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        session: _Session,
        max_records: int,
        encoding: str,
        auto_ack: bool,
    ) -> None:
        self.request = request
        self.response = response
        self.session = session
        self.max_records = max_records
        self.encoding = encoding
        self.auto_ack = auto_ack

    def disconnected(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def frame(self, messages: list[Message]) -> bytes:
        events = [
            codec.sse_event(
                "message",
                codec.render_message(message, self.encoding),
                f"{message.topic}/{message.partition}/{message.offset}",
            )
            for message in messages
        ]
        batch = {
            "batch": self.session.batch,
            "count": len(messages),
            "ack": "auto" if self.auto_ack else "manual",
        }
        events.append(codec.sse_event("batch", batch))
        return b"".join(events)


async def _all_done(futures: Sequence[RecordFuture]) -> None:
    """Waits (without blocking the loop) until every future is done."""
    if not futures:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def finished(_: RecordFuture) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            loop.call_soon_threadsafe(_resolve, done)

    for future in futures:
        future.add_done_callback(finished)
    await done


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _optional_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``."""
    raw = await read_body(request, SMALL_BODY_BYTES)
    if not raw.strip():
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("expected a JSON object")
    return body


def _batch_field(body: dict[str, Any]) -> int | None:
    unknown = sorted(set(body) - {"batch"})
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
    raw = body.get("batch")
    if raw is None:
        return None
    batch = codec.json_int(raw)
    if batch is None:
        raise InvalidRequest(f"batch must be an integer, not {raw!r}")
    return check_int(batch, "batch", minimum=0)
