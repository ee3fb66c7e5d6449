"""The pure parts: leader-epoch cache, sparse index, checkpoint parsing."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tidemq.storage.checkpoint import (
    format_epochs,
    parse_epochs,
    read_epochs,
    read_offset,
    write_epochs,
    write_offset,
)
from tidemq.storage.epochs import LeaderEpochCache
from tidemq.storage.index import SparseIndex


def test_epoch_cache_kafka_semantics() -> None:
    cache = LeaderEpochCache([(1, 0), (3, 10), (5, 20)])
    assert cache.latest_epoch() == 5
    assert cache.epoch_and_end_offset(0, 30) == (0, 0)  # older than all: first start
    assert cache.epoch_and_end_offset(1, 30) == (1, 10)
    assert cache.epoch_and_end_offset(2, 30) == (1, 10)
    assert cache.epoch_and_end_offset(4, 30) == (3, 20)
    assert cache.epoch_and_end_offset(5, 30) == (5, 30)
    assert cache.epoch_and_end_offset(6, 30) == (5, 30)  # newer than all: ends at log end
    assert not cache.assign(4, 25)  # not newer than latest
    assert cache.assign(7, 15)  # replaces entries starting at or after 15
    assert cache.entries() == [(1, 0), (3, 10), (7, 15)]
    assert cache.truncate_from_end(10)
    assert cache.entries() == [(1, 0)]
    cache = LeaderEpochCache([(1, 0), (3, 10), (5, 20)])
    assert cache.truncate_from_start(12)
    assert cache.entries() == [(3, 12), (5, 20)]
    assert not cache.truncate_from_start(12)
    assert cache.truncate_from_start(20)
    assert cache.entries() == [(5, 20)]


def test_index_lookup_and_truncate() -> None:
    index = SparseIndex()
    for relative_offset, position in ((5, 100), (9, 250), (20, 700)):
        index.append(relative_offset, position)
    assert index.lookup(0) == (0, 0)
    assert index.lookup(-3) == (0, 0)
    assert index.lookup(9) == (9, 250)
    assert index.lookup(19) == (9, 250)
    assert index.lookup(10**6) == (20, 700)
    decoded = SparseIndex.decode(index.encode(), log_size_bytes=701)
    assert decoded is not None and decoded.lookup(12) == (9, 250)
    assert SparseIndex.decode(index.encode(), log_size_bytes=700) is None  # points past the log
    assert SparseIndex.decode(index.encode()[:-1], log_size_bytes=10**6) is None
    assert SparseIndex.decode(bytes(16), log_size_bytes=10**6) is None  # not increasing
    index.truncate_to_position(250)
    assert list(index.positions) == [100]


@given(st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 2**40)), max_size=8))
def test_epoch_checkpoint_round_trip(entries: list[tuple[int, int]]) -> None:
    cache = LeaderEpochCache(entries)
    assert parse_epochs(format_epochs(cache.entries())) == cache.entries()


@given(st.text(max_size=40))
def test_epoch_checkpoint_garbage_is_rejected_or_valid(text: str) -> None:
    entries = parse_epochs(text)
    if entries is not None:
        assert LeaderEpochCache(entries).entries() == entries


def test_atomic_checkpoints(tmp_path: Path) -> None:
    assert read_offset(tmp_path / "missing") is None
    write_offset(tmp_path / "point", 42)
    assert read_offset(tmp_path / "point") == 42
    (tmp_path / "point").write_text("-5\n")
    assert read_offset(tmp_path / "point") is None
    write_epochs(tmp_path / "epochs", [(1, 0), (2, 7)])
    assert read_epochs(tmp_path / "epochs") == [(1, 0), (2, 7)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["epochs", "point"]
