"""The coordinator's group endpoints in-process, with a fake clock and a store that
can be held in the middle of an fsync: commits against ownership under the write
lock, group commit, restart recovery, snapshots off the loop, heartbeat cost."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import tidemq.coordinator.server as coordinator_server
from tidemq.coordinator.server import Coordinator, CoordinatorConfig
from tidemq.coordinator.store import CommandStore
from tidemq.core.metadata import ClusterState, Command

SESSION_MS = 10_000
GROUP = "/v1/groups/g"


class Clock:
    def __init__(self) -> None:
        self.now_ms = 1_000_000

    def __call__(self) -> int:
        return self.now_ms


class GatedStore(CommandStore):
    """A store whose appends wait for ``gate`` (an fsync that takes its time)."""

    def __init__(self, path: Path, snapshot_every: int = 1000) -> None:
        super().__init__(path, snapshot_every)
        self.gate = asyncio.Event()
        self.gate.set()
        self.appends: list[list[Command]] = []

    async def append(self, commands: list[Command]) -> int:
        self.appends.append(list(commands))
        await self.gate.wait()
        return await super().append(commands)


@asynccontextmanager
async def coordinator(
    data_dir: Path, clock: Clock, snapshot_every: int = 1000
) -> AsyncIterator[tuple[Coordinator, GatedStore, Api]]:
    store, state = await GatedStore.open(data_dir / "coordinator.sqlite", snapshot_every)
    if not isinstance(store, GatedStore):  # pragma: no cover - open is a classmethod
        raise TypeError(store)
    config = CoordinatorConfig(data_dir=data_dir, port=0, plain_http=True)
    coordinator = Coordinator(config, state, store, clock_ms=clock)
    try:
        await coordinator.start()
        async with TestClient(TestServer(coordinator.app())) as client:
            yield coordinator, store, Api(client)
    finally:
        store.gate.set()
        await store.close()


class Api:
    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.client.request(method, path, json=body) as response:
            return response.status, await response.json()

    async def register(self, broker_id: int = 1) -> tuple[int, Any]:
        body = {"broker_id": broker_id, "url": f"http://b{broker_id}"}
        return await self.call("POST", "/v1/brokers/register", body)

    async def setup(self, partitions: int = 12) -> None:
        await self.register()
        body = {"name": "orders", "partitions": partitions, "replication_factor": 1}
        assert (await self.call("POST", "/v1/topics", body))[0] == 201

    async def beat(self, member: str | None, epoch: int, owned: list[Any]) -> dict[str, Any]:
        status, body = await self.call(
            "POST",
            f"{GROUP}/heartbeat",
            {
                "member_id": member,
                "member_epoch": epoch,
                "topics": ["orders"],
                "owned": owned,
                "session_timeout_ms": SESSION_MS,
            },
        )
        assert status == 200, body
        return dict(body)

    async def beat_raw(self, body: dict[str, Any]) -> tuple[int, Any]:
        return await self.call("POST", f"{GROUP}/heartbeat", body)

    async def commit(
        self, member: str | None, epoch: int | None, partition: int, offset: int, group: str = "g"
    ) -> tuple[int, Any]:
        body: dict[str, Any] = {
            "offsets": [{"topic": "orders", "partition": partition, "offset": offset}]
        }
        if member is not None:
            body |= {"member_id": member, "member_epoch": epoch}
        return await self.call("POST", f"/v1/groups/{group}/offsets", body)


async def until(
    check: Callable[[], bool], what: str, timeout_s: float = 5.0, required: bool = True
) -> bool:
    """Polls ``check`` until it holds or the deadline passes (a failure if
    ``required``); returns whether it held."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            if required:
                pytest.fail(f"timed out waiting for {what}")
            return False
        await asyncio.sleep(0.01)
    return True


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def partitions_of(answer: dict[str, Any]) -> list[int]:
    return sorted(int(item["partition"]) for item in answer["assignment"])


def owned(partitions: list[int]) -> list[dict[str, Any]]:
    return [{"topic": "orders", "partition": p} for p in partitions]


def test_a_grant_waits_for_a_commit_checked_before_it(tmp_path: Path) -> None:
    """The check of a commit and its apply happen under one lock that grants also
    take: a partition cannot move to b between a's commit being checked and applied."""

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (_, store, api):
            await api.setup()
            a = await api.beat(None, 0, [])
            b = await api.beat(None, 0, [])
            a = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            moved = sorted(set(range(12)) - set(partitions_of(a)))
            store.appends.clear()
            store.gate.clear()  # a's commit on revocation gets stuck in its fsync
            commit = asyncio.create_task(api.commit(a["member_id"], a["member_epoch"], moved[0], 7))
            await until(lambda: len(store.appends) == 1, "the commit to reach the store")
            a_next = asyncio.create_task(
                api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            )
            b_next = asyncio.create_task(api.beat(b["member_id"], b["member_epoch"], []))
            b_done_early = await until(b_next.done, "b's heartbeat", timeout_s=1.0, required=False)
            store.gate.set()
            assert (await commit)[1] == {"committed": 1}
            await a_next
            b = await b_next
            assert not b_done_early, "b's heartbeat was answered while a's commit was unapplied"
            assert moved[0] in partitions_of(b)

    run(scenario)


