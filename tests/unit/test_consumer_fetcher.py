"""The consumer's fetching against a fake cluster (coordinator and brokers in one
fake transport): one long-poll per broker, a leader move of one partition that does
not stall the others, and a newly assigned partition fetched while a long-poll waits.

The fake answers ``POST {broker}/v1/fetch`` like the broker does (wire/fetch.py): at
once when a requested partition has records, else when one gets some, else empty
after ``wait_ms``; a partition it does not lead is an entry with ``not_leader``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

import tidemq.client.consumer as consumer_module
from tidemq.client.consumer import Consumer
from tidemq.client.fetch_buffer import Message
from tidemq.client.fetcher import PartitionFetch, fetch_request
from tidemq.errors import InvalidRequest, TideError, Unavailable
from tidemq.transport import error_from_response
from tidemq.wire.batch import build_batch, patch_batch
from tidemq.wire.fetch import FetchEntry, FetchRequest, decode_fetch, encode_fetch

TOPIC = "t"
BROKERS = ("https://b1", "https://b2")


class FakeCluster:
    """Shared state of the fake, touched from the test thread and the consumer's loop."""

    def __init__(self, partitions: int) -> None:
        self.lock = threading.Lock()
        self.logs: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
        self.leaders = {p: BROKERS[p % len(BROKERS)] for p in range(partitions)}
        self.epochs = dict.fromkeys(range(partitions), 0)
        self.assignment = set(range(partitions))
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.requests: list[tuple[str, FetchRequest]] = []
        self.other_requests: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters: set[asyncio.Event] = set()
        self.deposed: dict[int, tuple[str, int]] = {}  # leaders that do not know it yet
        self.on_request: Callable[[FetchRequest], None] = lambda request: None
        self.metadata_requests = 0
        self.metadata_error: TideError | None = None  # the coordinator's metadata fails

    def append(self, partition: int, value: bytes) -> None:
        with self.lock:
            log = self.logs[partition]
            batch = bytearray(build_batch([(None, value)], 1_000))
            patch_batch(batch, 0, len(log), self.epochs[partition])
            log.append(bytes(batch))
            loop, waiters = self.loop, list(self.waiters)
        if loop is not None:
            for event in waiters:
                loop.call_soon_threadsafe(event.set)

    def move_leader(self, partition: int, url: str, quietly: bool = False) -> None:
        with self.lock:
            if quietly:
                self.deposed[partition] = (self.leaders[partition], self.epochs[partition])
            self.leaders[partition] = url
            self.epochs[partition] += 1

    def entries(self, url: str, request: FetchRequest) -> list[FetchEntry]:
        out = []
        with self.lock:
            for wanted in request.partitions:
                p = wanted.partition
                if self.deposed.get(p) == (url, wanted.leader_epoch):
                    continue  # serves nothing new, and says nothing
                if self.leaders[p] != url or wanted.leader_epoch != self.epochs[p]:
                    code = "not_leader" if self.leaders[p] != url else "fenced_leader_epoch"
                    error = {"code": code, "message": f"{url} cannot serve {p}"}
                    out.append(FetchEntry(TOPIC, p, -1, -1, error, b""))
                elif wanted.offset < len(self.logs[p]):
                    data = b"".join(self.logs[p][wanted.offset :])
                    out.append(FetchEntry(TOPIC, p, len(self.logs[p]), 0, None, data))
        return out


