"""Idempotent produce on the broker: retried batches answered with their original
offsets, gaps and stale epochs rejected, state rebuilt from the log after a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from test_broker_api import BASE, BATCH_TYPE, broker_client, expect_error, produce, run

from tidemq.broker import idempotence
from tidemq.broker.idempotence import load_producer_state
from tidemq.broker.partition import PartitionReplica
from tidemq.core.producers import APPEND, Duplicate, rebuild
from tidemq.storage import LogConfig, PartitionLog
from tidemq.wire.batch import BatchBuilder, decode_records, patch_batch, read_header
from tidemq.wire.produce import PRODUCE_TYPE, encode_produce


def stamped(count: int, producer_id: int, epoch: int, sequence: int, tag: str = "v") -> bytes:
    builder = BatchBuilder(1000)
    for i in range(count):
        builder.append(b"k", f"{tag}{sequence + i}".encode(), 1000)
    return builder.build(producer_id, epoch, sequence)


async def offsets_of(response: Any) -> tuple[int, int, list[int]]:
    assert response.status == 200, await response.text()
    answer = await response.json()
    return answer["base_offset"], answer["last_offset"], answer["batch_base_offsets"]


async def stored_values(client: Any) -> list[bytes | None]:
    fetched = await client.get(
        BASE.format(0) + "/records", params={"offset": "0"}, headers={"Accept": BATCH_TYPE}
    )
    return [r.value for r in decode_records(await fetched.read())]


def test_a_retried_batch_is_answered_with_its_offsets_and_not_appended(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            first = stamped(3, 7, 0, 0)
            assert await offsets_of(await produce(client, first)) == (0, 2, [0])
            second = stamped(2, 7, 0, 3)
            assert await offsets_of(await produce(client, second)) == (3, 4, [3])
            # Another producer writes in between; then both retries arrive.
            assert await offsets_of(await produce(client, stamped(1, 8, 0, 0))) == (5, 5, [5])
            assert await offsets_of(await produce(client, first)) == (0, 2, [0])
            assert await offsets_of(await produce(client, second, acks="all")) == (3, 4, [3])
            replica = broker.replicas[("orders", 0)]
            assert replica.log.log_end_offset == 6
            # A request holding a retried batch and a new one appends only the new one.
            third = stamped(2, 7, 0, 5)
            answer = await offsets_of(await produce(client, second + third))
            assert answer == (3, 7, [3, 6])
            assert replica.log.log_end_offset == 8
            assert await stored_values(client) == [
                b"v0",
                b"v1",
                b"v2",
                b"v3",
                b"v4",
                b"v0",
                b"v5",
                b"v6",
            ]

    run(scenario)


def test_gaps_unknown_producers_and_stale_epochs_are_rejected(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            await offsets_of(await produce(client, stamped(2, 7, 1, 0)))
            replica = broker.replicas[("orders", 0)]
            await expect_error(
                await produce(client, stamped(1, 7, 1, 5)), 409, "out_of_order_sequence"
            )
            await expect_error(
                await produce(client, stamped(1, 9, 0, 4)), 409, "unknown_producer_id"
            )
            await expect_error(await produce(client, stamped(1, 7, 0, 2)), 409, "producer_fenced")
            # One bad batch rejects the whole request: nothing of it is appended.
            await expect_error(
                await produce(client, stamped(1, 7, 1, 2) + stamped(1, 7, 1, 9)),
                409,
                "out_of_order_sequence",
            )
            assert replica.log.log_end_offset == 2
            # A new epoch starts again at sequence 0.
            assert await offsets_of(await produce(client, stamped(1, 7, 2, 0))) == (2, 2, [2])
            # Batches without a producer id are not checked.
            plain = stamped(1, -1, -1, -1)
            await offsets_of(await produce(client, plain))
            await offsets_of(await produce(client, plain))
            assert replica.log.log_end_offset == 5

    run(scenario)


def test_the_multi_partition_produce_detects_duplicates_per_entry(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            body = encode_produce([("orders", 0, 1, stamped(2, 3, 0, 0))])
            headers = {"Content-Type": PRODUCE_TYPE}
            for _ in range(3):
                response = await client.post("/v1/produce", data=body, headers=headers)
                [result] = (await response.json())["results"]
                assert (result["base_offset"], result["last_offset"]) == (0, 1)
            assert broker.replicas[("orders", 0)].log.log_end_offset == 2

    run(scenario)


def test_producer_state_survives_a_broker_restart(tmp_path: Path) -> None:
    batches = [stamped(2, 7, 0, 2 * i) for i in range(4)]

    async def before() -> None:
        async with broker_client(tmp_path) as (_, client):
            for body in batches:
                await offsets_of(await produce(client, body))

    async def after() -> None:
        async with broker_client(tmp_path) as (broker, client):
            assert await offsets_of(await produce(client, batches[-1])) == (6, 7, [6])
            assert await offsets_of(await produce(client, batches[1])) == (2, 3, [2])
            await expect_error(
                await produce(client, stamped(1, 7, 0, 12)), 409, "out_of_order_sequence"
            )
            assert await offsets_of(await produce(client, stamped(1, 7, 0, 8))) == (8, 8, [8])
            assert broker.replicas[("orders", 0)].log.log_end_offset == 9

    run(before)
    run(after)


def test_a_retry_of_a_window_head_the_rebuilt_table_lost_is_a_duplicate(tmp_path: Path) -> None:
    """A table rebuilt from the last two segments may hold only the end of a producer's
    window. A retry of its head is answered as a duplicate at offset -1 (appended
    before, offsets no longer known), after the high watermark passed the remembered
    batches' start: neither appended again nor refused (which the client would take
    for "not appended", and renumber the rest: a review found them written twice)."""

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            window = [stamped(1, 7, 0, i) for i in range(3)]
            for body in window:
                await offsets_of(await produce(client, body))
            replica = broker.replicas[("orders", 0)]
            stored = [read_header(replica.log.read(offset, 1 << 16)) for offset in (1, 2)]
            replica.producers = rebuild(stored)  # what a rebuild of the tail saw
            for acks in ("1", "all"):
                answer = await offsets_of(await produce(client, window[0], acks=acks))
                assert answer == (-1, -1, [-1])
            assert await offsets_of(await produce(client, window[2])) == (2, 2, [2])
            both = await offsets_of(await produce(client, window[0] + window[1], acks="all"))
            assert both == (-1, 1, [-1, 1])
            assert replica.log.log_end_offset == 3
            assert await stored_values(client) == [b"v0", b"v1", b"v2"]

    run(scenario)


def test_rebuild_reads_the_last_two_segments(tmp_path: Path) -> None:
    """Producers whose batches all sit in older segments are forgotten (documented)."""
    config = LogConfig(segment_bytes_max=200)  # about two batches per segment
    log = PartitionLog.open(tmp_path / "p", config, 0)
    for producer_id in range(6):
        log.append(stamped(1, producer_id, 0, 0, tag="x" * 40), 0, 0)
    assert log.segment_count >= 3
    table = load_producer_state(log)
    kept = {pid for pid, _ in table.items()}
    assert 5 in kept and 0 not in kept
    log.close()


def test_a_request_that_overtook_an_earlier_one_waits_for_it(tmp_path: Path) -> None:
    """Requests of one producer travel on several connections: the later one waits
    (briefly) for the gap before it to fill, and both land in sequence order."""

    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            replica = broker.replicas[("orders", 0)]
            later = asyncio.ensure_future(produce(client, stamped(2, 7, 0, 2)))
            while not idempotence._appended.get(replica):  # the later one is waiting
                await asyncio.sleep(0.001)  # polling interval
            assert await offsets_of(await produce(client, stamped(2, 7, 0, 0))) == (0, 1, [0])
            assert await offsets_of(await later) == (2, 3, [2])
            # A gap that never fills is still rejected, after the short wait.
            started = asyncio.get_running_loop().time()
            await expect_error(
                await produce(client, stamped(1, 7, 0, 9)), 409, "out_of_order_sequence"
            )
            waited = asyncio.get_running_loop().time() - started
            assert idempotence.REORDER_WAIT_S <= waited < 5
            # A batch that is behind (an old retry no longer remembered) is not kept waiting.
            started = asyncio.get_running_loop().time()
            await expect_error(
                await produce(client, stamped(1, 7, 0, 1)), 409, "out_of_order_sequence"
            )
            assert asyncio.get_running_loop().time() - started < idempotence.REORDER_WAIT_S
            assert await stored_values(client) == [b"v0", b"v1", b"v2", b"v3"]

    run(scenario)


def test_a_follower_records_replicated_batches_and_forgets_truncated_ones(
    tmp_path: Path,
) -> None:
    """A follower's table follows its log: a new leader answers retries like the old."""

    async def scenario() -> None:
        replica = PartitionReplica.open(
            tmp_path, 2, ("orders", 0, "0" * 32), LogConfig(), 10_000, lambda *_: None, lambda: 0
        )
        body = bytearray()
        for i in range(3):  # as the leader stored them: offsets 0, 2, 4 in epoch 1
            batch = bytearray(stamped(2, 7, 0, 2 * i))
            patch_batch(batch, 0, 2 * i, 1)
            body += batch
        replica.append_replicated(bytes(body), 0)
        entry = replica.producers.entry(7)
        assert entry is not None and [b.base_offset for b in entry.batches] == [0, 2, 4]
        assert replica.producers.check(read_header(stamped(2, 7, 0, 2))) == Duplicate(2, 3)
        replica.truncate_to(4)  # diverged from the new leader after offset 3
        entry = replica.producers.entry(7)
        assert entry is not None and [b.base_offset for b in entry.batches] == [0, 2]
        assert replica.producers.check(read_header(stamped(2, 7, 0, 4))) == APPEND
        replica.close()

    run(scenario)
