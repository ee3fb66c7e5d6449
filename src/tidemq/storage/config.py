"""Configuration of one partition log: rolling, retention, indexing, durability.

The log itself never reads the clock and never decides *when* to fsync: the broker
applies ``fsync`` / ``fsync_interval_ms`` by calling :meth:`PartitionLog.sync`
(``always``: before acknowledging, with group commit; ``interval``: from a timer;
``never``: only at close). The policy lives here so that one object carries every
per-partition storage setting.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Index entries store positions and relative offsets as u32; a segment must stay
# addressable by them.
SEGMENT_BYTES_LIMIT = (1 << 31) - 1


class FsyncPolicy(enum.Enum):
    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


@dataclass(frozen=True)
class LogConfig:
    segment_bytes_max: int = 128 * 1024 * 1024
    segment_ms_max: int = 7 * 24 * 3600 * 1000
    retention_ms: int = 7 * 24 * 3600 * 1000  # -1 = keep forever
    retention_bytes: int = -1  # -1 = unlimited; per partition
    index_interval_bytes: int = 4096  # sparse index: one entry per this many bytes
    fsync: FsyncPolicy = FsyncPolicy.ALWAYS
    fsync_interval_ms: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.segment_bytes_max <= SEGMENT_BYTES_LIMIT:
            raise ValueError(f"segment_bytes_max must be in [1, {SEGMENT_BYTES_LIMIT}]")
        if self.segment_ms_max < 1:
            raise ValueError("segment_ms_max must be >= 1")
        if self.retention_ms < -1 or self.retention_bytes < -1:
            raise ValueError("retention_ms and retention_bytes must be >= -1")
        if self.index_interval_bytes < 0:
            raise ValueError("index_interval_bytes must be >= 0")
        if self.fsync_interval_ms < 0:
            raise ValueError("fsync_interval_ms must be >= 0")
