"""``tide proxy`` against a real cluster: a real proxy process on a free port, driven
by curl, by a Node.js program and by the seed's own Python client.

Every proxy started here is stopped by its PID when the test ends (SIGTERM, then
SIGKILL), and its log is printed then. Nothing sleeps a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tidemq import Admin, UnknownGroup
from tidemq.wire.partitioner import partition_for_key

NODE_PROGRAM = Path(__file__).with_name("proxy_order.mjs")
# The seed's scripts: ../shared/seed beside the repository (as CI lays it out), else
# the workplace's copy; TIDE_SEED_DIR overrides both.
SEED_DIR = next(
    (
        candidate
        for candidate in (
            Path(os.environ.get("TIDE_SEED_DIR", "/nonexistent")),
            Path(__file__).resolve().parents[3] / "shared" / "seed",
            Path("/work/shared/seed"),
        )
        if candidate.is_dir()
    ),
    Path("/work/shared/seed"),
)
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Answer:
    status: int
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def error_code(self) -> str:
        return str(self.json["error"]["code"])


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    tls: dict[str, str] | None  # ca_file / cert_file / key_file for curl; None: plain

    def curl_flags(self, client_cert: bool = True) -> list[str]:
        if self.tls is None:
            return []
        flags = ["--cacert", self.tls["ca_file"]]
        if client_cert:
            flags += ["--cert", self.tls["cert_file"], "--key", self.tls["key_file"]]
        return flags

    def curl(
        self,
        method: str,
        path: str,
        body: Any = None,
        *extra: str,
        raw_body: str | None = None,
        client_cert: bool = True,
    ) -> Answer:
        """One request with curl; the answer's status and body."""
        command = [
            "curl",
            "-sS",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            *self.curl_flags(client_cert),
        ]
        data = raw_body if raw_body is not None else None if body is None else json.dumps(body)
        if data is not None:
            command += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        command += [*extra, self.url + path]
        completed = subprocess.run(
            command, input=data, capture_output=True, text=True, timeout=60, check=False
        )
        if completed.returncode != 0:
            raise CurlFailed(completed.returncode, completed.stderr)
        text, _, status = completed.stdout.rpartition("\n")
        return Answer(int(status), text)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class CurlFailed(Exception):
    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"curl exited {returncode}: {stderr}")
        self.returncode = returncode


def _poll(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)  # the polling interval, not a wait for a condition


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(cluster: Any, *flags: str, plain_http: bool = False) -> ProxyProcess:
        port = _free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
        environment.update(cluster.env)
        command = [sys.executable, "-m", "tidemq", "proxy", "--listen", f"127.0.0.1:{port}"]
        command += ["--plain-http", *flags] if plain_http else list(flags)
        log_path = tmp_path / f"proxy-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        tls = None if plain_http else dict(cluster.config)
        proxy = ProxyProcess(
            process, f"{'http' if plain_http else 'https'}://127.0.0.1:{port}", log_path, tls
        )
        started.append(proxy)

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"tide proxy exited {process.returncode}:\n{proxy.log_tail()}")
            try:
                return proxy.curl("GET", "/readyz").status == 200
            except CurlFailed:
                return False

        _poll(ready, START_TIMEOUT_S, "the proxy to be ready")
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.send_signal(signal.SIGTERM)
            try:
                proxy.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proxy.process.kill()
                proxy.process.wait(timeout=10)
        print(f"----- {proxy.log_path} -----\n{proxy.log_tail()}")


def _members(admin: Admin, group: str) -> list[Any]:
    """The group's members; none once the coordinator forgot an empty group."""
    try:
        return list(admin.describe_group(group)["members"])
    except UnknownGroup:
        return []


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _create_topic(cluster: Any, name: str, partitions: int) -> None:
    with Admin(**cluster.config) as admin:
        admin.create_topic(name, partitions=partitions, replication_factor=1)


def _open_session(proxy: ProxyProcess, group: str, topic: str, *extra: str) -> str:
    answer = proxy.curl(
        "POST", "/v1/sessions", {"group": group, "topic": topic, "wait_ms": 10_000}, *extra
    )
    assert answer.status == 201, answer.text
    return str(answer.json["session_id"])


