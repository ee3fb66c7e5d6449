"""The pure parts of `tide bench`: value encoding, percentiles, rate schedule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tidemq.cli.bench import (
    decode_send_ns,
    encode_value,
    latency_summary,
    messages_due,
    percentile,
)


@given(st.integers(min_value=0, max_value=2**62), st.integers(min_value=0, max_value=4096))
def test_value_round_trips_the_send_time(send_ns: int, size: int) -> None:
    value = encode_value(send_ns, size)
    assert len(value) == max(size, 8)
    assert decode_send_ns(value) == send_ns


def test_short_or_null_values_have_no_send_time() -> None:
    assert decode_send_ns(None) is None
    assert decode_send_ns(b"1234567") is None


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 0.5) == 500
    assert percentile(values, 0.9) == 900
    assert percentile(values, 0.99) == 990
    assert percentile(values, 0.999) == 999
    assert percentile(values, 1.0) == 1000
    assert percentile([7.0], 0.999) == 7
    assert percentile([], 0.5) is None


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1), st.floats(0.01, 1))
def test_percentile_is_a_member_and_monotone(values: list[float], fraction: float) -> None:
    ordered = sorted(values)
    result = percentile(ordered, fraction)
    assert result in ordered
    assert result is not None
    assert result <= (percentile(ordered, min(1.0, fraction + 0.1)) or 0)


def test_messages_due() -> None:
    assert messages_due(10_000, 0) == 0
    assert messages_due(10_000, 0.5) == 5000
    assert messages_due(10_000, -1) == 0


def test_latency_summary_in_milliseconds() -> None:
    summary = latency_summary([2_000_000, 1_000_000, 3_000_000])
    assert summary == {"p50_ms": 2.0, "p90_ms": 3.0, "p99_ms": 3.0, "p999_ms": 3.0, "max_ms": 3.0}
    assert latency_summary([])["p50_ms"] is None


def test_latency_summary_has_every_percentile_of_1000_values() -> None:
    summary = latency_summary(reversed([value * 1_000_000 for value in range(1, 1001)]))
    assert summary == {
        "p50_ms": 500.0,
        "p90_ms": 900.0,
        "p99_ms": 990.0,
        "p999_ms": 999.0,
        "max_ms": 1000.0,
    }