class FakeTransport:
    cluster: FakeCluster

    def __init__(self, connection: Any) -> None:
        self.member_epoch = 0

    async def coordinator(
        self, method: str, path: str, json_body: Any = None, params: Any = None, **_: Any
    ) -> Any:
        cluster = self.cluster
        if path.endswith("/heartbeat"):
            self.member_epoch += 1
            with cluster.lock:
                assigned = sorted(cluster.assignment)
            return {
                "member_id": json_body["member_id"],
                "member_epoch": self.member_epoch,
                "heartbeat_interval_ms": 50,
                "assignment": [{"topic": TOPIC, "partition": p} for p in assigned],
            }
        if path == "/v1/metadata":
            cluster.metadata_requests += 1
            if cluster.metadata_error is not None:
                raise cluster.metadata_error
            with cluster.lock:
                partitions = [
                    {"partition": p, "leader_url": url, "leader_epoch": cluster.epochs[p]}
                    for p, url in sorted(cluster.leaders.items())
                ]
            return {"topics": [{"name": TOPIC, "partitions": partitions}]}
        if path.endswith("/offsets") and method == "GET":
            return {"offsets": []}
        return {}

    async def request_json(self, method: str, url: str, **_: Any) -> Any:
        self.cluster.other_requests.append(f"{method} {url}")
        return {"log_start_offset": 0, "high_watermark": 0}

    async def request(
        self, method: str, url: str, data: bytes = b"", timeout_ms: int = 0, **_: Any
    ) -> tuple[bytes, dict[str, str]]:
        cluster = self.cluster
        broker = url.removesuffix("/v1/fetch")
        if method != "POST" or broker not in BROKERS:
            cluster.other_requests.append(f"{method} {url}")
            raise error_from_response(404, b"")
        request = msgspec.json.decode(data, type=FetchRequest)
        cluster.loop = asyncio.get_running_loop()
        cluster.requests.append((broker, request))
        cluster.on_request(request)
        cluster.in_flight[broker] += 1
        cluster.max_in_flight[broker] = max(
            cluster.max_in_flight[broker], cluster.in_flight[broker]
        )
        event = asyncio.Event()
        try:
            with cluster.lock:
                cluster.waiters.add(event)
            deadline = time.monotonic() + request.wait_ms / 1000
            while True:
                event.clear()
                entries = cluster.entries(broker, request)
                remaining = deadline - time.monotonic()
                if entries or remaining <= 0:
                    return encode_fetch(entries), {}
                try:
                    async with asyncio.timeout(remaining):
                        await event.wait()
                except TimeoutError:
                    pass
        finally:
            with cluster.lock:
                cluster.waiters.discard(event)
            cluster.in_flight[broker] -= 1

    async def close(self) -> None:
        pass


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    fake = FakeCluster(12)
    transport = type("BoundTransport", (FakeTransport,), {"cluster": fake})
    monkeypatch.setattr(consumer_module, "Transport", transport)
    return fake


def make_consumer(**config: Any) -> Consumer:
    options = {"bootstrap": "https://coordinator", "retry_backoff_ms": 10, **config}
    return Consumer(TOPIC, group="g", **options)


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.005)


def poll_until(consumer: Consumer, wanted: Callable[[list[Message]], bool], seconds: float):
    got: list[Message] = []
    deadline = time.monotonic() + seconds
    while not wanted(got) and time.monotonic() < deadline:
        got += consumer.poll(timeout=0.05)
    return got


def test_twelve_partitions_on_two_brokers_keep_two_fetches_in_flight(
    cluster: FakeCluster,
) -> None:
    with make_consumer(fetch_wait_ms=300) as consumer:
        assert consumer.wait_until_ready(10)
        wait_for(lambda: len(cluster.requests) >= 6, 10, "a few rounds of long-polls")
        assert dict(cluster.max_in_flight) == {BROKERS[0]: 1, BROKERS[1]: 1}
        for broker, request in cluster.requests:
            led = {p for p, url in cluster.leaders.items() if url == broker}
            assert {p.partition for p in request.partitions} == led
            assert all(p.offset == 0 and p.leader_epoch == 0 for p in request.partitions)
        assert not [r for r in cluster.other_requests if r.endswith("/records")]
        for p in (3, 8):
            cluster.append(p, f"v{p}".encode())
        got = poll_until(consumer, lambda got: len(got) >= 2, 5)
        assert sorted((m.partition, m.offset, m.value) for m in got) == [
            (3, 0, b"v3"),
            (8, 0, b"v8"),
        ]
        assert max(cluster.max_in_flight.values()) == 1


