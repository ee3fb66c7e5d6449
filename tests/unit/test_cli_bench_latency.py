"""The latency sweep's pure parts: rates, saturation, the stop rule, the consumer's
window bookkeeping, and drawing the curve from saved reports."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner
from tests.standins import stand_in, stand_in_argv

from tidemq.cli import bench_curve
from tidemq.cli.bench import bench
from tidemq.cli.bench_latency import (
    WARMUP_TIMESTAMP,
    BrokersCpu,
    ConsumerProcess,
    CpuMeter,
    HarnessError,
    Recorder,
    _proc_stat,
    describe_step,
    encode_value,
    metric_sum,
    next_rates,
    parse_rates,
    process_cpu_s,
    saturation_reason,
    step_report,
)

MS = 1_000_000


class FakeMessage(NamedTuple):
    partition: int
    value: bytes | None


def window(received: int, p99_ms: float | None = 5.0) -> dict[str, Any]:
    return {
        "received": received,
        "p50_ms": 1.0,
        "p90_ms": 2.0,
        "p99_ms": p99_ms,
        "p999_ms": 9.0,
        "max_ms": 10.0,
    }


def test_parse_rates() -> None:
    assert parse_rates("500,1000, 2000") == (500, 1000, 2000)
    assert parse_rates("7") == (7,)
    for bad in ("", "a,b", "0,10", "1000,500", "500,500", "-1"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_an_unsaturated_step() -> None:
    step = step_report(1000, sent=5000, seconds=5.0, window=window(5000), p99_bound_ms=1000)
    assert step["achieved_per_s"] == 1000.0
    assert step["saturated"] is None
    assert [step[key] for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")] == [
        1.0,
        2.0,
        5.0,
        9.0,
        10.0,
    ]


def test_saturation_when_the_producer_falls_behind() -> None:
    # 5000 messages took 6 s instead of 5: 833/s is below 90% of 1000/s.
    step = step_report(1000, sent=5000, seconds=6.0, window=window(5000), p99_bound_ms=1000)
    assert step["saturated"] is not None
    assert "below 90%" in step["saturated"]
    # 5000 in 5.5 s is 909/s: still at least 90%.
    assert step_report(1000, 5000, 5.5, window(5000), 1000)["saturated"] is None


def test_saturation_when_the_consumer_misses_messages_or_p99_is_over_the_bound() -> None:
    missing = step_report(1000, 5000, 5.0, window(4999), p99_bound_ms=1000)
    assert missing["saturated"] == "consumer received 4999 of 5000"
    slow = step_report(1000, 5000, 5.0, window(5000, p99_ms=1500.0), p99_bound_ms=1000)
    assert slow["saturated"] is not None and "p99 1500.0 ms" in slow["saturated"]
    nothing = step_report(1000, 5000, 5.0, {"received": 5000}, p99_bound_ms=1000)
    assert nothing["saturated"] is not None
    assert saturation_reason({**slow, "p99_ms": 999.0}, 1000) is None


def test_the_sweep_stops_at_the_first_saturated_step() -> None:
    rates = (500, 1000, 2000, 5000)
    ok = {"rate_per_s": 500, "saturated": None}
    assert next_rates(rates, []) == [500, 1000, 2000, 5000]
    assert next_rates(rates, [ok]) == [1000, 2000, 5000]
    assert next_rates(rates, [ok, {"rate_per_s": 1000, "saturated": "p99"}]) == []
    assert next_rates(rates, [ok, ok, ok, ok]) == []


def test_recorder_counts_warm_up_partitions_and_only_the_window() -> None:
    recorder = Recorder()
    warm = encode_value(WARMUP_TIMESTAMP, 100)
    recorder.add([FakeMessage(0, warm), FakeMessage(2, warm), FakeMessage(1, None)], 50)
    assert recorder.warm_partitions == {0, 2}
    # warm-up of the step (send time 10), the window [100, 200), a later message (250)
    recorder.add([FakeMessage(0, encode_value(10, 8))], 20 * MS)
    recorder.add(
        [FakeMessage(0, encode_value(100, 8)), FakeMessage(1, encode_value(150, 8))], 3 * MS + 100
    )
    recorder.open_window(100, 200)
    assert recorder.in_window == 2  # 100 and 150; 10 is the step's warm-up
    recorder.add(
        [FakeMessage(1, encode_value(199, 8)), FakeMessage(1, encode_value(250, 8))], 1 * MS + 199
    )
    assert recorder.in_window == 3
    answer = recorder.close_window()
    assert answer["received"] == 3
    assert answer["p50_ms"] == 3.0  # latencies 3 ms, 3 ms - 50 ns, 1 ms (rounded to a µs)
    assert answer["max_ms"] == 3.0
    assert list(recorder.send_ns) == [250]  # only what was sent after the window
    recorder.open_window(200, 300)
    assert recorder.in_window == 1


def test_recorder_is_bounded() -> None:
    recorder = Recorder(limit=2)
    recorder.add([FakeMessage(0, encode_value(5, 8))] * 3, 10)
    assert len(recorder.send_ns) == 2
    assert recorder.overflow == 1


def sweep(label: str | None, partitions: int, factor: int, rates: list[int]) -> dict[str, Any]:
    steps = [
        {
            "rate_per_s": rate,
            "achieved_per_s": rate * 0.99,
            "sent": rate,
            "received": rate,
            "p50_ms": 1.0 + index,
            "p90_ms": 2.0 + index,
            "p99_ms": 3.0 + index,
            "p999_ms": 4.0 + index,
            "max_ms": 5.0 + index,
            "saturated": None,
        }
        for index, rate in enumerate(rates)
    ]
    return {"label": label, "partitions": partitions, "replication_factor": factor, "steps": steps}


def test_series_from_reports_of_every_shape() -> None:
    harness = sweep(None, 12, 2, [2000, 500])
    from_tide_bench = {"topic": "t", "latency_sweep": sweep("after", 1, 3, [500])}
    single = {
        "partitions": 1,
        "replication_factor": 1,
        "latency": sweep(None, 1, 1, [700])["steps"][0],
    }
    series = bench_curve.series_of([harness, from_tide_bench, single, harness])
    assert [one.label for one in series] == [
        "12 partitions, RF 2",
        "after",
        "1 partition, RF 1",
        "12 partitions, RF 2 (2)",
    ]
    assert series[0].achieved_per_s == (495.0, 1980.0)  # sorted by rate
    assert series[0].latency_ms["p99_ms"] == (4.0, 3.0)
    assert series[2].latency_ms["p999_ms"] == (4.0,)
    with pytest.raises(bench_curve.CurveError):
        bench_curve.series_of([{"topic": "t"}])


def test_curve_from_saved_reports_is_a_png_with_every_series(tmp_path: Path) -> None:
    paths = []
    for partitions in (1, 12):
        for factor in (1, 2, 3):
            path = tmp_path / f"p{partitions}-rf{factor}.json"
            path.write_text(json.dumps(sweep(None, partitions, factor, [500, 1000, 2000])))
            paths.append(path)
    out = tmp_path / "curve.png"
    labels = bench_curve.draw(
        bench_curve.series_of([bench_curve.load_report(p) for p in paths]), out
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert len(labels) == 6 * 3
    assert "12 partitions, RF 3 p99.9" in labels
    assert "1 partition, RF 2 p50" in labels


def test_tide_bench_draws_from_saved_reports_without_a_cluster(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"latency_sweep": sweep("before", 12, 2, [500, 2000])}))
    second.write_text(json.dumps(sweep("after", 12, 2, [500, 2000, 5000])))
    out = tmp_path / "out.png"
    result = CliRunner().invoke(
        bench, ["--curve", str(out), "--from", str(first), "--from", str(second)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bad_curve_input_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    out = tmp_path / "out.png"
    runner = CliRunner()
    result = runner.invoke(bench, ["--curve", str(out), "--from", str(broken)])
    assert result.exit_code != 0
    assert "broken.json" in result.output
    assert not out.exists()
    result = runner.invoke(bench, ["--from", str(broken)])
    assert result.exit_code == 2
    assert "--from needs --curve" in result.output
    result = runner.invoke(bench, ["--rates", "1000,500", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "strictly ascending" in result.output


def test_a_consumer_process_that_dies_is_reported_with_its_stderr() -> None:
    code = "import sys; sys.stderr.write('boom: no cluster'); sys.exit(3)"
    consumer = ConsumerProcess([sys.executable, "-c", code])
    try:
        with pytest.raises(HarnessError, match=r"exit code 3; stderr: boom: no cluster"):
            consumer.answer("ready", timeout_s=30.0)
    finally:
        consumer.close()


def test_a_consumer_process_that_ignores_stop_is_killed() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    consumer = ConsumerProcess([sys.executable, "-c", code])
    assert consumer.answer("ready", timeout_s=0.1) is None  # says nothing: no answer
    started = time.monotonic()
    consumer.close(grace_s=0.2)
    assert consumer.process.returncode is not None
    assert time.monotonic() - started < 10.0
    with pytest.raises(ProcessLookupError):
        os.kill(consumer.process.pid, 0)


METRICS = """# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
process_cpu_seconds_total_extra 99.0
tide_requests_total{route="/v1/fetch",code="200"} 3.0
tide_requests_total{route="/v1/produce",code="200"} 4.0 1700000000000
"""


def test_metric_sum_reads_one_metric_with_or_without_labels() -> None:
    assert metric_sum(METRICS, "process_cpu_seconds_total") == 12.5  # not the _extra one
    assert metric_sum(METRICS, "tide_requests_total") == 7.0  # a timestamp is not the value
    assert metric_sum(METRICS, "process_resident_memory_bytes") is None
    bad = "process_cpu_seconds_total not-a-number\nprocess_cpu_seconds_total NaN\n"
    assert metric_sum(bad, "process_cpu_seconds_total") is None


def test_a_step_reports_cpu_per_message_and_none_for_what_was_not_measured() -> None:
    cpu = {"brokers": 3.0, "producer": 0.5, "consumer": None}
    step = step_report(1000, 5000, 5.0, window(5000), 1000, cpu)
    assert step["cpu_s"] == cpu
    assert step["cpu_us_per_message"] == {"brokers": 600.0, "producer": 100.0, "consumer": None}
    assert "CPU us/msg: brokers 600  producer 100  consumer -" in describe_step(step)
    unmeasured = step_report(1000, 5000, 5.0, window(5000), 1000)
    assert set(unmeasured["cpu_us_per_message"].values()) == {None}
    assert "CPU" not in describe_step(unmeasured)


class FakeBrokers:
    """BrokersCpu's interface over a script of readings."""

    def __init__(self, readings: list[dict[str, Any]]) -> None:
        self.readings = iter(readings)

    def read(self) -> dict[str, Any]:
        return next(self.readings)

    used = staticmethod(BrokersCpu.used)


