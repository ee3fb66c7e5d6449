"""Replica fetch sessions (broker/follower.py, POST /v1/replica/fetch): two brokers
in-process, broker 1 leading and broker 2 following over real HTTP, with heartbeat
answers written by hand (no coordinator).

What must hold: one request in flight per (follower, leader) pair however many
partitions it follows; an acks=all produce is answered after one follower round trip
(not after a long-poll timer); divergence and log start resets work through the
session; a fenced partition backs off alone while the others replicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

import tidemq.broker.follower as follower_module
import tidemq.broker.main as broker_main
from tidemq.broker.fetch_sessions import FetchSessions
from tidemq.broker.partition import partition_directory_name
from tidemq.broker.server import (
    BATCH_TYPE,
    LAG_TIME_MAX_MS_MIN,
    Broker,
    BrokerConfig,
    ReplicaAnswer,
    create_app,
    make_endpoints,
)
from tidemq.core.replica import UNKNOWN, Acks
from tidemq.errors import FetchSessionNotHeld, InvalidRequest
from tidemq.service.app import build_app
from tidemq.storage import FsyncPolicy, LogConfig
from tidemq.storage.checkpoint import write_offset
from tidemq.storage.log import LOG_START_FILE
from tidemq.transport import HttpTransport
from tidemq.wire import control
from tidemq.wire.batch import build_batch, decode_records
from tidemq.wire.replica_fetch import (
    PARTITIONS_MAX,
    ReplicaFetchEntry,
    ReplicaFetchForgotten,
    ReplicaFetchPartition,
    ReplicaFetchRequest,
    decode_replica_fetch,
    encode_replica_fetch,
)

TOPIC_ID = "0123456789abcdef0123456789abcdef"
WAIT_MS = 5_000  # far above every bound below: an answer must never need the timer


def answer(
    partitions: int, epochs: dict[int, int] | None = None, leaders: dict[int, int] | None = None
) -> control.HeartbeatAnswer:
    """Broker 1 leads every partition (unless ``leaders`` says otherwise) in epoch 1
    (or ``epochs[p]``); brokers 1 and 2 are the replicas and the ISR."""
    epochs, leaders = epochs or {}, leaders or {}
    assignments = []
    for p in range(partitions):
        leader = leaders.get(p, 1)
        assignments.append(
            {
                "topic": "orders",
                "partition": p,
                "topic_id": TOPIC_ID,
                "leader_id": leader,
                "leader_url": URLS[leader],
                "leader_epoch": epochs.get(p, 1),
                "partition_epoch": epochs.get(p, 1),
                "replicas": [1, 2],
                "isr": [1, 2] if leader == 1 else [leader],
            }
        )
    body = {
        "cluster_id": "c1",
        "topics": {"orders": {"topic_id": TOPIC_ID, "partitions": partitions}},
        "deleted_topic_ids": [],
        "heartbeat_interval_ms": 1000,
        "assignments": assignments,
    }
    return control.decode(json.dumps(body).encode(), control.HeartbeatAnswer)


URLS: dict[int, str] = {}


@dataclass
class Counter:
    """Replica fetches the leader served: started, and the most at once."""

    started: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    per_partition: int = 0
    answers: list[list[ReplicaFetchEntry]] = field(default_factory=list)
    requests: list[ReplicaFetchRequest] = field(default_factory=list)


@dataclass
class Pair:
    leader: Broker
    follower: Broker
    client: TestClient[Any, Any]  # to the leader
    count: Counter


def _broker(broker_id: int, data_dir: Path) -> Broker:
    config = BrokerConfig(
        broker_id=broker_id,
        data_dir=data_dir / f"broker-{broker_id}",
        coordinator_url="http://127.0.0.1:1",
        advertised_url=URLS.get(broker_id, "http://127.0.0.1:1"),
        log_config=LogConfig(fsync=FsyncPolicy.ALWAYS),
        replica_fetch_wait_ms=WAIT_MS,
    )
    return Broker(config, lambda: HttpTransport(False, {}, 4, 1000), CollectorRegistry())


def _count(leader: Broker, count: Counter) -> None:
    served = leader.replica_fetch_session
    per_partition = leader.replica_fetch

    async def counted(request: ReplicaFetchRequest) -> ReplicaAnswer:
        count.started += 1
        count.requests.append(request)
        count.in_flight += 1
        count.most_in_flight = max(count.most_in_flight, count.in_flight)
        try:
            answer = await served(request)
        finally:
            count.in_flight -= 1
        count.answers.append(answer.entries)
        return answer

    async def counted_per_partition(*args: Any) -> Any:
        count.per_partition += 1
        return await per_partition(*args)

    leader.replica_fetch_session = counted  # type: ignore[method-assign]
    leader.replica_fetch = counted_per_partition  # type: ignore[method-assign]


@asynccontextmanager
async def pair(
    tmp_path: Path,
    partitions: int,
    before: Callable[[Broker, Broker], None] | None = None,
    follower_answer: control.HeartbeatAnswer | None = None,
    leader_answer: control.HeartbeatAnswer | None = None,
    sessions: bool = True,
) -> AsyncIterator[Pair]:
    leader = _broker(1, tmp_path)
    registry = CollectorRegistry()
    if sessions:
        app = create_app(leader, registry)
    else:  # a leader of the version before sessions
        old = ("/v1/replica/fetch", "/v1/channel")  # neither existed then
        endpoints = [e for e in make_endpoints(leader) if e.path not in old]
        app = build_app("old broker", endpoints, registry, lambda: True, 1 << 20)
    server = TestServer(app)
    client = TestClient(server)
    await client.start_server()
    URLS[1] = str(server.make_url("")).rstrip("/")
    count = Counter()
    _count(leader, count)
    follower = _broker(2, tmp_path)
    if before is not None:
        before(leader, follower)
    leader.reconcile(_pointing_here(leader_answer or answer(partitions)))
    leader.registered = True
    try:
        async with asyncio.TaskGroup() as tasks:
            follower._tasks = tasks
            follower.reconcile(_pointing_here(follower_answer or answer(partitions)))
            try:
                yield Pair(leader, follower, client, count)
            finally:
                for key in list(follower._followers):
                    follower._stop_follower(key)
    finally:
        await client.close()
        await follower.close()
        await leader.close()


def _pointing_here(heartbeat: control.HeartbeatAnswer) -> control.HeartbeatAnswer:
    """The answer with broker 1's URL as it is now (each test starts a new server)."""
    assignments = [
        msgspec.structs.replace(a, leader_url=URLS[1]) if a.leader_id == 1 else a
        for a in heartbeat.assignments
    ]
    return msgspec.structs.replace(heartbeat, assignments=assignments)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def batch(count: int, start: int = 0) -> bytes:
    return build_batch(
        [(f"k{i}".encode(), f"v{i}".encode()) for i in range(start, start + count)], 1000
    )


