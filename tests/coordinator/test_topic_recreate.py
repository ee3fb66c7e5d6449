"""Creating a topic under the name of one just deleted waits until no broker still
holds the deleted incarnation's data.

A broker learns of a deletion at its next heartbeat; until then it took requests that
name no leader epoch (REST clients) for the new topic into the old log, answered
200 and then deleted that log: acknowledged writes were lost (found by review)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests.coordinator.test_group_shell import Api, Clock, coordinator, run, until

import tidemq.coordinator.server as coordinator_server


async def heartbeat(api: Api, topics: list[tuple[str, str]]) -> None:
    """Broker 1's heartbeat, reporting partition 0 of each (topic, topic id)."""
    reports = [{"topic": t, "partition": 0, "topic_id": i} for t, i in topics]
    status, body = await api.call("POST", "/v1/brokers/1/heartbeat", {"partitions": reports})
    assert status == 200, body


async def create(api: Api) -> tuple[int, Any]:
    return await api.call("POST", "/v1/topics", {"name": "reborn", "partitions": 1})


def test_a_topic_is_created_again_only_once_no_broker_holds_the_deleted_one(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (c, _store, api):
            await api.register()
            assert (await create(api))[0] == 201
            old_id = c.state.topic("reborn").topic_id
            await heartbeat(api, [("reborn", old_id)])
            assert (await api.call("DELETE", "/v1/topics/reborn"))[0] == 200
            again = asyncio.ensure_future(create(api))
            await asyncio.sleep(0.3)
            assert not again.done(), "created while broker 1 still held the old log"
            assert "reborn" not in c.state.topics
            await heartbeat(api, [])  # broker 1 dropped the deleted topic
            status, body = await asyncio.wait_for(again, 5)
            assert status == 201, body
            assert c.state.topic("reborn").topic_id != old_id

    run(scenario)


def test_a_broker_that_keeps_the_deleted_topic_makes_the_create_503_retriable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_server, "DELETED_TOPIC_WAIT_S", 0.2)

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (c, _store, api):
            await api.register()
            assert (await create(api))[0] == 201
            await heartbeat(api, [("reborn", c.state.topic("reborn").topic_id)])
            assert (await api.call("DELETE", "/v1/topics/reborn"))[0] == 200
            status, body = await create(api)
            assert (status, body["error"]["code"]) == (503, "unavailable")
            assert "still hold" in body["error"]["message"]
            assert "reborn" not in c.state.topics  # refused: nothing changed
            await heartbeat(api, [])
            await until(lambda: not c.liveness.hosting("reborn"), "the report to clear")
            assert (await create(api))[0] == 201

    run(scenario)


def test_a_broker_that_never_reported_the_deleted_topic_must_still_heartbeat_first(
    tmp_path: Path,
) -> None:
    """Created, written and deleted within one heartbeat interval: no heartbeat named
    the topic, yet its replica's broker holds it (it heard of it from a request)."""

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (c, _store, api):
            await api.register()
            assert (await create(api))[0] == 201
            assert (await api.call("DELETE", "/v1/topics/reborn"))[0] == 200
            again = asyncio.ensure_future(create(api))
            await asyncio.sleep(0.3)
            assert not again.done() and c.lingering("reborn") == [1]
            await heartbeat(api, [])
            assert (await asyncio.wait_for(again, 5))[0] == 201

    run(scenario)


def test_a_topic_deleted_just_before_a_coordinator_restart_is_not_created_at_once(
    tmp_path: Path,
) -> None:
    """Broker 1 holds 'reborn'; it is deleted and the coordinator restarts before
    broker 1's next heartbeat. Who held it is soft state, gone with the restart: a
    name deleted before counts every live broker not heard from since the start."""

    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (c, _store, api):
            await api.register()
            assert (await create(api))[0] == 201
            await heartbeat(api, [("reborn", c.state.topic("reborn").topic_id)])
            assert (await api.call("DELETE", "/v1/topics/reborn"))[0] == 200
        async with coordinator(tmp_path, clock) as (c, _store, api):  # restarted
            again = asyncio.ensure_future(create(api))
            await asyncio.sleep(0.3)
            assert not again.done(), "created at once after a restart"
            await heartbeat(api, [])
            assert (await asyncio.wait_for(again, 5))[0] == 201

    run(scenario)
