"""A fault-injecting HTTPS proxy to put in front of one broker (tests only).

It forwards every request to the broker and relays the answer, except that a
seeded fraction of successful produce answers (status 200) are lost: the broker
appended the batches and answered, and the proxy closes the client's connection
instead of relaying it (a lost response, the case that makes a non-idempotent retry write
twice). Produce answers are also delayed by a random few milliseconds, so requests
of one partition that are in flight together may overtake one another.

It counts produce requests, dropped answers, and the most batches of one partition
it has seen in flight at once (parsed from the bodies), so a test can show that
the producer really pipelined.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import threading
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from tidemq.wire.batch import iter_headers
from tidemq.wire.produce import PRODUCE_TYPE, decode_produce

_FORWARDED_HEADERS = ("Content-Type", "Accept")
_RELAYED_HEADERS = ("Content-Type",)


class DroppingProxy:
    def __init__(
        self,
        upstream_url: str,
        server_ssl: ssl.SSLContext | None,
        upstream_ssl: ssl.SSLContext | None,
        drop_fraction: float,
        seed: int,
        max_delay_s: float = 0.01,
    ) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.server_ssl = server_ssl
        self.upstream_ssl = upstream_ssl
        self.drop_fraction = drop_fraction
        self.max_delay_s = max_delay_s
        self.random = random.Random(seed)
        self.produce_requests = 0
        self.dropped = 0
        self.in_flight: Counter[tuple[str, int]] = Counter()
        self.max_in_flight_batches = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.server_ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> DroppingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.upstream_ssl or False, limit=64)
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.server_ssl)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _batches_by_partition(self, request: web.Request, body: bytes) -> Counter[tuple[str, int]]:
        counts: Counter[tuple[str, int]] = Counter()
        if request.content_type == PRODUCE_TYPE:
            for entry in decode_produce(body):
                counts[(entry.topic, entry.partition)] += sum(
                    1 for _ in iter_headers(entry.batches)
                )
        else:
            topic = request.match_info["tail"].split("/")[2]
            partition = int(request.match_info["tail"].split("/")[4])
            counts[(topic, partition)] += sum(1 for _ in iter_headers(body))
        return counts

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        is_produce = request.method == "POST" and (
            request.path == "/v1/produce" or request.path.endswith("/records")
        )
        counts: Counter[tuple[str, int]] = Counter()
        if is_produce:
            self.produce_requests += 1
            counts = self._batches_by_partition(request, body)
            self.in_flight.update(counts)
            self.max_in_flight_batches = max(self.max_in_flight_batches, *self.in_flight.values())
        try:
            return await self._relay(request, body, is_produce)
        finally:
            self.in_flight.subtract(counts)

    async def _relay(
        self, request: web.Request, body: bytes, is_produce: bool
    ) -> web.StreamResponse:
        assert self._session is not None
        headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
        async with self._session.request(
            request.method,
            self.upstream_url + request.path_qs,
            data=body,
            headers=headers,
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
            relayed: dict[str, Any] = {
                h: upstream.headers[h] for h in _RELAYED_HEADERS if h in upstream.headers
            }
            relayed.update({k: v for k, v in upstream.headers.items() if k.startswith("Tide-")})
        if is_produce:
            await asyncio.sleep(self.random.uniform(0, self.max_delay_s))
            if status == 200 and self.random.random() < self.drop_fraction:
                self.dropped += 1
                if request.transport is not None:
                    request.transport.abort()  # the broker answered; the client never hears it
                raise asyncio.CancelledError
        return web.Response(body=payload, status=status, headers=relayed)