async def produce(
    client: TestClient[Any, Any], partition: int, body: bytes, acks: str = "all"
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/topics/orders/partitions/{partition}/records",
        data=body,
        params={"acks": acks},
        headers={"Content-Type": BATCH_TYPE},
    )
    text = await response.text()
    assert response.status == 200, text
    result: dict[str, Any] = json.loads(text)
    return result


async def until(what: str, check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)  # the polling interval


def values(broker: Broker, partition: int) -> list[bytes | None]:
    log_ = broker.replicas[("orders", partition)].log
    data = log_.read(log_.log_start_offset, 1 << 24)
    return [r.value for r in decode_records(data)]


def test_twelve_followed_partitions_share_one_fetch_in_flight(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 12) as p:
            await until("the first session poll", lambda: p.count.in_flight == 1)
            results = await asyncio.gather(*(produce(p.client, n, batch(3)) for n in range(12)))
            assert [r["high_watermark"] >= 3 for r in results] == [True] * 12
            for n in range(12):
                await until(
                    f"partition {n} replicated",
                    lambda n=n: p.follower.replicas[("orders", n)].log.log_end_offset == 3,
                )
                assert values(p.follower, n) == values(p.leader, n)
            assert p.count.most_in_flight == 1
            assert p.count.per_partition == 0
            assert len(p.follower._sessions) == 1

    run(scenario)


def test_acks_all_completes_after_one_follower_round_trip(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 12) as p:
            await produce(p.client, 0, batch(1))  # warm: connection up, follower caught up
            await until("a poll waiting", lambda: p.count.in_flight == 1)
            took = []
            for attempt in range(5):
                started = p.count.started
                begun = asyncio.get_running_loop().time()
                result = await produce(p.client, attempt % 12, batch(2))
                elapsed = asyncio.get_running_loop().time() - begun
                # The waiting poll carried the batch; the one next request (sent when
                # the follower's fsync completed) reported it durable: acknowledged.
                assert p.count.started - started == 1, p.count.answers[-3:]
                took.append(elapsed)
                assert result["high_watermark"] >= result["last_offset"] + 1
                await until("the next poll waiting", lambda: p.count.in_flight == 1)
            # No timer in the loop: the next fetch leaves when the fsync completes
            # (generous for a loaded machine; a fetch on a timer would show here).
            assert sorted(took)[2] < 0.2, took

    run(scenario)


