"""Process handling of `tide up` / `tide down` on a harmless stand-in process."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tidemq.cli import processes

# argv[3] is the "role", as in [python, -m, tidemq, role, ...]; the process sleeps.
STAND_IN = [
    sys.executable,
    "-c",
    "import time; time.sleep(60)",
    "tidemq-stand-in",
    "--data-dir",
    "/nowhere",
]


def test_spawn_is_running_and_stop(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "x.log"
    pid = processes.spawn(STAND_IN, log, tmp_path)
    try:
        # Until the child has exec'd, /proc shows the parent's command line: poll.
        deadline = time.monotonic() + 10
        while not processes.is_running(pid, STAND_IN):
            assert time.monotonic() < deadline, "the spawned process never showed its argv"
            time.sleep(0.01)
        assert os.getsid(pid) == pid  # its own session: outlives the CLI
        other = [*STAND_IN[:-1], "/elsewhere"]
        assert not processes.is_running(pid, other)  # not ours: never signalled
        assert not processes.send_signal(pid, other, 15)
        assert processes.is_running(pid, STAND_IN)
        outcome = processes.stop([(pid, STAND_IN)], grace_s=5)
        assert outcome == {pid: "stopped"}
        assert not processes.is_running(pid, STAND_IN)
        assert "starting:" in log.read_text()
    finally:
        processes.kill([(pid, STAND_IN)])


def test_stop_of_a_gone_process(tmp_path: Path) -> None:
    pid = processes.spawn([sys.executable, "-c", "pass"], tmp_path / "x.log", tmp_path)
    deadline = time.monotonic() + 10
    while processes.is_running(pid, [sys.executable, "-c", "pass"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert processes.stop([(pid, STAND_IN)]) == {pid: "not running"}


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert processes.log_tail(log, 3) == "line 97\nline 98\nline 99"
    assert "cannot read" in processes.log_tail(tmp_path / "missing.log")
