"""Text output of ``tide``: tables and status. Pure functions of the data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; None prints as "-"."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for index, value in enumerate(row):
            widths[index] = max(widths[index], len(value))
    lines = [
        "  ".join(value.ljust(widths[index]) for index, value in enumerate(row)).rstrip()
        for row in [list(headers), *cells]
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value) or "-"
    return str(value)


def brokers_table(brokers: Sequence[dict[str, Any]], local: Sequence[dict[str, Any]]) -> str:
    """Brokers as the coordinator sees them, joined with local processes by URL."""
    by_url = {row["url"]: row for row in local}
    rows = []
    for broker in sorted(brokers, key=lambda b: b.get("id", 0)):
        process = by_url.get(broker.get("url"), {})
        rows.append(
            [
                broker.get("id"),
                broker.get("url"),
                broker.get("alive"),
                broker.get("partitions"),
                broker.get("leaders"),
                process.get("pid"),
                _running(process),
            ]
        )
    known = {broker.get("url") for broker in brokers}
    for process in local:
        if process["name"] != "coordinator" and process["url"] not in known:
            broker_id = process["name"].removeprefix("broker-")
            rows.append(
                [broker_id, process["url"], None, None, None, process["pid"], _running(process)]
            )
    return table(["BROKER", "URL", "ALIVE", "PARTITIONS", "LEADERS", "PID", "PROCESS"], rows)


def _running(process: dict[str, Any]) -> str | None:
    if "running" not in process:
        return None
    return "running" if process["running"] else "stopped"


def partitions_table(topics: Sequence[dict[str, Any]]) -> str:
    rows = []
    for topic in sorted(topics, key=lambda t: str(t.get("name"))):
        for partition in topic.get("partitions", []):
            rows.append(
                [
                    topic.get("name"),
                    partition.get("partition"),
                    partition.get("leader_id"),
                    partition.get("leader_epoch"),
                    partition.get("replicas"),
                    partition.get("isr"),
                ]
            )
    return table(["TOPIC", "PARTITION", "LEADER", "EPOCH", "REPLICAS", "ISR"], rows)


def reassignments_table(answer: dict[str, Any]) -> str:
    """Partition moves in progress (GET /v1/reassignments) and draining brokers."""
    moves = answer.get("reassignments") or []
    draining = answer.get("draining") or []
    head = f"draining brokers: {_cell(list(draining))}"
    if not moves:
        return f"{head}\nno partition moves in progress"
    rows = [
        [
            f"{move.get('topic')}/{move.get('partition')}",
            move.get("from"),
            move.get("to"),
            move.get("step"),
            move.get("leader_id"),
            move.get("isr"),
        ]
        for move in moves
    ]
    moving = table(["MOVING", "FROM", "TO", "STEP", "LEADER", "ISR"], rows)
    return f"{head}\n{len(moves)} partition moves in progress\n{moving}"


def topics_summary(topics: Sequence[dict[str, Any]]) -> str:
    rows = []
    for topic in sorted(topics, key=lambda t: str(t.get("name"))):
        partitions = topic.get("partitions", [])
        offline = sum(1 for p in partitions if p.get("leader_id") is None)
        under = sum(1 for p in partitions if len(p.get("isr") or []) < len(p.get("replicas") or []))
        rows.append(
            [topic.get("name"), len(partitions), topic.get("replication_factor"), under, offline]
        )
    return table(["TOPIC", "PARTITIONS", "REPLICATION", "UNDER-REPLICATED", "OFFLINE"], rows)


def group_table(group: dict[str, Any]) -> str:
    members = table(
        ["MEMBER", "EPOCH", "ASSIGNMENT"],
        [
            [
                member.get("member_id"),
                member.get("member_epoch"),
                [f"{a.get('topic')}/{a.get('partition')}" for a in member.get("assignment", [])],
            ]
            for member in group.get("members", [])
        ],
    )
    offsets = table(
        ["TOPIC", "PARTITION", "COMMITTED", "HIGH-WATERMARK", "LAG"],
        [
            [
                o.get("topic"),
                o.get("partition"),
                o.get("committed"),
                o.get("high_watermark"),
                o.get("lag"),
            ]
            for o in group.get("offsets", [])
        ],
    )
    return f"group {group.get('group')}\n\n{members}\n\n{offsets}"


def format_record(partition: int, offset: int, key: bytes | None, value: bytes | None) -> str:
    """``partition offset key value``; a null key or value prints as "-"."""
    return f"{partition} {offset} {_text(key)} {_text(value)}"


def _text(data: bytes | str | None) -> str:
    if data is None:
        return "-"
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="backslashreplace")
