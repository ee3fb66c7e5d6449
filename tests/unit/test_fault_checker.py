"""The fault harness's history checker on hand-made histories: each safety number must
catch its own anomaly, and a clean history must come out clean."""

from __future__ import annotations

from typing import Any

from tests.fault.harness.checker import check, percentile, violations


def ack(
    producer: str, key: str, seq: int, offset: int, t: float, partition: int = 0
) -> dict[str, Any]:
    return {
        "type": "ack", "producer": producer, "key": key, "seq": seq, "topic": "t",
        "partition": partition, "offset": offset, "t": t,
    }  # fmt: skip


def final(producer: str, key: str, seq: int, offset: int, partition: int = 0) -> dict[str, Any]:
    return {
        "type": "final", "producer": producer, "key": key, "seq": seq, "topic": "t",
        "partition": partition, "offset": offset,
    }  # fmt: skip


def recv(consumer: str, producer: str, key: str, seq: int, offset: int, t: float) -> dict[str, Any]:
    return {
        "type": "recv", "consumer": consumer, "producer": producer, "key": key, "seq": seq,
        "topic": "t", "partition": 0, "offset": offset, "t": t,
    }  # fmt: skip


def done(partition: int = 0, complete: bool = True) -> dict[str, Any]:
    return {"type": "final_partition", "topic": "t", "partition": partition, "complete": complete}


def fault(kind: str, t: float) -> list[dict[str, Any]]:
    return [
        {"type": "fault", "kind": kind, "target": "broker-1", "phase": "start", "t": t},
        {"type": "fault", "kind": kind, "target": "broker-1", "phase": "end", "t": t + 0.5},
    ]


def clean_history() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for seq in range(3):
        events.append(ack("p", "k", seq, seq, 10.0 + seq))
        events.append(final("p", "k", seq, seq))
        events.append(recv("c", "p", "k", seq, seq, 20.0 + seq))
    events += fault("broker_kill", 10.5)
    events.append(done())
    return events


def test_clean_history_is_clean() -> None:
    verdict = check(clean_history())
    assert violations(verdict) == []
    assert verdict["acknowledged"] == 3
    assert verdict["faults"] == {"broker_kill": 1}
    assert verdict["acknowledged_not_received"] == 0
    assert verdict["unavailability_ms"]["windows"] == 1
    assert verdict["unavailability_ms"]["max"] == 1000.0


def test_lost_acknowledged_record_is_caught() -> None:
    events = [e for e in clean_history() if not (e["type"] == "final" and e["seq"] == 1)]
    verdict = check(events)
    assert verdict["acknowledged_lost"] == 1
    assert verdict["lost_examples"] == ["p:k:1"]
    # the consumer had received offset 1 which the log no longer holds
    assert verdict["receipt_conflicts"] == 1
    assert "acknowledged_lost = 1" in violations(verdict)


def test_unreadable_partition_fails_the_run() -> None:
    events = [e for e in clean_history() if e["type"] != "final_partition"]
    events.append(done(complete=False))
    assert not check(events)["final_read_complete"]
    assert any("final read incomplete" in v for v in violations(check(events)))
    # no final read at all is not a pass either
    assert violations(check([e for e in events if e["type"] not in ("final", "final_partition")]))


def test_reordered_log_is_caught() -> None:
    events = [ack("p", "k", 0, 0, 1.0), ack("p", "k", 1, 1, 2.0)]
    events += [final("p", "k", 1, 0), final("p", "k", 0, 1), done()]
    verdict = check(events)
    assert verdict["order_violations"] >= 1
    assert verdict["offset_mismatches"] == 2


def test_reordered_acknowledgements_are_caught() -> None:
    # acknowledged offsets go down while seq goes up; the log (unacknowledged view) agrees
    events = [ack("p", "k", 0, 5, 1.0), ack("p", "k", 1, 4, 2.0)]
    events += [final("p", "k", 1, 4), final("p", "k", 0, 5), done()]
    verdict = check(events)
    assert verdict["order_violations"] == 2  # once in the log, once in the acks


