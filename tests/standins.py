"""Harmless stand-in processes for tests of the CLI's process checks: a Python that
sleeps, started from an argv shaped like a tidemq service's (its role at index 3)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def stand_in_argv(role: str, data_dir: Path) -> list[str]:
    """argv of a stand-in ``role`` on ``data_dir``; "tidemq" appears in it, as in every
    service's command line (launch.cmdline_matches looks for it)."""
    code = "import time; time.sleep(60)  # tidemq"
    return [sys.executable, "-c", code, role, "--data-dir", str(data_dir)]


@contextlib.contextmanager
def stand_in(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Runs ``argv`` until the block ends (then kills it by PID); yields once /proc
    shows its command line, so that a check of it sees the program, not a fork."""
    process = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{process.pid}/cmdline").read_bytes().count(b"\0") < len(argv):
            assert time.monotonic() < deadline, "the stand-in never exec'd"
            time.sleep(0.01)
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)
