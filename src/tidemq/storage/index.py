"""The sparse offset index of one segment: a cache, never the truth.

On disk, ``<base_offset:020d>.index`` is a sequence of fixed 8-byte entries::

    relative_offset u32 big-endian   batch base_offset - segment base_offset
    position        u32 big-endian   byte position of that batch in the .log file

One entry is added when at least ``index_interval_bytes`` were appended since the
previous one (the first batch, at position 0, is implicit). Entries strictly
increase in both fields. The file is rewritten whole when its segment is rolled,
recovered, truncated or closed, without fsync: after a crash it may be missing,
short or garbage. ``decode`` rejects anything not strictly increasing or pointing
past the log file, and readers still check that the batch found at an entry's
position carries the expected base offset before using it (see segment.py).
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right

ENTRY = struct.Struct(">II")
ENTRY_SIZE = ENTRY.size  # 8
U32_MAX = (1 << 32) - 1


class SparseIndex:
    __slots__ = ("positions", "relative_offsets")

    def __init__(self) -> None:
        self.relative_offsets = array("I")
        self.positions = array("I")

    def __len__(self) -> int:
        return len(self.positions)

    def append(self, relative_offset: int, position: int) -> None:
        self.relative_offsets.append(relative_offset)
        self.positions.append(position)

    def lookup(self, relative_offset: int) -> tuple[int, int]:
        """The last entry at or below ``relative_offset``; (0, 0) if none."""
        slot = bisect_right(self.relative_offsets, relative_offset) - 1
        if slot < 0:
            return 0, 0
        return self.relative_offsets[slot], self.positions[slot]

    def truncate_to_position(self, position: int) -> None:
        """Drops entries at or beyond ``position`` (the log file was cut there)."""
        keep = bisect_right(self.positions, position - 1) if position > 0 else 0
        del self.relative_offsets[keep:]
        del self.positions[keep:]

    def encode(self) -> bytes:
        out = bytearray(len(self) * ENTRY_SIZE)
        for slot, (relative_offset, position) in enumerate(
            zip(self.relative_offsets, self.positions, strict=True)
        ):
            ENTRY.pack_into(out, slot * ENTRY_SIZE, relative_offset, position)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes, log_size_bytes: int) -> SparseIndex | None:
        """The index in ``data``, or None if it is not a plausible index of the log."""
        if len(data) % ENTRY_SIZE:
            return None
        index = cls()
        previous_offset = previous_position = -1
        for relative_offset, position in ENTRY.iter_unpack(data):
            if relative_offset <= previous_offset or position <= previous_position:
                return None
            if position >= log_size_bytes:
                return None
            index.append(relative_offset, position)
            previous_offset, previous_position = relative_offset, position
        return index
