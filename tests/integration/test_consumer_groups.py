"""Consumer groups over a real cluster (issue 6, "Done means"):

* 4 members of one group on a 12-partition topic receive 200,000 keyed messages
  produced while they are all members: each exactly once, in order per key, each
  partition consumed by one member at a time;
* a fifth member joins and one member is closed mid-stream: nothing lost, order kept,
  no message handed to two live members, and the members that kept their partitions
  never paused (shown from receipt timestamps);
* a member is SIGKILLed mid-stream: its partitions move after the session timeout, and
  the only redeliveries are messages it received but had not committed (counted).

Receipts are (monotonic time, member, partition, offset, key, value); every member of a
test runs in this process (one thread each) except the one that is killed.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from consumer_helpers import assignments, create_topic, wait_for

from tidemq import Consumer, Producer

PARTITIONS = 12
KEYS = 1000


class Receipt(NamedTuple):
    at: float
    member: str
    partition: int
    offset: int
    key: bytes
    value: bytes


class Member:
    """A group member polling on its own thread, recording every message it receives."""

    def __init__(self, name: str, topic: str, group: str, config: dict[str, Any]) -> None:
        self.name = name
        self.consumer = Consumer(topic, group=group, **config)
        self.receipts: list[Receipt] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"member-{name}")
        self._thread.start()

    def _run(self) -> None:
        receipts = self.receipts
        while not self._stop.is_set():
            messages = self.consumer.poll(timeout=0.1, max_records=2000)
            now = time.monotonic()
            for m in messages:
                assert m.key is not None and m.value is not None
                receipts.append(Receipt(now, self.name, m.partition, m.offset, m.key, m.value))

    def close(self) -> None:
        """Stops polling, then closes the consumer (committing what it received)."""
        self._stop.set()
        self._thread.join(30)
        self.consumer.close()


def value_for(key: int, sequence: int) -> str:
    return f"{key}:{sequence}"


def produce_keyed(
    cluster: Any, topic: str, count: int, rate_per_s: float | None = None
) -> list[float]:
    """Sends ``count`` messages over KEYS keys, each key's values numbered 0, 1, ...;
    at ``rate_per_s`` if given. Returns the monotonic time of every 1000th send."""
    marks = []
    sequence = [0] * KEYS
    started = time.monotonic()
    with Producer(**cluster.config) as producer:
        for i in range(count):
            key = i % KEYS
            producer.send(topic, value_for(key, sequence[key]), key=f"k{key}")
            sequence[key] += 1
            if i % 1000 == 0:
                marks.append(time.monotonic())
                if rate_per_s is not None:
                    ahead = started + i / rate_per_s - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)  # pacing the producer, not waiting for a condition
        producer.flush(timeout=120)
    return marks


def check_exactly_once_in_order(receipts: list[Receipt], count: int) -> None:
    positions = [(r.partition, r.offset) for r in receipts]
    assert len(set(positions)) == count, f"{len(set(positions))} distinct of {count}"
    assert len(positions) == count, f"{len(positions) - count} duplicates"
    check_order_per_key(receipts)


def check_order_per_key(receipts: list[Receipt], from_start: bool = True) -> None:
    """Per key, in offset order, values count up by one (from 0 if ``from_start``,
    else they only grow: a member that took over sees a later part of the stream)."""
    last: dict[bytes, int] = {}
    for receipt in sorted(receipts, key=lambda r: (r.partition, r.offset)):
        key_number, sequence = receipt.value.decode().split(":")
        assert receipt.key == f"k{key_number}".encode()
        previous = last.get(receipt.key)
        if from_start or previous is not None:
            expected = (-1 if previous is None else previous) + 1
            assert int(sequence) == expected, f"{receipt.key!r}: {sequence} after {expected - 1}"
        last[receipt.key] = int(sequence)


def check_one_member_at_a_time(receipts: list[Receipt]) -> dict[int, list[str]]:
    """Per partition, in offset order: the owners' runs never overlap in time. Returns
    the sequence of owners of each partition."""
    by_partition: dict[int, list[Receipt]] = defaultdict(list)
    for receipt in receipts:
        by_partition[receipt.partition].append(receipt)
    owners: dict[int, list[str]] = {}
    for partition, items in by_partition.items():
        items.sort(key=lambda r: r.offset)
        owners[partition] = [items[0].member]
        for before, after in itertools.pairwise(items):
            if after.member != before.member:
                owners[partition].append(after.member)
                assert before.at <= after.at, (
                    f"partition {partition}: {after.member} received offset {after.offset} "
                    f"before {before.member} received offset {before.offset}"
                )
    return owners


def wait_for_balanced(cluster: Any, group: str, members: int) -> None:
    def balanced() -> bool:
        sizes = sorted(len(a) for a in assignments(cluster, group).values())
        return len(sizes) == members and sum(sizes) == PARTITIONS and sizes[-1] - sizes[0] <= 1

    wait_for(balanced, 60, f"{members} members sharing {PARTITIONS} partitions")


def test_four_members_receive_200k_keyed_messages_once_in_order(cluster: Any) -> None:
    topic = group = "groups-200k"
    count = 200_000
    create_topic(cluster, topic, PARTITIONS)
    members = [Member(f"m{i}", topic, group, cluster.config) for i in range(4)]
    try:
        wait_for_balanced(cluster, group, 4)
        started = time.monotonic()
        produce_keyed(cluster, topic, count)
        wait_for(lambda: sum(len(m.receipts) for m in members) >= count, 180, "200,000 receipts")
        elapsed = time.monotonic() - started
    finally:
        for member in members:
            member.close()
    receipts = [r for m in members for r in m.receipts]
    check_exactly_once_in_order(receipts, count)
    owners = check_one_member_at_a_time(receipts)
    assert all(len(o) == 1 for o in owners.values()), owners  # nobody moved
    assert all(m.receipts for m in members), "every member took part"
    print(f"200,000 messages through 4 members in {elapsed:.1f} s")


def test_a_member_joins_and_one_leaves_mid_stream(cluster: Any) -> None:
    topic = group = "groups-churn"
    count = 40_000
    rate = 5_000.0
    create_topic(cluster, topic, PARTITIONS)
    members = [Member(f"m{i}", topic, group, cluster.config) for i in range(4)]
    events: dict[str, float] = {}
    try:
        wait_for_balanced(cluster, group, 4)
        producer = threading.Thread(target=produce_keyed, args=(cluster, topic, count, rate))
        producer.start()
        wait_for(lambda: sum(len(m.receipts) for m in members) > count // 4, 60, "a quarter")
        events["join"] = time.monotonic()
        members.append(Member("m4", topic, group, cluster.config))
        wait_for(lambda: members[4].receipts, 30, "the new member's first message")
        events["first message of the new member"] = time.monotonic()
        wait_for(
            lambda: sum(len(m.receipts) for m in members) > count // 2, 60, "half the messages"
        )
        events["leave"] = time.monotonic()
        members[1].close()
        events["closed"] = time.monotonic()
        producer.join(120)
        wait_for(lambda: sum(len(m.receipts) for m in members) >= count, 120, "every message")
    finally:
        for member in members:
            member.close()
    receipts = [r for m in members for r in m.receipts]
    check_exactly_once_in_order(receipts, count)  # hence no message to two live members
    owners = check_one_member_at_a_time(receipts)
    kept = [p for p, o in owners.items() if len(o) == 1]
    moved = {p: o for p, o in owners.items() if len(o) > 1}
    assert moved, "the join and the leave moved partitions"
    assert len(kept) >= 4, owners
    # members that kept their partitions never paused: around the join and the leave,
    # the longest gap between two receipts of a kept partition stays short
    worst_gap = 0.0
    for partition in kept:
        times = sorted(r.at for r in receipts if r.partition == partition)
        window = [t for t in times if events["join"] - 1 <= t <= events["closed"] + 3]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        worst_gap = max([worst_gap, *gaps])
    join_to_first = events["first message of the new member"] - events["join"]
    print(
        f"kept partitions {sorted(kept)}: longest gap between receipts {worst_gap * 1000:.0f} ms "
        f"during the rebalances; moved {moved}; join to first message {join_to_first:.2f} s"
    )
    assert worst_gap < 1.0, f"a kept partition paused {worst_gap:.2f} s"


KILLED_MEMBER = """
import sys
from tidemq import Consumer

