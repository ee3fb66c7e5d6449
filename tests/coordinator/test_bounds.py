"""The topic and broker bounds are the coordinator's policy before it persists a
command, not rules of the state's check: lowering them (a later version, or an
operator's build) must not stop the coordinator from replaying its log."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.coordinator.test_group_shell import Clock, GatedStore, coordinator, run, until

import tidemq.core.metadata as metadata


def test_a_create_past_the_topic_bound_is_refused_and_a_lowered_bound_still_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (c, _store, api):
            assert (await api.register(1))[0] == 200
            for name in ("a", "b", "c"):
                status, body = await api.call("POST", "/v1/topics", {"name": name})
                assert status == 201, body
            monkeypatch.setattr(metadata, "MAX_TOPICS", 3)
            status, body = await api.call("POST", "/v1/topics", {"name": "d"})
            assert status == 400, body
            assert "maximum of 3 topics" in str(body)
            assert set(c.state.topics) == {"a", "b", "c"}
        monkeypatch.setattr(metadata, "MAX_TOPICS", 2)  # lowered below what the log holds
        async with coordinator(tmp_path, clock) as (c, _store, api):
            assert set(c.state.topics) == {"a", "b", "c"}
            assert (await api.call("GET", "/v1/topics/a"))[0] == 200

    run(scenario)


def test_a_lowered_partition_bound_still_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_PARTITIONS_PER_TOPIC is policy too (found by review of the bounds fix)."""

    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (_c, _store, api):
            assert (await api.register(1))[0] == 200
            body = {"name": "wide", "partitions": 5, "replication_factor": 1}
            assert (await api.call("POST", "/v1/topics", body))[0] == 201
        monkeypatch.setattr(metadata, "MAX_PARTITIONS_PER_TOPIC", 4)
        async with coordinator(tmp_path, clock) as (c, _store, _api):
            assert len(c.state.topic("wide").partitions) == 5

    run(scenario)


async def race_for_the_last_slot(
    store: GatedStore, first: Callable[[], Awaitable[Any]], second: Callable[[], Awaitable[Any]]
) -> list[Any]:
    """Holds ``first`` inside its fsync (with the write lock), sends ``second``, then
    lets both finish: the second must wait for the first and then meet the bound."""
    store.gate.clear()
    appended = len(store.appends)
    first_answer = asyncio.ensure_future(first())
    await until(lambda: len(store.appends) > appended, "the first command's fsync")
    second_answer = asyncio.ensure_future(second())
    await asyncio.sleep(0.05)
    store.gate.set()
    return list(await asyncio.gather(first_answer, second_answer))


def test_two_creates_racing_for_the_last_topic_admit_exactly_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first create is held inside its fsync with the write lock; the second waits
    for it and then meets the bound (written by the reviewer of the bounds fix)."""

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (c, store, api):
            assert (await api.register(1))[0] == 200
            assert (await api.call("POST", "/v1/topics", {"name": "a"}))[0] == 201
            monkeypatch.setattr(metadata, "MAX_TOPICS", 2)
            answers = await race_for_the_last_slot(
                store,
                lambda: api.call("POST", "/v1/topics", {"name": "b"}),
                lambda: api.call("POST", "/v1/topics", {"name": "c"}),
            )
            assert sorted(status for status, _ in answers) == [201, 400], answers
            assert len(c.state.topics) == 2

    run(scenario)


def test_two_new_brokers_racing_for_the_last_slot_admit_exactly_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (c, store, api):
            assert (await api.register(1))[0] == 200
            monkeypatch.setattr(metadata, "MAX_BROKERS", 2)
            answers = await race_for_the_last_slot(
                store, lambda: api.register(2), lambda: api.register(3)
            )
            assert sorted(status for status, _ in answers) == [200, 400], answers
            assert "maximum of 2 brokers" in str(answers)
            assert len(c.state.brokers) == 2

    run(scenario)
