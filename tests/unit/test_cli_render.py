"""Text output: tables, status, records."""

from __future__ import annotations

from tidemq.cli.render import (
    brokers_table,
    format_record,
    group_table,
    partitions_table,
    reassignments_table,
    table,
    topics_summary,
)

TOPIC = {
    "name": "orders",
    "replication_factor": 2,
    "partitions": [
        {
            "partition": 0,
            "leader_id": 1,
            "leader_url": "u",
            "leader_epoch": 3,
            "replicas": [1, 2],
            "isr": [1, 2],
        },
        {
            "partition": 1,
            "leader_id": None,
            "leader_url": None,
            "leader_epoch": 4,
            "replicas": [2, 1],
            "isr": [2],
        },
    ],
}


def test_table_aligns_columns() -> None:
    text = table(["A", "LONG"], [[1, None], ["wide value", [1, 2]], [True, []]])
    assert text.splitlines() == [
        "A           LONG",
        "1           -",
        "wide value  1,2",
        "yes         -",
    ]


def test_partitions_and_summary() -> None:
    lines = partitions_table([TOPIC]).splitlines()
    assert lines[0].split() == ["TOPIC", "PARTITION", "LEADER", "EPOCH", "REPLICAS", "ISR"]
    assert lines[1].split() == ["orders", "0", "1", "3", "1,2", "1,2"]
    assert lines[2].split() == ["orders", "1", "-", "4", "2,1", "2"]
    summary = topics_summary([TOPIC]).splitlines()
    assert summary[1].split() == ["orders", "2", "2", "1", "1"]


def test_brokers_table_joins_local_processes() -> None:
    brokers = [{"id": 1, "url": "https://h:1", "alive": True, "partitions": 3, "leaders": 2}]
    local = [
        {"name": "coordinator", "pid": 9, "url": "https://h:0", "running": True},
        {"name": "broker-1", "pid": 10, "url": "https://h:1", "running": True},
        {"name": "broker-2", "pid": 11, "url": "https://h:2", "running": False},
    ]
    lines = brokers_table(brokers, local).splitlines()
    assert lines[1].split() == ["1", "https://h:1", "yes", "3", "2", "10", "running"]
    assert lines[2].split() == ["2", "https://h:2", "-", "-", "-", "11", "stopped"]


def test_group_table() -> None:
    group = {
        "group": "g",
        "members": [
            {"member_id": "m1", "member_epoch": 2, "assignment": [{"topic": "t", "partition": 0}]}
        ],
        "offsets": [{"topic": "t", "partition": 0, "committed": 5, "high_watermark": 7, "lag": 2}],
    }
    text = group_table(group)
    assert text.splitlines()[3].split() == ["m1", "2", "t/0"]
    assert text.splitlines()[-1].split() == ["t", "0", "5", "7", "2"]


def test_format_record() -> None:
    assert format_record(3, 17, b"k", b"hello world") == "3 17 k hello world"
    assert format_record(0, 0, None, b"\xff") == "0 0 - \\xff"


def test_reassignments_table_shows_moves_and_draining_brokers() -> None:
    idle = reassignments_table({"draining": [], "reassignments": []})
    assert idle.splitlines() == ["draining brokers: -", "no partition moves in progress"]
    move = {
        "topic": "orders",
        "partition": 3,
        "from": [1, 2],
        "to": [3, 2],
        "step": "copying",
        "leader_id": 1,
        "isr": [1, 2],
    }
    lines = reassignments_table({"draining": [1], "reassignments": [move]}).splitlines()
    assert lines[:2] == ["draining brokers: 1", "1 partition moves in progress"]
    assert lines[2].split() == ["MOVING", "FROM", "TO", "STEP", "LEADER", "ISR"]
    assert lines[3].split() == ["orders/3", "1,2", "3,2", "copying", "1", "1,2"]