def test_a_diverged_follower_truncates_through_the_session(tmp_path: Path) -> None:
    async def scenario() -> None:
        URLS.setdefault(1, "http://127.0.0.1:1")
        URLS.setdefault(2, "http://127.0.0.1:1")
        leader = _broker(1, tmp_path)
        follower = _broker(2, tmp_path)
        # Epoch 1: both hold the same 3 records. Epoch 2: broker 2 led and took 2
        # records nobody copied. Epoch 3: broker 1 leads again and takes 2 others.
        leader.reconcile(_alone(answer(1)))
        leader.replicas[("orders", 0)].append(batch(3), Acks.LEADER, 0)
        follower.reconcile(_alone(answer(1, leaders={0: 2})))
        follower.replicas[("orders", 0)].append(batch(3), Acks.LEADER, 0)
        follower.reconcile(_alone(answer(1, epochs={0: 2}, leaders={0: 2})))
        follower.replicas[("orders", 0)].append(batch(2, start=100), Acks.LEADER, 0)
        leader.reconcile(_alone(answer(1, epochs={0: 3})))
        leader.replicas[("orders", 0)].append(batch(2, start=3), Acks.LEADER, 0)
        await follower.close()
        await leader.close()

        epoch_3 = answer(1, epochs={0: 3})
        async with pair(tmp_path, 1, follower_answer=epoch_3, leader_answer=epoch_3) as p:
            await until(
                "the follower caught up",
                lambda: values(p.follower, 0) == [f"v{i}".encode() for i in range(5)],
            )
            assert values(p.leader, 0) == values(p.follower, 0)
            diverged = [e for entries in p.count.answers for e in entries if e.diverging]
            assert diverged and diverged[0].diverging == (1, 3)
            assert p.count.per_partition == 0

    run(scenario)


def _alone(heartbeat: control.HeartbeatAnswer) -> control.HeartbeatAnswer:
    """The same answer with the leader as the only replica (no follower to wait for)."""
    alone = [
        msgspec.structs.replace(a, replicas=[a.leader_id], isr=[a.leader_id])
        for a in heartbeat.assignments
    ]
    return msgspec.structs.replace(heartbeat, assignments=alone)


def test_a_follower_behind_the_leaders_log_start_starts_over_there(tmp_path: Path) -> None:
    def leader_log_starts_at_100(leader: Broker, _: Broker) -> None:
        directory = leader.config.data_dir / partition_directory_name("orders", 1, TOPIC_ID)
        directory.mkdir(parents=True)
        write_offset(directory / LOG_START_FILE, 100)

    async def scenario() -> None:
        async with pair(tmp_path, 2, before=leader_log_starts_at_100) as p:
            replica = p.follower.replicas[("orders", 1)]
            await until("the follower started over", lambda: replica.log.log_start_offset == 100)
            result = await produce(p.client, 1, batch(4))
            assert result["base_offset"] == 100
            follower_log = p.follower.replicas[("orders", 1)].log
            await until("replicated", lambda: follower_log.log_end_offset == 104)
            assert values(p.follower, 1) == values(p.leader, 1)
            await produce(p.client, 0, batch(1))  # the other partition is unaffected

    run(scenario)


def test_a_fenced_partition_does_not_stall_the_others(tmp_path: Path) -> None:
    async def scenario() -> None:
        # The follower still believes in epoch 1 of partition 0, the leader is in 2.
        stale, current = answer(3, epochs={0: 1}), answer(3, epochs={0: 2})
        async with pair(tmp_path, 3, follower_answer=stale, leader_answer=current) as p:
            for n in range(10):
                begun = asyncio.get_running_loop().time()
                await produce(p.client, 1 + n % 2, batch(1))
                assert asyncio.get_running_loop().time() - begun < WAIT_MS / 1000 / 2
            errors = [e.error for entries in p.count.answers for e in entries if e.error]
            assert errors and errors[0]["code"] == "fenced_leader_epoch"
            # The fenced one backs off (at most 1 s), not one failed request per answer.
            assert len(errors) < p.count.started
            # The coordinator's next answer (epoch 2) heals it through the same session.
            p.follower.reconcile(_pointing_here(current))
            await produce(p.client, 0, batch(2))
            assert len(p.follower._sessions) == 1

    run(scenario)


def test_replica_answer_bytes_in_flight_are_bounded_broker_wide(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 1) as p:
            await produce(p.client, 0, batch(2))
            leader = p.leader
            request = ReplicaFetchRequest(
                broker_id=2,
                partitions=[ReplicaFetchPartition("orders", 0, 1, 0, TOPIC_ID)],
                wait_ms=2_000,
            )
            leader._inflight_replica_bytes = leader.config.max_inflight_replica_bytes
            held = asyncio.ensure_future(leader.replica_fetch_session(request))
            done, _ = await asyncio.wait({held}, timeout=0.3)
            assert not done  # data is there, but no room to read it
            leader.release_replica_bytes(leader.config.max_inflight_replica_bytes)
            entries, size, _ = await asyncio.wait_for(held, 5)
            assert [len(list(decode_records(e.batches))) for e in entries] == [2]
            assert leader._inflight_replica_bytes == size > 0
            leader.release_replica_bytes(size)

    run(scenario)