def test_a_delayed_commit_cannot_move_the_new_owners_offset_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (_, _store, api):
            await api.setup()
            a = await api.beat(None, 0, [])
            b = await api.beat(None, 0, [])
            a = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            moved = sorted(set(range(12)) - set(partitions_of(a)))[0]
            assert (await api.commit(a["member_id"], a["member_epoch"], moved, 50))[0] == 200
            a = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            b = await api.beat(b["member_id"], b["member_epoch"], [])
            assert moved in partitions_of(b)
            assert (await api.commit(b["member_id"], b["member_epoch"], moved, 100))[0] == 200
            # a's revocation commit again (a retry delivered late): a's epoch is current,
            # but a no longer holds the partition.
            status, body = await api.commit(a["member_id"], a["member_epoch"], moved, 50)
            assert (status, body["error"]["code"]) == (409, "fenced_member")
            _, offsets = await api.call("GET", f"{GROUP}/offsets")
            assert {"topic": "orders", "partition": moved, "offset": 100} in offsets["offsets"]

    run(scenario)


def test_offset_commits_from_many_members_share_one_transaction(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (coordinator_, store, api):
            await api.setup(partitions=16)
            store.appends.clear()
            store.gate.clear()
            commits = [
                asyncio.create_task(api.commit(None, None, p, 10 + p, group=f"g{p}"))
                for p in range(16)
            ]
            await until(lambda: len(store.appends) == 1, "the first commit's fsync")
            await until(
                lambda: len(getattr(coordinator_, "_pending_commits", [])) == 15,
                "the other commits to queue",
                required=False,  # there is no queue before group commit
            )
            store.gate.set()
            answers = await asyncio.gather(*commits)
            assert [status for status, _ in answers] == [200] * 16
            assert [len(batch) for batch in store.appends] == [1, 15]
            assert coordinator_.state.offsets["g3"][("orders", 3)] == 13

    run(scenario)


def test_a_failing_commit_in_a_batch_fails_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (coordinator_, store, api):
            await api.setup(partitions=2)
            store.appends.clear()
            store.gate.clear()
            first = asyncio.create_task(api.commit(None, None, 0, 1, group="x"))
            await until(lambda: len(store.appends) == 1, "the first commit's fsync")
            good = asyncio.create_task(api.commit(None, None, 1, 5, group="y"))
            bad = asyncio.create_task(api.commit(None, None, 9, 5, group="z"))
            await until(
                lambda: len(getattr(coordinator_, "_pending_commits", [])) == 2,
                "both to queue behind the first",
            )
            store.gate.set()
            assert (await first)[0] == 200 and (await good)[0] == 200
            status, body = await bad
            assert (status, body["error"]["code"]) == (404, "unknown_partition")

    run(scenario)


def test_after_a_restart_partitions_move_only_after_the_session_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (_, _store, api):
            await api.setup()
            a = await api.beat(None, 0, [])
            b = await api.beat(None, 0, [])
            a = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            a = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            b = await api.beat(b["member_id"], b["member_epoch"], [])
            assert len(partitions_of(a)) == len(partitions_of(b)) == 6
        clock.now_ms += 5  # the coordinator restarts; a and b keep fetching
        async with coordinator(tmp_path, clock) as (_, _store, api):
            c = await api.beat(None, 0, [])
            assert c["assignment"] == [], "c was given partitions a or b may still fetch"
            a_again = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            assert partitions_of(a_again) == partitions_of(a)  # adopted, keeps consuming
            status, body = await api.commit(a["member_id"], a_again["member_epoch"], 0, 1)
            assert (status, body["error"]["code"]) == (503, "unavailable")
            # A member heard at the very restart may fetch through restart + session
            # (expiry needs the session strictly passed): still nothing moves then.
            clock.now_ms += SESSION_MS
            c = await api.beat(c["member_id"], c["member_epoch"], [])
            assert c["assignment"] == []
            clock.now_ms += 1  # b's session has certainly run out by now
            a_again = await api.beat(a["member_id"], a_again["member_epoch"], a_again["assignment"])
            c = await api.beat(c["member_id"], c["member_epoch"], [])
            assert set(partitions_of(c)) <= set(partitions_of(b)) and partitions_of(c)
            assert not set(partitions_of(a_again)) & set(partitions_of(c))

    run(scenario)


def test_a_group_heartbeat_does_not_scan_the_cluster(tmp_path: Path) -> None:
    class NoScan(dict[str, Any]):
        def _scan(self, *_: Any) -> Any:
            raise AssertionError("a group heartbeat walked every topic")

        __iter__ = items = values = keys = _scan

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (coordinator_, _store, api):
            await api.setup()
            coordinator_.state.topics = NoScan(coordinator_.state.topics)
            a = await api.beat(None, 0, [])
            assert len(a["assignment"]) == 12

    run(scenario)


def test_snapshots_are_built_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    original = ClusterState.to_snapshot

    def recording(self: ClusterState) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(ClusterState, "to_snapshot", recording)

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock(), snapshot_every=3) as (_, _store, api):
            await api.setup()
            for partition in range(6):
                assert (await api.commit(None, None, partition, 1))[0] == 200
            before = (await api.call("GET", f"{GROUP}/offsets"))[1]
        async with coordinator(tmp_path, Clock(), snapshot_every=3) as (_, _store, api):
            assert (await api.call("GET", f"{GROUP}/offsets"))[1] == before

    run(scenario)
    assert threads, "no snapshot was written"
    assert threading.main_thread().name not in threads


