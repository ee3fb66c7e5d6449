"""`tide up` / `env` / `status` / `down` over real processes and TLS."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tidemq.cli import processes
from tidemq.cli.model import read_cluster_file

Tide = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def data_dir(tmp_path: Path, adopt_cluster: Callable[[Path], Any]) -> Path:
    """A directory for a cluster the test starts itself; stopped when the test ends."""
    directory = tmp_path / "data"
    adopt_cluster(directory)
    return directory


def test_up_env_status_down(data_dir: Path, tide_cli: Tide) -> None:
    started = time.monotonic()
    up = tide_cli("up", "--brokers", "3", "--data-dir", str(data_dir), "--detach", timeout_s=60)
    assert time.monotonic() - started < 20 + 5, "healthy within 20 s (plus interpreter start)"
    assert "cluster healthy" in up.stderr

    raw = json.loads((data_dir / "cluster.json").read_text())
    assert set(raw) == {"coordinator", "brokers", "ca_file", "client_cert_file", "client_key_file"}
    assert set(raw["coordinator"]) == {"url", "pid", "argv"}
    assert [broker["id"] for broker in raw["brokers"]] == [1, 2, 3]
    for broker in raw["brokers"]:
        assert set(broker) == {"id", "url", "pid", "argv"}
        assert broker["url"].startswith("https://127.0.0.1:")
        assert isinstance(broker["pid"], int)
        assert all(isinstance(part, str) for part in broker["argv"])
    for name in ("ca_file", "client_cert_file", "client_key_file"):
        assert Path(raw[name]).is_absolute() and Path(raw[name]).is_file()
    info = read_cluster_file(data_dir)
    everything = [(b.pid, b.argv) for b in info.brokers] + [
        (info.coordinator.pid, info.coordinator.argv)
    ]
    assert all(processes.is_running(pid, argv) for pid, argv in everything)
    assert len({url for url in [info.coordinator.url, *(b.url for b in info.brokers)]}) == 4

    env = tide_cli("env", "--data-dir", str(data_dir)).stdout.splitlines()
    exported = dict(shlex.split(line)[1].split("=", 1) for line in env)
    assert exported == {
        "TIDE_BOOTSTRAP": raw["coordinator"]["url"],
        "TIDE_CA_FILE": raw["ca_file"],
        "TIDE_CERT_FILE": raw["client_cert_file"],
        "TIDE_KEY_FILE": raw["client_key_file"],
    }

    report = json.loads(tide_cli("status", "--data-dir", str(data_dir), "--json").stdout)
    assert report["coordinator"]["error"] is None
    assert sorted(b["id"] for b in report["brokers"] if b["alive"]) == [1, 2, 3]
    text = tide_cli("status", "--data-dir", str(data_dir)).stdout
    assert "3/3 brokers alive" in text

    down = tide_cli("down", "--data-dir", str(data_dir))
    assert "stopped" in down.stderr
    assert not any(processes.is_running(pid, argv) for pid, argv in everything)
    assert (data_dir / "cluster.json").exists(), "down keeps the data"
    assert (data_dir / "broker-1").is_dir()


def test_up_restarts_dead_processes_and_scales_out(
    cluster_factory: Callable[..., Any],
    tide_cli: Tide,
) -> None:
    cluster = cluster_factory(brokers=1)
    first = cluster.broker_entry(1)
    coordinator_pid = cluster.info["coordinator"]["pid"]

    cluster.up(brokers=2)  # scale-out: broker 2 added, the rest untouched
    assert cluster.broker_entry(1) == first
    assert cluster.info["coordinator"]["pid"] == coordinator_pid
    second = cluster.broker_entry(2)
    assert cluster.is_running(second["pid"])

    cluster.kill_broker(1)
    assert not cluster.is_running(first["pid"])
    cluster.up()  # restarts broker 1 from its argv: same URL and argv, new pid
    restarted = cluster.broker_entry(1)
    assert restarted["argv"] == first["argv"]
    assert restarted["url"] == first["url"]
    assert restarted["pid"] != first["pid"]
    assert cluster.is_running(restarted["pid"])
    cluster.wait_healthy()


def test_kill_all_and_restart_all_keep_the_data(cluster: Any, tide_cli: Tide) -> None:
    data_dir = str(cluster.data_dir)
    tide_cli("topics", "create", "kept", "--partitions", "2", "--data-dir", data_dir)
    produced = tide_cli(
        "produce",
        "kept",
        "--key-separator",
        ":",
        "--data-dir",
        data_dir,
        input_text="a:one\nb:two\nc:three\n",
    )
    assert len(produced.stdout.splitlines()) == 3

    cluster.kill_all()
    assert not any(cluster.is_running(b["pid"]) for b in cluster.info["brokers"])
    cluster.restart_all()

    consumed = tide_cli(
        "consume",
        "kept",
        "--from-beginning",
        "--max-messages",
        "3",
        "--timeout-s",
        "30",
        "--data-dir",
        data_dir,
    )
    lines = consumed.stdout.splitlines()
    assert sorted(line.split(" ", 2)[2] for line in lines) == ["a one", "b two", "c three"]
    topics = tide_cli("topics", "list", "--data-dir", data_dir).stdout
    assert "kept" in topics


def test_up_reports_a_start_that_is_not_healthy_in_time(data_dir: Path, tide_cli: Tide) -> None:
    failed = tide_cli(
        "up",
        "--brokers",
        "1",
        "--data-dir",
        str(data_dir),
        "--detach",
        "--timeout-s",
        "0.1",
        check=False,
    )
    assert failed.returncode == 1
    assert "not healthy after 0.1 s" in failed.stderr or "exited while starting" in failed.stderr
    assert "coordinator.log" in failed.stderr
    # what did start is in cluster.json, so `tide down` can stop it
    tide_cli("down", "--data-dir", str(data_dir))
    info = read_cluster_file(data_dir)
    assert not processes.is_running(info.coordinator.pid, info.coordinator.argv)


def test_down_never_signals_a_stranger(data_dir: Path, tide_cli: Tide) -> None:
    tide_cli("up", "--brokers", "1", "--data-dir", str(data_dir), "--detach", timeout_s=60)
    raw: dict[str, Any] = json.loads((data_dir / "cluster.json").read_text())
    real_pid = raw["brokers"][0]["pid"]
    original = (data_dir / "cluster.json").read_text()
    raw["brokers"][0]["pid"] = os.getpid()  # pretend the PID was reused by this test
    (data_dir / "cluster.json").write_text(json.dumps(raw))
    try:
        down = tide_cli("down", "--data-dir", str(data_dir))
        assert "broker-1" in down.stderr and "not running" in down.stderr
        argv = raw["brokers"][0]["argv"]
        assert processes.is_running(real_pid, argv), "the real broker was left alone"
    finally:
        (data_dir / "cluster.json").write_text(original)  # teardown stops the real one


def test_groups_delete_forgets_an_idle_group_and_says_why_when_it_cannot(
    cluster: Any, tide_cli: Tide
) -> None:
    data_dir = str(cluster.data_dir)
    tide_cli("topics", "create", "spent", "--partitions", "1", "--data-dir", data_dir)
    tide_cli("produce", "spent", "one", "--data-dir", data_dir)
    consumed = tide_cli(
        "consume", "spent", "--group", "run-1", "--max-messages", "1",
        "--timeout-s", "30", "--data-dir", data_dir,
    )  # fmt: skip
    assert consumed.stdout.strip().endswith("one")
    assert "run-1" in tide_cli("groups", "list", "--data-dir", data_dir).stdout.split()
    deleted = tide_cli("groups", "delete", "run-1", "--data-dir", data_dir)
    assert deleted.stdout.strip() == "deleted group run-1"
    assert "run-1" not in tide_cli("groups", "list", "--data-dir", data_dir).stdout.split()
    again = tide_cli("groups", "delete", "run-1", "--data-dir", data_dir, check=False)
    assert again.returncode != 0 and "unknown_group" in again.stderr
