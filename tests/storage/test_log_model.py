"""Property test: PartitionLog against a list-of-batches model.

Random appends (leader and follower paths), reads at random offsets, syncs, rolls
(tiny segments), retention by bytes, truncation, clean and crash reopen. After every
step: offsets are dense, log start/end match the model, and the epoch cache is
exactly what the surviving batches say.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from storage_helpers import START_MS, batch_of, open_log, read_all

from tidemq.storage import PartitionLog
from tidemq.wire.batch import decode_records, iter_headers, patch_batch

CONFIG = {"segment_bytes_max": 400, "index_interval_bytes": 90, "retention_ms": -1}
values_strategy = st.lists(st.binary(min_size=0, max_size=60), min_size=1, max_size=4)


class LogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="tidemq-model-"))
        self.directory = self.root / "partition-0"
        self.retention_bytes = -1
        self.log = self._open()
        self.batches: list[tuple[int, int, list[bytes]]] = []  # (base, epoch, values)
        self.epoch = 0
        self.now_ms = START_MS

    def _open(self) -> PartitionLog:
        return open_log(self.directory, START_MS, retention_bytes=self.retention_bytes, **CONFIG)

    @property
    def model_end(self) -> int:
        if not self.batches:
            return self.log.log_start_offset
        base, _, values = self.batches[-1]
        return base + len(values)

    def model_records(self, start_offset: int) -> list[tuple[int, bytes]]:
        return [
            (base + index, value)
            for base, _, values in self.batches
            for index, value in enumerate(values)
            if base + index >= start_offset
        ]

    @rule(batches=st.lists(values_strategy, min_size=1, max_size=3), bump=st.booleans())
    def append(self, batches: list[list[bytes]], bump: bool) -> None:
        self.epoch += bump
        self.now_ms += 1
        body = b"".join(batch_of(values, self.now_ms) for values in batches)
        first, last = self.log.append(body, self.epoch, self.now_ms)
        assert first == self.model_end
        for values in batches:
            self.batches.append((self.model_end, self.epoch, values))
        assert last == self.model_end - 1

    @rule(values=values_strategy, bump=st.booleans())
    def append_replicated(self, values: list[bytes], bump: bool) -> None:
        self.epoch += bump
        body = bytearray(batch_of(values, self.now_ms))
        patch_batch(body, 0, self.model_end, self.epoch)
        first, _ = self.log.append_replicated(body, self.now_ms)
        assert first == self.model_end
        self.batches.append((first, self.epoch, values))

    @rule(data=st.data(), max_bytes=st.integers(0, 1500))
    def read(self, data: st.DataObject, max_bytes: int) -> None:
        start = self.log.log_start_offset
        offset = data.draw(st.integers(start, self.model_end), label="offset")
        chunk = self.log.read(offset, max_bytes)
        if offset == self.model_end:
            assert chunk == b""
            return
        headers = list(iter_headers(chunk))
        assert sum(header.size for header in headers) == len(chunk)
        assert headers[0].base_offset <= offset < headers[0].next_offset
        assert len(chunk) <= max_bytes or len(headers) == 1
        got = [(record.offset, record.value) for record in decode_records(chunk, offset)]
        assert got == self.model_records(offset)[: len(got)]

    @rule()
    def sync(self) -> None:
        assert self.log.sync() == self.model_end
        assert self.log.flushed_offset == self.model_end

    @rule(retention_bytes=st.integers(0, 1200))
    def retention_by_bytes(self, retention_bytes: int) -> None:
        self.log.close()
        self.retention_bytes = retention_bytes
        self.log = self._open()
        size_before = self.log.size_bytes
        deleted = self.log.apply_retention(self.now_ms)
        start = self.log.log_start_offset
        self.batches = [batch for batch in self.batches if batch[0] >= start]
        assert deleted == 0 or self.log.size_bytes >= retention_bytes
        oldest_bytes = self.log._segments[0].size_bytes
        assert self.log.segment_count == 1 or self.log.size_bytes - oldest_bytes < retention_bytes
        assert self.log.size_bytes <= size_before

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(self.log.log_start_offset, self.model_end))
        self.log.truncate_to(offset)
        self.batches = [batch for batch in self.batches if batch[0] + len(batch[2]) <= offset]

    @rule(clean=st.booleans())
    def reopen(self, clean: bool) -> None:
        if clean:
            self.log.close()
        else:  # a process crash: the page cache survives, the clean marker is not written
            for segment in self.log._segments:
                segment.close()
        self.log = self._open()

    @invariant()
    def matches_model(self) -> None:
        assert self.log.log_end_offset == self.model_end
        assert self.log.log_start_offset <= self.log.log_end_offset
        assert self.log.flushed_offset <= self.log.log_end_offset
        expected_epochs: list[tuple[int, int]] = []
        for base, epoch, _ in self.batches:
            if not expected_epochs or epoch > expected_epochs[-1][0]:
                expected_epochs.append((epoch, base))
        assert self.log.epoch_entries() == expected_epochs

    def teardown(self) -> None:
        assert read_all(self.log) == self.model_records(self.log.log_start_offset)
        self.log.close()
        shutil.rmtree(self.root)


LogMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLogModel = LogMachine.TestCase