def test_the_session_endpoint_refuses_bad_requests(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 1) as p:
            for body in (
                b"{}",
                b'{"broker_id": 2, "partitions": []}',
                b'{"broker_id": 2, "partitions": [{"topic": "orders", "partition": 0}]}',
                b"not json",
            ):
                response = await p.client.post(
                    "/v1/replica/fetch", data=body, headers={"Content-Type": "application/json"}
                )
                assert response.status == 400, await response.text()
            # A broker that is no follower gets an error entry, not a stall.
            request = ReplicaFetchRequest(
                broker_id=7,
                partitions=[ReplicaFetchPartition("orders", 0, 1, 0, TOPIC_ID)],
                wait_ms=10_000,
            )
            response = await p.client.post(
                "/v1/replica/fetch",
                data=control.encode(request),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=5),
            )
            entries = decode_replica_fetch(await response.read())
            assert [e.error and e.error["code"] for e in entries] == ["not_leader"]

    run(scenario)


@pytest.mark.parametrize(
    "entry",
    [
        ReplicaFetchEntry("orders", 3, 10, 0, 12, None, None, batch(2)),
        ReplicaFetchEntry("ö", 9_999, 1, 2, 3, (-1, 0)),
        ReplicaFetchEntry("t", 0, error={"code": "not_leader", "message": "moved"}),
    ],
)
def test_the_answer_framing_round_trips(entry: ReplicaFetchEntry) -> None:
    assert decode_replica_fetch(encode_replica_fetch([entry, entry])) == [entry, entry]


def test_a_partition_added_while_a_poll_waits_is_fetched_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 1) as p:
            await produce(p.client, 0, batch(1))
            await until("a poll waiting", lambda: p.count.in_flight == 1)
            # A heartbeat brings a second partition: the waiting poll (5 s) is replaced
            # by one that includes it, or acks=all there would wait it out.
            p.leader.reconcile(_pointing_here(answer(2)))
            p.follower.reconcile(_pointing_here(answer(2)))
            begun = asyncio.get_running_loop().time()
            await produce(p.client, 1, batch(2))
            assert asyncio.get_running_loop().time() - begun < WAIT_MS / 1000 / 2
            assert len(p.follower._sessions) == 1 and p.count.most_in_flight <= 2

    run(scenario)


def test_an_unexpected_failure_in_a_session_surfaces(tmp_path: Path) -> None:
    """A failed write while replicating is no operating error: the session's task
    fails, and with it the broker's task group (which fail-stops the broker)."""

    def broken(*_: Any) -> None:
        raise OSError(5, "Input/output error")

    async def scenario() -> None:
        with pytest.raises(ExceptionGroup) as caught:
            async with pair(tmp_path, 2) as p:
                p.follower.replicas[("orders", 1)].append_replicated = broken  # type: ignore[method-assign]
                await produce(p.client, 1, batch(1), acks="1")
                await until("the task group failing", lambda: False)
        assert caught.group_contains(OSError)

    run(scenario)


def test_a_leader_without_sessions_is_followed_per_partition(tmp_path: Path) -> None:
    """Rolling upgrades: a follower of this version keeps replicating from a leader
    that predates POST /v1/replica/fetch, through the per-partition endpoint."""

    async def scenario() -> None:
        async with pair(tmp_path, 3, sessions=False) as p:
            for n in range(3):
                begun = asyncio.get_running_loop().time()
                result = await produce(p.client, n, batch(2))
                assert result["high_watermark"] >= 2
                assert asyncio.get_running_loop().time() - begun < WAIT_MS / 1000 / 2
                assert values(p.follower, n) == values(p.leader, n)
            assert p.count.per_partition >= 3 and p.count.answers == []

    run(scenario)


