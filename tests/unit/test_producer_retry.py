"""The real Producer against scripted brokers: when the leader moved it retries at
once on the new one, and a broker that is only behind the coordinator (a new topic)
is retried after a short wait, not after ``retry_backoff_ms``. Backoffs here are set
to 5 s so that waiting one out fails the test."""

from __future__ import annotations

import time
from typing import Any

import pytest
from tests.unit.producer_fakes import metadata_class

import tidemq.client.producer as producer_module
from tidemq.client.metadata import PartitionInfo
from tidemq.errors import ConnectionFailed, NotLeader, TideError, UnknownTopic
from tidemq.wire.batch import check_batches
from tidemq.wire.produce import decode_produce

OLD, NEW = "https://old-leader", "https://new-leader"


class Cluster:
    """Partition t/0: led by OLD at epoch 0 until ``move``, then by NEW at epoch 1.
    ``failures`` lists what the brokers answer to the next requests, in order."""

    def __init__(self, failures: list[TideError | None]) -> None:
        self.leader = PartitionInfo(0, OLD, 0)
        self.failures = failures
        self.requests: list[tuple[float, str]] = []
        self.move_on_failure = False
        self.end = 0

    def move(self) -> None:
        self.leader = PartitionInfo(0, NEW, 1)

    def answer(self, url: str, data: bytes) -> Any:
        self.requests.append((time.monotonic(), url))
        failure = self.failures.pop(0) if self.failures else None
        if url.startswith(OLD) and self.leader.leader_url == NEW:
            failure = NotLeader("not the leader any more")
        if failure is not None:
            if self.move_on_failure and isinstance(failure, NotLeader):
                self.move()  # the coordinator elects NEW while OLD refuses
            raise failure
        if url.endswith("/v1/produce"):
            results = []
            for entry in decode_produce(data):
                results.append(self._append(bytes(entry.batches)))
            return {"results": results}
        return self._append(data)

    def _append(self, body: bytes) -> dict[str, Any]:
        base = self.end
        self.end += sum(header.record_count for header in check_batches(body))
        return {"base_offset": base, "batch_base_offsets": [base]}


CLUSTER: Cluster


class FakeTransport:
    def __init__(self, connection: Any) -> None:
        pass

    async def coordinator(self, method: str, path: str, **_: Any) -> Any:
        return {"producer_id": 7, "producer_epoch": 0}

    async def request_json(self, method: str, url: str, data: bytes = b"", **_: Any) -> Any:
        return CLUSTER.answer(url, data)

    async def close(self) -> None:
        pass


def send_one(monkeypatch: pytest.MonkeyPatch) -> float:
    """Sends one record; seconds until it is acknowledged (fails after 2 s)."""
    monkeypatch.setattr(producer_module, "Transport", FakeTransport)
    monkeypatch.setattr(
        producer_module, "MetadataCache", metadata_class("t", 1, lambda _: CLUSTER.leader)
    )
    producer = producer_module.Producer(
        bootstrap="https://coordinator",
        retry_backoff_ms=5_000,
        retry_backoff_max_ms=5_000,
    )
    try:
        started = time.monotonic()
        assert producer.send("t", b"v", key=b"k").result(timeout=2.0).offset == 0
        return time.monotonic() - started
    finally:
        producer.close(timeout=5)


def test_a_producer_whose_leader_moved_retries_at_once_on_the_new_leader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    global CLUSTER
    # first attempt: the connection drops; the resend meets not_leader while the
    # coordinator moves the partition; the next attempt goes to NEW without a backoff
    CLUSTER = Cluster([ConnectionFailed("reset"), NotLeader("moving")])
    CLUSTER.move_on_failure = True
    elapsed = send_one(monkeypatch)
    urls = [url for _, url in CLUSTER.requests]
    assert [url.split("/v1/")[0] for url in urls] == [OLD, OLD, NEW]
    assert elapsed < 1.0


def test_a_broker_behind_the_coordinator_is_retried_after_a_short_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    global CLUSTER
    # a topic just created: its leader learns of it with its next heartbeat
    CLUSTER = Cluster([UnknownTopic("unknown topic 't'")] * 4)
    elapsed = send_one(monkeypatch)
    assert len(CLUSTER.requests) == 5 and elapsed < 1.0
    gaps = [b - a for (a, _), (b, _) in zip(CLUSTER.requests, CLUSTER.requests[1:], strict=False)]
    assert max(gaps) < 0.5  # never a 5 s backoff
