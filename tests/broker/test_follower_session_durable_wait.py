"""A follower fetch session waits for the fsync of what it appended before its next
fetch (broker/follower.py). That wait must end even when another session cut the
replica meanwhile: a partition whose leader moved is appended to by the old leader's
session, then moved to the new leader's session, which truncates it (a divergence)
or starts it over (the leader's log start is past ours) before the old session's
fsync completed. The records the old session waited for are gone, so its durable
waiter never completed and that session never fetched again: every other partition
it follows on the old leader (still alive, still leading them) stopped replicating
and fell out of the ISR.

The leader is a fake that holds every request until the test answers it; the
replicas are real (fsync=always), their fsyncs driven by hand.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from tidemq.broker.follower import FetchSession
from tidemq.broker.partition import PartitionReplica
from tidemq.core.replica import ReplicaAssignment
from tidemq.errors import ConnectionFailed
from tidemq.storage import FsyncPolicy, LogConfig
from tidemq.transport import HttpTransport
from tidemq.wire.batch import build_batch, patch_batch
from tidemq.wire.replica_fetch import ReplicaFetchEntry, encode_replica_fetch

TOPIC_ID = "0123456789abcdef0123456789abcdef"
Answer = asyncio.Future[tuple[bytes, dict[str, str]]]


class FakeLeader:
    """Every replica fetch waits until the test answers it."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[tuple[dict[str, Any], Answer]] = asyncio.Queue()

    async def request(
        self, method: str, url: str, *, data: bytes = b"", **_: Any
    ) -> tuple[bytes, dict[str, str]]:
        answer: Answer = asyncio.get_running_loop().create_future()
        await self.requests.put((json.loads(data), answer))
        return await answer

    async def next_request(self, what: str) -> tuple[dict[str, Any], Answer]:
        try:
            return await asyncio.wait_for(self.requests.get(), 5.0)
        except TimeoutError:
            pytest.fail(f"the session sent no request within 5 s: {what}")


def follower_replica(tmp_path: Path, partition: int) -> PartitionReplica:
    replica = PartitionReplica.open(
        tmp_path,
        2,
        ("orders", partition, TOPIC_ID),
        LogConfig(fsync=FsyncPolicy.ALWAYS),
        10_000,
        lambda *_: None,
        lambda: 0,
    )
    replica.assign(
        ReplicaAssignment(
            leader_id=1, leader_epoch=1, partition_epoch=1, replicas=(1, 2), isr=(1, 2)
        )
    )
    return replica


def batch(count: int, base_offset: int, epoch: int = 1) -> bytes:
    data = bytearray(build_batch([(None, f"v{i}".encode()) for i in range(count)], 1000))
    patch_batch(data, 0, base_offset, epoch)
    return bytes(data)


def session_with(leader: FakeLeader, replicas: list[PartitionReplica]) -> FetchSession:
    session = FetchSession(
        2,
        1,
        "http://leader-1",
        cast("Callable[[], HttpTransport]", lambda: leader),
        lambda replica: None,  # the fsync is driven by the test
        lambda topic, size: None,
        5_000,
        1_000,
    )
    for replica in replicas:
        session.add(("orders", replica.partition), replica, 1)
    return session


@pytest.mark.parametrize("cut", ["truncated", "started over"])
def test_a_session_fetches_again_when_another_session_cut_what_it_waits_for(
    tmp_path: Path, cut: str
) -> None:
    async def scenario() -> None:
        moved, other = follower_replica(tmp_path, 0), follower_replica(tmp_path, 1)
        leader = FakeLeader()
        session = session_with(leader, [moved, other])
        task = asyncio.create_task(session.run())
        try:
            request, answer = await leader.next_request("the first poll")
            assert sorted(p["partition"] for p in request["partitions"]) == [0, 1]
            entry = ReplicaFetchEntry("orders", 0, 0, 0, 3, None, None, batch(3, 0))
            answer.set_result((encode_replica_fetch([entry]), {}))
            deadline = asyncio.get_running_loop().time() + 5
            while moved.log.log_end_offset != 3:
                assert asyncio.get_running_loop().time() < deadline, "nothing appended"
                await asyncio.sleep(0.005)
            # The session now waits for the fsync of offsets 0..2 of partition 0. Before
            # it completes, partition 0 moves to another leader (the broker's reconcile:
            # _stop_follower), whose session cuts the replica (follower._truncate or
            # _restart_at) before this session's fsync is done.
            session.remove(("orders", 0))
            if cut == "truncated":
                moved.truncate_to(1)
                moved.log.sync()  # the fsync ends: durable up to the new log end only
                moved.flushed()
            else:
                # The journal's fsync notes the replica's log when it runs: the new
                # one, empty at 50; nothing of the old log is marked durable.
                moved.reset_to(50, 0)
            request, answer = await leader.next_request(
                "partition 1 on the old leader is fetched again"
            )
            assert [p["partition"] for p in request["partitions"]] == [1]
            answer.set_result((b"", {}))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            moved.close()
            other.close()

    asyncio.run(scenario())


def test_a_session_cancelled_as_its_fetch_fails_leaves_no_unretrieved_error(
    tmp_path: Path,
) -> None:
    """Seen at shutdown: the leader's channel closed (the fetch failed) in the same
    turn as the session was cancelled, and asyncio logged "Task exception was never
    retrieved" at ERROR for the fetch."""

    async def scenario() -> list[dict[str, Any]]:
        unretrieved: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: unretrieved.append(context))
        replica = follower_replica(tmp_path, 0)
        leader = FakeLeader()
        session = session_with(leader, [replica])
        task = asyncio.create_task(session.run())
        try:
            _, answer = await leader.next_request("the first poll")
            answer.set_exception(ConnectionFailed("http://leader-1: channel closed (None)"))
            task.cancel()  # the same turn: shutdown
            await asyncio.gather(task, return_exceptions=True)
        finally:
            replica.close()
        del task, answer, session
        gc.collect()
        await asyncio.sleep(0)
        return unretrieved

    assert asyncio.run(scenario()) == []
