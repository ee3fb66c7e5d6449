"""service.http.read_json reads the whole body, however many chunks it arrives in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tidemq.errors import RequestTooLarge
from tidemq.service.http import read_json


async def _slowly(payload: bytes, pieces: int) -> AsyncIterator[bytes]:
    step = len(payload) // pieces + 1
    for start in range(0, len(payload), step):
        await asyncio.sleep(0)  # let the server run between chunks
        yield payload[start : start + step]


def test_a_body_in_many_chunks_is_read_whole_and_bounded() -> None:
    async def handler(request: web.Request) -> web.Response:
        try:
            body = await read_json(request, max_bytes=100_000)
        except RequestTooLarge as error:
            return web.json_response(error.to_json(), status=error.http_status)
        return web.json_response({"length": len(body["value"])})

    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/", handler)
        async with TestClient(TestServer(app)) as client:
            payload = json.dumps({"value": "x" * 50_000}).encode()
            answer = await client.post("/", data=_slowly(payload, 20))
            assert (answer.status, await answer.json()) == (200, {"length": 50_000})
            too_big = json.dumps({"value": "x" * 150_000}).encode()
            answer = await client.post("/", data=_slowly(too_big, 20))  # no Content-Length
            assert answer.status == 413

    asyncio.run(scenario())