def test_the_cpu_meter_counts_what_each_party_used_since_a_reading() -> None:
    brokers = FakeBrokers(
        [
            {"b1": ("metrics", 100.0, 10.0), "b2": ("proc", 7.0, 4.0)},
            {"b1": ("metrics", 100.0, 12.0), "b2": ("proc", 7.0, 4.5)},
        ]
    )
    meter = CpuMeter(os.getpid(), brokers)  # type: ignore[arg-type]
    before = meter.read()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn some CPU in this process
        pass
    used = meter.since(before)
    assert used["brokers"] == 2.5
    assert used["producer"] is not None and used["producer"] >= 0.2
    # The consumer here is this process too, read from /proc in ticks (10 ms, and
    # sampled by the scheduler tick): allow a few of them.
    assert used["consumer"] is not None and used["consumer"] >= 0.1
    alone = CpuMeter(None)
    assert alone.since(alone.read()) == {
        "brokers": None,
        "producer": pytest.approx(0.0, abs=0.05),
        "consumer": None,
    }


def test_a_broker_restarted_or_unread_voids_the_brokers_figure() -> None:
    used = BrokersCpu.used
    first = {"b1": ("metrics", 100.0, 10.0), "b2": ("metrics", 50.0, 3.0)}
    assert used(first, {"b1": ("metrics", 100.0, 11.0), "b2": ("metrics", 50.0, 3.5)}) == (
        1.5,
        None,
    )
    restarted = {"b1": ("metrics", 100.0, 11.0), "b2": ("metrics", 90.0, 0.2)}
    assert used(first, restarted) == (None, "b2 restarted during the step")
    backwards = {"b1": ("metrics", 100.0, 9.0), "b2": ("metrics", 50.0, 3.5)}
    assert used(first, backwards) == (None, "b1's CPU counter went backwards")
    gone = {"b1": ("metrics", 100.0, 11.0), "b2": "b2/metrics: connection refused"}
    assert used(first, gone) == (None, "b2/metrics: connection refused")
    assert used(first, {"b1": ("metrics", 100.0, 11.0)}) == (None, "b2 not read again")
    assert used({}, {}) == (None, "no broker listed")