def test_a_leader_move_of_one_partition_does_not_stall_the_others(
    cluster: FakeCluster,
) -> None:
    # a long back-off: the moved partition waits it out, the others must not
    with make_consumer(
        fetch_wait_ms=300, retry_backoff_ms=3000, retry_backoff_max_ms=3000
    ) as consumer:
        assert consumer.wait_until_ready(10)
        cluster.move_leader(0, BROKERS[1])  # broker 1 now answers not_leader for 0
        cluster.append(0, b"moved")
        moved_at = time.monotonic()
        moved = consumer._fetchers.partitions[(TOPIC, 0)]
        wait_for(lambda: moved.leader_url is None, 5, "broker 1's not_leader for partition 0")
        seen: list[Message] = []
        for i, p in enumerate((2, 4, 6, 8, 10, 2)):  # led by broker 1 all along
            cluster.append(p, f"v{i}".encode())
            sent = time.monotonic()
            seen += poll_until(consumer, lambda got, p=p: any(m.partition == p for m in got), 3)
            assert [m.value for m in seen if m.partition == p][-1] == f"v{i}".encode()
            assert time.monotonic() - sent < 1.0, f"partition {p} stalled behind partition 0"
        seen += poll_until(consumer, lambda got: any(m.partition == 0 for m in got), 10)
        assert [m.value for m in seen if m.partition == 0] == [b"moved"]
        assert time.monotonic() - moved_at < 10
        asked = [
            (broker, p.leader_epoch)
            for broker, request in cluster.requests
            for p in request.partitions
            if p.partition == 0
        ]
        assert asked[-1] == (BROKERS[1], 1)
        assert max(cluster.max_in_flight.values()) == 1


def test_a_deposed_leader_that_says_nothing_is_left_when_metadata_ages(
    cluster: FakeCluster,
) -> None:
    with make_consumer(fetch_wait_ms=200, metadata_max_age_ms=300) as consumer:
        assert consumer.wait_until_ready(10)
        cluster.move_leader(5, BROKERS[0], quietly=True)  # broker 2 keeps answering
        cluster.append(5, b"on the new leader")
        got = poll_until(consumer, lambda got: bool(got), 10)
        assert [(m.partition, m.value) for m in got] == [(5, b"on the new leader")]
        asked = [(b, p.leader_epoch) for b, r in cluster.requests for p in r.partitions]
        assert (BROKERS[0], 1) in asked


def test_a_new_partition_is_fetched_while_its_brokers_long_poll_waits(
    cluster: FakeCluster,
) -> None:
    cluster.assignment = {0}
    with make_consumer(fetch_wait_ms=4000) as consumer:
        assert consumer.wait_until_ready(10)
        wait_for(lambda: cluster.in_flight[BROKERS[0]] == 1, 5, "the long-poll of partition 0")
        asked_before = len(cluster.requests)
        with cluster.lock:
            cluster.assignment = {0, 2}  # 2 is on the same broker as 0
        cluster.append(2, b"new")
        started = time.monotonic()
        got = poll_until(consumer, lambda got: bool(got), 5)
        assert [(m.partition, m.value) for m in got] == [(2, b"new")]
        assert time.monotonic() - started < 2.0, "waited out the long-poll of partition 0"
        later = cluster.requests[asked_before:]
        assert any({p.partition for p in r.partitions} == {0, 2} for _, r in later)
        assert cluster.max_in_flight[BROKERS[0]] == 1


