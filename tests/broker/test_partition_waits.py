"""A replica's waits end one way each: answered, failed, timed out, or cancelled,
and none leaves a waiter behind in the core (broker/partition.py ``_wait`` and
``until_done``: one timer each instead of asyncio.timeout / asyncio.wait)."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from types import SimpleNamespace

import pytest

from tidemq.broker.partition import PartitionReplica, until_done
from tidemq.broker.server import Broker
from tidemq.core.replica import Acks, ReplicaAssignment
from tidemq.errors import NotLeader, RequestTimedOut
from tidemq.storage import FsyncPolicy, LogConfig
from tidemq.wire.batch import build_batch

TOPIC_ID = "0123456789abcdef0123456789abcdef"


def leader(tmp_path: Path) -> PartitionReplica:
    """Broker 1 leads orders/0 with follower 2 in the ISR: acks=all waits for 2."""
    replica = PartitionReplica.open(
        tmp_path,
        1,
        ("orders", 0, TOPIC_ID),
        LogConfig(fsync=FsyncPolicy.NEVER),
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


def test_an_ack_wait_times_out_with_its_error_and_leaves_no_waiter(tmp_path: Path) -> None:
    async def scenario() -> None:
        replica = leader(tmp_path)
        _, last = replica.append(build_batch([(None, b"v")], 1000), Acks.ALL, 0)
        begun = asyncio.get_running_loop().time()
        with pytest.raises(RequestTimedOut, match=r"orders/0: offset 0 not acknowledged"):
            await replica.wait_ack(last + 1, Acks.ALL, 0.05)
        assert asyncio.get_running_loop().time() - begun >= 0.05
        assert not replica._waiters  # the core drops it (lazily) once the HW passes
        replica.follower_fetched(2, last + 1, last + 1)
        assert replica.core.waiting() == 0
        replica.close()

    asyncio.run(scenario())


def test_an_ack_wait_ends_when_the_follower_has_it_and_a_cancel_leaves_no_waiter(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        replica = leader(tmp_path)
        _, last = replica.append(build_batch([(None, b"v")], 1000), Acks.ALL, 0)
        waiting = asyncio.ensure_future(replica.wait_ack(last + 1, Acks.ALL, 5.0))
        await asyncio.sleep(0)
        assert replica.core.waiting() == 1
        replica.follower_fetched(2, last + 1, last + 1)
        await asyncio.wait_for(waiting, 1.0)  # answered, long before its 5 s
        cancelled = asyncio.ensure_future(replica.wait_ack(last + 2, Acks.ALL, 5.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not replica._waiters
        _, last = replica.append(build_batch([(None, b"w")], 1000), Acks.ALL, 0)
        replica.follower_fetched(2, last + 1, last + 1)
        assert replica.core.waiting() == 0
        replica.close()

    asyncio.run(scenario())


def test_until_done_ends_on_the_result_the_failure_the_timeout_or_a_cancel() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        loop.call_soon(answered.set_result, None)
        await until_done(answered, 5.0)

        failed: asyncio.Future[None] = loop.create_future()
        loop.call_soon(failed.set_exception, NotLeader("moved"))
        with pytest.raises(NotLeader):
            await until_done(failed, 5.0)

        timed: asyncio.Future[None] = loop.create_future()
        begun = loop.time()
        await until_done(timed, 0.05)
        assert timed.done() and timed.result() is None and loop.time() - begun >= 0.05

        left: asyncio.Future[None] = loop.create_future()
        task = asyncio.ensure_future(until_done(left, 5.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert left.cancelled()

    asyncio.run(scenario())


def test_a_partition_demoted_while_a_session_poll_waits_fails_only_itself(
    tmp_path: Path,
) -> None:
    """The shared waiter fails with NotLeader when one followed partition stops
    leading; the poll must end normally (the next read reports that partition's
    error), not fail the session's other partitions."""

    async def scenario() -> None:
        moved = leader(tmp_path / "0")
        stays = leader(tmp_path / "1")
        broker = SimpleNamespace(
            _inflight_replica_bytes=0, config=SimpleNamespace(max_inflight_replica_bytes=1 << 20)
        )
        broker._replica_bytes_full = functools.partial(Broker._replica_bytes_full, broker)
        followed = [(SimpleNamespace(offset=1), moved), (SimpleNamespace(offset=1), stays)]
        waiting = asyncio.ensure_future(Broker._replica_wait(broker, followed, 5.0))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert not waiting.done()
        moved.close()  # leadership moved (or the topic was deleted) meanwhile
        await asyncio.wait_for(waiting, 1.0)  # ends at once, without raising
        assert not stays._waiters and stays.core.waiting() == 0
        stays.close()

    asyncio.run(scenario())
