"""The scalability benchmark's harness at a tiny scale (docs/BENCHMARKS.md has the real
runs): namespaces and tbf caps are built, a run measures something, and every
namespace, bridge, veth and process is gone afterwards, also when the run is stopped
halfway. Nothing here asserts a speed. Skipped unless root with ip, tc and netns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.scale.network import PREFIX, namespaces_available

REPOSITORY = Path(__file__).resolve().parents[2]
AVAILABLE, WHY = namespaces_available()
pytestmark = [
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {WHY}"),
    pytest.mark.timeout(400),
]
TINY = ["--producers", "1", "--warmup-s", "4", "--measure-s", "3", "--rate-mbit", "8"]


def _bench(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.scale.bench", *args],
        cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _kill(bench: subprocess.Popen[str]) -> str:
    """Kills the benchmark's process group if it still runs and returns what it wrote
    to stderr ("" if it had ended); the caller's ``with`` closes the pipes."""
    if bench.poll() is None:
        os.killpg(bench.pid, signal.SIGKILL)
        return bench.communicate()[1]
    return ""


def _names() -> tuple[list[str], list[str]]:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    link_names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    return [line.split()[0] for line in namespaces.splitlines() if line.split()], link_names


def _ours(tag: int) -> list[str]:
    namespaces, links = _names()
    return [n for n in namespaces + links if n.startswith((f"{PREFIX}{tag}", f"{PREFIX}b{tag}"))]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_one_and_two_capped_brokers_measure_and_clean_up(tmp_path: Path) -> None:
    with _bench("--part", "scaling", "--brokers", "1,2", "--runs", "1", *TINY) as bench:
        try:
            stdout, stderr = bench.communicate(timeout=200)
        finally:
            _kill(bench)
    assert bench.returncode == 0, stderr[-3000:]
    report: dict[str, Any] = json.loads(stdout.splitlines()[-1])
    by_brokers = report["scaling"]["by_brokers"]
    assert set(by_brokers) == {"1", "2"}
    for count, part in by_brokers.items():
        network = part["network"]
        brokers = [f"broker-{i}" for i in range(1, int(count) + 1)]
        for broker in brokers:  # capped both ways while the run was on
            for direction in ("ingress", "egress"):
                assert "tbf" in network["caps"][broker][direction]
                assert "rate 8Mbit" in network["caps"][broker][direction]
        assert "tbf" not in network["caps"]["coordinator"]["ingress"]
        (run,) = part["runs"]
        assert run["messages_per_s"] > 0 and run["failed"] == 0
        assert sorted(run["leaders_per_broker"]) == [str(i) for i in range(1, int(count) + 1)]
        assert sum(run["leaders_per_broker"].values()) == report["settings"]["partitions"]
        assert set(run["link_use_of_cap"]) == set(brokers)
        # Gone afterwards: namespaces, bridge, veths, processes.
        namespaces, links = _names()
        assert not set(network["namespaces"]) & set(namespaces)
        assert not {network["bridge"], *network["veths"]} & set(links)
        assert not [name for name, pid in network["pids"].items() if _alive(pid)]
    assert _ours(bench.pid) == []


def _where(bench: subprocess.Popen[str]) -> str:
    """The benchmark's process tree (its session) with states, wait channels and
    kernel stacks: where a run that builds nothing is stuck."""
    tree = subprocess.run(
        ["ps", "-s", str(bench.pid), "-o", "pid,ppid,stat,etimes,wchan:32,args"],
        capture_output=True,
        text=True,
    ).stdout
    stacks = []
    for line in tree.splitlines()[1:]:
        pid = line.split()[0]
        try:
            stacks.append(f"{pid}: " + Path(f"/proc/{pid}/stack").read_text().replace("\n", " | "))
        except OSError:
            continue
    return tree + "\n".join(stacks)


def _built_within(bench: subprocess.Popen[str], seconds: float) -> bool:
    """Polls until the benchmark has built a namespace, for ``seconds`` of time this
    process ran: a step counts at most 0.5 s, so a pause of the whole machine (CI saw
    a 150 s wait end with the namespaces appearing a moment later) does not use it up."""
    ran, last = 0.0, time.monotonic()
    while ran < seconds and not _ours(bench.pid):
        assert bench.poll() is None, bench.communicate()[1][-3000:]
        time.sleep(0.1)
        now = time.monotonic()
        ran, last = ran + min(now - last, 0.5), now
    return bool(_ours(bench.pid))


def test_a_run_stopped_halfway_leaves_nothing_behind() -> None:
    """SIGTERM while the cluster runs: the benchmark exits non-zero and leaves no
    namespace, bridge, veth or process. A start that builds nothing is stopped the same
    way (the promise holds there too), reported with where it was stuck, and retried
    once."""
    for attempt in (1, 2):
        with _bench("--part", "scaling", "--brokers", "2", "--runs", "5", *TINY) as bench:
            try:
                built = _built_within(bench, 150)
                where = "" if built else _where(bench)
                bench.send_signal(signal.SIGTERM)
                stderr = bench.communicate(timeout=120)[1]
            finally:
                _kill(bench)
        assert bench.returncode != 0, stderr[-3000:]
        assert _ours(bench.pid) == [], stderr[-3000:]
        if built:
            return
        report = (
            f"attempt {attempt}: the benchmark built no namespace within 150 s; "
            f"its stderr:\n{stderr[-3000:]}\nits processes then:\n{where}"
        )
        if attempt == 2:
            pytest.fail(report)
        print(report, file=sys.stderr)