consumer = Consumer(sys.argv[1], group=sys.argv[2], session_timeout_ms=3000,
                    heartbeat_interval_ms=300, auto_commit_interval_ms=300)
print("started", flush=True)
while True:
    messages = consumer.poll(timeout=0.1, max_records=200)
    if messages:
        sys.stdout.write("".join(f"{m.partition} {m.offset}\\n" for m in messages))
        sys.stdout.flush()
"""


def test_a_killed_member_redelivers_only_what_it_had_not_committed(
    cluster: Any, tmp_path: Path
) -> None:
    topic = group = "groups-kill"
    partitions, count, rate, session_s = 4, 30_000, 3_000.0, 3.0
    create_topic(cluster, topic, partitions)
    script = tmp_path / "member.py"
    script.write_text(KILLED_MEMBER)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    environment.update(cluster.env)
    process = subprocess.Popen(
        [sys.executable, "-u", str(script), topic, group],
        env=environment,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    survivor: Member | None = None
    producer = threading.Thread(target=produce_keyed, args=(cluster, topic, count, rate))
    try:
        wait_for(lambda: lines, 30, "the member to start")
        producer.start()
        survivor = Member("survivor", topic, group, dict(cluster.config, session_timeout_ms=3000))
        wait_for_balanced_of(cluster, group, partitions)
        wait_for(lambda: len(lines) > 3000, 60, "the member to receive messages")
        owned = assignments(cluster, group)
        survivor_id = survivor.consumer.member_id
        kept_by_killed = {
            p for member, tps in owned.items() if member != survivor_id for _, p in tps
        }
        assert len(kept_by_killed) == partitions // 2, owned
        process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        process.wait(10)
        reader.join(10)
        producer.join(120)
        wait_for(
            lambda: len(positions(survivor.receipts) | parse_lines(lines[1:])) >= count,
            120,
            "every message",
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
        if survivor is not None:
            survivor.close()
        if producer.is_alive():
            producer.join(120)
    killed = parse_lines(lines[1:])
    taken_over = [r for r in survivor.receipts if r.partition in kept_by_killed]
    restart: dict[int, int] = {}
    for receipt in taken_over:
        restart[receipt.partition] = min(
            restart.get(receipt.partition, receipt.offset), receipt.offset
        )
    assert set(restart) == kept_by_killed, "every partition of the killed member moved"
    moved_at = min(r.at for r in taken_over)
    assert moved_at - killed_at >= session_s - 0.5, "moved before the session could expire"
    assert moved_at - killed_at < session_s + 5, "moved long after the session timeout"
    # the survivor restarts each partition at the killed member's last commit, so the
    # redeliveries are exactly what it received from there on: received, not committed
    received_uncommitted = {(p, o) for p, o in killed if p in restart and o >= restart[p]}
    survivor_positions = positions(survivor.receipts)
    redelivered = killed & survivor_positions
    assert redelivered == received_uncommitted
    assert len(survivor_positions) == len(survivor.receipts), "the survivor got duplicates"
    assert len(killed | survivor_positions) == count, "messages lost"
    check_order_per_key(survivor.receipts, from_start=False)
    print(
        f"killed member received {len(killed)}, of which {len(redelivered)} uncommitted ones "
        f"were redelivered; partitions moved {moved_at - killed_at:.2f} s after the kill"
    )


def positions(receipts: list[Receipt]) -> set[tuple[int, int]]:
    return {(r.partition, r.offset) for r in receipts}


def parse_lines(lines: list[str]) -> set[tuple[int, int]]:
    out = set()
    for line in lines:
        partition, offset = line.split()
        out.add((int(partition), int(offset)))
    return out


def wait_for_balanced_of(cluster: Any, group: str, partitions: int) -> None:
    def balanced() -> bool:
        sizes = sorted(len(a) for a in assignments(cluster, group).values())
        return len(sizes) == 2 and sum(sizes) == partitions and sizes[0] == sizes[1]

    wait_for(balanced, 60, "two members sharing the partitions")


pytestmark = pytest.mark.slow
