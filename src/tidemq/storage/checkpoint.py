"""Small text checkpoints, written atomically, and directory fsync.

Files (one directory per partition replica)::

    recovery-point-checkpoint    "<offset>\\n"    every offset below it was fsynced
    log-start-offset-checkpoint  "<offset>\\n"    first offset still visible
    leader-epoch-checkpoint      "0\\n<count>\\n" then count lines "<epoch> <start_offset>\\n"

Atomicity: write ``<name>.tmp``, flush, fsync, ``os.replace`` over ``<name>``, fsync
the directory. A reader therefore sees the old or the new content, never a mix.
A missing or unparsable checkpoint reads as ``None``: callers fall back to the
safe choice (scan more, trust less); a checkpoint is never a reason to fail open.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

EPOCH_FILE_VERSION = 0
CHECKPOINT_BYTES_MAX = 1 << 20  # bound what we read back


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="ascii") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def _read_text(path: Path) -> str | None:
    try:
        with open(path, encoding="ascii") as file:
            return file.read(CHECKPOINT_BYTES_MAX)
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def read_offset(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def write_offset(path: Path, offset: int) -> None:
    write_atomically(path, f"{offset}\n")


def format_epochs(entries: Sequence[tuple[int, int]]) -> str:
    lines = [str(EPOCH_FILE_VERSION), str(len(entries))]
    lines.extend(f"{epoch} {start_offset}" for epoch, start_offset in entries)
    return "\n".join(lines) + "\n"


def parse_epochs(text: str) -> list[tuple[int, int]] | None:
    """The entries, or None unless the text is well formed and strictly increasing."""
    lines = text.split("\n")
    try:
        if int(lines[0]) != EPOCH_FILE_VERSION:
            return None
        count = int(lines[1])
        if count < 0 or len(lines) < count + 2:
            return None
        entries = []
        for line in lines[2 : 2 + count]:
            epoch_text, start_text = line.split(" ")
            entries.append((int(epoch_text), int(start_text)))
    except (ValueError, IndexError):
        return None
    for (epoch, start), (next_epoch, next_start) in itertools.pairwise(entries):
        if next_epoch <= epoch or next_start < start:
            return None
    if any(epoch < 0 or start < 0 for epoch, start in entries):
        return None
    return entries


def read_epochs(path: Path) -> list[tuple[int, int]] | None:
    text = _read_text(path)
    return None if text is None else parse_epochs(text)


def write_epochs(path: Path, entries: Sequence[tuple[int, int]]) -> None:
    write_atomically(path, format_epochs(entries))
