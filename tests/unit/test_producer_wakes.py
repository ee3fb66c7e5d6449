"""The real Producer's sender wakes: a record for a broker with nothing in flight goes
at once, whatever linger_ms says, and a record behind a request in flight goes within
its linger, without a lost wake-up, however user threads and answers interleave.

The producer skips a cross-thread wake while the sender's event is still set, and after
a pass that sends the sender looks in again within a linger: a wake lost by either
would leave a record waiting for linger_ms (here far longer than the test's deadline)
or for ever.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.unit.producer_fakes import InstantBroker, StaticMetadata, fake_producer

from tidemq.client import producer as producer_module
from tidemq.client.metadata import PartitionInfo

TOPIC = "t"
PARTITIONS = 6
LEADERS = ("https://b1.invalid", "https://b2.invalid", "https://b3.invalid")


def make_producer(broker: InstantBroker, linger_ms: int) -> producer_module.Producer:
    metadata = StaticMetadata(
        TOPIC, PARTITIONS, lambda p: PartitionInfo(p, LEADERS[p % len(LEADERS)], 0)
    )
    return fake_producer(broker, metadata, linger_ms=linger_ms)


def test_a_record_for_an_idle_broker_goes_at_once_however_long_the_linger() -> None:
    broker = InstantBroker(0.0)
    producer = make_producer(broker, linger_ms=60_000)
    try:
        for i in range(200):  # each waits: nothing is in flight when the next is sent
            metadata = producer.send(TOPIC, b"v%d" % i, partition=i % PARTITIONS).result(5)
            assert metadata.offset == i // PARTITIONS
    finally:
        producer.close(timeout=1)  # a lost wake must fail the test, not hang its close


def test_records_from_many_threads_behind_requests_in_flight_all_go_within_linger() -> None:
    broker = InstantBroker(0.002)
    linger_ms = 50
    futures: list[Any] = []
    lock = threading.Lock()
    producer = make_producer(broker, linger_ms=linger_ms)
    try:

        def sender(seed: int) -> None:
            for i in range(300):
                future = producer.send(TOPIC, b"%d-%d" % (seed, i), key=b"k%d" % (i % 17))
                with lock:
                    futures.append(future)
                if i % 50 == 0:
                    time.sleep(0.003)

        threads = [threading.Thread(target=sender, args=(seed,)) for seed in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for future in futures:  # no flush: only the sender's own wakes and timers
            future.result(5)
        elapsed = time.monotonic() - started
    finally:
        producer.close(timeout=1)
    assert len(futures) == 1200
    assert sum(broker.ends.values()) == 1200
    assert broker.requests < 1200  # behind requests in flight, records share requests
    assert elapsed < 5


def test_a_record_behind_a_slow_request_goes_when_its_linger_ends() -> None:
    """Nagle per broker: the second record waits behind the first's request, but no
    longer than linger_ms, though the answer takes far longer and nothing wakes the
    sender (the look-in timer armed when the first request went out does)."""
    broker = InstantBroker(1.0)
    arrivals: list[float] = []
    answer = broker.request_json

    async def timed(method: str, url: str, **kwargs: Any) -> Any:
        arrivals.append(time.monotonic())
        return await answer(method, url, **kwargs)

    broker.request_json = timed  # type: ignore[method-assign]
    producer = make_producer(broker, linger_ms=50)
    try:
        started = time.monotonic()
        first = producer.send(TOPIC, b"first", partition=0)
        deadline = started + 5
        while not arrivals and time.monotonic() < deadline:
            time.sleep(0.001)
        second = producer.send(TOPIC, b"second", partition=3)  # the same leader, busy
        while len(arrivals) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(arrivals) == 2
        assert arrivals[1] - started < 0.5  # its linger (50 ms), not the first's answer
        assert first.result(5).offset == 0 and second.result(5).offset == 0
    finally:
        producer.close(timeout=1)
