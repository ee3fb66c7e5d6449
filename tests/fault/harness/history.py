"""The history file: one JSON object per line, appended by every actor of a fault run.

Event types (``t`` is wall-clock seconds, ``time.time()``, the same clock everywhere):

* ``{"type": "fault", "kind", "target", "phase": "start"|"end", "t", ...}`` nemesis
* ``{"type": "ack", "producer", "key", "seq", "topic", "partition", "offset", "t"}``
* ``{"type": "fail", "producer", "key", "seq", "topic", "error", "t"}`` (indeterminate:
  the record may or may not be in the log)
* ``{"type": "recv", "consumer", "topic", "partition", "offset", "producer", "key",
  "seq", "t"}`` a consumer received a record
* ``{"type": "final", "topic", "partition", "offset", "producer", "key", "seq"}`` one
  record of the final full read; ``{"type": "final_partition", "topic", "partition",
  "complete", "high_watermark"}`` closes each partition's read
* ``{"type": "note", ...}`` anything else worth keeping (ignored by the checker)

A message's value is ``"<producer>:<key>:<seq>"`` (:func:`encode_value`), so a
record read back names the send it came from.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


def encode_value(producer: str, key: str, seq: int) -> str:
    return f"{producer}:{key}:{seq}"


def decode_value(value: bytes | str) -> tuple[str, str, int] | None:
    """(producer, key, seq), or None for a record that is not ours."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    parts = text.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


class HistoryWriter:
    """Thread-safe appender; every write is one complete line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: TextIO | None = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event_type: str, **fields: Any) -> None:
        fields.setdefault("t", time.time())
        line = json.dumps({"type": event_type, **fields}, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_history(path: Path) -> Iterator[dict[str, Any]]:
    """Every event of a history file; a torn last line (a crashed writer) is skipped."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                yield event
