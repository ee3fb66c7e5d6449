"""The topic and broker bounds are the coordinator's policy before it persists a
command, not rules of the state's check: lowering them (a later version, or an
operator's build) must not stop the coordinator from replaying its log."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.coordinator.test_group_shell import Clock, coordinator, run

import tidemq.core.metadata as metadata


def test_a_create_past_the_topic_bound_is_refused_and_a_lowered_bound_still_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (c, _store, api):
            await api.call("POST", "/v1/brokers/register", {"broker_id": 1, "url": "http://b1"})
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
