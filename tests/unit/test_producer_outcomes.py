"""The real Producer against a scripted leader that judges batches with the broker's
own ProducerStateTable and stores them in a real PartitionLog: what the producer
concludes from each answer (appended, not appended, unknown) must never write a
record twice, and no answer may stop the producer. Each test is a sequence an
adversarial review of the idempotent producer found broken.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.unit.producer_fakes import StaticMetadata, led_by, metadata_class

import tidemq.client.producer as producer_module
from tidemq.broker.idempotence import load_producer_state
from tidemq.client.metadata import PartitionInfo
from tidemq.client.sequencing import EPOCH_MAX
from tidemq.client.transport import UnrecognizedRefusal, error_from_response
from tidemq.core.producers import Append, Behind
from tidemq.errors import (
    BrokerBusy,
    ClientClosed,
    ConnectionFailed,
    InternalError,
    OutcomeUnknown,
    RequestTimedOut,
    RequestTooLarge,
    TideError,
    UnknownLeaderEpoch,
)
from tidemq.storage import LogConfig, PartitionLog
from tidemq.wire.batch import check_batches, decode_records
from tidemq.wire.produce import decode_produce

LEADER_URL = "https://leader"
ANSWER_DELAY_S = 0.05  # a lost answer is noticed a little after the append


class Leader:
    """One partition leader per partition number; ``first`` and ``resend`` script the
    answers to first attempts (POST /v1/produce) and to resends (…/records)."""

    def __init__(self, directory: Path, segment_bytes_max: int = 1 << 20) -> None:
        self.log = PartitionLog.open(directory, LogConfig(segment_bytes_max=segment_bytes_max), 0)
        self.table = load_producer_state(self.log)
        self.requests = 0
        self.first: Callable[[bytes], Any] = self.answer
        self.resend: Callable[[bytes], Any] = self.answer

    def append(self, body: bytes) -> list[int]:
        headers = check_batches(body)
        decisions = self.table.check_all(headers)
        offsets, position = [], 0
        for header, decision in zip(headers, decisions, strict=True):
            raw = body[position : position + header.size]
            position += header.size
            if isinstance(decision, Append):
                base, _ = self.log.append(raw, 0, 0)
                self.table.record(header, base)
                offsets.append(base)
            elif isinstance(decision, Behind):
                offsets.append(-1)
            else:
                offsets.append(decision.base_offset)
        return offsets

    def answer(self, body: bytes) -> dict[str, Any]:
        offsets = self.append(body)
        return {"base_offset": offsets[0], "batch_base_offsets": offsets}

    def refusing(self, value: bytes, error: TideError) -> Callable[[bytes], Any]:
        """Answers like ``answer``, but raises ``error`` for a body of just ``value``
        (refused before the append, or lost before the broker), appending nothing."""

        def script(body: bytes) -> Any:
            if [m.value for m in decode_records(body)] == [value]:
                raise error
            return self.answer(body)

        return script

    def lose_answer(self, body: bytes) -> dict[str, Any]:
        self.append(body)
        raise ConnectionFailed("connection reset after the append")

    def values(self) -> list[bytes | None]:
        values: list[bytes | None] = []
        offset = self.log.log_start_offset
        while offset < self.log.log_end_offset:  # a read stops at a segment's end
            data = self.log.read(offset, 1 << 20)
            values += [m.value for m in decode_records(data)]
            offset = check_batches(data)[-1].next_offset
        return values


LEADERS: dict[int, Leader] = {}
IDENTITIES: list[dict[str, int]] = []  # the coordinator's answers, in turn


class FakeTransport:
    def __init__(self, connection: object) -> None:
        pass

    async def coordinator(self, method: str, path: str, **_: Any) -> dict[str, int]:
        return IDENTITIES.pop(0) if IDENTITIES else {"producer_id": 7, "producer_epoch": 0}

    async def request_json(self, method: str, url: str, data: bytes = b"", **_: Any) -> Any:
        if url.endswith("/v1/produce"):
            results = []
            for entry in decode_produce(data):
                leader = LEADERS[entry.partition]
                leader.requests += 1
                await asyncio.sleep(ANSWER_DELAY_S)
                results.append(leader.first(bytes(entry.batches)))
            return {"results": results}
        partition = int(url.split("/partitions/")[1].split("/")[0])
        leader = LEADERS[partition]
        leader.requests += 1
        await asyncio.sleep(ANSWER_DELAY_S)
        return leader.resend(data)

    async def close(self) -> None:
        pass


@pytest.fixture
def leaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(producer_module, "Transport", FakeTransport)
    monkeypatch.setattr(
        producer_module, "MetadataCache", metadata_class("t", 2, led_by(LEADER_URL))
    )

    def make(partition: int, **kwargs: Any) -> Leader:
        LEADERS[partition] = Leader(tmp_path / f"t-{partition}", **kwargs)
        return LEADERS[partition]

    yield make
    for leader in LEADERS.values():
        leader.log.close()
    LEADERS.clear()
    IDENTITIES.clear()


def producer(**options: Any) -> Any:
    return producer_module.Producer(
        bootstrap="https://coordinator",
        linger_ms=0,
        batch_size=80,  # one record per batch
        retry_backoff_ms=20,
        retry_backoff_max_ms=50,
        **options,
    )


def send_in_separate_groups(client: Any, leader: Leader, values: list[bytes]) -> list[Any]:
    """Each value in its own request: the next is sent once the leader saw the last."""
    futures = []
    for value in values:
        seen = leader.requests
        futures.append(client.send("t", value, partition=0))
        deadline = time.monotonic() + 5
        while leader.requests == seen:
            assert time.monotonic() < deadline, "the producer sent nothing"
            time.sleep(0.005)
    return futures


def settle(futures: list[Any], timeout_s: float = 15) -> list[Any]:
    """Each future's outcome: its RecordMetadata or its error."""
    deadline = time.monotonic() + timeout_s
    outcomes = []
    for future in futures:
        error = future.exception(timeout=max(0.0, deadline - time.monotonic()))
        outcomes.append(error if error is not None else future.result())
    return outcomes