def test_a_fetch_request_bounds_bytes_per_partition_and_in_total() -> None:
    states = [PartitionFetch((TOPIC, p), 5 * p) for p in range(3)]
    states[1].leader_epoch = 7
    request = fetch_request(states, wait_ms=200, partition_max_bytes=1 << 20)
    assert [(p.partition, p.offset, p.leader_epoch, p.max_bytes) for p in request.partitions] == [
        (0, 0, -1, 1 << 20),
        (1, 5, 7, 1 << 20),
        (2, 10, -1, 1 << 20),
    ]
    assert request.max_bytes == 3 << 20 and request.wait_ms == 200
    huge = fetch_request(states * 10, wait_ms=0, partition_max_bytes=1 << 30)
    assert huge.partitions[0].max_bytes == 8 << 20  # the protocol's limit per partition
    assert huge.max_bytes == 64 << 20  # and in total


def test_decode_fetch_reads_back_what_the_broker_encodes() -> None:
    entries = [
        FetchEntry("t", 1, 10, 0, None, b"batches"),
        FetchEntry("t", 2, -1, -1, {"code": "not_leader", "message": "m"}, b""),
    ]
    assert decode_fetch(encode_fetch(entries)) == entries
    with pytest.raises(InvalidRequest):
        decode_fetch(encode_fetch(entries)[:-3])


def test_a_full_partition_is_not_fetched_and_comes_back_soon_after_it_drains(
    cluster: FakeCluster,
) -> None:
    cluster.assignment = {0, 2}  # both on broker 1; 2 stays idle: its long-poll parks
    for i in range(10):
        cluster.append(0, b"x" * 100 + str(i).encode())
    bound = 300
    with make_consumer(fetch_wait_ms=4000, max_partition_buffer_bytes=bound) as consumer:
        fetched_while_full: list[int] = []

        def check(request: FetchRequest) -> None:
            buffered = consumer._buffer.buffered_bytes((TOPIC, 0))
            if any(p.partition == 0 for p in request.partitions) and buffered >= bound:
                fetched_while_full.append(buffered)

        cluster.on_request = check
        wait_for(lambda: consumer._buffer.buffered_bytes((TOPIC, 0)) >= bound, 5, "a full p0")
        wait_for(
            lambda: (
                [p.partition for p in cluster.requests[-1][1].partitions] == [2]
                and cluster.in_flight[BROKERS[0]] == 1
            ),
            5,
            "a long-poll without the full partition",
        )
        got = consumer.poll(timeout=1, max_records=100)
        assert [m.offset for m in got] == list(range(10))
        cluster.append(0, b"after")
        drained = time.monotonic()
        got = poll_until(consumer, lambda got: bool(got), 5)
        assert [(m.partition, m.value) for m in got] == [(0, b"after")]
        assert time.monotonic() - drained < 2.0, "the drained partition waited out a long-poll"
        assert fetched_while_full == []


def test_a_failing_coordinator_is_not_asked_for_metadata_after_every_fetch(
    cluster: FakeCluster,
) -> None:
    """Review finding: once a topic's metadata is older than metadata_max_age_ms, every
    broker loop round asks the coordinator again, and a failed refresh is retried at
    the next round at once: a busy consumer sent the coordinator one metadata request
    per fetch answer (hundreds a second) while it failed (overloaded, or restarting
    while the group's heartbeats still got through), with no back-off at all."""
    cluster.assignment = {0, 1}  # one partition on each broker
    with make_consumer(fetch_wait_ms=5, metadata_max_age_ms=200) as consumer:
        assert consumer.wait_until_ready(10)
        wait_for(lambda: len(cluster.requests) >= 4, 5, "fetching from both brokers")
        failing_since = cluster.metadata_requests
        cluster.metadata_error = Unavailable("coordinator overloaded")
        wait_for(lambda: cluster.metadata_requests > failing_since, 5, "a refresh of aged metadata")
        asked_before, fetched_before = cluster.metadata_requests, len(cluster.requests)
        wait_for(lambda: len(cluster.requests) >= fetched_before + 200, 20, "200 more fetch rounds")
        asked = cluster.metadata_requests - asked_before
        # Backed off (retry_backoff_ms=10, doubling): a handful, not one per round.
        assert asked <= 20, f"{asked} metadata requests in 200 fetch rounds"