def _pull_until(proxy: ProxyProcess, session: str, count: int, query: str = "") -> list[Any]:
    records: list[Any] = []

    def more() -> bool:
        answer = proxy.curl("POST", f"/v1/sessions/{session}/pull?timeout_ms=500{query}")
        assert answer.status == 200, answer.text
        records.extend(answer.json["records"])
        return len(records) >= count

    _poll(more, 30.0, f"{count} records")
    return records


# -- curl ----------------------------------------------------------------------------------


def test_curl_push_pull_commit_over_mutual_tls(cluster: Any, start_proxy: Any) -> None:
    proxy = start_proxy(cluster)
    with pytest.raises(CurlFailed):  # no client certificate: the handshake is refused
        proxy.curl("GET", "/healthz", client_cert=False)
    assert proxy.curl("GET", "/healthz").json == {"status": "ok"}
    tls = Path(cluster.config["ca_file"]).parent  # a broker's certificate is not a client's
    as_broker = ("--cert", str(tls / "broker-1.pem"), "--key", str(tls / "broker-1-key.pem"))
    refused = proxy.curl("POST", "/v1/topics/curl-orders/records", {"value": "x"}, *as_broker)
    assert (refused.status, refused.error_code) == (403, "forbidden"), refused.text
    paths = proxy.curl("GET", "/openapi.json").json["paths"]
    for path in (
        "/v1/topics/{topic}/records",
        "/v1/sessions",
        "/v1/sessions/{session_id}/events",
        "/v1/sessions/{session_id}/commit",
        "/api/python/pull-as-subscriber",
    ):
        assert path in paths

    _create_topic(cluster, "curl-orders", 3)
    one = proxy.curl("POST", "/v1/topics/curl-orders/records", {"key": "alice", "value": "héllo"})
    assert one.status == 200, one.text
    many = proxy.curl(
        "POST",
        "/v1/topics/curl-orders/records",
        {
            "encoding": "base64",
            "records": [
                {"key": _b64(b"bob"), "value": _b64(b"\xff\x00")},
                {"key": "alice", "value": "second", "encoding": "utf-8", "headers": {"h": "1"}},
                {"value": "pinned", "partition": 2, "encoding": "utf-8"},
            ],
        },
    )
    assert many.status == 200, many.text
    offsets = one.json["offsets"] + many.json["offsets"]
    assert offsets[3]["partition"] == 2
    alice_partition = partition_for_key(b"alice", 3)
    assert offsets[0]["partition"] == offsets[2]["partition"] == alice_partition
    assert offsets[2]["offset"] > offsets[0]["offset"]
    assert offsets[1]["partition"] == partition_for_key(b"bob", 3)

    session = _open_session(proxy, "curl-group", "curl-orders")
    records = _pull_until(proxy, session, 4, "&encoding=base64")
    assert len(records) == 4
    decoded = {
        (base64.b64decode(r["key"]) if r["key"] else None, base64.b64decode(r["value"]))
        for r in records
    }
    assert decoded == {
        (b"alice", "héllo".encode()),
        (b"bob", b"\xff\x00"),
        (b"alice", b"second"),
        (None, b"pinned"),
    }
    alice = [r for r in records if r["key"] == base64.b64encode(b"alice").decode()]
    assert [base64.b64decode(r["value"]) for r in alice] == ["héllo".encode(), b"second"]
    assert alice[1]["headers"] == {"h": base64.b64encode(b"1").decode()}

    described = proxy.curl("GET", f"/v1/sessions/{session}").json
    batch = described["batch"]
    assert batch >= 1 and described["committed_batch"] == 0
    committed = proxy.curl("POST", f"/v1/sessions/{session}/commit", {"batch": batch})
    assert committed.status == 200, committed.text
    assert sum(entry["offset"] for entry in committed.json["committed"]) == 4
    assert proxy.curl("DELETE", f"/v1/sessions/{session}").json["closed"] is True
    assert proxy.curl("GET", f"/v1/sessions/{session}").status == 404

    # The group resumes after the commit: a new member of it gets nothing again.
    again = _open_session(proxy, "curl-group", "curl-orders")
    empty = proxy.curl("POST", f"/v1/sessions/{again}/pull?timeout_ms=1000")
    assert empty.json == {"records": [], "batch": 0}
    with Admin(**cluster.config) as admin:
        group = admin.describe_group("curl-group")
    assert sum(entry["committed"] for entry in group["offsets"]) == 4
    metrics = proxy.curl("GET", "/metrics").text
    assert 'tide_proxy_records_in_total{topic="curl-orders"} 4.0' in metrics
    assert "tide_proxy_sessions 1.0" in metrics


