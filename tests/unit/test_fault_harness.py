"""Pure pieces of the fault harness: value encoding, history reading, nemesis config."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.fault.harness.history import HistoryWriter, decode_value, encode_value, read_history
from tests.fault.harness.nemesis import ALL_KINDS, NemesisConfig


def test_values_name_their_send() -> None:
    assert decode_value(encode_value("p1", "k7", 42).encode()) == ("p1", "k7", 42)
    assert decode_value("p1:k7:42") == ("p1", "k7", 42)
    for foreign in (b"hello", b"a:b:c", b"a:b:1:2", b""):
        assert decode_value(foreign) is None


def test_history_skips_a_torn_last_line(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path / "h.jsonl")
    writer.write("ack", producer="p", key="k", seq=0, t=1.5)
    writer.write("note", what="x")
    writer.close()
    writer.write("ack", producer="late")  # after close: dropped, not a crash
    with open(tmp_path / "h.jsonl", "a") as handle:
        handle.write('{"type": "ack", "produ')  # a writer killed mid-line
    events = list(read_history(tmp_path / "h.jsonl"))
    assert [e["type"] for e in events] == ["ack", "note"]
    assert events[0]["t"] == 1.5 and isinstance(events[1]["t"], float)


def test_nemesis_config_rejects_what_it_cannot_do() -> None:
    assert set(NemesisConfig().kinds) == set(ALL_KINDS)
    with pytest.raises(ValueError, match="meteor"):
        NemesisConfig(kinds=("broker_kill", "meteor"))
    with pytest.raises(ValueError):
        NemesisConfig(lanes=0)
    with pytest.raises(ValueError):
        NemesisConfig(per_kind=0)
