"""`tide bench`'s latency sweep against a live cluster: the report's shape, every
message of an unsaturated step received, the curve drawn, the consumer process gone;
and the harness run by file path, the way it measures an older tree."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.conftest import LocalCluster

import tidemq
from tidemq.cli import bench_latency

Tide = Callable[..., subprocess.CompletedProcess[str]]
STEP_KEYS = {
    "rate_per_s",
    "seconds",
    "sent",
    "received",
    "achieved_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "cpu_s",
    "cpu_us_per_message",
    "saturated",
}


def processes_naming(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in command_line:
            found.append(int(entry.name))
    return found


def check_steps(sweep: dict[str, Any], rates: list[int], seconds: float) -> None:
    steps = sweep["steps"]
    assert 1 <= len(steps) <= len(rates)
    assert [step["rate_per_s"] for step in steps] == rates[: len(steps)]
    for step in steps:
        assert set(step) == STEP_KEYS
        assert step["sent"] == int(step["rate_per_s"] * seconds)
        if step["saturated"] is None:
            assert step["received"] == step["sent"]
            assert 0 < step["p50_ms"] <= step["p90_ms"] <= step["p99_ms"]
            assert step["p99_ms"] <= step["p999_ms"] <= step["max_ms"]
        # Every party's CPU is measured on this machine (Linux, brokers exporting
        # process_cpu_seconds_total); the brokers and the producer work for every step.
        assert set(step["cpu_s"]) == {"brokers", "producer", "consumer"}
        assert step["cpu_s"]["brokers"] > 0 and step["cpu_s"]["producer"] > 0
        assert step["cpu_s"]["consumer"] is not None and step["cpu_s"]["consumer"] >= 0
        per_message = step["cpu_us_per_message"]
        assert per_message["brokers"] == round(step["cpu_s"]["brokers"] / step["sent"] * 1e6, 1)
    if len(steps) < len(rates):  # stopped early: only for a saturated step
        assert steps[-1]["saturated"]
        assert sweep["saturated_at_per_s"] == steps[-1]["rate_per_s"]


def test_tide_bench_sweeps_rates_and_draws_the_curve(
    cluster: LocalCluster, tide_cli: Tide, tmp_path: Path
) -> None:
    topic = f"bench-it-{uuid.uuid4().hex[:8]}"
    curve = tmp_path / "curve.png"
    result = tide_cli(
        "bench", "--data-dir", str(cluster.data_dir), "--phase", "latency", "--topic", topic,
        "--partitions", "2", "--replication-factor", "1", "--rates", "200,400",
        "--latency-seconds", "1", "--warmup-seconds", "0.2", "--json", "--curve", str(curve),
        timeout_s=90,
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["replication_factor"] == 1
    sweep = report["latency_sweep"]
    assert sweep["label"] == "2 partitions, RF 1"
    assert sweep["partitions"] == 2
    assert sweep["acks"] == "all" and sweep["linger_ms"] is None
    check_steps(sweep, [200, 400], 1.0)
    assert curve.read_bytes()[:4] == b"\x89PNG"
    assert processes_naming(topic) == [], "the consumer process is still running"


def test_the_harness_by_file_path_writes_its_report(cluster: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    topic = f"bench-it-{uuid.uuid4().hex[:8]}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    completed = subprocess.run(
        [
            sys.executable, bench_latency.__file__, "sweep", "--data-dir", str(cluster.data_dir),
            "--topic", topic, "--partitions", "1", "--rates", "300", "--seconds", "0.5",
            "--warmup-seconds", "0", "--label", "by file", "--json-out", str(out),
        ],
        capture_output=True, text=True, timeout=90, env=environment, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(completed.stdout)
    assert report["kind"] == "tidemq-latency-sweep"
    assert report["label"] == "by file"
    assert report["tidemq"] == os.path.dirname(tidemq.__file__)
    assert report["rates"] == [300]
    check_steps(report, [300], 0.5)
    assert processes_naming(topic) == []


def test_a_bench_deletes_the_topic_it_created_for_itself(
    cluster: LocalCluster, tide_cli: Tide
) -> None:
    """Topics left behind keep every broker busier (followers fetch them), so the next
    run would measure another cluster; a topic given with --topic stays (tests above)."""
    from tidemq.cli.control import ControlPlane, resolve_target

    control = ControlPlane(resolve_target(str(cluster.data_dir)))
    generated = re.compile(r"^bench-(latency-)?[0-9a-f]{8}$")
    before = {t["name"] for t in control.topics() if generated.match(t["name"])}
    tide_cli(
        "bench", "--data-dir", str(cluster.data_dir), "--phase", "throughput",
        "--messages", "500", "--partitions", "1", "--replication-factor", "1",
        timeout_s=90,
    )  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    completed = subprocess.run(
        [
            sys.executable, bench_latency.__file__, "sweep", "--data-dir", str(cluster.data_dir),
            "--partitions", "1", "--rates", "200", "--seconds", "0.3", "--warmup-seconds", "0",
        ],
        capture_output=True, text=True, timeout=90, env=environment, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "could not delete" not in completed.stderr
    after = {t["name"] for t in control.topics() if generated.match(t["name"])}
    assert after == before