def test_a_waiting_follower_gets_the_records_before_the_leader_blocks_in_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's journal fdatasync runs on its event loop: it waits until the
    follower fetch that the append woke has its answer, so the follower's copy and
    fsync overlap the leader's instead of following it (with SYNC_AFTER_TURNS = 0
    the fdatasync comes first: this test fails)."""

    async def scenario() -> None:
        async with pair(tmp_path, 1) as p:
            await produce(p.client, 0, batch(1))  # warm: connection up, follower caught up
            await until("a poll waiting", lambda: p.count.in_flight == 1)
            journal = p.leader.syncer.journal
            assert journal is not None
            events: list[str] = []
            real_sync = journal.sync

            def noted_sync() -> None:
                events.append("leader fdatasync")
                real_sync()

            class NotedAnswers(list[list[ReplicaFetchEntry]]):
                def append(self, entries: list[ReplicaFetchEntry]) -> None:
                    if any(entry.batches for entry in entries):
                        events.append("records to the follower")
                    super().append(entries)

            monkeypatch.setattr(journal, "sync", noted_sync)
            p.count.answers = NotedAnswers(p.count.answers)
            await produce(p.client, 0, batch(2), acks="1")
            await until("the leader synced", lambda: "leader fdatasync" in events)
            await until("the follower answered", lambda: "records to the follower" in events)
            assert events[:2] == ["records to the follower", "leader fdatasync"], events

    run(scenario)


# -- incremental sessions (broker/fetch_sessions.py) ------------------------------------


def _named(request: ReplicaFetchRequest) -> set[int]:
    return {w.partition for w in request.partitions}


async def _incremental_poll_waiting(p: Pair) -> None:
    await until(
        "an incremental poll waiting",
        lambda: p.count.in_flight == 1 and p.count.requests[-1].session_epoch > 0,
    )


def test_within_a_session_a_request_names_only_what_changed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 12) as p:
            await until("the first session poll", lambda: p.count.in_flight == 1)
            for n in range(4):
                await produce(p.client, 0, batch(2, start=2 * n))
            requests = p.count.requests
            assert requests[0].session_epoch == 0 and _named(requests[0]) == set(range(12))
            later = [r for r in requests if r.session_id == requests[0].session_id]
            assert [r.session_epoch for r in later] == list(range(len(later)))
            assert len(later) >= 5  # opened, then one or more rounds per produce
            # Partitions 1-11 are idle: never named again; partition 0 as it moved.
            assert all(_named(r) <= {0} for r in later[1:]), [_named(r) for r in later]
            assert any(_named(r) == {0} for r in later[1:])
            session = p.leader._fetch_sessions._sessions[2]
            assert len(session.partitions) == 12
            assert values(p.follower, 0) == values(p.leader, 0)

    run(scenario)


def test_records_for_a_partition_the_poll_did_not_name_wake_it(tmp_path: Path) -> None:
    """The standing watch: without it, acks=all on an idle partition would wait out
    the follower's 5 s poll, which names only what changed."""

    async def scenario() -> None:
        async with pair(tmp_path, 12) as p:
            await produce(p.client, 0, batch(1))
            await _incremental_poll_waiting(p)
            for partition in (5, 11, 5):
                assert partition not in _named(p.count.requests[-1])
                begun = asyncio.get_running_loop().time()
                result = await produce(p.client, partition, batch(2))
                assert result["high_watermark"] >= 2
                assert asyncio.get_running_loop().time() - begun < WAIT_MS / 1000 / 2
                assert values(p.follower, partition) == values(p.leader, partition)
                await until("the poll waiting again", lambda: p.count.in_flight == 1)

    run(scenario)


def _stays_caught_up(tmp_path: Path, lag_ms: int, poll_wait_ms: int, partitions: int) -> None:
    """An idle follower (data on partition 0 once, then nothing) stays caught up on
    every partition for three lag bounds."""

    def configured(leader: Broker, follower: Broker) -> None:
        leader.config = replace(leader.config, replica_lag_time_max_ms=lag_ms)
        follower.config = replace(follower.config, replica_fetch_wait_ms=poll_wait_ms)

    async def scenario() -> None:
        async with pair(tmp_path, partitions, before=configured) as p:
            await produce(p.client, 0, batch(1))
            replicas = [p.leader.replicas[("orders", n)] for n in range(partitions)]
            end = asyncio.get_running_loop().time() + 3 * lag_ms / 1000
            while asyncio.get_running_loop().time() < end:
                for replica in replicas:
                    progress = replica.core.followers[2]
                    behind = replica._clock_ms() - progress.last_caught_up_ms
                    assert behind < lag_ms, (replica.partition, behind)
                await asyncio.sleep(0.02)
            incremental = [r for r in p.count.requests if r.session_epoch > 0]
            assert incremental and all(_named(r) <= {0} for r in incremental)

    run(scenario)


def test_an_idle_follower_stays_caught_up_without_naming_its_partitions(
    tmp_path: Path,
) -> None:
    """The leader refreshes the fetch times of partitions a request did not name (at
    least every refresh_s): else an idle follower would drop out of the ISR."""
    _stays_caught_up(tmp_path, lag_ms=600, poll_wait_ms=100, partitions=4)


async def _stopped(p: Pair) -> Callable[[ReplicaFetchRequest], Awaitable[ReplicaAnswer]]:
    """The follower's own session stopped: the test speaks for broker 2 through the
    leader's fetch it returns (and broker 2 has a URL should a partition move to it)."""
    for key in list(p.follower._followers):
        p.follower._stop_follower(key)
    await until("no poll waiting", lambda: p.count.in_flight == 0)
    p.leader._fetch_sessions.close_all()  # and its watches released
    URLS.setdefault(2, "http://127.0.0.1:1")
    return p.leader.replica_fetch_session