def unknown_because(outcome: Any, cause: type[TideError]) -> bool:
    """A record an attempt may have appended fails with OutcomeUnknown, the last
    error as its cause."""
    return isinstance(outcome, OutcomeUnknown) and isinstance(outcome.__cause__, cause)


def written_twice(leader: Leader) -> list[bytes | None]:
    return [value for value, n in Counter(leader.values()).items() if n > 1]


@pytest.mark.parametrize(
    ("refusal", "options"),
    [
        (BrokerBusy, {"retries": 0}),  # the one resend is refused
        (UnknownLeaderEpoch, {"delivery_timeout_ms": 1000}),  # refused until the deadline
    ],
)
def test_a_group_refused_after_an_unknown_attempt_leaves_the_later_ones_in_sequence(
    leaders: Any, refusal: type[TideError], options: dict[str, Any]
) -> None:
    """v0 and v1 are appended and their answers lost; every resend of v0 is refused
    before the append. v0 may be in the log (it is): giving it up as "not appended"
    renumbered v1 in a new epoch and wrote it twice. With an unknown outcome v1 fails
    with v0's error (it may be in the log too), and the next send continues the
    sequence. Both fail with outcome_unknown (the refusal is its cause): the refusal
    alone says "not written", and an application would send them again."""
    leader = leaders(0)
    leader.first = leader.lose_answer

    leader.resend = leader.refusing(b"v0", refusal("refused before the append"))
    client = producer(**options)
    try:
        futures = send_in_separate_groups(client, leader, [b"v0", b"v1"])
        v0, v1 = settle(futures)
        [v2] = settle([client.send("t", b"v2", partition=0)])
    finally:
        client.close(timeout=5)
    for outcome in (v0, v1):
        assert isinstance(outcome, OutcomeUnknown), outcome
        assert isinstance(outcome.__cause__, refusal), outcome.__cause__
    assert not isinstance(v2, TideError) and v2.offset == 2
    assert leader.values() == [b"v0", b"v1", b"v2"]


