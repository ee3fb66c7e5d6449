"""The real Producer against a fake leader that uses the broker's own
ProducerStateTable. Every answer is lost (after the append) for longer than
delivery_timeout_ms (every answer to an epoch-0 batch); then answers flow again. The
log must hold every value at most once. (An adversarial review found the held groups
written twice: given up with an unknown outcome, they were renumbered in a new epoch.)
"""

import asyncio
import time
from collections import Counter

from tests.unit.producer_fakes import led_by, metadata_class

import tidemq.client.producer as producer_module
from tidemq.core.producers import Append, ProducerStateTable
from tidemq.errors import RequestTimedOut
from tidemq.wire.batch import check_batches, decode_records
from tidemq.wire.produce import decode_produce


class FakeLeader:
    def __init__(self, drop_until: float) -> None:
        self.table = ProducerStateTable()
        self.log: list[bytes] = []  # values, in log order
        self.end = 0
        self.drop_until = drop_until

    def append(self, body: bytes) -> list[int]:
        headers = check_batches(body)
        decisions = self.table.check_all(headers)
        offsets, position = [], 0
        for header, decision in zip(headers, decisions, strict=True):
            raw = body[position : position + header.size]
            position += header.size
            if isinstance(decision, Append):
                self.table.record(header, self.end)
                offsets.append(self.end)
                self.log += [m.value for m in decode_records(raw)]
                self.end += header.record_count
            else:
                offsets.append(decision.base_offset)
        if headers[0].producer_epoch == 0:  # the outage: epoch-0 answers are lost
            raise RequestTimedOut("answer lost after the append")
        return offsets


LEADER: FakeLeader


class FakeTransport:
    def __init__(self, connection) -> None:
        pass

    async def coordinator(self, method, path, json_body=None, **_):
        return {"producer_id": 7, "producer_epoch": 0}

    async def request_json(self, method, url, params=None, data=None, headers=None, **_):
        await asyncio.sleep(0.3)  # a lost answer is only noticed after a while
        if url.endswith("/v1/produce"):
            results = []
            for entry in decode_produce(data):
                offsets = LEADER.append(bytes(entry.batches))
                results.append({"base_offset": offsets[0], "batch_base_offsets": offsets})
            return {"results": results}
        offsets = LEADER.append(data)
        return {"base_offset": offsets[0], "batch_base_offsets": offsets}

    async def close(self) -> None:
        pass


def test_lost_answers_beyond_delivery_timeout_duplicate_the_held_groups(monkeypatch) -> None:
    global LEADER
    LEADER = FakeLeader(drop_until=time.monotonic() + 1.5)
    monkeypatch.setattr(producer_module, "Transport", FakeTransport)
    monkeypatch.setattr(
        producer_module, "MetadataCache", metadata_class("t", 1, led_by("https://leader"))
    )
    producer = producer_module.Producer(
        bootstrap="https://coordinator",
        linger_ms=0,
        batch_size=80,
        delivery_timeout_ms=1000,
        retry_backoff_ms=20,
        retry_backoff_max_ms=100,
    )
    try:
        futures = [producer.send("t", b"v0", key=b"k")]
        time.sleep(0.05)  # v0 is in flight alone (group 1); v1..v4 form later groups
        futures += [producer.send("t", f"v{i}".encode(), key=b"k") for i in range(1, 5)]
        deadline = time.monotonic() + 10
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        producer.close(timeout=5)
    counts = Counter(LEADER.log)
    assert not [v for v, n in counts.items() if n > 1], f"log: {LEADER.log}"