def test_a_commit_naming_a_partition_twice_or_an_offset_past_int64_is_refused(
    tmp_path: Path,
) -> None:
    """Both were stored (the last of two entries won; 2**64 was kept as is): bad input
    gets a clear error and changes nothing."""

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (_, _store, api):
            await api.setup(partitions=2)
            entry = {"topic": "orders", "partition": 0, "offset": 100}
            for body in (
                {"offsets": [entry, {**entry, "offset": 5}]},
                {"offsets": [{**entry, "offset": 2**64}]},
                {"offsets": [entry], "member_epoch": 2**63},
            ):
                status, answer = await api.call("POST", f"{GROUP}/offsets", body)
                assert status == 400 and answer["error"]["code"] == "invalid_request", answer
            _, stored = await api.call("GET", f"{GROUP}/offsets")
            assert stored["offsets"] == []
            status, _ = await api.call("POST", f"{GROUP}/offsets", {"offsets": [entry]})
            assert status == 200

    run(scenario)


def test_group_heartbeats_waiting_for_the_write_lock_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They queued without a limit (1,500 waited on one slow fsync, each answered
    later): past the bound a heartbeat or leave is a retriable 503 at once."""
    monkeypatch.setattr(coordinator_server, "GROUP_REQUESTS_WAITING_MAX", 3)

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (c, store, api):
            await api.setup(partitions=2)
            store.gate.clear()  # the first heartbeat persists the group's session bound
            body = {"member_id": None, "member_epoch": 0, "topics": ["orders"], "owned": []}
            waiting = [
                asyncio.create_task(
                    api.call("POST", f"{GROUP}/heartbeat", {**body, "session_timeout_ms": 5000})
                )
                for _ in range(3)
            ]
            await until(lambda: c._group_requests_waiting == 3, "three heartbeats waiting")
            status, answer = await api.beat_raw(body | {"session_timeout_ms": 5000})
            assert status == 503 and answer["error"]["code"] == "unavailable", answer
            status, answer = await api.call("POST", f"{GROUP}/leave", {"member_id": "x"})
            assert status == 503, answer
            store.gate.set()
            assert [status for status, _ in await asyncio.gather(*waiting)] == [200] * 3
            assert c._group_requests_waiting == 0
            assert (await api.beat_raw(body | {"session_timeout_ms": 5000}))[0] == 200

    run(scenario)


def test_a_stale_commit_is_409_stale_member_epoch_and_a_huge_heartbeat_epoch_is_400(
    tmp_path: Path,
) -> None:
    """An older epoch of the partitions' only holder is stale_member_epoch (the client
    resends under its current epoch) and stores nothing; heartbeat epochs were not
    bounded while commit epochs were (an adopted epoch near 2**63 made every commit 400)."""

    async def scenario() -> None:
        async with coordinator(tmp_path, Clock()) as (_, _store, api):
            await api.setup(partitions=2)
            a = await api.beat(None, 0, [])
            a = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            b = await api.beat(None, 0, [])
            stale = a["member_epoch"]
            a = await api.beat(a["member_id"], stale, a["assignment"])  # revokes one
            [kept] = partitions_of(a)
            status, body = await api.commit(a["member_id"], stale, kept, 7)
            assert (status, body["error"]["code"]) == (409, "stale_member_epoch"), body
            _, stored = await api.call("GET", f"{GROUP}/offsets")
            assert stored["offsets"] == []
            status, body = await api.commit(a["member_id"], a["member_epoch"], kept, 7)
            assert status == 200, body
            for epoch in (2**62, 2**63):
                status, body = await api.beat_raw(
                    {"member_id": b["member_id"], "member_epoch": epoch, "topics": ["orders"]}
                )
                assert (status, body["error"]["code"]) == (400, "invalid_request"), body

    run(scenario)