def test_a_resend_after_the_leader_rebuilt_its_producer_table_writes_nothing_twice(
    leaders: Any,
) -> None:
    """Three records, each its own batch and segment, appended with their answers lost;
    the leader restarts and rebuilds its table from the last two segments, so it knows
    v1 and v2 but not v0. The resend of v0 was refused as out of order, taken for "not
    appended", and v1 and v2 were renumbered and written again."""
    leader = leaders(0, segment_bytes_max=100)
    leader.first = leader.lose_answer
    rebuilt = False

    def after_a_restart(body: bytes) -> Any:
        nonlocal rebuilt
        if not rebuilt:
            leader.table = load_producer_state(leader.log)
            rebuilt = True
        return leader.answer(body)

    leader.resend = after_a_restart
    client = producer()
    try:
        futures = send_in_separate_groups(client, leader, [b"v0", b"v1", b"v2"])
        outcomes = settle(futures)
    finally:
        client.close(timeout=5)
    assert leader.log.segment_count >= 3 and rebuilt
    assert not any(isinstance(outcome, TideError) for outcome in outcomes), outcomes
    assert [outcome.offset for outcome in outcomes] == [-1, 1, 2]  # v0: appended, offset lost
    assert leader.values() == [b"v0", b"v1", b"v2"]
    assert not written_twice(leader)


@pytest.mark.parametrize("attempt", ["first", "resend"])
def test_a_malformed_answer_fails_its_records_not_the_producer(leaders: Any, attempt: str) -> None:
    """A well-formed JSON answer with a null offset stopped the producer's sender: on a
    first attempt outside its error handling, on a resend by giving up twice."""
    leader, other = leaders(0), leaders(1)
    malformed = {"base_offset": 0, "batch_base_offsets": [None]}

    def answer_malformed(body: bytes) -> Any:
        leader.append(body)
        return malformed

    if attempt == "resend":
        leader.first = leader.lose_answer  # both groups go to recovery
    else:
        leader.first = answer_malformed
    leader.resend = answer_malformed
    client = producer(delivery_timeout_ms=1000)
    try:
        futures = send_in_separate_groups(client, leader, [b"v0", b"v1"])
        outcomes = settle(futures)
        assert all(unknown_because(outcome, InternalError) for outcome in outcomes), outcomes
        assert not client._main.done(), "the sender stopped"
        [unrelated] = settle([client.send("t", b"x", partition=1)])
    finally:
        client.close(timeout=5)
    assert not isinstance(unrelated, TideError) and unrelated.offset == 0
    assert other.values() == [b"x"]
    assert leader.values() == [b"v0", b"v1"]


def test_a_partition_that_used_up_its_producer_epochs_goes_on_under_a_new_producer_id(
    leaders: Any,
) -> None:
    """The epoch is an i16: the reset after a refused batch at epoch 32,767 overflowed
    in the sender, which stopped, and every later send hung."""
    IDENTITIES[:] = [{"producer_id": 7, "producer_epoch": EPOCH_MAX}]
    IDENTITIES.append({"producer_id": 8, "producer_epoch": 0})
    leader = leaders(0)

    leader.first = leader.resend = leader.refusing(b"v0", RequestTooLarge("too large"))
    client = producer()
    try:
        [v0] = settle([client.send("t", b"v0", partition=0)])
        [v1] = settle([client.send("t", b"v1", partition=0)])
    finally:
        client.close(timeout=5)
    assert isinstance(v0, RequestTooLarge)
    assert not isinstance(v1, TideError) and v1.offset == 0
    assert leader.values() == [b"v1"]
    assert [(pid, entry.epoch) for pid, entry in leader.table.items()] == [(8, 0)]


def test_the_send_after_one_given_up_unknown_is_written_although_it_meets_a_gap(
    leaders: Any,
) -> None:
    """Every request for v0 is lost before the broker; v0 fails with a timeout (an
    unknown outcome), so the sequence goes on. v1, sent alone afterwards, met the gap
    v0 left (out_of_order_sequence) and failed for good, though it never reached the
    log: it is resent in a new epoch instead."""
    leader = leaders(0)

    leader.first = leader.resend = leader.refusing(b"v0", RequestTimedOut("no answer"))
    client = producer(delivery_timeout_ms=500)
    try:
        outcomes = [settle([client.send("t", value, partition=0)])[0] for value in (b"a", b"v0")]
        outcomes += [settle([client.send("t", value, partition=0)])[0] for value in (b"v1", b"v2")]
    finally:
        client.close(timeout=5)
    a, v0, v1, v2 = outcomes
    assert unknown_because(v0, RequestTimedOut)
    assert [getattr(outcome, "offset", outcome) for outcome in (a, v1, v2)] == [0, 1, 2]
    assert leader.values() == [b"a", b"v1", b"v2"]


