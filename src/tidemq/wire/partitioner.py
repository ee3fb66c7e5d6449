"""The stable key -> partition function, the same in every client and language.

``partition = crc32(key) mod partitions`` where crc32 is the IEEE CRC-32 of the
key's bytes (zlib.crc32, Java's java.util.zip.CRC32, Go's hash/crc32.ChecksumIEEE),
taken as an unsigned 32-bit integer. str keys are UTF-8 encoded first.
"""

from __future__ import annotations

import zlib


def partition_for_key(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions
