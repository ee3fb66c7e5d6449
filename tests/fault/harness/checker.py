"""The history checker: a pure function from a fault run's events to one verdict.

Input: the events of :mod:`tests.fault.harness.history`. Output: a dict that
``python -m tests.fault.check HISTORY`` prints as ONE JSON line. What each number means:

* ``faults``: injected faults by kind (``phase == "start"`` events).
* ``acknowledged_lost``: acknowledged sends (``ack``) missing from the final full read
  of every partition. Only meaningful when ``final_read_complete``; a partition that
  could not be read counts its acknowledged records as lost (a safe default: a test
  can only fail from it, never pass).
* ``order_violations``: for one producer and key, seq numbers must strictly grow with
  the offset (a) in the final log, (b) in the offsets acknowledged, and (c) in what
  each consumer received from one partition while its offsets kept growing (a consumer
  that rewinds after a rebalance is redelivery, counted in ``redeliveries``).
* ``duplicates``: the same (producer, key, seq) at more than one offset of the log.
* ``double_leaders``: one (topic, partition, offset) acknowledged for two different
  records: two brokers both accepted writes at that position, i.e. two leaders (in
  the same epoch, or a deposed one that went on acknowledging); plus, from the
  brokers' own logs read after the run (``replica_record`` events), one (topic,
  partition, offset, leader epoch) holding different records on two brokers: two
  leaders accepted writes in one epoch. ``offset_mismatches``:
  an acknowledged record found in the log at another offset than acknowledged (the
  acknowledged position was overwritten).
* ``receipt_conflicts``: a consumer received at (topic, partition, offset) a record that
  the final log does not hold there (it read something that was later lost).
* ``unavailability_ms``: per partition, the gap between consecutive acknowledgements
  that contains the start of a fault (each gap counted once); p50 / p99 / max over
  those gaps. ``open_windows``: partitions with no acknowledgement at all after some
  fault began (measured to the last acknowledgement of the run).

:func:`violations` lists the safety numbers that must be zero.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

RecordId = tuple[str, str, int]  # producer, key, seq
TopicPartition = tuple[str, int]

SAFETY_FIELDS = (
    "acknowledged_lost",
    "order_violations",
    "duplicates",
    "double_leaders",
    "offset_mismatches",
    "receipt_conflicts",
)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _record_id(event: dict[str, Any]) -> RecordId:
    return str(event["producer"]), str(event["key"]), int(event["seq"])


def _tp(event: dict[str, Any]) -> TopicPartition:
    return str(event["topic"]), int(event["partition"])


def _seq_inversions(seqs: list[int]) -> int:
    """Adjacent pairs where the seq goes down (equal seqs are duplicates, not order)."""
    return sum(1 for earlier, later in itertools.pairwise(seqs) if later < earlier)


class _Sorted:
    """Events of one run sorted into what the checks need."""

    def __init__(self, events: Iterable[dict[str, Any]]) -> None:
        self.fault_starts: list[float] = []
        self.faults: Counter[str] = Counter()
        self.acks: list[dict[str, Any]] = []
        self.fails = 0
        self.receipts: list[dict[str, Any]] = []
        self.final: dict[TopicPartition, dict[int, RecordId]] = defaultdict(dict)
        self.final_partitions: dict[TopicPartition, bool] = {}
        self.replicas: dict[tuple[str, int, int, int], set[RecordId]] = defaultdict(set)
        self.replica_records = 0
        for event in events:
            kind = event.get("type")
            if kind == "fault" and event.get("phase") == "start":
                self.faults[str(event["kind"])] += 1
                self.fault_starts.append(float(event["t"]))
            elif kind == "ack":
                self.acks.append(event)
            elif kind == "fail":
                self.fails += 1
            elif kind == "recv":
                self.receipts.append(event)
            elif kind == "final":
                self.final[_tp(event)][int(event["offset"])] = _record_id(event)
            elif kind == "replica_record":
                tp = _tp(event)
                key = (tp[0], tp[1], int(event["offset"]), int(event["epoch"]))
                self.replicas[key].add(_record_id(event))
                self.replica_records += 1
            elif kind == "final_partition":
                self.final_partitions[_tp(event)] = bool(event.get("complete"))
        self.fault_starts.sort()


def _log_checks(run: _Sorted) -> tuple[int, int, dict[RecordId, list[TopicPartition | int]]]:
    """(order violations, duplicates, where each record sits) over the final log.

    Order is judged on each record's first copy: a retried batch appended again later
    is one duplicate, not also a reordering."""
    where: dict[RecordId, list[TopicPartition | int]] = defaultdict(list)
    order = 0
    duplicates = 0
    for tp, records in run.final.items():
        by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
        for offset in sorted(records):
            record = records[offset]
            if record in where:
                duplicates += 1
            else:
                by_key[record[:2]].append(record[2])
            where[record].append(tp)
            where[record].append(offset)
        for seqs in by_key.values():
            order += _seq_inversions(seqs)
    return order, duplicates, where


def _ack_checks(run: _Sorted, where: dict[RecordId, list[Any]]) -> dict[str, Any]:
    at_offset: dict[tuple[str, int, int], set[RecordId]] = defaultdict(set)
    by_key: dict[tuple[str, str], list[tuple[int, TopicPartition, int]]] = defaultdict(list)
    lost: list[RecordId] = []
    mismatches = 0
    for ack in run.acks:
        record, tp, offset = _record_id(ack), _tp(ack), int(ack["offset"])
        at_offset[(tp[0], tp[1], offset)].add(record)
        by_key[record[:2]].append((record[2], tp, offset))
        found = where.get(record)
        if not found:
            lost.append(record)
        elif not any(found[i] == tp and found[i + 1] == offset for i in range(0, len(found), 2)):
            mismatches += 1
    order = 0
    for entries in by_key.values():
        entries.sort()
        offsets = [offset for _, _, offset in entries]
        order += sum(1 for a, b in itertools.pairwise(offsets) if b <= a)
    double = sum(1 for records in at_offset.values() if len(records) > 1)
    return {
        "lost": lost,
        "offset_mismatches": mismatches,
        "order_violations": order,
        "double_leaders": double,
    }


def _receipt_checks(run: _Sorted, where: dict[RecordId, list[Any]]) -> dict[str, int]:
    """Receipts that disagree with the log, and keys a consumer saw go backwards while
    its offsets went forwards. A receipt of a duplicate's later copy is skipped (the
    duplicate is counted once, in the log)."""
    conflicts = 0
    order = 0
    redeliveries = 0
    last: dict[tuple[str, TopicPartition], int] = {}
    last_seq: dict[tuple[str, TopicPartition, str, str], int] = {}
    for receipt in sorted(run.receipts, key=lambda r: float(r["t"])):
        consumer, tp, offset = str(receipt["consumer"]), _tp(receipt), int(receipt["offset"])
        record = _record_id(receipt)
        final = run.final.get(tp)
        if final is not None and run.final_partitions.get(tp) and final.get(offset) != record:
            conflicts += 1
            continue
        copies = where.get(record)
        if copies and (copies[0] != tp or copies[1] != offset):
            continue  # a later copy of a duplicate
        previous = last.get((consumer, tp))
        if previous is not None and offset <= previous:
            redeliveries += 1
            for key in [k for k in last_seq if k[0] == consumer and k[1] == tp]:
                del last_seq[key]
        last[(consumer, tp)] = offset
        key_state = (consumer, tp, record[0], record[1])
        seen = last_seq.get(key_state)
        if seen is not None and record[2] < seen:
            order += 1
        last_seq[key_state] = record[2]
    return {"conflicts": conflicts, "order": order, "redeliveries": redeliveries}


def _unavailability(run: _Sorted) -> dict[str, Any]:
    ack_times: dict[TopicPartition, list[float]] = defaultdict(list)
    for ack in run.acks:
        ack_times[_tp(ack)].append(float(ack["t"]))
    windows: list[float] = []
    open_windows = 0
    for times in ack_times.values():
        times.sort()
        gaps: set[int] = set()
        for start in run.fault_starts:
            index = bisect.bisect_right(times, start)
            if index > 0:  # a fault before this partition's first ack has no gap
                gaps.add(index)
        if len(times) in gaps:  # no ack after a fault: a window the run cannot measure
            gaps.discard(len(times))
            open_windows += 1
        windows += [(times[i] - times[i - 1]) * 1000.0 for i in gaps]

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "windows": len(windows),
        "p50": rounded(percentile(windows, 0.50)),
        "p99": rounded(percentile(windows, 0.99)),
        "max": rounded(max(windows) if windows else None),
        "open_windows": open_windows,
    }


def check(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The verdict over one run's history (see the module docstring)."""
    run = _Sorted(events)
    log_order, duplicates, where = _log_checks(run)
    acks = _ack_checks(run, where)
    receipts = _receipt_checks(run, where)
    acknowledged = {_record_id(a) for a in run.acks}
    received = {_record_id(r) for r in run.receipts}
    incomplete = sorted(f"{t}/{p}" for (t, p), ok in run.final_partitions.items() if not ok)
    return {
        "faults": dict(sorted(run.faults.items())),
        "faults_total": sum(run.faults.values()),
        "acknowledged": len(run.acks),
        "failed_sends": run.fails,
        "acknowledged_lost": len(acks["lost"]),
        "lost_examples": [":".join(map(str, r)) for r in acks["lost"][:5]],
        "order_violations": log_order + acks["order_violations"] + receipts["order"],
        "duplicates": duplicates,
        "double_leaders": acks["double_leaders"]
        + sum(1 for records in run.replicas.values() if len(records) > 1),
        "replica_records": run.replica_records,
        "offset_mismatches": acks["offset_mismatches"],
        "receipt_conflicts": receipts["conflicts"],
        "received": len(run.receipts),
        "redeliveries": receipts["redeliveries"],
        "acknowledged_not_received": len(acknowledged - received),
        "final_records": sum(len(records) for records in run.final.values()),
        "final_read_complete": bool(run.final_partitions) and not incomplete,
        "unreadable_partitions": incomplete,
        "unavailability_ms": _unavailability(run),
    }


def violations(verdict: dict[str, Any], duplicates: bool = True) -> list[str]:
    """Human-readable reasons why ``verdict`` is not safe; empty when it is.
    ``duplicates=False`` leaves duplicates out (reported, not judged)."""
    fields = [name for name in SAFETY_FIELDS if duplicates or name != "duplicates"]
    problems = [f"{name} = {verdict[name]}" for name in fields if verdict.get(name)]
    if not verdict.get("final_read_complete"):
        problems.append(f"final read incomplete: {verdict.get('unreadable_partitions')}")
    return problems
