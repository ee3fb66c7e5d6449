"""HttpTransport.request_json decodes with msgspec (fast) and reads anything
json.dumps writes, which msgspec alone refuses: a lone surrogate a client put in
a free-form string (a member id, echoed by GET /v1/groups/{group}) or NaN."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tidemq.errors import InternalError
from tidemq.transport import HttpTransport


def answered(body: bytes) -> Any:
    async def scenario() -> Any:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/answer", handler)
        server = TestServer(app)
        await server.start_server()
        transport = HttpTransport(False, {}, 4, 5000)
        try:
            return await transport.request_json("GET", str(server.make_url("/answer")))
        finally:
            await transport.close()
            await server.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    "value",
    [{"member_id": "\ud800evil", "member_epoch": 1}, {"lag": float("nan")}, {"n": 1, "s": "ö"}],
)
def test_request_json_reads_what_json_dumps_writes(value: dict[str, Any]) -> None:
    got = answered(json.dumps(value).encode())
    assert json.dumps(got) == json.dumps(value)  # NaN != NaN: compare the texts


def test_an_answer_that_is_not_json_is_a_clear_error() -> None:
    with pytest.raises(InternalError, match="answer is not JSON"):
        answered(b"<html>")