def _request(
    session_id: int, epoch: int, offsets: dict[int, int], wait_ms: int = 0
) -> ReplicaFetchRequest:
    return ReplicaFetchRequest(
        broker_id=2,
        partitions=[
            ReplicaFetchPartition("orders", n, 1, o, TOPIC_ID, durable_offset=o)
            for n, o in offsets.items()
        ],
        wait_ms=wait_ms,
        session_id=session_id,
        session_epoch=epoch,
    )


def test_a_request_that_continues_no_held_session_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 2) as p:
            fetch = await _stopped(p)
            assert (await fetch(_request(7, 0, {0: 0, 1: 0}))).session_id == 7
            session = p.leader._fetch_sessions._sessions[2]
            for bad, error in (
                (_request(7, 5, {}), FetchSessionNotHeld),  # another epoch
                (_request(8, 1, {}), FetchSessionNotHeld),  # another id
                (_request(7, 0, {}), InvalidRequest),  # opening with nothing in it
                (_request(0, 0, {}), InvalidRequest),  # no session, nothing in it
                (_request(0, 1, {0: 0}), InvalidRequest),  # an epoch without a session
            ):
                with pytest.raises(error):
                    await fetch(bad)
                assert p.leader._fetch_sessions._sessions[2] is session
                assert session.epoch == 1 and not session.closed
                assert set(session.partitions) == {("orders", 0), ("orders", 1)}
            response = await p.client.post(
                "/v1/replica/fetch",
                data=control.encode(_request(7, 9, {})),
                headers={"Content-Type": "application/json"},
            )
            assert response.status == 409
            assert (await response.json())["error"]["code"] == "fetch_session_not_held"
            assert (await fetch(_request(7, 1, {}))).session_id == 7
            assert session.epoch == 2

    run(scenario)


def test_a_new_session_ends_the_old_ones_poll_and_releases_its_watches(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 2) as p:
            fetch = await _stopped(p)
            replica = p.leader.replicas[("orders", 0)]
            metrics = p.leader.metrics
            opened_before = _value(metrics.fetch_sessions_opened)
            old = asyncio.ensure_future(fetch(_request(7, 0, {0: 0, 1: 0}, wait_ms=WAIT_MS)))
            await until("the old poll watching", lambda: len(replica._waiters) == 1)
            new = await fetch(_request(8, 0, {0: 0, 1: 0}))
            answer_ = await asyncio.wait_for(old, WAIT_MS / 1000 / 2)
            assert answer_.session_id == 0 and new.session_id == 8
            assert len(replica._waiters) == 1  # the new session's watch only
            assert _value(metrics.fetch_sessions_opened) - opened_before == 2
            assert _value(metrics.fetch_sessions) == 1
            p.leader._fetch_sessions.expire(idle_s=0)
            assert replica._waiters == {} and len(p.leader._fetch_sessions) == 0
            assert _value(metrics.fetch_sessions) == 0
            with pytest.raises(FetchSessionNotHeld):
                await fetch(_request(8, 1, {}))

    run(scenario)


def test_a_lost_leadership_ends_the_session_with_an_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, 2) as p:
            fetch = await _stopped(p)
            await fetch(_request(7, 0, {0: 0, 1: 0}))
            poll = asyncio.ensure_future(fetch(_request(7, 1, {}, wait_ms=WAIT_MS)))
            session = p.leader._fetch_sessions._sessions[2]
            await until("the poll waiting", lambda: session._woken is not None)
            assert not poll.done()
            p.leader.reconcile(_pointing_here(answer(2, epochs={1: 2}, leaders={1: 2})))
            answer_ = await asyncio.wait_for(poll, WAIT_MS / 1000 / 2)
            assert answer_.session_id == 0
            assert [e.error and e.error["code"] for e in answer_.entries] == ["not_leader"]
            assert len(p.leader._fetch_sessions) == 0

    run(scenario)


def test_a_leader_that_holds_no_session_gets_whole_requests(tmp_path: Path) -> None:
    """A leader that names no session in its answers (or one that predates them and
    ignores the fields) is sent every partition in every request."""

    def sessionless(leader: Broker, _: Broker) -> None:
        served = leader.replica_fetch_session

        async def forgetful(request: ReplicaFetchRequest) -> ReplicaAnswer:
            return (await served(request))._replace(session_id=0)

        leader.replica_fetch_session = forgetful  # type: ignore[method-assign]

    async def scenario() -> None:
        async with pair(tmp_path, 3, before=sessionless) as p:
            for n in range(3):
                await produce(p.client, n, batch(2))
                assert values(p.follower, n) == values(p.leader, n)
            assert all(r.session_epoch == 0 for r in p.count.requests)
            assert all(_named(r) == {0, 1, 2} for r in p.count.requests)

    run(scenario)


