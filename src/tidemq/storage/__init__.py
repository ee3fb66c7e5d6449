"""The log on disk: segments, sparse indexes, checkpoints, recovery. No asyncio.

See log.py for the directory layout and invariants, segment.py and index.py for
the file formats, and docs/ARCHITECTURE_storage.md for the decisions.
"""

from tidemq.storage.config import FsyncPolicy, LogConfig
from tidemq.storage.epochs import LeaderEpochCache
from tidemq.storage.log import PartitionLog

__all__ = ["FsyncPolicy", "LeaderEpochCache", "LogConfig", "PartitionLog"]
