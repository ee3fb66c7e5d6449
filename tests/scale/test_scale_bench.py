"""The scalability benchmark's harness at a tiny scale (docs/BENCHMARKS.md has the real
runs): namespaces and tbf caps are built, a run measures something, and every
namespace, bridge, veth and process is gone afterwards, also when the run is stopped
halfway. Nothing here asserts a speed. Skipped unless root with ip, tc and netns."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.scale.network import PREFIX, namespaces_available, sweep_stale
from tests.scale.worker import running

REPOSITORY = Path(__file__).resolve().parents[2]
AVAILABLE, WHY = namespaces_available()
pytestmark = [
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {WHY}"),
    pytest.mark.timeout(600),
]
TINY = ["--producers", "1", "--warmup-s", "4", "--measure-s", "3", "--rate-mbit", "8"]


def _bench(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.scale.bench", *args],
        cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _kill(bench: subprocess.Popen[str], started: dict[int, int] | None = None) -> None:
    """Stops the benchmark if it still runs; the caller's ``with`` closes the pipes.
    SIGTERM first (it cleans up after itself); if that takes over 60 s, SIGKILL. Then,
    whatever happened, SIGKILL what it started that still runs (brokers and workers run
    in sessions of their own: the process group does not reach them; pidfds, so a
    reused PID is never hit) and delete the names of its dead PID."""
    more: dict[int, int] = {}
    if bench.poll() is None:
        more = _started_by(bench.pid)
        bench.terminate()
        try:
            bench.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.communicate(timeout=30)
    for pidfd in [*(started or {}).values(), *more.values()]:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    for pidfd in more.values():
        os.close(pidfd)
    sweep_stale()


def _names() -> tuple[list[str], list[str]]:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    link_names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    return [line.split()[0] for line in namespaces.splitlines() if line.split()], link_names


def _ours(tag: int) -> list[str]:
    """Names the benchmark with PID ``tag`` made (not those of PID 12345 for tag 1234)."""
    namespaces, links = _names()
    mine = re.compile(rf"^{PREFIX}b?{tag}(?!\d)")
    return [n for n in namespaces + links if mine.match(n)]


def _started_by(tag: int) -> dict[int, int]:
    """The processes the benchmark started, PID -> pidfd (the caller closes them): its
    children (workers, and the ``ip netns exec`` that became each broker) and whatever
    runs in its namespaces."""
    children = subprocess.run(
        ["ps", "--ppid", str(tag), "-o", "pid="], capture_output=True, text=True
    ).stdout.split()
    inside: list[str] = []
    for namespace in _names()[0]:
        if re.match(rf"^{PREFIX}{tag}-", namespace):
            inside += subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True
            ).stdout.split()
    found: dict[int, int] = {}
    for pid in {int(pid) for pid in children + inside}:
        with contextlib.suppress(ProcessLookupError):
            found[pid] = os.pidfd_open(pid)
    return found


def _exited(pidfd: int) -> bool:
    """A pidfd is readable once its process has ended (whoever reaps it)."""
    return bool(select.select([pidfd], [], [], 0)[0])


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
        assert run["messages_per_s"] > 0 and run["failed"] == 0, run
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


def _halfway(bench: subprocess.Popen[str]) -> tuple[str, dict[int, int]]:
    """Waits until the benchmark has measured its first run and started the producer of
    the next (so a cluster and a worker are running): 240 s of running time, 300 s of
    wall time at most. Returns its stderr so far and what it started ({} if it got
    nowhere)."""
    assert bench.stderr is not None
    stderr = b""
    # Running time: CI once saw a 150 s wait end with the namespaces appearing a
    # moment later (a stalled machine). Wall time: the pytest timeout counts it.
    for _ in running(240, step_s=0.1, wall_s=300):
        if bench.poll() is not None:
            return (stderr + bench.communicate()[1].encode()).decode(errors="replace"), {}
        while select.select([bench.stderr], [], [], 0)[0]:
            chunk = os.read(bench.stderr.fileno(), 65536)  # raw: communicate() reads the rest
            if not chunk:
                break
            stderr += chunk
        if b"run 1:" not in stderr:
            continue
        started = _started_by(bench.pid)
        if any("tests.scale.worker" in _args(pid) for pid in started):
            return stderr.decode(errors="replace"), started
        for pidfd in started.values():
            os.close(pidfd)
    return stderr.decode(errors="replace"), {}


def _args(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_run_stopped_halfway_leaves_nothing_behind() -> None:
    """SIGTERM while the second run's producer works: the benchmark exits non-zero and
    leaves no namespace, bridge, veth or process (brokers and workers included).
    Worst case in wall time: 300 s waiting, 120 s for its exit, _kill's 90 s."""
    started: dict[int, int] = {}
    try:
        with _bench("--part", "scaling", "--brokers", "2", "--runs", "5", *TINY) as bench:
            try:
                before, started = _halfway(bench)
                where = "" if started else _where(bench)
                alive = {pid: not _exited(fd) for pid, fd in started.items()}
                bench.send_signal(signal.SIGTERM)
                stderr = before + bench.communicate(timeout=120)[1]
            finally:
                left = {pid for pid, fd in started.items() if not _exited(fd)}
                _kill(bench, started)
        assert started, f"no run measured in time; stderr:\n{before[-3000:]}\n{where}"
        assert sum(alive.values()) >= 4, alive  # coordinator, two brokers, a worker
        assert bench.returncode != 0, stderr[-3000:]
        assert _ours(bench.pid) == [], stderr[-3000:]
        assert left == set(), stderr[-3000:]
    finally:
        for pidfd in started.values():
            os.close(pidfd)