def _partition_0(
    replicas: list[int], isr: list[int], partition_epoch: int
) -> control.HeartbeatAnswer:
    """Broker 1 leads both partitions in leader epoch 1; partition 0 with these
    replicas, ISR and partition epoch (a reassignment keeps the leader epoch)."""
    base = answer(2)
    assignments = [
        msgspec.structs.replace(a, replicas=replicas, isr=isr, partition_epoch=partition_epoch)
        if a.partition == 0
        else a
        for a in base.assignments
    ]
    return _pointing_here(msgspec.structs.replace(base, assignments=assignments))


def _value(metric: Any) -> float:
    """A metric without labels: its value (a counter's _total sample)."""
    [family] = metric.collect()
    return float(next(s.value for s in family.samples if not s.name.endswith("_created")))


def _refresh_due(p: Pair) -> None:
    p.leader._fetch_sessions._sessions[2].refreshed_at = float("-inf")


@pytest.mark.parametrize("change", ["follower leaves the replicas", "leader epoch bump"])
def test_a_watch_is_released_when_a_look_at_its_partition_fails(
    tmp_path: Path, change: str
) -> None:
    """Neither change fails the core's data waiters; the refresh's look fails and
    closes the session, which must still release the watch (found by review)."""

    async def scenario() -> None:
        async with pair(tmp_path, 2) as p:
            fetch = await _stopped(p)
            replica = p.leader.replicas[("orders", 0)]
            assert (await fetch(_request(7, 0, {0: 0, 1: 0}))).session_id == 7
            assert len(replica._waiters) == 1  # the standing watch
            if change == "leader epoch bump":
                p.leader.reconcile(_pointing_here(answer(2, epochs={0: 2})))
                assert replica.is_leader and replica.leader_epoch == 2
                code = "fenced_leader_epoch"
            else:
                p.leader.reconcile(_partition_0([1], [1], 2))
                code = "not_leader"
            _refresh_due(p)
            answer_ = await fetch(_request(7, 1, {}))
            assert answer_.session_id == 0 and len(p.leader._fetch_sessions) == 0
            assert [e.error and e.error["code"] for e in answer_.entries] == [code]
            assert replica._waiters == {} and replica.core._data_waiters == {}

    run(scenario)


@pytest.mark.parametrize("whole", [True, False])
def test_a_poll_woken_midway_reports_no_state_its_request_did_not_vouch_for(
    tmp_path: Path, whole: bool
) -> None:
    """Broker 2 leaves partition 0 and is added back (same leader epoch) while a poll
    waits; data elsewhere wakes the poll. Nothing broker 2 sent since vouches for
    its old state of partition 0, so the leader must not count it (were it counted,
    the leader would propose an empty follower into the ISR; found by review)."""

    async def scenario() -> None:
        async with pair(tmp_path, 2) as p:
            await produce(p.client, 0, batch(5))  # broker 2 holds 5 durably
            fetch = await _stopped(p)
            replica = p.leader.replicas[("orders", 0)]
            if whole:
                poll = asyncio.ensure_future(fetch(_request(0, 0, {0: 5, 1: 0}, WAIT_MS)))
            else:
                assert (await fetch(_request(7, 0, {0: 5, 1: 0}))).session_id == 7
                poll = asyncio.ensure_future(fetch(_request(7, 1, {}, WAIT_MS)))
            other = p.leader.replicas[("orders", 1)]
            sessions = p.leader._fetch_sessions._sessions
            await until(
                "the poll waiting",
                lambda: len(other._waiters) == 1 if whole else sessions[2]._woken is not None,
            )
            p.leader.reconcile(_partition_0([1], [1], 2))
            assert 2 not in replica.core.followers
            p.leader.reconcile(_partition_0([1, 2], [1], 3))
            assert replica.core.followers[2].fetch_offset == UNKNOWN
            if not whole:
                _refresh_due(p)
            await produce(p.client, 1, batch(1), acks="1")  # wakes the poll
            await asyncio.wait_for(poll, WAIT_MS / 1000 / 2)
            assert replica.core.followers[2].fetch_offset == UNKNOWN
            assert replica.core._proposal is None

    run(scenario)