@pytest.mark.parametrize(
    ("attempt", "answer"),
    [
        ("resend", {}),  # a 2xx with an empty body: request_json returns {}
        ("resend", {"base_offset": None}),
        ("first", {"base_offset": -7}),
    ],
    ids=["resend-empty-body", "resend-null-offset", "first-negative-offset"],
)
def test_an_answer_that_places_no_batch_is_not_taken_for_a_write(
    leaders: Any, attempt: str, answer: dict[str, Any]
) -> None:
    """A 2xx answer with no usable offset was taken for success at offset -1 although
    nothing said the batch was written (here it was not): for an idempotent producer
    the outcome is unknown and the batch is resent (a duplicate would get its offsets)."""
    leader = leaders(0)
    malformed_once = [True]

    def malformed(body: bytes) -> Any:
        if malformed_once[0]:
            malformed_once[0] = False
            return answer  # nothing appended
        return leader.answer(body)

    def lost_before_the_broker(body: bytes) -> Any:
        raise ConnectionFailed("connection refused")

    if attempt == "first":
        leader.first = malformed
    else:
        leader.first = lost_before_the_broker
        leader.resend = malformed
    client = producer(delivery_timeout_ms=2000)
    try:
        [v0] = settle([client.send("t", b"v0", partition=0)])
    finally:
        client.close(timeout=5)
    assert not isinstance(v0, TideError), v0
    assert (v0.offset, leader.values()) == (0, [b"v0"])


@pytest.mark.parametrize("where", ["first-identity", "after-epochs-used-up"])
def test_an_out_of_range_producer_epoch_from_the_coordinator_does_not_stop_the_producer(
    leaders: Any, where: str
) -> None:
    """The coordinator's producer_epoch was taken as is: one past the batch header's
    i16 (40,000) made sealing a batch raise in the sender loop, which stopped, and
    every later send hung. Now it is a malformed answer: at the first identity the
    producer sends without idempotence; for a new producer id the held records fail."""
    leader = leaders(0)
    if where == "first-identity":
        IDENTITIES[:] = [{"producer_id": 7, "producer_epoch": 40_000}]
    else:
        IDENTITIES[:] = [
            {"producer_id": 7, "producer_epoch": EPOCH_MAX},
            {"producer_id": 8, "producer_epoch": 40_000},
        ]
        leader.first = leader.resend = leader.refusing(b"v0", RequestTooLarge("too large"))
    client = producer(delivery_timeout_ms=2000)
    try:
        if where != "first-identity":
            [v0] = settle([client.send("t", b"v0", partition=0)])
            assert isinstance(v0, RequestTooLarge), v0
        [v1] = settle([client.send("t", b"v1", partition=0)], timeout_s=5)
        assert not client._main.done(), "the sender stopped"
    finally:
        client.close(timeout=2)
    assert not isinstance(v1, TideError), v1
    assert leader.values()[-1] == b"v1"


def test_a_late_request_of_a_record_given_up_unknown_is_fenced_by_the_new_epoch(
    leaders: Any,
) -> None:
    """a is written; every request for v0 is held up in the network (the client times
    out; the bytes reach the leader later). v0 fails unknown, v1 meets the gap and is
    resent in a new epoch. The late v0 is then fenced: it can never land after v1."""
    leader = leaders(0)
    delayed: list[bytes] = []

    def hold_up_v0(body: bytes) -> Any:
        if [m.value for m in decode_records(body)] == [b"v0"]:
            delayed.append(body)
            raise RequestTimedOut("no answer (the request is still on its way)")
        return leader.answer(body)

    leader.first = leader.resend = hold_up_v0
    client = producer(delivery_timeout_ms=500)
    try:
        a, v0, v1 = [settle([client.send("t", v, partition=0)])[0] for v in (b"a", b"v0", b"v1")]
    finally:
        client.close(timeout=5)
    assert unknown_because(v0, RequestTimedOut) and not isinstance(v1, TideError), (v0, v1)
    assert not isinstance(a, TideError) and delayed
    with pytest.raises(TideError):  # producer_fenced
        leader.answer(delayed[0])
    assert leader.values() == [b"a", b"v1"]


