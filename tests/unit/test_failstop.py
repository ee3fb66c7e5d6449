"""fail_stop ends the process at once, non-zero, with one clear line; no cleanup runs."""

from __future__ import annotations

import subprocess
import sys

from tidemq.service.failstop import EXIT_CODE


def test_fail_stop_exits_at_once_skipping_cleanup() -> None:
    program = (
        "import atexit, logging\n"
        "logging.basicConfig()\n"
        "atexit.register(lambda: print('cleanup ran'))\n"
        "from tidemq.service.failstop import fail_stop\n"
        "try:\n"
        "    fail_stop('fsync of t/0 failed: EIO')\n"
        "finally:\n"
        "    print('finally ran')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EXIT_CODE != 0
    assert "FAIL-STOP: fsync of t/0 failed: EIO" in done.stderr
    assert "cleanup ran" not in done.stdout and "finally ran" not in done.stdout
