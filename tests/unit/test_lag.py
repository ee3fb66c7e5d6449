"""The high-watermark timeline behind consumer lag in seconds (core/lag.py)."""

from __future__ import annotations

import pytest

from tidemq.core.lag import HighWatermarkTimeline

KEY = ("orders", 0)


def test_age_is_the_time_the_high_watermark_first_passed_the_committed_offset() -> None:
    timeline = HighWatermarkTimeline()
    timeline.record(KEY, 0, 1_000)
    timeline.record(KEY, 10, 2_000)  # offsets 0..9 visible at 2 s
    timeline.record(KEY, 10, 3_000)  # no change: no new point
    timeline.record(KEY, 25, 4_000)  # offsets 10..24 visible at 4 s
    assert timeline.age_ms(KEY, 0, 10_000) == 8_000
    assert timeline.age_ms(KEY, 9, 10_000) == 8_000
    assert timeline.age_ms(KEY, 10, 10_000) == 6_000
    assert timeline.age_ms(KEY, 24, 10_000) == 6_000
    assert timeline.age_ms(KEY, 25, 10_000) == 0  # caught up
    assert timeline.age_ms(("other", 0), 0, 10_000) is None


def test_a_bounded_history_reports_a_lower_bound_for_older_offsets() -> None:
    timeline = HighWatermarkTimeline(points_max=3)
    for step in range(10):
        timeline.record(KEY, step * 10, step * 1_000)
    # thinned to 3 points: ages are lower bounds of the true ones (19 s and 12 s)
    assert 0 < timeline.age_ms(KEY, 5, 20_000) <= 19_000
    assert timeline.age_ms(KEY, 75, 20_000) == 12_000


def test_a_lower_high_watermark_restarts_the_timeline_and_retain_forgets() -> None:
    timeline = HighWatermarkTimeline()
    timeline.record(KEY, 50, 1_000)
    timeline.record(KEY, 3, 5_000)  # topic re-created, or truncated
    assert timeline.age_ms(KEY, 0, 6_000) == 1_000
    timeline.retain([("orders", 1)])
    assert timeline.age_ms(KEY, 0, 6_000) is None


def test_points_max_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HighWatermarkTimeline(points_max=0)


def test_a_stuck_consumer_under_steady_load_keeps_ageing() -> None:
    """Review 7: with points dropped oldest-first the age saturated at points_max
    heartbeats (~2 min), so TideConsumerLagGrowing (deriv > 0 for 5m) never fired."""
    timeline = HighWatermarkTimeline(points_max=120)
    for second in range(1, 1801):  # 30 min, the high watermark moves every heartbeat
        timeline.record(KEY, 10 * second, second * 1_000)
    assert timeline.age_ms(KEY, 0, 1_800_000) >= 1_799_000
    middle = timeline.age_ms(KEY, 9_000, 1_800_000)  # became visible at 900 s
    assert middle is not None and abs(middle - 900_000) <= 0.05 * 900_000
