"""The coordinator's metrics move with what it decides (coordinator/metrics.py)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from test_coordinator_api import Api, coordinator, eventually, register, scenario


async def samples(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await api.text("/metrics")
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def report(partition: int, high_watermark: int) -> dict[str, int | str]:
    return {
        "topic": "t",
        "partition": partition,
        "leader_epoch": 0,
        "log_start_offset": 0,
        "log_end_offset": high_watermark,
        "high_watermark": high_watermark,
    }


def test_isr_changes_elections_brokers_and_commands(tmp_path: Path) -> None:
    async def run() -> None:
        options = {"session_timeout_ms": 300, "heartbeat_interval_ms": 50}
        async with coordinator(tmp_path, **options) as api:
            await register(api, 1, 2)
            body = {"name": "t", "partitions": 1, "replication_factor": 2}
            _, topic = await api.call("POST", "/v1/topics", body)
            partition = topic["partitions"][0]
            leader = partition["leader_id"]
            follower = 3 - leader
            found = await samples(api)
            assert value(found, "tide_partitions_under_replicated") == 0
            assert value(found, "process_cpu_seconds_total") > 0  # the process collector
            assert (
                value(found, "tide_coordinator_commands_applied_total", command="CreateTopic") == 1
            )
            assert value(found, "tide_broker_leaders_assigned", broker=str(leader)) == 1
            assert value(found, "tide_broker_replicas_assigned", broker=str(follower)) == 1

            async def alter_isr(isr: list[int]) -> None:
                _, now = await api.call("GET", "/v1/topics/t")
                proposal = {
                    "topic": "t",
                    "partition": 0,
                    "topic_id": topic["topic_id"],
                    "leader_epoch": now["partitions"][0]["leader_epoch"],
                    "partition_epoch": now["partitions"][0]["partition_epoch"],
                    "isr": isr,
                }
                status, answer = await api.call("POST", f"/v1/brokers/{leader}/alter-isr", proposal)
                assert status == 200, answer

            await alter_isr([leader])
            found = await samples(api)
            assert (
                value(found, "tide_isr_shrinks_total"),
                value(found, "tide_isr_expands_total"),
            ) == (1, 0)
            assert value(found, "tide_partitions_under_replicated") == 1
            await alter_isr(sorted([leader, follower]))
            found = await samples(api)
            assert (
                value(found, "tide_isr_shrinks_total"),
                value(found, "tide_isr_expands_total"),
            ) == (1, 1)
            assert value(found, "tide_coordinator_commands_applied_total", command="AlterIsr") == 2

            async def elected() -> bool:
                await api.call("POST", f"/v1/brokers/{follower}/heartbeat", {"partitions": []})
                return value(await samples(api), "tide_leader_elections_total") == 1

            await eventually(elected, "the leader's death to elect the follower")
            found = await samples(api)
            assert value(found, "tide_isr_shrinks_total") == 2  # the dead leader left the ISR
            assert value(found, "tide_broker_up", broker=str(leader)) == 0
            assert value(found, "tide_broker_up", broker=str(follower)) == 1
            assert value(found, "tide_brokers_alive") == 1
            assert (
                value(found, "tide_coordinator_commands_applied_total", command="ChangeLeader") == 1
            )

    scenario(run)


def test_rebalances_and_lag_in_messages_and_seconds(tmp_path: Path) -> None:
    async def run() -> None:
        async with coordinator(tmp_path, heartbeat_interval_ms=20) as api:
            await register(api, 1)
            body = {"name": "t", "partitions": 1, "replication_factor": 1}
            await api.call("POST", "/v1/topics", body)
            join = {"member_epoch": 0, "topics": ["t"], "owned": []}
            _, member = await api.call("POST", "/v1/groups/g/heartbeat", join)
            found = await samples(api)
            assert value(found, "tide_consumer_group_rebalances_total", group="g") == 1
            await api.call("POST", "/v1/brokers/1/heartbeat", {"partitions": [report(0, 10)]})
            owner = {"member_id": member["member_id"], "member_epoch": member["member_epoch"]}
            commit = {**owner, "offsets": [{"topic": "t", "partition": 0, "offset": 4}]}
            status, answer = await api.call("POST", "/v1/groups/g/offsets", commit)
            assert status == 200, answer  # only the owner commits (core/groups.py)

            async def lag_seconds_grows() -> bool:
                await api.call("POST", "/v1/brokers/1/heartbeat", {"partitions": [report(0, 10)]})
                found = await samples(api)
                key = (
                    "tide_consumer_lag_seconds",
                    (("group", "g"), ("partition", "0"), ("topic", "t")),
                )
                return found.get(key, 0.0) >= 0.2

            await eventually(lag_seconds_grows, "lag in seconds to grow while nothing is committed")
            found = await samples(api)
            assert (
                value(found, "tide_consumer_lag_messages", group="g", topic="t", partition="0") == 6
            )
            commit = {**owner, "offsets": [{"topic": "t", "partition": 0, "offset": 10}]}
            status, answer = await api.call("POST", "/v1/groups/g/offsets", commit)
            assert status == 200, answer
            found = await samples(api)
            assert (
                value(found, "tide_consumer_lag_seconds", group="g", topic="t", partition="0") == 0
            )
            await api.call("POST", "/v1/groups/g/leave", {"member_id": member["member_id"]})
            found = await samples(api)
            assert value(found, "tide_consumer_group_rebalances_total", group="g") == 2

    scenario(run)