def test_curl_subscribe_with_server_sent_events(cluster: Any, start_proxy: Any) -> None:
    proxy = start_proxy(cluster, "--keepalive-ms", "200")
    _create_topic(cluster, "sse-orders", 2)
    pushed = proxy.curl(
        "POST",
        "/v1/topics/sse-orders/records",
        {"records": [{"key": f"k{i}", "value": f"v{i}"} for i in range(3)]},
    )
    assert pushed.status == 200, pushed.text
    session = _open_session(proxy, "sse-group", "sse-orders")
    with _event_stream(proxy, session) as events:
        values, batch = _collect_batch(events, 3)
        assert sorted(values) == ["v0", "v1", "v2"]
        # No acknowledgement yet: the stream holds the next batch back, and a pull on
        # the same session is refused while the stream is open.
        busy = proxy.curl("POST", f"/v1/sessions/{session}/pull")
        assert (busy.status, busy.error_code) == (409, "session_busy")
        more = proxy.curl("POST", "/v1/topics/sse-orders/records", {"key": "k9", "value": "v9"})
        assert more.status == 200, more.text
        assert proxy.curl("GET", f"/v1/sessions/{session}").json["batch"] == batch
        ack = proxy.curl("POST", f"/v1/sessions/{session}/commit", {"batch": batch})
        assert ack.status == 200, ack.text
        values, second = _collect_batch(events, 1)
        assert values == ["v9"] and second == batch + 1
        proxy.curl("POST", f"/v1/sessions/{session}/commit", {"batch": second})
    # Its session is closed and its member leaves the group.
    _poll(lambda: proxy.curl("GET", f"/v1/sessions/{session}").status == 404, 15.0, "cleanup")
    with Admin(**cluster.config) as admin:
        _poll(lambda: not _members(admin, "sse-group"), 15.0, "the member to leave")
        offsets = admin.describe_group("sse-group")["offsets"]
    assert sum(entry["committed"] for entry in offsets) == 4
    assert (
        'tide_proxy_sessions_closed_total{reason="disconnected"} 1.0'
        in proxy.curl("GET", "/metrics").text
    )

    # ack=auto: the proxy commits each batch itself once it is written.
    automatic = _open_session(proxy, "sse-auto", "sse-orders")
    with _event_stream(proxy, automatic, "?ack=auto&max_records=2") as events:
        received = []
        while len(received) < 4:
            values, _ = _collect_batch(events, None, ack="auto")
            received += values
        assert sorted(received) == ["v0", "v1", "v2", "v9"]
        with Admin(**cluster.config) as admin:

            def all_committed() -> bool:
                offsets = admin.describe_group("sse-auto")["offsets"]
                return sum(entry["committed"] for entry in offsets) == 4

            _poll(all_committed, 15.0, "the automatic commits")


