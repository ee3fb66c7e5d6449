"""Scale-out and scale-in on real processes: `tide up --brokers 3` on a running
two-broker cluster moves replicas and leaders until each broker holds and leads a
fair share; `tide brokers drain ID` empties a broker.
Partitions move with their data, under load, losing nothing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tidemq import Consumer, Producer
from tidemq.cli.control import ControlPlane, resolve_target

Tide = Callable[..., Any]
SETTLE_S = 120.0
TOPICS = {"orders": 6, "events": 3}  # 9 partitions x 2 replicas


def balanced(control: ControlPlane, broker_ids: list[int]) -> tuple[bool, str]:
    brokers = {b["id"]: b for b in control.brokers()}
    moves = control.reassignments()["reassignments"]
    replicas = [brokers[i]["partitions"] for i in broker_ids]
    leaders = [brokers[i]["leaders"] for i in broker_ids]
    fair = max(replicas) - min(replicas) <= 1 and max(leaders) - min(leaders) <= 1
    return fair and not moves, f"replicas {replicas}, leaders {leaders}, moves {len(moves)}"


def wait_balanced(control: ControlPlane, broker_ids: list[int], deadline_s: float) -> str:
    deadline = time.monotonic() + deadline_s
    while True:
        done, seen = balanced(control, broker_ids)
        if done:
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"not balanced over brokers {broker_ids} after {deadline_s} s: {seen}")
        time.sleep(0.2)  # the polling interval, not a wait for a condition


def check_partitions(control: ControlPlane) -> None:
    for topic in control.topics():
        for partition in topic["partitions"]:
            assert partition["isr"] and set(partition["isr"]) <= set(partition["replicas"])
            assert partition["leader_id"] in partition["isr"]
            assert len(partition["replicas"]) == topic["replication_factor"]


def test_scale_out_to_three_brokers_then_drain_one(
    cluster_factory: Callable[..., Any], tide_cli: Tide
) -> None:
    cluster = cluster_factory(brokers=2)
    data_dir = str(cluster.data_dir)
    for name, partitions in TOPICS.items():
        tide_cli("topics", "create", name, "--partitions", str(partitions), "--data-dir", data_dir)
    control = ControlPlane(resolve_target(data_dir))
    assert balanced(control, [1, 2])[0]

    started = time.monotonic()
    cluster.up(brokers=3)
    seen = wait_balanced(control, [1, 2, 3], SETTLE_S)
    print(f"scale-out 2 -> 3 brokers settled in {time.monotonic() - started:.1f} s")
    assert seen.startswith("replicas [6, 6, 6], leaders [3, 3, 3]"), seen
    check_partitions(control)
    for name in TOPICS:
        control.wait_topic_ready(name)  # every new leader serves its partition
    status = json.loads(tide_cli("status", "--json", "--data-dir", data_dir).stdout)
    assert status["moves"] == {"draining": [], "reassignments": []}

    started = time.monotonic()
    drain = tide_cli("brokers", "drain", "1", "--timeout-s", str(SETTLE_S), "--data-dir", data_dir)
    assert "broker 1 holds nothing" in drain.stderr
    seen = wait_balanced(control, [2, 3], SETTLE_S)
    print(f"drain of broker 1 settled in {time.monotonic() - started:.1f} s")
    assert seen.startswith("replicas [9, 9]"), seen
    brokers = {b["id"]: b for b in control.brokers()}
    assert (brokers[1]["partitions"], brokers[1]["leaders"], brokers[1]["draining"]) == (
        0,
        0,
        True,
    )
    check_partitions(control)
    text = tide_cli("status", "--data-dir", data_dir).stdout
    assert "draining brokers: 1" in text and "no partition moves in progress" in text

    refused = tide_cli("brokers", "drain", "2", "--no-wait", "--data-dir", data_dir, check=False)
    assert refused.returncode != 0 and "replication factor" in refused.stderr
    tide_cli("brokers", "undrain", "1", "--data-dir", data_dir)
    wait_balanced(control, [1, 2, 3], SETTLE_S)

    # The cluster still works: produce to the new leaders, read it back.
    control.wait_topic_ready("orders")
    with Producer(**cluster.config) as producer:
        futures = [producer.send("orders", f"v{i}", key=f"k{i}") for i in range(50)]
        producer.flush(timeout=30)
        assert all(f.result(timeout=1).offset >= 0 for f in futures)
    with Consumer("orders", group="after-drain", **cluster.config) as consumer:
        received: list[Any] = []
        deadline = time.monotonic() + 60
        while len(received) < 50 and time.monotonic() < deadline:
            received.extend(consumer.poll(timeout=0.5, max_records=100))
    assert sorted(m.value for m in received) == sorted(f"v{i}".encode() for i in range(50))


class _Load:
    """Produces keyed messages in a thread and records every acknowledged one."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        self.config = config
        self.topic = topic
        self.acknowledged: list[tuple[str, str]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        number = 0
        with Producer(**self.config) as producer:
            while not self._stop.is_set():
                batch = []
                for _ in range(100):
                    key, value = f"k{number % 50}", f"m{number}"
                    batch.append((key, value, producer.send(self.topic, value, key=key)))
                    number += 1
                for key, value, future in batch:
                    try:
                        future.result(timeout=30)
                        self.acknowledged.append((key, value))
                    except Exception as error:  # retried by the producer; counted here
                        self.errors.append(error)
                time.sleep(0.01)  # pace the load; the broker is not the subject here


def test_scale_out_and_drain_under_load_lose_nothing(
    cluster_factory: Callable[..., Any], tide_cli: Tide
) -> None:
    cluster = cluster_factory(brokers=2)
    data_dir = str(cluster.data_dir)
    tide_cli("topics", "create", "load", "--partitions", "6", "--data-dir", data_dir)
    control = ControlPlane(resolve_target(data_dir))
    with _Load(cluster.config, "load") as load:
        cluster.up(brokers=3)
        wait_balanced(control, [1, 2, 3], 60.0)
        tide_cli("brokers", "drain", "1", "--timeout-s", "60", "--data-dir", data_dir)
    assert load.acknowledged
    with Consumer("load", group="check", **cluster.config) as consumer:
        received: dict[str, list[str]] = {}
        where: dict[str, tuple[int, int]] = {}  # value -> (partition, offset), for a failure
        count = 0
        deadline = time.monotonic() + 60
        while count < len(load.acknowledged) and time.monotonic() < deadline:
            for message in consumer.poll(timeout=0.5, max_records=2000):
                received.setdefault(message.key.decode(), []).append(message.value.decode())
                where[message.value.decode()] = (message.partition, message.offset)
                count += 1
    values = {value for values in received.values() for value in values}
    lost = [value for _, value in load.acknowledged if value not in values]
    assert not lost, f"{len(lost)} acknowledged messages lost"
    for key, values_of_key in received.items():
        # At least once: a consumer whose session lapsed (a slow heartbeat on a loaded
        # machine) gets uncommitted records again. Order is about first deliveries.
        numbers = list(dict.fromkeys(int(value[1:]) for value in values_of_key))
        if numbers != sorted(numbers):
            first = next(i for i in range(1, len(numbers)) if numbers[i] < numbers[i - 1])
            around = [(f"m{n}", where.get(f"m{n}")) for n in numbers[max(0, first - 3) : first + 3]]
            duplicated = len(numbers) != len(set(numbers))
            raise AssertionError(
                f"order per key broken for {key} (duplicates: {duplicated}; "
                f"errors while producing: {len(load.errors)}): {around}"
            )