def test_close_cancelling_an_in_flight_first_attempt_reports_unknown_not_closed(
    leaders: Any, monkeypatch: Any
) -> None:
    """v0's first request reaches the leader and is appended; its answer is slow. The
    application closes with a short timeout: after 5 s the loop is stopped, the
    in-flight _deliver_to_leader is cancelled and v0 fails with ClientClosed ("the
    producer closed before delivery"), although v0 is in the log."""
    leader: Leader = leaders(0)
    appended: list[Any] = []

    class HangingTransport(FakeTransport):
        async def request_json(self, method: str, url: str, data: bytes = b"", **_: Any) -> Any:
            if url.endswith("/v1/produce"):
                for entry in decode_produce(data):
                    appended.append(leader.append(bytes(entry.batches)))
                await asyncio.sleep(3600)  # the answer never comes back in time
            return await super().request_json(method, url, data=data)

    monkeypatch.setattr(producer_module, "Transport", HangingTransport)
    client = producer()
    future = client.send("t", b"v0", partition=0)
    deadline = time.monotonic() + 5
    while not appended:
        assert time.monotonic() < deadline, "nothing sent"
        time.sleep(0.005)
    client.close(timeout=0.1)
    [v0] = settle([future], timeout_s=10)
    assert leader.values() == [b"v0"]
    assert isinstance(v0, OutcomeUnknown), repr(v0)


def test_a_written_record_whose_resends_time_out_fails_as_unknown(leaders: Any) -> None:
    """v0 is appended, its answer lost; the one resend times out: v0 fails with
    RequestTimedOut, an error 'of another type', which OutcomeUnknown's contract says
    means 'not written'. It is in the log."""
    leader: Leader = leaders(0)
    leader.first = leader.lose_answer

    def time_out(body: bytes) -> Any:
        raise RequestTimedOut("no answer")

    leader.resend = time_out
    client = producer(retries=0)
    try:
        [v0] = settle([client.send("t", b"v0", partition=0)])
    finally:
        client.close(timeout=5)
    assert leader.values() == [b"v0"]
    assert isinstance(v0, OutcomeUnknown), repr(v0)


def test_close_during_a_leader_lookup_fails_the_unsent_record_as_closed(
    leaders: Any, monkeypatch: Any
) -> None:
    """The coordinator is unreachable when a drained group looks up its leader
    (metadata invalidated). close() cancels _deliver_grouped inside the lookup: no
    handler failed the group and its future never completed. Nothing was sent, so
    it fails with ClientClosed."""
    leaders(0)
    looking = []

    class SlowMetadata(StaticMetadata):
        async def leader(self, topic: str, partition: int) -> PartitionInfo:
            looking.append(partition)
            await asyncio.sleep(3600)  # the coordinator does not answer
            raise AssertionError

    monkeypatch.setattr(
        producer_module, "MetadataCache", lambda *_: SlowMetadata("t", 2, led_by(LEADER_URL))
    )
    client = producer()
    future = client.send("t", b"v0", partition=0)
    deadline = time.monotonic() + 5
    while not looking:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    client.close(timeout=0.1)
    [v0] = settle([future], timeout_s=10)
    assert isinstance(v0, ClientClosed), repr(v0)


