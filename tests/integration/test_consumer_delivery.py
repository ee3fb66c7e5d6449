"""What the consumer promises about delivery, over a real cluster (issue 6).

* a poison record is named (topic, partition, offset) by poll() and can be skipped;
* a background failure reaches poll() and subscribe() as an exception;
* a handler that raises stops subscribe() and its message is delivered again, with
  nothing after it committed;
* at-least-once / at-most-once / manual commit what they promise;
* a revocation waits until the application finished what it holds, and commits only
  that;
* a member cut off from the coordinator stops handing out messages before its
  session could expire, so before its partitions can be given to another member.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from consumer_helpers import (
    CuttableProxy,
    assignments,
    committed,
    corrupt_stored_record,
    create_topic,
    produce,
    wait_for,
)

import tidemq.client.fetcher as fetcher_module
from tidemq import Consumer, CorruptRecord, Message, Producer
from tidemq.errors import InternalError
from tidemq.wire.partitioner import partition_for_key

FLUSH_TIMEOUT_S = 30.0


def poll_until(consumer: Consumer, count: int, timeout_s: float = 60.0) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"received {len(out)} of {count} messages")
        out += consumer.poll(timeout=0.2, max_records=count - len(out))
    return out


def test_poison_record_is_named_and_can_be_skipped(cluster: Any) -> None:
    topic = "poison"
    create_topic(cluster, topic, 1)
    produce(cluster, topic, [(None, f"v{i}") for i in range(10)])
    corrupt_stored_record(cluster.data_dir, topic, 0, 4)
    with Consumer(topic, group="poison", **cluster.config) as consumer:
        received: list[Message] = []
        deadline = time.monotonic() + 60
        with pytest.raises(CorruptRecord) as raised:
            while time.monotonic() < deadline:
                received += consumer.poll(timeout=0.2)
        error = raised.value
        assert [m.offset for m in received] == [0, 1, 2, 3]  # everything before it
        assert (error.topic, error.partition, error.offset) == (topic, 0, 4)
        assert "poison/0 offset 4" in str(error) and "seek" in str(error)
        with pytest.raises(CorruptRecord):  # it does not go away by itself
            consumer.poll(timeout=0.1)
        consumer.seek(error.topic, error.partition, error.offset + 1)
        rest = poll_until(consumer, 5)
        assert [(m.offset, m.value) for m in rest] == [(i, b"v%d" % i) for i in range(5, 10)]
        consumer.commit()
    assert committed(cluster, "poison", topic) == {0: 10}


def test_a_background_failure_reaches_poll_and_subscribe(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = "doomed"
    create_topic(cluster, topic, 1)
    produce(cluster, topic, [(None, "x")])

    def broken(*args: object) -> object:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(fetcher_module, "decode_records", broken)
    with Consumer(topic, group="doomed", **cluster.config) as consumer:
        deadline = time.monotonic() + 30
        with pytest.raises(InternalError, match="decoder exploded"):
            while time.monotonic() < deadline:
                assert consumer.poll(timeout=0.2) == []
        with pytest.raises(InternalError, match="decoder exploded"):
            consumer.poll(timeout=0)
        with pytest.raises(InternalError, match="decoder exploded"):
            consumer.subscribe(lambda message: None)


class Boom(Exception):
    pass


def test_a_handler_error_stops_subscribe_and_its_message_comes_again(cluster: Any) -> None:
    topic = "handler-error"
    create_topic(cluster, topic, 1)
    produce(cluster, topic, [(None, f"v{i}") for i in range(20)])
    seen: list[int] = []

    def handler(message: Message) -> None:
        seen.append(message.offset)
        if message.offset == 7 and seen.count(7) == 1:
            raise Boom("handler failed on offset 7")

    with Consumer(topic, group="handler-error", **cluster.config) as consumer:
        with pytest.raises(Boom):
            consumer.subscribe(handler)
        assert seen == list(range(8))
        assert committed(cluster, "handler-error", topic) == {0: 7}  # nothing after it
        again = poll_until(consumer, 13)
        assert [m.offset for m in again] == list(range(7, 20))
    assert committed(cluster, "handler-error", topic) == {0: 20}


def test_subscribe_again_after_a_handler_error_resumes_at_that_message(cluster: Any) -> None:
    topic = "handler-again"
    create_topic(cluster, topic, 1)
    produce(cluster, topic, [(None, f"v{i}") for i in range(10)])
    seen: list[int] = []
    consumer = Consumer(topic, group="handler-again", **cluster.config)

    def handler(message: Message) -> None:
        seen.append(message.offset)
        if message.offset == 3 and seen.count(3) == 1:
            raise Boom("once")
        if len(seen) == 11:
            threading.Thread(target=consumer.close).start()

    try:
        with pytest.raises(Boom):
            consumer.subscribe(handler)
        consumer.subscribe(handler)  # returns when the handler closes the consumer
    finally:
        consumer.close()
    assert seen == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]
    assert committed(cluster, "handler-again", topic) == {0: 10}


def test_at_most_once_subscribe_commits_before_the_handler_and_loses_only_the_failed(
    cluster: Any,
) -> None:
    topic = group = "at-most-once-subscribe"
    create_topic(cluster, topic, 1)
    produce(cluster, topic, [(None, f"v{i}") for i in range(10)])
    seen: list[tuple[int, dict[int, int]]] = []

    def handler(message: Message) -> None:
        seen.append((message.offset, committed(cluster, group, topic)))
        if message.offset == 3:
            raise Boom("at most once")

    options = {"delivery": "at_most_once"}
    with Consumer(topic, group=group, **options, **cluster.config) as consumer:
        with pytest.raises(Boom):
            consumer.subscribe(handler)
        assert [offset for offset, _ in seen] == [0, 1, 2, 3]
        assert all(at.get(0, 0) > offset for offset, at in seen)  # committed before
        assert committed(cluster, group, topic) == {0: 4}  # only the failed one is lost
        rest = poll_until(consumer, 6)
        assert [m.offset for m in rest] == list(range(4, 10))


@pytest.mark.parametrize("delivery", ["at_least_once", "at_most_once", "manual"])
def test_delivery_modes_commit_what_they_promise(cluster: Any, delivery: str) -> None:
    topic = f"modes-{delivery.replace('_', '-')}"
    group = topic
    create_topic(cluster, topic, 1)
    produce(cluster, topic, [(None, f"v{i}") for i in range(30)])
    options = {"delivery": delivery, "auto_commit_interval_ms": 1}
    with Consumer(topic, group=group, **options, **cluster.config) as consumer:
        assert consumer.wait_until_ready(30)
        first = poll_until(consumer, 10)
        assert [m.offset for m in first] == list(range(10))
        if delivery == "at_most_once":
            assert committed(cluster, group, topic) == {0: 10}  # before handing them over
        else:
            assert committed(cluster, group, topic).get(0, 0) == 0  # not processed yet
        second = poll_until(consumer, 10)  # polling again: the first ten are done
        assert [m.offset for m in second] == list(range(10, 20))
        if delivery == "at_least_once":
            wait_for(lambda: committed(cluster, group, topic) == {0: 10}, 10, "auto-commit")
        elif delivery == "at_most_once":
            assert committed(cluster, group, topic) == {0: 20}
        else:
            assert committed(cluster, group, topic) == {}
            consumer.commit()
            assert committed(cluster, group, topic) == {0: 20}
        poll_until(consumer, 10)
    # close: what was handed out is done; manual commits only on commit()
    expected = 20 if delivery == "manual" else 30
    assert committed(cluster, group, topic) == {0: expected}


def test_revocation_waits_for_what_the_application_holds(cluster: Any) -> None:
    topic, group, partitions = "revoke-wait", "revoke-wait", 4
    create_topic(cluster, topic, partitions)
    keys = [f"k{i}" for i in range(40)]
    produce(cluster, topic, [(key, "first") for key in keys for _ in range(5)])
    first = Consumer(topic, group=group, **cluster.config)
    second: Consumer | None = None
    try:
        assert first.wait_until_ready(30)
        held = first.poll(timeout=5, max_records=1000)  # and holds them: no poll again
        held_positions: dict[int, int] = {}
        for message in held:
            held_positions[message.partition] = message.offset + 1
        assert len(held_positions) == partitions
        produce(cluster, topic, [(key, "second") for key in keys for _ in range(5)])
        second = Consumer(topic, group=group, **cluster.config)
        first_id = first.member_id
        wait_for(
            lambda: len(assignments(cluster, group).get(str(first_id), ())) == partitions // 2,
            30,
            "the coordinator to revoke half of the first member's partitions",
        )
        wait_for(lambda: len(first.assignment()) == partitions // 2, 10, "the revocation")
        revoked = set(range(partitions)) - {p for _, p in first.assignment()}
        window_end = time.monotonic() + 2.0
        while time.monotonic() < window_end:  # the first member still holds its records
            early = second.poll(timeout=0.2)
            assert early == [], "a revoked partition moved while its records were held"
        assert set(committed(cluster, group, topic).values()) <= {0}  # nothing done yet
        first.poll(timeout=0)  # done with what it held: the revocation completes
        expected = 5 * sum(1 for key in keys if partition_for_key(key.encode(), 4) in revoked)
        moved = poll_until(second, expected, 30)
        assert {m.partition for m in moved} == revoked
        for message in moved:
            assert message.offset >= held_positions[message.partition]  # no overlap
            assert message.value == b"second"
        committed_now = committed(cluster, group, topic)
        for partition in revoked:
            assert committed_now[partition] == held_positions[partition]
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_member_cut_off_from_the_coordinator_stops_before_its_session_can_expire(
    cluster: Any,
) -> None:
    topic, group = "cut-off", "cut-off"
    create_topic(cluster, topic, 2)
    session_ms = 3_000
    proxy = CuttableProxy(cluster.config["bootstrap"])
    config = dict(cluster.config, bootstrap=proxy.url)
    stop = threading.Event()
    receipts: dict[str, list[tuple[float, Message]]] = {"cut": [], "other": []}

    errors: list[BaseException] = []

    def keep_producing() -> None:
        try:
            with Producer(**cluster.config, linger_ms=1) as producer:
                number = 0
                while not stop.is_set():
                    producer.send(topic, str(number), key=f"k{number % 20}")
                    number += 1
                    if number % 20 == 0:
                        producer.flush(timeout=FLUSH_TIMEOUT_S)
                        stop.wait(0.02)
        except BaseException as error:  # reported by this test, not by a later one
            errors.append(error)

    def consume(name: str, consumer: Consumer) -> None:
        while not stop.is_set():
            for message in consumer.poll(timeout=0.1):
                receipts[name].append((time.monotonic(), message))

    options = {"session_timeout_ms": session_ms, "heartbeat_interval_ms": 300}
    cut_member = Consumer(topic, group=group, **options, **config)
    other: Consumer | None = None
    threads = [
        threading.Thread(target=keep_producing),
        threading.Thread(target=consume, args=("cut", cut_member)),
    ]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(receipts["cut"]) > 50, 30, "the member to consume")
        proxy.cut()
        cut_at = time.monotonic()
        last_sent = cut_member.last_heartbeat_sent
        assert last_sent is not None and last_sent <= cut_at
        other = Consumer(topic, group=group, **options, **cluster.config)
        threads.append(threading.Thread(target=consume, args=("other", other)))
        threads[-1].start()
        wait_for(lambda: receipts["other"], 30, "the partitions to move to the other member")
        last_cut = max(at for at, _ in receipts["cut"])
        first_other = min(at for at, _ in receipts["other"])
        # stopped handing out at its last successful heartbeat's send time plus the
        # session minus the margin (a poll returning at that instant may log just after)
        assert last_cut <= last_sent + session_ms * 0.8 / 1000 + 0.05
        assert last_cut < first_other, "two members handed out one partition's messages"
        # the coordinator gave the partitions away only once the session expired
        assert first_other >= last_sent + session_ms / 1000
        assert not errors, errors
    finally:
        stop.set()
        for thread in threads:  # longer than a flush may take: no thread outlives the test
            thread.join(FLUSH_TIMEOUT_S + 15)
        cut_member.close(timeout=5)
        if other is not None:
            other.close()
        proxy.close()
