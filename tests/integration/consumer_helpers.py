"""Shared pieces of the consumer integration tests: waiting, producing, committed
offsets, damaging a stored record, and a TCP proxy that can cut a client off."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tidemq import Admin, Producer, UnknownGroup


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Polls ``condition`` every 50 ms until it is true; fails the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)  # the polling interval, not a wait for a condition


def create_topic(cluster: Any, topic: str, partitions: int) -> None:
    with Admin(**cluster.config) as admin:
        admin.create_topic(topic, partitions=partitions, replication_factor=1)


def produce(cluster: Any, topic: str, records: Iterable[tuple[str | None, str]]) -> int:
    count = 0
    with Producer(**cluster.config) as producer:
        for key, value in records:
            producer.send(topic, value, key=key)
            count += 1
        producer.flush(timeout=120)
    return count


def committed(cluster: Any, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets of ``topic`` by partition."""
    with Admin(**cluster.config) as admin:
        try:
            rows = admin.describe_group(group)["offsets"]
        except UnknownGroup:
            return {}
    return {row["partition"]: row["committed"] for row in rows if row["topic"] == topic}


def assignments(cluster: Any, group: str) -> dict[str, set[tuple[str, int]]]:
    """What the coordinator has assigned to each member of ``group`` now."""
    with Admin(**cluster.config) as admin:
        try:
            members = admin.describe_group(group)["members"]
        except UnknownGroup:
            return {}
    return {
        member["member_id"]: {(a["topic"], a["partition"]) for a in member["assignment"]}
        for member in members
    }


def corrupt_stored_record(data_dir: Path, topic: str, partition: int, offset: int) -> None:
    """Makes the stored record at ``offset`` undecodable (its key runs past it) while its
    batch's CRC and record lengths still check: what a buggy producer could have
    written before brokers checked full framing. Edits the segment file in place."""
    for path in sorted(data_dir.rglob("*.log")):
        if not path.parent.name.startswith(f"{topic}-{partition}-"):  # then the topic id
            continue
        data = bytearray(path.read_bytes())
        position = 0
        while position + 61 <= len(data):
            base_offset, batch_length = struct.unpack_from(">qI", data, position)
            (count,) = struct.unpack_from(">i", data, position + 57)
            end = position + batch_length + 12
            if base_offset <= offset < base_offset + count:
                cursor = position + 61
                for _ in range(offset - base_offset):
                    cursor += 4 + struct.unpack_from(">I", data, cursor)[0]
                struct.pack_into(">i", data, cursor + 8, 10_000)
                struct.pack_into(">I", data, position + 17, zlib.crc32(data[position + 21 : end]))
                with open(path, "r+b") as file:
                    file.seek(position)
                    file.write(data[position:end])
                    file.flush()
                    os.fsync(file.fileno())
                return
            position = end
    pytest.fail(f"no stored record {topic}/{partition}@{offset} under {data_dir}")


class CuttableProxy:
    """A TCP forwarder to ``url``'s host and port that can cut every connection and
    refuse new ones (``cut``) and let them through again (``restore``). TLS passes
    through untouched, so the client still talks to the real service."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 443)
        self._listener = socket.create_server((self._target[0], 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"{parts.scheme}://{self._target[0]}:{self.port}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._cut = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._start(self._accept_loop)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._cut or self._closed
            if refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            self._start(self._pump, client, upstream)
            self._start(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