def _close_with_a_partition_waiting_to_recover(leaders: Any, monkeypatch: Any) -> list[str]:
    """One run of the scenario below; the names of the records that never completed."""
    l0, l1 = leaders(0), leaders(1)
    requests: list[list[int]] = []

    class Script(FakeTransport):
        async def request_json(self, method: str, url: str, data: bytes = b"", **_: Any) -> Any:
            entries = list(decode_produce(data))
            requests.append([entry.partition for entry in entries])
            for entry in entries:
                (l0, l1)[entry.partition].append(bytes(entry.batches))
            if len(requests) == 2:  # g1: appended, answer lost
                await asyncio.sleep(0.3)
                raise ConnectionFailed("answer lost")
            await asyncio.sleep(3600)  # x, and then g2 + h: no answer

    monkeypatch.setattr(producer_module, "Transport", Script)
    client = producer_module.Producer(
        bootstrap="https://coordinator", linger_ms=100, retry_backoff_ms=20,
        retry_backoff_max_ms=50,
    )  # fmt: skip
    x = client.send("t", b"x", partition=1)
    while not requests:
        time.sleep(0.005)
    g1 = client.send("t", b"g1", partition=0)
    while len(requests) < 2:
        time.sleep(0.005)
    g2 = client.send("t", b"g2", partition=0)
    h = client.send("t", b"h", partition=1)
    time.sleep(0.6)
    assert requests == [[1], [0], [0, 1]], requests
    client.close(timeout=0.1)
    hung = []
    for name, future in zip(("x", "g1", "g2", "h"), (x, g1, g2, h), strict=True):
        if not future._batch.wait(2):
            hung.append(name)
        else:
            assert isinstance(future.exception(), OutcomeUnknown), (name, future.exception())
    for leader in (l0, l1):
        leader.log.close()
    return hung


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_close_cancelling_a_request_while_its_partition_waits_to_recover_fails_every_record(
    leaders: Any, monkeypatch: Any
) -> None:
    """x (tp1) is in flight for ever; g1 (tp0) is appended and its answer lost, so tp0
    waits to recover until its in-flight g2 settles. g2 (tp0) and h (tp1) share one
    multi-partition request (in that order) whose answer never comes. close() cancels
    it: the handler gave up g2 -> _settle -> _maybe_recover -> TaskGroup.create_task,
    which raised RuntimeError("TaskGroup ... is shutting down") whenever the main
    task's cancellation ran first (about one run in two: the order of
    asyncio.all_tasks), the loop over the request's items stopped and h never
    completed. Every record may be in the log: each fails with OutcomeUnknown.
    Repeated to catch both orders."""
    hangs = [
        (run, name)
        for run in range(6)
        for name in _close_with_a_partition_waiting_to_recover(leaders, monkeypatch)
    ]
    assert not hangs, f"records never completed after close(): {hangs}"


def test_a_refusal_whose_code_the_client_does_not_know_is_an_unknown_outcome(
    leaders: Any,
) -> None:
    """v0 is appended and answered with a 4xx whose code this client does not know (a
    newer broker, a proxy's page); v1's answer is lost after its append. Such a 4xx was
    taken for "refused before the append": v0 failed as not written and the held v1
    was renumbered in a new epoch and written twice. Now v0's outcome is unknown."""
    leader = leaders(0)
    unknown_4xx = error_from_response(400, b'{"error": {"code": "new_in_v9", "message": "x"}}')

    def script(body: bytes) -> Any:
        if [m.value for m in decode_records(body)] == [b"v0"]:
            leader.append(body)  # a resend is a duplicate: appended once
            raise unknown_4xx
        return leader.lose_answer(body)

    leader.first = script
    leader.resend = lambda body: script(body) if b"v0" in body else leader.answer(body)
    client = producer(retries=1)
    try:
        futures = send_in_separate_groups(client, leader, [b"v0", b"v1"])
        v0, v1 = settle(futures)
        [v2] = settle([client.send("t", b"v2", partition=0)])
    finally:
        client.close(timeout=5)
    assert unknown_because(v0, UnrecognizedRefusal), v0
    assert not written_twice(leader), leader.values()
    assert leader.values() == [b"v0", b"v1", b"v2"]
    assert not isinstance(v2, TideError) and v2.offset == 2
    assert isinstance(v1, OutcomeUnknown) or v1.offset == 1


# -- found by the fourth review of the in-turn sends (helper-71) ---------------------


def test_unknown_producer_id_after_a_lost_first_attempt_does_not_write_it_twice(
    leaders: Any,
) -> None:
    """v0 is the producer's first batch on the partition (sequence 0) and every request
    for it is held up in the network (the client times out; the bytes arrive later):
    v0 fails OutcomeUnknown and v1 goes on at sequence 1. v1's first request is held up
    too (maybe appended). Its resend meets unknown_producer_id (v0 not there yet): the
    client starts a new epoch although v1 may land, renumbers v1 to sequence 0 and
    resends it; the late v0 and v1 reach the leader first (no entry for the producer:
    v0 at sequence 0 is appended, then v1 at 1), then v1 of the new epoch: v1 twice."""
    leader = leaders(0)
    delayed: list[bytes] = []
    held_v1 = [False]

    def network(body: bytes) -> Any:
        values = [m.value for m in decode_records(body)]
        if values == [b"v0"] or (values == [b"v1"] and not held_v1[0]):
            held_v1[0] = held_v1[0] or values == [b"v1"]
            delayed.append(body)
            raise RequestTimedOut("no answer (the request is still on its way)")
        if values == [b"v1"] and check_batches(body)[0].producer_epoch > 0:
            for late in delayed:  # the held-up requests arrive before the new epoch
                try:
                    leader.answer(late)
                except TideError:
                    pass
            delayed.clear()
        return leader.answer(body)

    leader.first = leader.resend = network
    client = producer(delivery_timeout_ms=500)
    try:
        v0, v1 = [settle([client.send("t", v, partition=0)])[0] for v in (b"v0", b"v1")]
    finally:
        client.close(timeout=5)
    assert written_twice(leader) == [], (leader.values(), v0, v1)


