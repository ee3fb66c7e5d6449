"""A consumer cut off from the coordinator (not killed) while it keeps running.

The consumer reaches the coordinator through a small TCP proxy in this test; blocking
the proxy swallows every byte both ways (connections stay open, as when a link goes
down). The coordinator must give the consumer's partitions to another member only
after the consumer's session timeout since its last heartbeat. (The consumer side,
which must stop fetching before that, is the client's half of the same promise.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from tidemq import Admin, Consumer
from tidemq.errors import UnknownGroup

SESSION_MS = 4000
HEARTBEAT_MS = 200
GROUP = "cutoff"
TOPIC = "cutoff"


class BlockableProxy:
    """Forwards TCP from a local port to ``target``; ``block()`` swallows everything."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.blocked = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._start(self._accept)

    def block(self) -> None:
        self.blocked.set()

    def unblock(self) -> None:
        self.blocked.clear()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            self._start(self._pump, client, upstream)
            self._start(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                if not self.blocked.is_set():
                    sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def members(admin: Admin) -> dict[str, list[int]]:
    try:
        group = admin.describe_group(GROUP)
    except UnknownGroup:  # not yet
        return {}
    return {
        m["member_id"]: sorted(int(a["partition"]) for a in m["assignment"])
        for m in group["members"]
    }


def wait_for(check: Any, what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = check()
        if answer:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_a_cut_off_member_keeps_its_partitions_for_its_session_timeout(cluster: Any) -> None:
    config = dict(cluster.config)
    admin = Admin(**config)
    admin.create_topic(TOPIC, partitions=4, replication_factor=1)
    coordinator = urlsplit(config["bootstrap"])
    proxy = BlockableProxy(coordinator.hostname or "127.0.0.1", coordinator.port or 443)
    options = {"session_timeout_ms": SESSION_MS, "heartbeat_interval_ms": HEARTBEAT_MS}
    cut_off = Consumer(
        TOPIC,
        group=GROUP,
        **{**config, "bootstrap": f"{coordinator.scheme}://127.0.0.1:{proxy.port}"},
        **options,
    )
    other: Consumer | None = None
    try:
        first = wait_for(
            lambda: next((m for m, a in members(admin).items() if len(a) == 4), None),
            "the first member to own every partition",
            30,
        )
        proxy.block()
        blocked_at = time.monotonic()
        other = Consumer(TOPIC, group=GROUP, **config, **options)
        granted_at = None
        while time.monotonic() - blocked_at < SESSION_MS / 1000 + 20:
            now = time.monotonic()
            view = members(admin)
            if any(a for m, a in view.items() if m != first):
                granted_at = now
                break
            time.sleep(0.05)
        assert granted_at is not None, "the cut-off member's partitions never moved"
        # Its last heartbeat reached the coordinator at most one interval (plus a
        # request's time) before the cut; the session counts from there.
        earliest = blocked_at + (SESSION_MS - HEARTBEAT_MS - 300) / 1000
        assert granted_at >= earliest, (
            f"partitions moved {granted_at - blocked_at:.2f} s after the cut, "
            f"before the {SESSION_MS} ms session timeout"
        )
        assert first not in members(admin)  # it was expired, not merely fenced
    finally:
        if other is not None:
            other.close()
        proxy.close()  # its connections fail at once, so the cut-off member closes fast
        cut_off.close()
        admin.close()