def test_consumer_seeing_keys_out_of_order_is_caught() -> None:
    # no readable log here, so only the consumer's own view can show the reordering
    events = [
        recv("c2", "p", "k", 2, 2, 30.0),
        recv("c2", "p", "k", 0, 3, 31.0),
        done(complete=False),
    ]
    verdict = check(events)
    assert verdict["order_violations"] == 1
    assert verdict["redeliveries"] == 0


def test_consumer_rewind_is_redelivery_not_reordering() -> None:
    events = clean_history()
    events.append(recv("c", "p", "k", 0, 0, 40.0))
    events.append(recv("c", "p", "k", 1, 1, 41.0))
    verdict = check(events)
    assert verdict["order_violations"] == 0
    assert verdict["redeliveries"] == 1


def test_duplicate_in_log_is_caught() -> None:
    events = clean_history()
    events.insert(-1, final("p", "k", 2, 3))  # seq 2 again at offset 3
    verdict = check(events)
    assert verdict["duplicates"] == 1
    assert verdict["order_violations"] == 0


def test_two_records_acknowledged_at_one_offset_is_a_double_leader() -> None:
    events = [ack("p", "k", 0, 0, 1.0), ack("q", "j", 0, 0, 1.1)]
    events += [final("p", "k", 0, 0), done()]
    verdict = check(events)
    assert verdict["double_leaders"] == 1
    assert verdict["acknowledged_lost"] == 1
    assert "double_leaders = 1" in violations(verdict)


def test_unavailability_counts_each_gap_once_per_partition() -> None:
    events = [ack("p", "k", s, s, float(t)) for s, t in enumerate([0, 1, 5, 6])]
    events += [ack("p", "j", 0, 0, 0.0, partition=1), ack("p", "j", 1, 1, 2.0, partition=1)]
    events += fault("broker_pause", 2.5) + fault("link_down", 3.0)  # both in the 1..5 gap
    events += fault("packet_loss", 5.5)  # inside 5..6 on partition 0; after p1's last ack
    verdict = check(events)["unavailability_ms"]
    assert verdict["windows"] == 2
    assert verdict["max"] == 4000.0
    assert verdict["p50"] == 1000.0
    assert verdict["open_windows"] == 1


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(map(float, range(1, 101))), 0.99) == 99.0


def test_duplicate_appended_after_later_records_is_one_duplicate_not_a_reordering() -> None:
    events = clean_history()
    events.insert(-1, final("p", "k", 1, 3))  # a retried batch with seq 1 lands after seq 2
    events.append(recv("c", "p", "k", 1, 3, 30.0))  # and the consumer reads that copy
    verdict = check(events)
    assert verdict["duplicates"] == 1
    assert verdict["order_violations"] == 0
    assert verdict["receipt_conflicts"] == 0


def test_consumer_reading_a_record_the_log_holds_elsewhere_is_a_conflict() -> None:
    events = clean_history()
    events.append(recv("c", "p", "k", 0, 2, 30.0))  # offset 2 holds seq 2, not seq 0
    assert check(events)["receipt_conflicts"] == 1


def replica(broker: int, seq: int, offset: int, epoch: int) -> dict[str, Any]:
    return {
        "type": "replica_record", "broker": broker, "producer": "p", "key": "k", "seq": seq,
        "topic": "t", "partition": 0, "offset": offset, "epoch": epoch,
    }  # fmt: skip


def test_two_brokers_writing_one_offset_in_one_epoch_is_a_double_leader() -> None:
    events = [*clean_history(), replica(1, 2, 2, 4), replica(2, 2, 2, 4)]
    assert check(events)["double_leaders"] == 0  # replicas agree
    assert check(events)["replica_records"] == 2
    events += [replica(3, 0, 2, 4)]  # a third broker wrote another record there in epoch 4
    assert check(events)["double_leaders"] == 1
    # a divergent tail from another epoch is what truncation is for, not a double leader
    assert (
        check([*clean_history(), replica(1, 2, 2, 4), replica(3, 0, 2, 5)])["double_leaders"] == 0
    )
