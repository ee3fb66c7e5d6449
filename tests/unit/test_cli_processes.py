"""Process handling of `tide up` / `tide down` on a harmless stand-in process."""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

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


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers GET /<status>/<kind> with a body of that kind."""

    bodies = {
        "ok": b'{"brokers": []}',
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "utf": b'{"x": "\xff"}',
        "digits": b"1" * 5_000,
        "huge": b" " * 64,  # with ANSWER_BYTES_MAX lowered below
        "error": b'{"error": {"code": "not_found", "message": "no such topic"}}',
        "deep-error": b"[" * 100_000,
    }

    def do_GET(self) -> None:  # http.server calls it by this name
        _, status, kind = self.path.split("/")
        body = self.bodies[kind]
        self.send_response(int(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def test_http_json_turns_any_bad_answer_into_a_probe_error(monkeypatch: Any) -> None:
    """A wrong or hostile server gives a ProbeError (a clear CLI error), never a
    traceback or an unbounded read: deep nesting, bad UTF-8, a 5,000-digit integer,
    an answer past the bound, and error bodies of each kind."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert processes.http_json("GET", f"{base}/200/ok", None) == {"brokers": []}
        for kind in ("deep", "utf", "digits"):
            with pytest.raises(processes.ProbeError, match="answer is not JSON"):
                processes.http_json("GET", f"{base}/200/{kind}", None)
        monkeypatch.setattr(processes, "ANSWER_BYTES_MAX", 63)
        with pytest.raises(processes.ProbeError, match="answer exceeds 63 bytes"):
            processes.http_json("GET", f"{base}/200/huge", None)
        with pytest.raises(processes.ProbeError, match="not_found: no such topic") as found:
            processes.http_json("GET", f"{base}/404/error", None)
        assert found.value.status == 404
        with pytest.raises(processes.ProbeError, match=r"HTTP 500: \[\[\[") as found:
            processes.http_json("GET", f"{base}/500/deep-error", None)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",  # no status line: BadStatusLine
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",  # cut short
    ],
)
def test_http_json_turns_an_answer_that_is_no_http_into_a_probe_error(answer: bytes) -> None:
    """http.client raises HTTPException subclasses (not OSError) for these: found by
    re-review, they were tracebacks out of every CLI command."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(answer)

    server = threading.Thread(target=serve_once, daemon=True)
    server.start()
    try:
        with pytest.raises(processes.ProbeError):
            processes.http_json("GET", f"http://127.0.0.1:{listener.getsockname()[1]}/x", None)
    finally:
        server.join(10)
        listener.close()