def test_a_never_sent_group_resent_after_an_unknown_give_up_is_not_written_twice(
    leaders: Any, monkeypatch: Any
) -> None:
    """da67271's path: v0 (sequence 0, the producer's first batch here) is held up in
    the network on every request; v1, drained meanwhile, finds no leader (never sent,
    so no longer held when v0 is given up unknown). v1's first resend is held up too,
    its second meets unknown_producer_id: a new epoch, v1 renumbered and resent after
    the late requests arrived - v1 twice. On c422fda v1 failed OutcomeUnknown with v0."""
    import time

    import tidemq.client.producer as producer_module
    from tidemq.client.metadata import PartitionInfo

    leader = leaders(0)
    lookups = [0]

    class Metadata:
        def __init__(self, *_: Any) -> None:
            self.partition_counts = {"t": 2}

        def cached(self, name: str) -> Any:
            from tidemq.client.metadata import TopicInfo

            return TopicInfo(name, (PartitionInfo(0, "https://leader", 0),) * 2, 0.0)

        async def topic(self, name: str) -> Any:
            return self.cached(name)

        async def leader(self, topic: str, partition: int) -> PartitionInfo:
            lookups[0] += 1
            return PartitionInfo(partition, None if lookups[0] == 2 else "https://leader", 0)

        def invalidate(self, topic: str) -> None:
            pass

    monkeypatch.setattr(producer_module, "MetadataCache", Metadata)
    delayed: list[bytes] = []
    v1_attempts = [0]

    def network(body: bytes) -> Any:
        values = [m.value for m in decode_records(body)]
        if values == [b"v1"]:
            v1_attempts[0] += 1
            if check_batches(body)[0].producer_epoch > 0:
                for late in delayed:  # the held-up requests arrive before the new epoch
                    try:
                        leader.answer(late)
                    except TideError:
                        pass
                delayed.clear()
        if values == [b"v0"] or (values == [b"v1"] and v1_attempts[0] == 1):
            delayed.append(body)
            raise RequestTimedOut("no answer (the request is still on its way)")
        return leader.answer(body)

    leader.first = leader.resend = network
    client = producer(retries=1)
    try:
        f0 = client.send("t", b"v0", partition=0)
        time.sleep(0.01)
        f1 = client.send("t", b"v1", partition=0)
        v0, v1 = settle([f0, f1])
    finally:
        client.close(timeout=5)
    assert written_twice(leader) == [], (leader.values(), v0, v1, lookups)


def test_a_group_whose_resend_lookups_fail_is_not_reported_maybe_written() -> None:
    """t/0 has no leader for the whole delivery timeout (a failover): the first
    lookup's Unavailable leaves v0 unsent (da67271), but each resend's lookup failure
    goes through _resend's `except TideError`, which marks v0 maybe appended although
    no request carried it: v0 fails OutcomeUnknown."""
    from tests.unit.producer_fakes import InstantBroker, StaticMetadata, fake_producer, led_by

    from tidemq.errors import OutcomeUnknown, Unavailable

    class NoLeader(StaticMetadata):
        async def leader(self, topic: str, partition: int) -> Any:
            raise Unavailable(f"{topic}/{partition} has no leader right now")

    broker = InstantBroker()
    client = fake_producer(
        broker,
        NoLeader("t", 1, led_by("https://leader")),
        linger_ms=0,
        retries=2,
        retry_backoff_ms=1,
        retry_backoff_max_ms=2,
    )
    try:
        error = client.send("t", b"v0", partition=0).exception(5)
    finally:
        client.close(timeout=2)
    assert broker.requests == 0 and error is not None
    assert not isinstance(error, OutcomeUnknown), f"never-sent v0 reported {error!r}"
