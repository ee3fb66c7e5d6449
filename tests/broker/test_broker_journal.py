"""The broker with its journal (storage/journal.py): acknowledged records survive a
power loss that took the segment files' unsynced bytes; checkpoints delete old
journal files; a clean shutdown leaves no journal behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry
from tests.broker.test_broker_api import _answer, batch, broker_client, produce, run

from tidemq.broker.partition import partition_directory_name
from tidemq.broker.server import Broker, BrokerConfig
from tidemq.storage import LogConfig
from tidemq.storage.journal import JOURNAL_DIRECTORY, journal_files
from tidemq.transport import HttpTransport
from tidemq.wire.batch import decode_records

TOPIC_ID = "0123456789abcdef0123456789abcdef"


def _start(data_dir: Path) -> Broker:
    config = BrokerConfig(1, data_dir, "http://127.0.0.1:1", "http://127.0.0.1:2", LogConfig())
    broker = Broker(config, lambda: HttpTransport(False, {}, 4, 1000), CollectorRegistry())
    broker.reconcile(_answer())
    return broker


def test_acknowledged_records_survive_losing_the_segments_unsynced_bytes(
    tmp_path: Path,
) -> None:
    live = tmp_path / "live"
    crashed = tmp_path / "crashed"
    partition_dir = partition_directory_name("orders", 0, TOPIC_ID)

    async def scenario() -> None:
        async with broker_client(live) as (broker, client):
            segments = list((live / partition_dir).glob("*.log"))
            synced_sizes = {p.name: p.stat().st_size for p in segments}  # fsynced at open
            for start in range(0, 9, 3):
                response = await produce(client, batch(3, start), acks="all")
                assert response.status == 200, await response.text()
            assert broker.replicas[("orders", 0)].high_watermark == 9
            # The power loss, taken while the broker runs: the segments lose what was
            # never fsynced (everything since open), the journal keeps its synced bytes.
            shutil.copytree(live, crashed)
            for name, size in synced_sizes.items():
                os.truncate(crashed / partition_dir / name, size)

    run(scenario)
    assert journal_files(crashed / JOURNAL_DIRECTORY), "the journal held the records"
    restarted = _start(crashed)
    try:
        log = restarted.replicas[("orders", 0)].log
        records = list(decode_records(log.read(0, 1 << 20)))
        assert [r.value for r in records] == [f"v{i}".encode() for i in range(9)]
        # replayed, fsynced into the segments, and the old journal files are gone
        assert len(journal_files(crashed / JOURNAL_DIRECTORY)) == 1
    finally:
        run(restarted.close)
    assert journal_files(crashed / JOURNAL_DIRECTORY) == []  # clean shutdown: none left


def test_a_checkpoint_fsyncs_the_logs_then_deletes_the_older_journal_files(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path) as (broker, client):
            assert (await produce(client, batch(4), acks="all")).status == 200
            journal_dir = tmp_path / JOURNAL_DIRECTORY
            before = journal_files(journal_dir)
            assert len(before) == 1 and before[0].stat().st_size > 0
            log = broker.replicas[("orders", 0)].log
            await broker.syncer.checkpoint()
            after = journal_files(journal_dir)
            assert before[0] not in after and len(after) == 1
            assert log.flushed_offset == 4
            assert (await produce(client, batch(2, 4), acks="all")).status == 200
            assert after[0].stat().st_size > 0  # appends go to the new file

    run(scenario)


def test_without_the_journal_each_log_is_fsynced(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with broker_client(tmp_path, journal=False) as (broker, client):
            assert broker.syncer.journal is None
            assert (await produce(client, batch(2), acks="all")).status == 200
            assert broker.replicas[("orders", 0)].log.flushed_offset == 2
            assert journal_files(tmp_path / JOURNAL_DIRECTORY) == []

    run(scenario)