@contextlib.contextmanager
def _event_stream(
    proxy: ProxyProcess, session: str, query: str = ""
) -> Iterator[queue.Queue[tuple[str, Any]]]:
    """``curl -N`` on the session's events; (event, data) pairs arrive in the queue.
    Leaving the block ends curl: the client goes away."""
    url = f"{proxy.url}/v1/sessions/{session}/events{query}"
    stream = subprocess.Popen(
        ["curl", "-sS", "-N", *proxy.curl_flags(), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    reader = threading.Thread(target=_read_events, args=(stream, events), daemon=True)
    reader.start()
    try:
        yield events
    finally:
        stream.send_signal(signal.SIGTERM)
        stream.wait(timeout=10)
        reader.join(timeout=10)
        assert stream.stdout is not None
        stream.stdout.close()


def _read_events(stream: subprocess.Popen[bytes], events: queue.Queue[tuple[str, Any]]) -> None:
    assert stream.stdout is not None
    event = "message"
    for raw in stream.stdout:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            events.put((event, json.loads(line[6:])))
            event = "message"


def _collect_batch(
    events: queue.Queue[tuple[str, Any]], count: int | None, ack: str = "manual"
) -> tuple[list[str], int]:
    """The values of the next batch's message events (``count`` of them, unless
    None) and the batch's number."""
    values: list[str] = []
    deadline = time.monotonic() + 30.0
    while True:
        event, data = events.get(timeout=max(0.0, deadline - time.monotonic()))
        if event == "message":
            values.append(data["value"])
        elif event == "batch":
            assert data["count"] == len(values) == (count or len(values)), (data, values)
            assert data["ack"] == ack
            return values, int(data["batch"])


def test_records_not_committed_go_to_the_next_member(cluster: Any, start_proxy: Any) -> None:
    proxy = start_proxy(cluster)
    _create_topic(cluster, "redeliver", 1)
    records = [{"key": "k", "value": f"v{i}"} for i in range(3)]
    assert proxy.curl("POST", "/v1/topics/redeliver/records", {"records": records}).status == 200
    first = _open_session(proxy, "redeliver-group", "redeliver")
    assert [r["value"] for r in _pull_until(proxy, first, 3)] == ["v0", "v1", "v2"]
    assert proxy.curl("DELETE", f"/v1/sessions/{first}").status == 200  # never committed
    second = _open_session(proxy, "redeliver-group", "redeliver")
    again = _pull_until(proxy, second, 3)
    assert [(r["value"], r["offset"]) for r in again] == [("v0", 0), ("v1", 1), ("v2", 2)]
    assert proxy.curl("POST", f"/v1/sessions/{second}/commit").status == 200
    assert proxy.curl("DELETE", f"/v1/sessions/{second}").status == 200
    third = _open_session(proxy, "redeliver-group", "redeliver")
    nothing = proxy.curl("POST", f"/v1/sessions/{third}/pull?timeout_ms=1000")
    assert nothing.json["records"] == []


def test_bad_input_gets_a_clear_error_and_changes_nothing(cluster: Any, start_proxy: Any) -> None:
    proxy = start_proxy(cluster, "--max-request-bytes", "4096")
    _create_topic(cluster, "strict", 1)
    push = "/v1/topics/strict/records"
    bad = "invalid_request"
    two = [{"value": "fine"}]  # a good record first: the whole request is still refused
    cases: list[tuple[str, str, Any, str | None, int, str]] = [
        ("POST", push, None, "{not json", 400, "malformed_json"),
        ("POST", push, None, "", 400, "malformed_json"),
        ("POST", push, [1, 2], None, 400, "invalid_request"),
        ("POST", push, {"records": []}, None, 400, "invalid_request"),
        ("POST", push, {"records": [*two, {"value": "%%", "encoding": "base64"}]}, None, 400, bad),
        (
            "POST",
            push,
            {"records": [*two, {"value": "x", "partition": 1}]},
            None,
            404,
            "unknown_partition",
        ),
        ("POST", push, {"value": "x", "colour": "red"}, None, 400, "invalid_request"),
        ("POST", push, {"value": "x" * 5000}, None, 413, "request_too_large"),
        ("POST", "/v1/topics/bad%20name/records", {"value": "x"}, None, 400, "invalid_request"),
        ("POST", "/v1/sessions", {"group": "g", "topics": "strict"}, None, 400, "invalid_request"),
        ("POST", "/v1/sessions", {"group": "no way", "topic": "strict"}, None, 400, bad),
        ("POST", "/v1/sessions/nope/pull", None, None, 404, "unknown_session"),
        ("GET", "/v1/sessions/nope/events", None, None, 404, "unknown_session"),
        ("POST", "/v1/sessions/nope/commit", None, None, 404, "unknown_session"),
        ("DELETE", "/v1/sessions/nope", None, None, 404, "unknown_session"),
        ("POST", "/api/python/push", {"key": 1, "message": "m"}, None, 400, "invalid_request"),
        ("GET", "/v1/nowhere", None, None, 404, "not_found"),
        ("GET", push, None, None, 405, "method_not_allowed"),
    ]
    for method, path, body, raw, status, code in cases:
        answer = proxy.curl(method, path, body, raw_body=raw)
        assert (answer.status, answer.error_code) == (status, code), (method, path, answer.text)
        assert answer.json["error"]["message"]

    session = _open_session(proxy, "strict-group", "strict")
    for query in ("max_records=0", "timeout_ms=30001", "encoding=latin-1", "max_records=x"):
        answer = proxy.curl("POST", f"/v1/sessions/{session}/pull?{query}")
        assert (answer.status, answer.error_code) == (400, "invalid_request"), answer.text
    for query in ("ack=never", "keepalive_ms=5"):
        answer = proxy.curl("GET", f"/v1/sessions/{session}/events?{query}")
        assert (answer.status, answer.error_code) == (400, "invalid_request"), answer.text
    for body, status, code in [
        ({"batch": "x"}, 400, "invalid_request"),
        ({"batch": 7}, 409, "batch_mismatch"),
        ({"batch": 0, "more": 1}, 400, "invalid_request"),
    ]:
        answer = proxy.curl("POST", f"/v1/sessions/{session}/commit", body)
        assert (answer.status, answer.error_code) == (status, code), answer.text

    # Nothing of the above was written: the first good record gets offset 0.
    first = proxy.curl("POST", push, {"key": "a", "value": "first"})
    assert first.json["offsets"] == [{"partition": 0, "offset": 0}], first.text
    assert [r["value"] for r in _pull_until(proxy, session, 1)] == ["first"]
    proxy.curl("POST", push, {"key": "a", "value": "second"})
    assert [r["value"] for r in _pull_until(proxy, session, 1)] == ["second"]
    # Committing batch 1 would also commit batch 2, which the client may not have
    # processed: refused, and nothing is committed.
    stale = proxy.curl("POST", f"/v1/sessions/{session}/commit", {"batch": 1})
    assert (stale.status, stale.error_code) == (409, "batch_mismatch"), stale.text
    with Admin(**cluster.config) as admin:
        assert admin.describe_group("strict-group")["offsets"] == []
        assert "bad name" not in json.dumps(admin.list_topics())
    assert proxy.curl("POST", f"/v1/sessions/{session}/commit", {"batch": 2}).status == 200


def test_limits_per_client_in_total_and_idle_sessions(
    cluster: Any, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = start_proxy(
        cluster,
        "--max-sessions",
        "3",
        "--max-sessions-per-client",
        "2",
        "--session-idle-timeout-ms",
        "3000",
        "--max-pushes-per-client",
        "1",
    )
    _create_topic(cluster, "limited", 1)
    body = {"group": "limited-group", "topic": "limited"}
    other = ("--interface", "127.0.0.2")  # a second client: another loopback address
    mine = [proxy.curl("POST", "/v1/sessions", body) for _ in range(2)]
    assert [answer.status for answer in mine] == [201, 201]
    refused = proxy.curl("POST", "/v1/sessions", body)
    assert (refused.status, refused.error_code) == (429, "too_many_requests")
    assert "client 127.0.0.1" in refused.json["error"]["message"]
    theirs = proxy.curl("POST", "/v1/sessions", body, *other)
    assert theirs.status == 201, theirs.text
    full = proxy.curl("POST", "/v1/sessions", body, *other)
    assert (full.status, full.error_code) == (429, "too_many_requests")
    assert "maximum of 3 sessions" in full.json["error"]["message"]
    # A session belongs to the client that opened it.
    foreign = proxy.curl("GET", f"/v1/sessions/{mine[0].json['session_id']}", None, *other)
    assert (foreign.status, foreign.error_code) == (404, "unknown_session")

    def closed_for_idleness() -> bool:
        metrics = proxy.curl("GET", "/metrics").text
        return 'tide_proxy_sessions_closed_total{reason="idle"} 3.0' in metrics

    _poll(closed_for_idleness, 20.0, "idle sessions to be closed")
    assert (
        proxy.curl("GET", f"/v1/sessions/{theirs.json['session_id']}", None, *other).status == 404
    )
    with Admin(**cluster.config) as admin:
        _poll(lambda: not _members(admin, "limited-group"), 15.0, "members to leave")
    assert proxy.curl("POST", "/v1/sessions", body).status == 201
    assert (
        'tide_proxy_rejected_requests_total{limit="sessions"} 2.0'
        in proxy.curl("GET", "/metrics").text
    )

    # One push in flight per client: a slow upload holds the slot, so another push of
    # the same client is refused meanwhile, while other clients' pushes go through.
    slow_body = tmp_path / "slow.json"  # ~10 s at 40 KB/s
    slow_body.write_text(json.dumps({"key": "slow", "value": "x" * 400_000}))
    command = ["curl", "-sS", "--limit-rate", "40K", "-o", "/dev/null", "-w", "%{http_code}"]
    command += [*proxy.curl_flags(), "-H", "Content-Type: application/json"]
    command += ["--data-binary", f"@{slow_body}", f"{proxy.url}/v1/topics/limited/records"]
    slow = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        in_flight = "tide_proxy_pushes_in_flight 1.0"
        _poll(lambda: in_flight in proxy.curl("GET", "/metrics").text, 10.0, "the slow push")
        refused_push = proxy.curl("POST", "/v1/topics/limited/records", {"value": "quick"})
        assert (refused_push.status, refused_push.error_code) == (429, "too_many_requests")
        other_client = proxy.curl("POST", "/v1/topics/limited/records", {"value": "x"}, *other)
        assert other_client.status == 200, other_client.text
        assert slow.poll() is None, f"the slow upload finished early: {slow.communicate()}"
        output, errors = slow.communicate(timeout=60)
        assert output == "200", errors
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.communicate()


# -- Node.js -------------------------------------------------------------------------------


def test_node_order_and_exactly_once(cluster: Any, start_proxy: Any) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/test installs nodejs when absent)")
    partitions, messages = 12, 20_000
    _create_topic(cluster, "node-orders", partitions)
    proxy = start_proxy(cluster, "--client-auth", "none")
    environment = {
        **os.environ,
        "NODE_EXTRA_CA_CERTS": cluster.config["ca_file"],
        "PROXY_URL": proxy.url,
        "TOPIC": "node-orders",
        "GROUP": "node-group",
        "MESSAGES": str(messages),
        "KEYS": "40",
        "PARTITIONS": str(partitions),
        "SESSIONS": "4",
        "DEADLINE_MS": "120000",
    }
    completed = subprocess.run(
        [node, str(NODE_PROGRAM)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    print("node summary:", summary)
    assert summary["received"] == messages
    assert summary["duplicates"] == summary["outOfOrder"] == summary["wrongPartition"] == 0
    assert summary["sharedPartitions"] == summary["leftOver"] == 0
    assert summary["viaPull"] > 0 and summary["viaEvents"] > 0
    with Admin(**cluster.config) as admin:
        offsets = admin.describe_group("node-group")["offsets"]
    assert sum(entry["committed"] for entry in offsets) == messages


# -- the seed's own Python client ------------------------------------------------------------

SEED_DRIVER = """
import json, sys, threading, time
from python_client import Consumer, Producer

port, total = int(sys.argv[1]), int(sys.argv[2])
producer, consumer = Producer("localhost", port), Consumer("localhost", port)
answers = {producer.push(str(i % 3), str(i)) for i in range(total)}
pulled = []
deadline = time.monotonic() + 60
while len(pulled) < 5 and time.monotonic() < deadline:
    pulled += [pair for pair in consumer.pull() if pair != (None, None)]
lock, subscribed = threading.Lock(), []
def store(key, value):
    with lock:
        subscribed.append((key, value))
threading.Thread(target=consumer.subscribe, args=(store,), daemon=True).start()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    with lock:
        if len(pulled) + len(subscribed) >= total:
            break
    time.sleep(0.05)  # the polling interval
with lock:
    print(json.dumps({"answers": sorted(answers), "pulled": pulled, "subscribed": subscribed}))
"""


def test_seed_python_client_pushes_pulls_and_subscribes(
    cluster: Any, start_proxy: Any, tmp_path: Path
) -> None:
    client = SEED_DIR / "python_client.py"
    if not client.exists():
        pytest.skip(f"the seed's client is not at {client} (set TIDE_SEED_DIR)")
    workdir = tmp_path / "seed"
    workdir.mkdir()
    shutil.copy(client, workdir / "python_client.py")  # unchanged; the seed dir is read-only
    (workdir / "driver.py").write_text(SEED_DRIVER)
    _create_topic(cluster, "default", 3)
    proxy = start_proxy(cluster, plain_http=True)
    port = proxy.url.rsplit(":", 1)[1]
    total = 40
    completed = subprocess.run(
        [sys.executable, "driver.py", port, str(total)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["answers"] == ["Pushed to Queue"]
    received = [tuple(pair) for pair in result["pulled"] + result["subscribed"]]
    assert len(result["pulled"]) >= 5 and result["subscribed"], result
    assert sorted(received, key=lambda pair: int(pair[1])) == [
        (str(i % 3), str(i)) for i in range(total)
    ]
