"""Fixtures of the fault suite.

Every scenario runs as its own process (``python -m tests.fault.run`` or
``tests.fault.leader_kill``): the clients of a cluster under a nemesis may leave
threads and sockets behind, and they must not outlive the scenario into other tests.
:func:`run_scenario` returns the JSON line such a process printed.

``fault_network_guard`` (autouse) makes sure that, pass or fail, no network namespace
or bridge of ours survives a test: a scenario deletes its network in ``finally``; one
that was killed leaves names tagged with its dead PID, which :func:`sweep_stale`
deletes, and the guard fails the test if any remains.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault.harness.network import PREFIX, sweep_stale

REPOSITORY = Path(__file__).resolve().parents[2]


def run_scenario(module: str, *args: str, root: Path, timeout_s: float) -> dict[str, Any]:
    """Runs ``python -m MODULE ARGS --dir ROOT``; returns its JSON line. On a crash or a
    timeout the test fails with the tail of its output, and ROOT is kept."""
    command = [sys.executable, "-m", module, *args, "--dir", str(root)]
    process = subprocess.Popen(
        command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{module} ran over {timeout_s} s; {keep(root)}\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode not in (0, 1) or not lines:
        pytest.fail(f"{module} exited {process.returncode}; {keep(root)}\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def keep(root: Path) -> str:
    """Copies ROOT's history and logs out of pytest's rotating tmp dirs; says where."""
    kept = Path(tempfile.mkdtemp(prefix="tidemq-fault-failed-"))
    if (root / "history.jsonl").exists():
        shutil.copy(root / "history.jsonl", kept)
    if (root / "cluster" / "logs").exists():
        shutil.copytree(root / "cluster" / "logs", kept / "logs")
    return f"history and logs kept in {kept}"


def _ours() -> list[str]:
    names: list[str] = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    tag = f"{PREFIX}{os.getpid()}"
    names += [line.split()[0] for line in listing.stdout.splitlines() if line.startswith(tag)]
    return names


@pytest.fixture(autouse=True)
def fault_network_guard() -> Iterator[None]:
    yield
    if os.geteuid() != 0:
        return
    swept = sweep_stale()  # what a killed scenario process left behind
    leftovers = _ours()
    for name in leftovers:
        subprocess.run(["ip", "netns", "delete", name], check=False)
    assert not leftovers, f"the fault network was not cleaned up: {leftovers} (swept {swept})"