def test_a_session_the_leader_lost_is_reopened_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The leader restarted (or expired the session) while the follower waited for
    its fsync: the refusal is no failure, so no warning and no backoff (found by
    review). The backoff is made 5 s here, so a backoff would show."""
    monkeypatch.setattr(follower_module, "BACKOFF_MIN_S", 5.0)

    async def scenario() -> None:
        async with pair(tmp_path, 2) as p:
            await produce(p.client, 0, batch(1))
            await _incremental_poll_waiting(p)
            lost = p.count.requests[-1].session_id
            p.leader._fetch_sessions._sessions.clear()  # as a restart would
            with caplog.at_level(logging.WARNING):
                begun = asyncio.get_running_loop().time()
                await produce(p.client, 0, batch(1, start=1))  # acks=all: one round trip
                assert asyncio.get_running_loop().time() - begun < 2.5
            assert values(p.follower, 0) == values(p.leader, 0)
            reopened = [r for r in p.count.requests if r.session_id not in (0, lost)]
            assert reopened and reopened[0].session_epoch == 0
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    run(scenario)


def test_a_session_holds_at_most_partitions_max() -> None:
    sessions = FetchSessions()

    def wanted(topic: str, partition: int) -> ReplicaFetchPartition:
        return ReplicaFetchPartition(topic, partition, 1, 0)

    full = [wanted("t", n) for n in range(PARTITIONS_MAX)]
    session = sessions.session_for(ReplicaFetchRequest(broker_id=2, partitions=full, session_id=7))
    more = ReplicaFetchRequest(
        broker_id=2, partitions=[wanted("u", 0)], session_id=7, session_epoch=1
    )
    with pytest.raises(InvalidRequest):
        sessions.session_for(more)
    assert len(session.partitions) == PARTITIONS_MAX and session.epoch == 1
    instead = msgspec.structs.replace(more, forgotten=[ReplicaFetchForgotten("t", 0)])
    assert sessions.session_for(instead) is session
    assert len(session.partitions) == PARTITIONS_MAX and ("u", 0) in session.partitions


def _lose_cut_and_regain(p: Pair) -> None:
    """Broker 1 loses partition 0 (epoch 2), is cut back to 3 as a follower, then
    leads again in epoch 3 and takes records [3, 8) of its own: the same replica
    object, a rewritten log."""
    replica = p.leader.replicas[("orders", 0)]
    p.leader.reconcile(_pointing_here(answer(2, epochs={0: 2}, leaders={0: 2})))
    assert not replica.is_leader
    replica.truncate_to(3)
    p.leader.reconcile(_pointing_here(answer(2, epochs={0: 3})))
    assert replica.is_leader and replica.leader_epoch == 3
    replica.append(batch(2, start=103), Acks.LEADER, 0)
    replica.append(batch(3, start=105), Acks.LEADER, 0)
    assert p.leader.replicas[("orders", 0)] is replica


@pytest.mark.parametrize(
    "mode", ["session", "session waiting for bytes", "whole waiting for bytes"]
)
def test_a_read_after_leadership_was_lost_and_regained_serves_nothing(
    tmp_path: Path, mode: str
) -> None:
    """A read without a look (a fired watch in a session, or a poll held back by the
    bound on replica bytes in flight) must not serve a log rewritten since the look
    checked the follower against the epoch history: the follower would append
    records past a divergence nobody told it of (found by review)."""

    async def scenario() -> None:
        async with pair(tmp_path, 2) as p:
            await produce(p.client, 0, batch(5))  # broker 2 holds [0, 5) of epoch 1
            fetch = await _stopped(p)
            wanted = {0: 5, 1: 0}
            if mode == "session":
                assert (await fetch(_request(7, 0, wanted))).session_id == 7
                _lose_cut_and_regain(p)
                got = await fetch(_request(7, 1, {}))  # no refresh due: read only
            else:
                leader = p.leader
                leader._inflight_replica_bytes = leader.config.max_inflight_replica_bytes
                poll = asyncio.ensure_future(
                    fetch(_request(7 if mode.startswith("session") else 0, 0, wanted, WAIT_MS))
                )
                released = leader._replica_bytes_released
                await until("the poll waiting for bytes", lambda: bool(released._waiters))
                _lose_cut_and_regain(p)
                leader.release_replica_bytes(leader.config.max_inflight_replica_bytes)
                got = await asyncio.wait_for(poll, WAIT_MS / 1000 / 2)
            [entry] = [e for e in got.entries if e.partition == 0]
            assert entry.batches == b"" and entry.error is not None
            assert entry.error["code"] == "fenced_leader_epoch"
            assert got.session_id == 0

    run(scenario)


def test_an_idle_follower_stays_caught_up_when_its_poll_wait_exceeds_the_lag_bound(
    tmp_path: Path,
) -> None:
    """A fetch waits at most half of replica_lag_time_max_ms on the leader: fetch
    times are refreshed only when a request arrives (found by review; whole requests
    had it too)."""
    _stays_caught_up(tmp_path, lag_ms=800, poll_wait_ms=2_000, partitions=2)


def test_a_lag_bound_too_small_for_a_fetch_wait_is_refused(tmp_path: Path) -> None:
    """A replica fetch waits at most half the bound: a bound of ~0 would make
    followers send requests in a loop (found by review)."""
    with pytest.raises(ValueError, match="replica_lag_time_max_ms"):
        replace(_broker(1, tmp_path).config, replica_lag_time_max_ms=LAG_TIME_MAX_MS_MIN - 1)
    result = CliRunner().invoke(
        broker_main.command,
        ["--id", "1", "--data-dir", str(tmp_path), "--replica-lag-time-max-ms", "1"],
    )
    assert result.exit_code == 2 and "--replica-lag-time-max-ms" in result.output
