"""Reads every broker's partition logs from disk after a run (all processes stopped).

For each broker data directory ``broker-<id>/`` and each partition directory in it
(``<topic>-<partition>`` or ``<topic>-<partition>-<topic_id>``), the segment files
``<base_offset>.log`` are read in order, batch by batch, each batch checked
(:func:`tidemq.wire.batch.check_batch`); the first batch that fails the check ends
that segment (a torn tail the broker would truncate at its next start). Nothing is
written: this is a post-mortem reader, not the storage engine.

Each record becomes a ``replica_record`` history event with the leader epoch its batch
was written under, which lets the checker find two brokers that accepted different
records at the same offset in the same epoch: two leaders at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fault.harness.history import decode_value
from tidemq.errors import CorruptBatch
from tidemq.wire.batch import check_batch, decode_records

_PARTITION_DIRECTORY = re.compile(r"^(?P<topic>.+)-(?P<partition>\d+)(?:-[0-9a-f]{32})?$")
_BROKER_DIRECTORY = re.compile(r"^broker-(?P<id>\d+)$")


def _segment_records(path: Path) -> Iterator[tuple[int, int, bytes | None]]:
    """(offset, leader_epoch, value) of every whole, valid batch of one segment file."""
    data = path.read_bytes()
    position = 0
    while position < len(data):
        try:
            header = check_batch(data, position)
        except CorruptBatch:
            return
        batch = data[position : position + header.size]
        for record in decode_records(batch):
            yield record.offset, header.leader_epoch, record.value
        position += header.size


def replica_records(cluster_root: Path, topics: set[str]) -> Iterator[dict[str, Any]]:
    """Every record of ``topics`` on every broker's disk, as history event fields."""
    for broker_directory in sorted(cluster_root.iterdir()):
        broker = _BROKER_DIRECTORY.match(broker_directory.name)
        if broker is None or not broker_directory.is_dir():
            continue
        for partition_directory in sorted(broker_directory.iterdir()):
            match = _PARTITION_DIRECTORY.match(partition_directory.name)
            if match is None or match["topic"] not in topics:
                continue
            segments = sorted(partition_directory.glob("*.log"), key=lambda p: int(p.stem))
            for segment in segments:
                for offset, epoch, value in _segment_records(segment):
                    decoded = decode_value(value or b"")
                    if decoded is None:
                        continue
                    yield {
                        "broker": int(broker["id"]),
                        "topic": match["topic"],
                        "partition": int(match["partition"]),
                        "offset": offset,
                        "epoch": epoch,
                        "producer": decoded[0],
                        "key": decoded[1],
                        "seq": decoded[2],
                    }
