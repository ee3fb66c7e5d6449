"""The pure parts of `tide bench --phase join|scale`: gaps, kept partitions, analysis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tidemq.cli.bench_groups import (
    AFTER_FIRST_S,
    analyse_join,
    gap_in_window,
    kept_partitions,
    longest_gap,
    median_of,
)


def test_longest_gap_of_unsorted_times() -> None:
    assert longest_gap([3.0, 1.0, 1.5, 7.0, 6.5]) == 3.5
    assert longest_gap([]) == 0.0
    assert longest_gap([2.0]) == 0.0


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=2))
def test_longest_gap_bounds_every_consecutive_gap(times: list[float]) -> None:
    gap = longest_gap(times)
    ordered = sorted(times)
    gaps = [ordered[index + 1] - ordered[index] for index in range(len(ordered) - 1)]
    assert all(each <= gap for each in gaps)
    assert gap in gaps
    assert gap <= ordered[-1] - ordered[0]


def test_kept_partitions_are_seen_in_both_windows() -> None:
    receipts = [(1.0, 0), (1.5, 1), (2.0, 2), (5.0, 0), (5.5, 2), (6.0, 3)]
    assert kept_partitions(receipts, (0.0, 3.0), (4.0, 7.0)) == {0, 2}
    assert kept_partitions(receipts, (0.0, 1.0), (4.0, 7.0)) == set()  # half-open


def test_gap_in_window_counts_from_the_last_receipt_before_it() -> None:
    receipts = [(1.0, 0), (2.0, 0), (2.1, 9), (4.5, 0), (5.0, 0)]
    # from 2.0 (last before 3.0) to 4.5; partition 9 is not counted
    assert gap_in_window(receipts, {0}, 3.0, 5.0) == 2.5
    # a pause running to the end of the window counts up to the end
    assert gap_in_window(receipts, {0}, 3.0, 8.0) == 3.0


def test_analyse_join_separates_kept_members_and_their_pause() -> None:
    joined_at, first_at = 10.0, 11.0
    end = first_at + AFTER_FIRST_S
    steady = [(7.0 + step * 0.1, 0) for step in range(int((end - 7.0) / 0.1))]
    paused = [(at, partition) for at, partition in steady if not 10.2 <= at < 10.6]
    revoked = [(at, 5) for at, _ in steady if at < 10.5]  # lost its only partition
    run = analyse_join([paused, revoked], joined_at, first_at)
    assert run.join_to_first_ms == 1000.0
    assert run.members_kept == 1
    assert 490 <= run.pause_ms <= 510
    assert 90 <= run.baseline_ms <= 110


def test_median_of() -> None:
    assert median_of([3.0, 1.0, 2.0]) == 2.0
    assert median_of([]) == 0.0
