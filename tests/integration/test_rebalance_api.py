"""Rebalancing through the coordinator's HTTP API (in-process, plain HTTP), with
brokers played by the test: each heartbeat reports every replica, and a leader
proposes (AlterIsr) every replica of an idle partition into the ISR, as a real leader
does once its followers have caught up with an empty log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_coordinator_api import Api, coordinator, eventually, register, scenario

OPTIONS = {
    "heartbeat_interval_ms": 20,
    "session_timeout_ms": 5000,
    "rebalance_moves_max": 3,
    "rebalance_moves_per_broker_max": 2,
}


class FakeBrokers:
    """Heartbeats like brokers (reporting what they lead and what is being moved)
    whose partitions are empty, except those in ``written``
    (topic, partition) -> high watermark: their leader has data no follower has."""

    def __init__(self, api: Api, broker_ids: list[int]) -> None:
        self.api = api
        self.broker_ids = broker_ids
        self.assignments: dict[int, list[dict[str, Any]]] = {b: [] for b in broker_ids}
        self.written: dict[tuple[str, int], int] = {}
        self.snapshots: list[dict[str, Any]] = []

    async def beat(self) -> None:
        for broker in self.broker_ids:
            reports = [self._report(broker, a) for a in self.assignments[broker]]
            path = f"/v1/brokers/{broker}/heartbeat"
            status, body = await self.api.call("POST", path, {"partitions": reports})
            assert status == 200
            self.assignments[broker] = body["assignments"]
            for assignment in body["assignments"]:
                await self._propose_caught_up(broker, assignment)

    async def _propose_caught_up(self, broker: int, assignment: dict[str, Any]) -> None:
        """A leader of an idle partition: every follower has caught up at once."""
        key = (assignment["topic"], assignment["partition"])
        if assignment["leader_id"] != broker or key in self.written:
            return
        if set(assignment["isr"]) == set(assignment["replicas"]):
            return
        proposal = {
            "topic": key[0],
            "partition": key[1],
            "topic_id": assignment["topic_id"],
            "leader_epoch": assignment["leader_epoch"],
            "partition_epoch": assignment["partition_epoch"],
            "isr": assignment["replicas"],
        }
        path = f"/v1/brokers/{broker}/alter-isr"
        status, body = await self.api.call("POST", path, proposal)
        assert status in (200, 409), body  # 409: the partition changed meanwhile

    def _report(self, broker: int, assignment: dict[str, Any]) -> dict[str, Any]:
        key = (assignment["topic"], assignment["partition"])
        written = self.written.get(key, 0)
        end = written if assignment["leader_id"] == broker else 0
        return {
            "topic": key[0],
            "partition": key[1],
            "leader_epoch": assignment["leader_epoch"],
            "log_start_offset": 0,
            "log_end_offset": end,
            "high_watermark": end,
        }

    async def settle(self, balanced: Any, what: str) -> dict[str, Any]:
        """Heartbeats until ``balanced(brokers, topics)``; checks every snapshot."""
        seen: dict[str, Any] = {}

        async def check() -> bool:
            await self.beat()
            brokers = (await self.api.call("GET", "/v1/brokers"))[1]["brokers"]
            topics = (await self.api.call("GET", "/v1/topics"))[1]["topics"]
            moves = (await self.api.call("GET", "/v1/reassignments"))[1]
            assert len(moves["reassignments"]) <= OPTIONS["rebalance_moves_max"]
            for topic in topics:
                for partition in topic["partitions"]:
                    assert partition["isr"], "an empty isr"
                    assert set(partition["isr"]) <= set(partition["replicas"])
                    assert partition["leader_id"] in partition["isr"]
            seen.update(brokers=brokers, topics=topics, moves=moves)
            return bool(balanced(brokers, topics) and not moves["reassignments"])

        try:
            await eventually(check, what)
        except AssertionError as error:
            raise AssertionError(f"{error}; last seen: {seen}") from None
        return seen


def counts(brokers: list[dict[str, Any]], ids: list[int]) -> tuple[list[int], list[int]]:
    by_id = {b["id"]: b for b in brokers}
    return [by_id[i]["partitions"] for i in ids], [by_id[i]["leaders"] for i in ids]


def test_a_new_broker_gets_its_share_and_a_drained_one_ends_empty(tmp_path: Path) -> None:
    async def run() -> None:
        async with coordinator(tmp_path, **OPTIONS) as api:
            await register(api, 1, 2)
            status, _ = await api.call(
                "POST", "/v1/topics", {"name": "t", "partitions": 6, "replication_factor": 2}
            )
            assert status == 201
            fake = FakeBrokers(api, [1, 2])
            await fake.beat()
            await register(api, 3)
            fake = FakeBrokers(api, [1, 2, 3])

            def even(brokers: list[dict[str, Any]], _: Any) -> bool:
                return counts(brokers, [1, 2, 3]) == ([4, 4, 4], [2, 2, 2])

            await fake.settle(even, "6 partitions x 2 replicas to spread over 3 brokers")

            status, body = await api.call("POST", "/v1/brokers/9/drain")
            assert (status, body["error"]["code"]) == (404, "unknown_broker")
            status, body = await api.call("POST", "/v1/brokers/1/drain")
            assert status == 200 and body["draining"] is True
            status, body = await api.call("POST", "/v1/brokers/2/drain")
            assert (status, body["error"]["code"]) == (409, "cluster_state_conflict")
            assert "replication factor" in body["error"]["message"]
            moves = (await api.call("GET", "/v1/reassignments"))[1]
            assert moves["draining"] == [1]

            def drained(brokers: list[dict[str, Any]], _: Any) -> bool:
                return counts(brokers, [1, 2, 3]) == ([0, 6, 6], [0, 3, 3])

            await fake.settle(drained, "broker 1 to be drained")
            status, body = await api.call("POST", "/v1/topics", {"name": "new", "partitions": 4})
            assert status == 201
            assert all(1 not in p["replicas"] for p in body["partitions"]), "placed on drained"

            status, body = await api.call("POST", "/v1/brokers/1/undrain")
            assert status == 200 and body["draining"] is False

            def back(brokers: list[dict[str, Any]], _: Any) -> bool:
                replicas, leaders = counts(brokers, [1, 2, 3])
                return max(replicas) - min(replicas) <= 1 and max(leaders) - min(leaders) <= 1

            seen = await fake.settle(back, "broker 1 to take a share again")
            assert counts(seen["brokers"], [1])[0][0] >= 6
            metrics = await api.text("/metrics")
            assert "tide_reassignments_in_progress 0.0" in metrics

    scenario(run)


def test_a_move_of_a_partition_with_data_waits_for_the_copy(tmp_path: Path) -> None:
    """Followers do not copy on this branch: a partition whose leader has data keeps
    its old replica, its leader and its ISR however long the move waits."""

    async def run() -> None:
        async with coordinator(tmp_path, **OPTIONS) as api:
            await register(api, 1)
            status, _ = await api.call(
                "POST", "/v1/topics", {"name": "t", "partitions": 2, "replication_factor": 1}
            )
            assert status == 201
            fake = FakeBrokers(api, [1])
            fake.written.update({("t", 0): 7, ("t", 1): 3})
            await fake.beat()
            await register(api, 2)
            fake.broker_ids.append(2)
            fake.assignments[2] = []

            async def started() -> bool:
                await fake.beat()
                moves = (await api.call("GET", "/v1/reassignments"))[1]["reassignments"]
                return len(moves) == 1

            await eventually(started, "a move to start")
            for _ in range(30):
                await fake.beat()
            [move] = (await api.call("GET", "/v1/reassignments"))[1]["reassignments"]
            assert move["step"] == "copying" and move["adding"] == [2]
            assert move["replicas"] == [1, 2] and move["isr"] == [1]
            assert move["leader_id"] == 1

    scenario(run)


def test_a_move_survives_a_coordinator_restart(tmp_path: Path) -> None:
    async def run() -> None:
        async with coordinator(tmp_path, **OPTIONS) as api:
            await register(api, 1)
            await api.call(
                "POST", "/v1/topics", {"name": "t", "partitions": 2, "replication_factor": 1}
            )
            fake = FakeBrokers(api, [1])
            fake.written.update({("t", 0): 7, ("t", 1): 3})
            await fake.beat()
            await register(api, 2)
            await api.call("POST", "/v1/brokers/2/drain")

            async def started() -> bool:
                await fake.beat()
                return bool((await api.call("GET", "/v1/reassignments"))[1]["draining"])

            await eventually(started, "broker 2 to be draining")
            await api.call("POST", "/v1/brokers/2/undrain")
            await eventually(lambda: _moves(api, fake, 1), "a move to start after the undrain")
            before = (await api.call("GET", "/v1/reassignments"))[1]
        async with coordinator(tmp_path, **OPTIONS) as api:
            assert (await api.call("GET", "/v1/reassignments"))[1] == before
            status, body = await api.call("POST", "/v1/brokers/1/drain")
            assert status == 200 and body["draining"] is True
        async with coordinator(tmp_path, **OPTIONS) as api:
            assert (await api.call("GET", "/v1/reassignments"))[1]["draining"] == [1]

    scenario(run)


async def _moves(api: Api, fake: FakeBrokers, count: int) -> bool:
    await fake.beat()
    return len((await api.call("GET", "/v1/reassignments"))[1]["reassignments"]) == count


def test_drain_command_times_out_with_the_moves_it_waits_for(tmp_path: Path) -> None:
    """`tide brokers drain` against a coordinator whose move cannot finish (the
    partition has data, followers do not copy): it fails at its timeout, naming the
    moves, and the broker stays draining."""
    import asyncio

    from click.testing import CliRunner

    from tidemq.cli.brokers import brokers

    async def run() -> None:
        async with coordinator(tmp_path, **OPTIONS) as api:
            await register(api, 1, 2)
            await api.call(
                "POST", "/v1/topics", {"name": "t", "partitions": 2, "replication_factor": 1}
            )
            fake = FakeBrokers(api, [1, 2])
            fake.written.update({("t", 0): 7, ("t", 1): 3})
            await fake.beat()
            environment = {"TIDE_BOOTSTRAP": api.base}
            arguments = ["drain", "1", "--timeout-s", "1"]
            result = await asyncio.to_thread(
                CliRunner().invoke, brokers, arguments, env=environment
            )
            assert result.exit_code == 1, result.output
            assert "still holds 1 replicas" in result.output
            assert "copying" in result.output
            moves = (await api.call("GET", "/v1/reassignments"))[1]
            assert moves["draining"] == [1]
            result = await asyncio.to_thread(
                CliRunner().invoke, brokers, ["undrain", "1"], env=environment
            )
            assert result.exit_code == 0 and "no longer draining" in result.output

    scenario(run)
