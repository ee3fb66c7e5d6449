"""The I/O shell of local cluster management: start, find, probe and stop processes.

A process is *ours* when it is alive, not a zombie, and its ``/proc/PID/cmdline``
matches the argv we started it with (``launch.cmdline_matches``); we never signal a
PID that fails that check, since PIDs are reused. Without ``/proc`` (not Linux) the
check degrades to "the PID exists".
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tidemq.cli.launch import cmdline_matches
from tidemq.cli.model import JSON_ERRORS
from tidemq.tls import TlsFiles, client_context

# Children started by this process. Kept so they can be reaped (no zombies while a
# foreground `tide up` runs) and so no Popen is garbage-collected while running.
_children: dict[int, subprocess.Popen[bytes]] = {}

PROBE_TIMEOUT_S = 2.0
# A service's JSON answer to a CLI command (cluster metadata, a group's members...):
# far above what a large cluster writes, and a bound on what a wrong server can make
# the CLI hold. An error body is only quoted, so less of it is read.
ANSWER_BYTES_MAX = 64 * 1024 * 1024
ERROR_BYTES_MAX = 64 * 1024


@atexit.register
def _reap_exited_children() -> None:
    """Reaps children that were killed by PID (e.g. by a test) but never waited for."""
    for child in list(_children.values()):
        child.poll()


def spawn(argv: Sequence[str], log_file: Path, cwd: Path) -> int:
    """Starts ``argv`` in its own session (it outlives the CLI), output to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_file, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=environment,
            start_new_session=True,
            close_fds=True,
        )
    _children[child.pid] = child
    return child.pid


def _reap(pid: int) -> bool:
    """True when ``pid`` is a child of ours that has exited (and is now reaped)."""
    child = _children.get(pid)
    if child is None:
        return False
    if child.poll() is None:
        return False
    del _children[pid]
    return True


def has_exited(pid: int) -> bool:
    """True when ``pid`` is a child spawned here that has exited (it is reaped now).

    Unlike :func:`is_running`, this never reads /proc, so it cannot mistake a child
    that is still starting for a stranger."""
    return _reap(pid)


def read_cmdline(pid: int) -> list[str] | None:
    """The process's argv from /proc; [] for a zombie; None when /proc has no answer."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return [] if Path("/proc/self").exists() else None
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Format: "pid (comm) state ..."; comm may hold spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))


def is_running(pid: int, argv: Sequence[str]) -> bool:
    """Alive, not a zombie, and started from ``argv`` (as far as /proc can tell)."""
    if _reap(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not ours
    except (OverflowError, ValueError):
        return False  # a number no PID can be (past the C int range)
    if _is_zombie(pid):
        return False
    cmdline = read_cmdline(pid)
    if cmdline is None:
        return True
    return cmdline_matches(cmdline, argv)


def send_signal(pid: int, argv: Sequence[str], signum: int) -> bool:
    """Signals ``pid`` only if it is still our process; False when it was not running."""
    if not is_running(pid, argv):
        return False
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def wait_stopped(processes: Sequence[tuple[int, Sequence[str]]], deadline: float) -> list[int]:
    """Polls until every process has exited or ``deadline`` (monotonic) passes.

    Returns the PIDs still running."""
    remaining = list(processes)
    while remaining:
        remaining = [(pid, argv) for pid, argv in remaining if is_running(pid, argv)]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return [pid for pid, _ in remaining]


def stop(processes: Sequence[tuple[int, Sequence[str]]], grace_s: float = 10.0) -> dict[int, str]:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL. Returns pid -> what happened."""
    outcome: dict[int, str] = {}
    signalled = []
    for pid, argv in processes:
        if send_signal(pid, argv, signal.SIGTERM):
            signalled.append((pid, argv))
            outcome[pid] = "stopped"
        else:
            outcome[pid] = "not running"
    stubborn = wait_stopped(signalled, time.monotonic() + grace_s)
    for pid in stubborn:
        argv = dict(signalled)[pid]
        if send_signal(pid, argv, signal.SIGKILL):
            outcome[pid] = "killed"
    wait_stopped([(pid, dict(signalled)[pid]) for pid in stubborn], time.monotonic() + 5.0)
    return outcome


def kill(processes: Sequence[tuple[int, Sequence[str]]]) -> None:
    """SIGKILL each process that is still ours, and wait until it is gone."""
    for pid, argv in processes:
        send_signal(pid, argv, signal.SIGKILL)
    wait_stopped(processes, time.monotonic() + 10.0)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode(errors="replace")
    except OSError as error:
        return f"(cannot read {path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


class ProbeError(Exception):
    """An HTTP probe failed: connection refused, TLS, timeout or a non-2xx answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def http_json(
    method: str,
    url: str,
    tls: TlsFiles | None,
    body: Any = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> Any:
    """One synchronous JSON request; ProbeError on any failure (with the wire error)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    context = client_context(tls) if url.startswith("https:") and tls is not None else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            raw = response.read(ANSWER_BYTES_MAX + 1)
            # A bounded read stops at EOF without complaint: compare with the length.
            missing = response.length if len(raw) <= ANSWER_BYTES_MAX else None
    except urllib.error.HTTPError as error:
        raw = error.read(ERROR_BYTES_MAX)
        error.close()
        raise ProbeError(_error_message(error.code, raw), error.code) from error
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as error:
        # HTTPException: the answer is no HTTP (a bad status line, a broken chunk)
        reason = getattr(error, "reason", error)
        raise ProbeError(f"{url}: {str(reason) or type(reason).__name__}") from error
    if len(raw) > ANSWER_BYTES_MAX:
        raise ProbeError(f"{url}: answer exceeds {ANSWER_BYTES_MAX} bytes")
    if missing:
        raise ProbeError(f"{url}: answer cut short ({missing} bytes missing)")
    try:
        return json.loads(raw) if raw else None
    except JSON_ERRORS as error:  # not JSON, not UTF-8, too deep, a too-long integer
        raise ProbeError(f"{url}: answer is not JSON") from error


def _error_message(status: int, raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return f"{error['code']}: {error['message']} (HTTP {status})"
    except (*JSON_ERRORS, KeyError, TypeError):
        return f"HTTP {status}: {raw[:200].decode(errors='replace')}"


def is_ready(url: str, tls: TlsFiles | None) -> bool:
    try:
        http_json("GET", f"{url}/readyz", tls)
    except ProbeError:
        return False
    return True
