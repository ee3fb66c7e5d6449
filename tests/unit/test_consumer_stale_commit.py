"""A commit refused as stale_member_epoch (a grant moved the member's epoch on while
the commit was on its way) is resent under the epoch the next heartbeat brings, and
only then: never under another member id, never after the wait for it ran out."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from tidemq.client.consumer import Consumer
from tidemq.errors import StaleMemberEpoch

TP = ("orders", 0)


class Coordinator:
    """The coordinator's side: commits at another epoch than ``epoch`` are stale;
    a heartbeat answers ``heartbeat_answer`` (a new epoch, or a new member id)."""

    def __init__(self, epoch: int, heartbeat_answer: dict[str, Any]) -> None:
        self.epoch = epoch
        self.heartbeat_answer = heartbeat_answer
        self.commits: list[tuple[str, int]] = []
        self.offsets: dict[tuple[str, int], int] = {}

    async def coordinator(self, method: str, path: str, json_body: Any = None, **_: Any) -> Any:
        if path.endswith("/heartbeat"):
            return self.heartbeat_answer
        self.commits.append((json_body["member_id"], json_body["member_epoch"]))
        if json_body["member_epoch"] != self.epoch:
            raise StaleMemberEpoch("stale")
        for o in json_body["offsets"]:
            self.offsets[(o["topic"], o["partition"])] = o["offset"]
        return {"committed": len(json_body["offsets"])}


def consumer_with(fake: Coordinator, epoch: int, timeout_ms: int = 5_000) -> Consumer:
    consumer = Consumer.__new__(Consumer)
    consumer.group, consumer.topics = "g", ("orders",)
    consumer._member_id, consumer._member_epoch = "m", epoch
    consumer._committed, consumer._owned = {}, {TP}
    consumer._connection = SimpleNamespace(request_timeout_ms=timeout_ms)
    consumer._options = SimpleNamespace(session_timeout_ms=10_000, heartbeat_interval_ms=1_000)
    consumer._session_limit_s = 8.0
    consumer._transport = fake
    return consumer


async def commit_while_a_heartbeat_answers(consumer: Consumer, after_s: float) -> None:
    async def heartbeat_later() -> None:
        await asyncio.sleep(after_s)
        await consumer._heartbeat()

    beat = asyncio.ensure_future(heartbeat_later())
    try:
        await consumer._commit({TP: 200})
    finally:
        await beat


def test_a_commit_overtaken_by_a_grant_is_resent_under_the_new_epoch() -> None:
    fake = Coordinator(epoch=4, heartbeat_answer={"member_id": "m", "member_epoch": 4})
    consumer = consumer_with(fake, epoch=3)
    asyncio.run(commit_while_a_heartbeat_answers(consumer, after_s=0.05))
    assert fake.commits == [("m", 3), ("m", 4)]
    assert fake.offsets == {TP: 200} and consumer._committed == {TP: 200}


def test_a_stale_commit_is_not_resent_under_another_member_id() -> None:
    """Fenced and rejoined meanwhile: the positions belong to the old life."""
    fake = Coordinator(epoch=4, heartbeat_answer={"member_id": "other", "member_epoch": 4})
    consumer = consumer_with(fake, epoch=3)
    with pytest.raises(StaleMemberEpoch):
        asyncio.run(commit_while_a_heartbeat_answers(consumer, after_s=0.05))
    assert fake.commits == [("m", 3)] and fake.offsets == {} and consumer._committed == {}


def test_a_stale_commit_without_a_newer_epoch_in_time_fails() -> None:
    fake = Coordinator(epoch=4, heartbeat_answer={"member_id": "m", "member_epoch": 3})
    consumer = consumer_with(fake, epoch=3, timeout_ms=200)
    with pytest.raises(StaleMemberEpoch):
        asyncio.run(commit_while_a_heartbeat_answers(consumer, after_s=0.05))
    assert fake.commits == [("m", 3)] and consumer._committed == {}