def test_process_cpu_is_what_the_kernel_counts() -> None:
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    times = os.times()
    measured = process_cpu_s(os.getpid())
    assert measured is not None
    assert abs(measured - (times.user + times.system)) < 0.05  # utime + stime, in seconds
    assert process_cpu_s(2**22 + 12345) is None  # above any pid_max


def test_brokers_cpu_without_an_answer_says_why() -> None:
    reading = BrokersCpu([("http://127.0.0.1:9", None)], None, timeout_s=1.0).read()
    assert isinstance(reading["http://127.0.0.1:9"], str)  # nothing listens on port 9
    assert BrokersCpu.used(reading, reading)[0] is None


@contextlib.contextmanager
def metrics_server(bodies: dict[str, bytes]) -> Iterator[str]:
    """An HTTP server answering GET with ``bodies[path]`` (read at each request)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies.get(self.path, b"")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_brokers_cpu_reads_each_brokers_metrics_with_its_start_time() -> None:
    bodies = {
        "/metrics": b"process_cpu_seconds_total 3.25\nprocess_start_time_seconds 1.7e9\n",
    }
    with metrics_server(bodies) as url:
        brokers = BrokersCpu([(url, None), (url, None)], None)  # one entry per URL
        assert brokers.read() == {url: ("metrics", 1.7e9, 3.25)}
        bodies["/metrics"] = b"tide_topics 1\n"  # an older broker: no process metrics
        reason = brokers.read()[url]
        assert isinstance(reason, str) and "process_cpu_seconds_total" in reason


def test_an_older_broker_is_read_from_proc_only_if_cluster_json_started_it(
    tmp_path: Path,
) -> None:
    argv = stand_in_argv("broker", tmp_path / "broker-1")  # a stand-in broker
    with stand_in(argv) as process, metrics_server({"/metrics": b"tide_topics 1\n"}) as url:
        reading = BrokersCpu([(url, (process.pid, argv))], None).read()[url]  # no metrics
        assert isinstance(reading, tuple) and reading[0] == "proc"
        stat = _proc_stat(process.pid)
        assert stat is not None and reading[1] == stat[0]  # its start time
        assert 0 <= reading[2] <= stat[1]  # its CPU seconds (read again just now)
        # The same PID with another data directory or role is not that broker (reused).
        other_dir = [*argv[:-1], str(tmp_path / "broker-2")]
        other_role = [*argv[:3], "coordinator", *argv[4:]]
        for process_here in [(process.pid, other_dir), (process.pid, other_role)]:
            reason = BrokersCpu([(url, process_here)], None).read()[url]
            assert isinstance(reason, str) and "no broker process here" in reason
        # A PID no process can have (a damaged cluster.json): no reading, no crash.
        for pid in (2**31, 2**63):
            reason = BrokersCpu([(url, (pid, argv))], None).read()[url]
            assert isinstance(reason, str) and "no broker process here" in reason
