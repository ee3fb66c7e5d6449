#!/usr/bin/env python3
"""The latency floor of tidemq's hop structure, in bare Python, on this machine.

Usage: .venv/bin/python scripts/latency_floor.py [--rate 2000] [--seconds 10]
       [--warmup 1] [--plain] [--no-fsync] [--sync thread|inline] [--coalesce]
       [--partitions 12] [--brokers 3] [--switch-interval-ms 0] [--repeat 1] [--pull]

It does not import tidemq: it measures what the hops tidemq needs for acks=all with an
fsync on every replica cost when each hop does almost nothing else. Five processes
(with --brokers 3): three brokers, one producer, one consumer, each on uvloop with
asyncio Protocols, TLS on every connection unless --plain (a throwaway CA and
certificate are made with ``cryptography``), and length-prefixed binary frames.

The path of one message:

1. The producer stamps a 100-byte value with the send time (CLOCK_MONOTONIC, the same
   clock in every process) and sends it to the leader of crc32(key) % partitions. It
   is open loop: messages are scheduled by time at --rate and sent whether or not
   earlier ones are acknowledged. It wakes at most once per millisecond (libuv's timer
   resolution) and sends every message then due, each stamped when it is sent.
2. The leader (broker p % brokers) appends the record to its one journal file
   (os.write), hands the fdatasync to a dedicated thread that group-commits (one sync
   covers every write before it), and at once pushes the record to the partition's
   follower. Followers are spread so each leader's partitions replicate to every other
   broker.
3. The follower appends to its own journal, group-commits the same way, and sends one
   small ack (partition, offset) per partition per sync back to the leader.
4. Once the leader's own sync and the follower's ack both cover an offset, the leader
   pushes the record to the consumer and acknowledges the producer.
5. The consumer (connected to every broker) records receive time - send time.

--coalesce gathers every frame written to one peer within one event-loop iteration
into one write (one TLS record, one syscall); without it each frame is its own write.
--no-fsync keeps the sync thread and its hand-off but skips the fdatasync call;
--sync inline runs the group commit on the event loop instead of on a thread (with
--no-fsync that removes the hand-off too). --switch-interval-ms sets the GIL switch
interval (the sync thread waits up to that long for the GIL to report back while the
loop thread runs). --brokers 1 is replication factor 1.

--pull follows tidemq's PULL structure instead (like Kafka); see "PULL mode" below.

PULL mode (--pull):

1. The producer keeps at most one produce request in flight per broker. At each wake
   it queues every message then due (each stamped when queued, i.e. when the
   application hands it over) on its leader's broker; a broker with no request in
   flight gets them at once in one PRODUCE_REQ frame (many records, possibly for
   several of its partitions); records queued while a request is in flight wait and
   all go in the next request when the answer comes (Nagle-style, no linger).
2. The leader assigns offsets, writes the request's records to its journal in one
   os.write (group commit as above) and keeps them in memory per partition. It
   answers the produce request only once the high watermark covers every record in
   it. High watermark = min(own durable end, follower's fetched durable end).
3. Each broker runs one fetch session (its own connection) per leader it follows,
   with one FETCH in flight naming its partitions and next offsets. The leader
   answers at once if it has records past them (up to its log end, not waiting for
   its own fsync), else parks the fetch until the next append to one of them. The
   follower appends the answer (one os.write), waits for a sync that covers it, and
   only then sends the next FETCH with its new offsets, which is what moves the
   leader's high watermark.
4. The consumer keeps one long-poll FETCH in flight per broker naming the partitions
   that broker leads; answered with records up to the high watermark when there are
   any, else parked until the high watermark of one of them moves. On the answer it
   records receive time - send time for each record and sends the next FETCH.

Only messages sent after --warmup seconds, during --seconds, are measured. Printed per
run, one JSON line: end-to-end latency p50/p90/p99/p99.9/max (ms), the producer's
send-to-ack latency, the producer's lag behind its schedule, CPU seconds per process
during the measured window (utime + stime from /proc/<pid>/stat, all threads), the
load average before the run, and messages missing at the end. With --repeat N a last
line gives the medians over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import multiprocessing
import os
import signal
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Frames: u32 length of what follows, u8 type, the type's fields (little-endian), and
# for PRODUCE and RECORD the value. A RECORD frame is also the journal's record format:
# the leader writes, replicates and delivers the very same bytes.
U32 = struct.Struct("<I")
HELLO = struct.Struct("<IBBB")  # role, broker id
PRODUCE = struct.Struct("<IBH")  # partition; the value follows
RECORD = struct.Struct("<IBHQ")  # partition, offset; the value follows
ACK = struct.Struct("<IBHQ")  # follower -> leader: partition, offset now durable
PRODUCE_ACK = struct.Struct("<IBHQq")  # leader -> producer: partition, offset, send time
STAMP = struct.Struct("<qq")  # a value starts with its send time (ns) and its sequence
SEND_NS = struct.Struct("<q")
T_HELLO, T_PRODUCE, T_RECORD, T_ACK, T_PRODUCE_ACK = range(5)
# PULL mode frames.
FETCH_HEAD = struct.Struct("<IBH")  # entries follow
FETCH_ENTRY = struct.Struct("<HQ")  # partition, next offset wanted (= durable end)
FETCH_RESP = struct.Struct("<IBI")  # record count; that many RECORD frames follow
PRODUCE_REQ = struct.Struct("<IBH")  # record count; that many PRODUCE_ENTRY + value
PRODUCE_ENTRY = struct.Struct("<HH")  # partition, value length
PRODUCE_RESP = struct.Struct("<IBH")  # record count acknowledged
T_FETCH, T_FETCH_RESP, T_PRODUCE_REQ, T_PRODUCE_RESP = range(5, 9)
MAX_BATCH = 4096  # records per produce request / fetch answer (keeps frames < MAX_FRAME)
ROLE_PRODUCER, ROLE_CONSUMER, ROLE_BROKER = range(3)
VALUE_SIZE = 100
MAX_FRAME = 1 << 20
NEVER = 1 << 62  # the follower offset of a partition that has no follower


@dataclass(frozen=True)
class Config:
    rate: int
    seconds: float
    warmup: float
    drain: float
    partitions: int
    brokers: int
    tls: bool
    fsync: bool
    sync: str
    coalesce: bool
    pull: bool
    switch_interval_ms: float
    ports: tuple[int, ...]
    cert_dir: str
    data_dir: str

    def leader(self, partition: int) -> int:
        return partition % self.brokers

    def follower(self, partition: int) -> int | None:
        """A broker other than the leader; a leader's partitions use every other broker."""
        if self.brokers < 2:
            return None
        step = 1 + (partition // self.brokers) % (self.brokers - 1)
        return (self.leader(partition) + step) % self.brokers


FrameHandler = Callable[["Link", int, bytes], None]


class Link(asyncio.Protocol):
    """One connection: splits the byte stream into frames, writes frames (coalesced or not)."""

    transport: asyncio.Transport

    def __init__(self, on_frame: FrameHandler, coalesce: bool) -> None:
        self.on_frame = on_frame
        self.coalesce = coalesce
        self.loop = asyncio.get_running_loop()
        self.inbox = bytearray()
        self.outbox: list[bytes] = []
        self.role = -1  # PULL mode: the role its hello announced (server side)
        self.peer = -1  # the broker at the other end (client side) or the hello's id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        inbox = self.inbox
        inbox += data
        size = len(inbox)
        pos = 0
        while size - pos >= 5:
            (length,) = U32.unpack_from(inbox, pos)
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes is over the {MAX_FRAME} limit")
            end = pos + 4 + length
            if end > size:
                break
            self.on_frame(self, inbox[pos + 4], bytes(inbox[pos:end]))
            pos = end
        if pos:
            del inbox[:pos]

    def send(self, frame: bytes) -> None:
        if not self.coalesce:
            self.transport.write(frame)
            return
        if not self.outbox:
            self.loop.call_soon(self.flush)
        self.outbox.append(frame)

    def flush(self) -> None:
        self.transport.write(b"".join(self.outbox))
        self.outbox.clear()


class Journal:
    """One append-only file per broker, made durable by group commit.

    append() writes on the event loop; a sync covers every append made before it, and
    on_durable(n) is then called on the loop with n = the number of appends covered.
    """

    def __init__(self, path: str, cfg: Config, on_durable: Callable[[int], None]) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self.fsync = cfg.fsync
        self.inline = cfg.sync == "inline"
        self.on_durable = on_durable
        self.loop = asyncio.get_running_loop()
        self.appended = 0
        self.scheduled = False
        self.wake = threading.Event()
        if not self.inline:
            threading.Thread(target=self._sync_thread, daemon=True).start()

    def append(self, record: bytes) -> int:
        os.write(self.fd, record)
        self.appended += 1
        if self.inline:
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self._sync_inline)
        elif not self.wake.is_set():
            self.wake.set()
        return self.appended

    def append_many(self, records: bytes, count: int) -> int:
        """PULL mode: ``count`` records in one write; positions count records."""
        os.write(self.fd, records)
        self.appended += count
        if self.inline:
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self._sync_inline)
        elif not self.wake.is_set():
            self.wake.set()
        return self.appended

    def _sync_inline(self) -> None:
        self.scheduled = False
        covered = self.appended
        if self.fsync:
            os.fdatasync(self.fd)
        self.on_durable(covered)

    def _sync_thread(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            covered = self.appended  # read after clear(): a later append sets wake again
            if self.fsync:
                os.fdatasync(self.fd)
            self.loop.call_soon_threadsafe(self.on_durable, covered)


class Broker:
    def __init__(self, cfg: Config, broker_id: int) -> None:
        self.cfg = cfg
        self.id = broker_id
        self.led = [p for p in range(cfg.partitions) if cfg.leader(p) == broker_id]
        self.follower_of = [cfg.follower(p) for p in range(cfg.partitions)]
        self.next_offset = [0] * cfg.partitions
        # Per led partition: (journal position, offset, record, producer) until acks=all.
        self.pending: list[deque[tuple[int, int, bytes, Link]]] = [
            deque() for _ in range(cfg.partitions)
        ]
        self.follower_offset = [-1 if f is not None else NEVER for f in self.follower_of]
        # Records replicated to us, until our own sync covers them.
        self.replicas: deque[tuple[int, int, int, Link]] = deque()
        self.durable_upto = 0
        self.syncs = 0
        self.peers: dict[int, Link] = {}
        self.consumers: list[Link] = []
        self.peers_ready = asyncio.Event()
        self.journal = Journal(
            os.path.join(cfg.data_dir, f"broker{broker_id}.journal"), cfg, self.durable
        )

    def on_frame(self, link: Link, frame_type: int, frame: bytes) -> None:
        if frame_type == T_PRODUCE:
            self.produce(link, frame)
        elif frame_type == T_RECORD:
            self.replicate(link, frame)
        elif frame_type == T_ACK:
            _, _, partition, offset = ACK.unpack(frame)
            self.follower_offset[partition] = offset
            self.complete(partition)
        elif frame_type == T_HELLO:
            _, _, role, peer = HELLO.unpack(frame)
            if role == ROLE_BROKER:
                self.add_peer(peer, link)
            elif role == ROLE_CONSUMER:
                self.consumers.append(link)
        else:
            raise ValueError(f"broker {self.id}: unexpected frame type {frame_type}")

    def add_peer(self, peer: int, link: Link) -> None:
        self.peers[peer] = link
        if len(self.peers) == self.cfg.brokers - 1:
            self.peers_ready.set()

    def produce(self, producer: Link, frame: bytes) -> None:
        (_, _, partition) = PRODUCE.unpack_from(frame)
        if self.cfg.leader(partition) != self.id:
            raise ValueError(f"broker {self.id} does not lead partition {partition}")
        offset = self.next_offset[partition]
        self.next_offset[partition] = offset + 1
        value = frame[PRODUCE.size :]
        record = RECORD.pack(RECORD.size - 4 + len(value), T_RECORD, partition, offset) + value
        position = self.journal.append(record)
        follower = self.follower_of[partition]
        if follower is not None:
            self.peers[follower].send(record)
        self.pending[partition].append((position, offset, record, producer))

    def replicate(self, leader: Link, record: bytes) -> None:
        position = self.journal.append(record)
        _, _, partition, offset = RECORD.unpack_from(record)
        self.replicas.append((position, partition, offset, leader))

    def durable(self, upto: int) -> None:
        self.durable_upto = upto
        self.syncs += 1
        replicas = self.replicas
        if replicas and replicas[0][0] <= upto:
            acks: dict[tuple[Link, int], int] = {}
            while replicas and replicas[0][0] <= upto:
                _, partition, offset, leader = replicas.popleft()
                acks[leader, partition] = offset
            for (leader, partition), offset in acks.items():
                leader.send(ACK.pack(ACK.size - 4, T_ACK, partition, offset))
        for partition in self.led:
            self.complete(partition)

    def complete(self, partition: int) -> None:
        waiting = self.pending[partition]
        upto = self.durable_upto
        replicated = self.follower_offset[partition]
        while waiting and waiting[0][0] <= upto and waiting[0][1] <= replicated:
            _, offset, record, producer = waiting.popleft()
            for consumer in self.consumers:
                consumer.send(record)
            (send_ns,) = SEND_NS.unpack_from(record, RECORD.size)
            producer.send(
                PRODUCE_ACK.pack(PRODUCE_ACK.size - 4, T_PRODUCE_ACK, partition, offset, send_ns)
            )


class FetchSession:
    """PULL mode, follower side: the partitions this broker follows on one leader."""

    def __init__(self, link: Link, partitions: list[int]) -> None:
        self.link = link
        self.next = {p: 0 for p in partitions}  # appended end per partition
        self.awaiting: int | None = None  # journal position the next fetch waits for

    def send_fetch(self) -> None:
        entries = b"".join(FETCH_ENTRY.pack(p, o) for p, o in self.next.items())
        head = FETCH_HEAD.pack(FETCH_HEAD.size - 4 + len(entries), T_FETCH, len(self.next))
        self.link.send(head + entries)


class PullBroker:
    """PULL mode: produce requests answered at the high watermark, long-poll fetches."""

    def __init__(self, cfg: Config, broker_id: int) -> None:
        self.cfg = cfg
        self.id = broker_id
        self.led = [p for p in range(cfg.partitions) if cfg.leader(p) == broker_id]
        self.log: list[list[bytes]] = [[] for _ in range(cfg.partitions)]  # led: records
        self.local_end = [0] * cfg.partitions  # led: records durable here
        self.follower_end = [
            0 if cfg.follower(p) is not None else NEVER for p in range(cfg.partitions)
        ]
        self.hw = [0] * cfg.partitions
        # Journal writes of led records not yet durable: (position, {partition: end}).
        self.unsynced: deque[tuple[int, dict[int, int]]] = deque()
        # Produce requests until the high watermark covers them: (link, {p: end}, count).
        self.produces: list[tuple[Link, dict[int, int], int]] = []
        self.parked_followers: dict[Link, list[tuple[int, int]]] = {}
        self.parked_consumers: dict[Link, list[tuple[int, int]]] = {}
        self.sessions: list[FetchSession] = []  # as a follower, one per leader
        self.syncs = 0
        self.counts = {"produce_reqs": 0, "follower_answers": 0, "consumer_answers": 0}
        self.journal = Journal(
            os.path.join(cfg.data_dir, f"broker{broker_id}.journal"), cfg, self.durable
        )

    def on_frame(self, link: Link, frame_type: int, frame: bytes) -> None:
        if frame_type == T_PRODUCE_REQ:
            self.produce(link, frame)
        elif frame_type == T_FETCH:
            self.fetch(link, frame)
        elif frame_type == T_FETCH_RESP:
            self.replicate(link, frame)
        elif frame_type == T_HELLO:
            _, _, role, peer = HELLO.unpack(frame)
            link.role, link.peer = role, peer
        else:
            raise ValueError(f"broker {self.id}: unexpected frame type {frame_type}")

    # Leader side.

    def produce(self, producer: Link, frame: bytes) -> None:
        (_, _, count) = PRODUCE_REQ.unpack_from(frame)
        pos = PRODUCE_REQ.size
        log, ends = self.log, {}
        records = []
        for _ in range(count):
            partition, size = PRODUCE_ENTRY.unpack_from(frame, pos)
            pos += PRODUCE_ENTRY.size
            value = frame[pos : pos + size]
            pos += size
            if self.cfg.leader(partition) != self.id:
                raise ValueError(f"broker {self.id} does not lead partition {partition}")
            plog = log[partition]
            offset = len(plog)
            record = RECORD.pack(RECORD.size - 4 + size, T_RECORD, partition, offset) + value
            plog.append(record)
            records.append(record)
            ends[partition] = offset + 1
        position = self.journal.append_many(b"".join(records), count)
        self.unsynced.append((position, ends))
        self.produces.append((producer, ends, count))
        self.counts["produce_reqs"] += 1
        if self.parked_followers:
            for link, wanted in list(self.parked_followers.items()):
                if any(p in ends for p, _ in wanted):
                    del self.parked_followers[link]
                    self.answer(link, wanted, self.log_end)
                    self.counts["follower_answers"] += 1

    def log_end(self, partition: int) -> int:
        return len(self.log[partition])

    def hw_end(self, partition: int) -> int:
        return self.hw[partition]

    def answer(
        self, link: Link, wanted: list[tuple[int, int]], end_of: Callable[[int], int]
    ) -> bool:
        """Send the records past each wanted offset up to end_of(p); False if none."""
        records: list[bytes] = []
        for partition, offset in wanted:
            end = end_of(partition)
            if end > offset:
                records.extend(self.log[partition][offset : min(end, offset + MAX_BATCH)])
            if len(records) >= MAX_BATCH:
                break
        if not records:
            return False
        body = b"".join(records)
        link.send(FETCH_RESP.pack(FETCH_RESP.size - 4 + len(body), T_FETCH_RESP, len(records)) + body)
        return True

    def fetch(self, link: Link, frame: bytes) -> None:
        (_, _, count) = FETCH_HEAD.unpack_from(frame)
        wanted = [
            FETCH_ENTRY.unpack_from(frame, FETCH_HEAD.size + i * FETCH_ENTRY.size)
            for i in range(count)
        ]
        if link.role == ROLE_BROKER:  # a follower: its offsets are its durable ends
            moved = False
            for partition, offset in wanted:
                if offset > self.follower_end[partition]:
                    self.follower_end[partition] = offset
                    moved = True
            if moved:
                self.advance()
            if self.answer(link, wanted, self.log_end):
                self.counts["follower_answers"] += 1
            else:
                self.parked_followers[link] = wanted
        elif link.role == ROLE_CONSUMER:
            if self.answer(link, wanted, self.hw_end):
                self.counts["consumer_answers"] += 1
            else:
                self.parked_consumers[link] = wanted
        else:
            raise ValueError(f"broker {self.id}: fetch before hello")

    def advance(self) -> None:
        """Recompute the high watermarks; answer what they now cover."""
        hw, local, follower = self.hw, self.local_end, self.follower_end
        moved = False
        for p in self.led:
            new = min(local[p], follower[p])
            if new > hw[p]:
                hw[p] = new
                moved = True
        if not moved:
            return
        if self.produces:
            waiting = []
            for producer, ends, count in self.produces:
                if all(hw[p] >= end for p, end in ends.items()):
                    producer.send(PRODUCE_RESP.pack(PRODUCE_RESP.size - 4, T_PRODUCE_RESP, count))
                else:
                    waiting.append((producer, ends, count))
            self.produces = waiting
        if self.parked_consumers:
            for link, wanted in list(self.parked_consumers.items()):
                if self.answer(link, wanted, self.hw_end):
                    self.counts["consumer_answers"] += 1
                    del self.parked_consumers[link]

    # Follower side.

    def replicate(self, link: Link, frame: bytes) -> None:
        (_, _, count) = FETCH_RESP.unpack_from(frame)
        session = self.session_of[link]
        body = frame[FETCH_RESP.size :]
        pos, size, nxt = 0, len(body), session.next
        while pos < size:
            (length,) = U32.unpack_from(body, pos)
            _, _, partition, offset = RECORD.unpack_from(body, pos)
            nxt[partition] = offset + 1
            pos += 4 + length
        session.awaiting = self.journal.append_many(body, count)

    # Both.

    def durable(self, upto: int) -> None:
        self.syncs += 1
        unsynced = self.unsynced
        if unsynced and unsynced[0][0] <= upto:
            local = self.local_end
            while unsynced and unsynced[0][0] <= upto:
                _, ends = unsynced.popleft()
                for p, end in ends.items():
                    local[p] = end
            self.advance()
        for session in self.sessions:
            if session.awaiting is not None and session.awaiting <= upto:
                session.awaiting = None
                session.send_fetch()

    session_of: dict[Link, FetchSession]


def tls_contexts(cfg: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    if not cfg.tls:
        return None, None
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(
        os.path.join(cfg.cert_dir, "cert.pem"), os.path.join(cfg.cert_dir, "key.pem")
    )
    client = ssl.create_default_context(cafile=os.path.join(cfg.cert_dir, "ca.pem"))
    return server, client


async def connect(cfg: Config, broker: int, on_frame: FrameHandler, role: int, me: int) -> Link:
    loop = asyncio.get_running_loop()
    _, client_tls = tls_contexts(cfg)
    deadline = time.monotonic() + 10
    while True:
        try:
            _, link = await loop.create_connection(
                lambda: Link(on_frame, cfg.coalesce),
                "127.0.0.1",
                cfg.ports[broker],
                ssl=client_tls,
                server_hostname="localhost" if client_tls else None,
            )
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        link.send(HELLO.pack(HELLO.size - 4, T_HELLO, role, me))
        return link


async def run_pull_broker(cfg: Config, broker_id: int, ctl: Connection) -> None:
    loop = asyncio.get_running_loop()
    broker = PullBroker(cfg, broker_id)
    broker.session_of = {}
    server_tls, _ = tls_contexts(cfg)
    await loop.create_server(
        lambda: Link(broker.on_frame, cfg.coalesce),
        "127.0.0.1",
        cfg.ports[broker_id],
        ssl=server_tls,
    )
    for leader in range(cfg.brokers):
        followed = [
            p
            for p in range(cfg.partitions)
            if cfg.leader(p) == leader and cfg.follower(p) == broker_id
        ]
        if leader == broker_id or not followed:
            continue
        link = await connect(cfg, leader, broker.on_frame, ROLE_BROKER, broker_id)
        link.peer = leader
        session = FetchSession(link, followed)
        broker.sessions.append(session)
        broker.session_of[link] = session
        session.send_fetch()
    ctl.send("ready")

    def report() -> None:
        ctl.recv()
        ctl.send({"appends": broker.journal.appended, "syncs": broker.syncs, **broker.counts})

    loop.add_reader(ctl.fileno(), report)
    await asyncio.Future()


async def run_broker(cfg: Config, broker_id: int, ctl: Connection) -> None:
    if cfg.pull:
        await run_pull_broker(cfg, broker_id, ctl)
        return
    loop = asyncio.get_running_loop()
    broker = Broker(cfg, broker_id)
    server_tls, _ = tls_contexts(cfg)
    await loop.create_server(
        lambda: Link(broker.on_frame, cfg.coalesce),
        "127.0.0.1",
        cfg.ports[broker_id],
        ssl=server_tls,
    )
    for peer in range(broker_id + 1, cfg.brokers):
        link = await connect(cfg, peer, broker.on_frame, ROLE_BROKER, broker_id)
        broker.add_peer(peer, link)
    if cfg.brokers > 1:
        await asyncio.wait_for(broker.peers_ready.wait(), 10)
    ctl.send("ready")

    def report() -> None:
        ctl.recv()
        ctl.send({"appends": broker.journal.appended, "syncs": broker.syncs})

    loop.add_reader(ctl.fileno(), report)  # the parent asks at the window's start and end
    await asyncio.Future()  # until the parent ends this process


def window(cfg: Config, t0: int) -> tuple[int, int]:
    start = t0 + int(cfg.warmup * 1e9)
    return start, start + int(cfg.seconds * 1e9)


def percentiles_ms(samples: array[int]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    last = len(ordered) - 1
    result = {
        name: ordered[min(last, int(fraction * len(ordered)))] / 1e6
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
    }
    result["max"] = ordered[last] / 1e6
    return {name: round(value, 3) for name, value in result.items()}


async def run_producer(cfg: Config, ctl: Connection) -> None:
    acked = 0
    ack_latency: array[int] = array("q")
    lo = hi = 0

    def on_frame(link: Link, frame_type: int, frame: bytes) -> None:
        nonlocal acked
        if frame_type != T_PRODUCE_ACK:
            raise ValueError(f"producer: unexpected frame type {frame_type}")
        now = time.monotonic_ns()
        (send_ns,) = SEND_NS.unpack_from(frame, PRODUCE_ACK.size - 8)
        acked += 1
        if lo <= send_ns < hi:
            ack_latency.append(now - send_ns)

    links = [await connect(cfg, b, on_frame, ROLE_PRODUCER, 0) for b in range(cfg.brokers)]
    leader_link = [links[cfg.leader(p)] for p in range(cfg.partitions)]
    ctl.send("ready")
    t0: int = ctl.recv()
    lo, hi = window(cfg, t0)
    interval = 1e9 / cfg.rate
    max_in_flight = max(10_000, 2 * cfg.rate)  # bounded: beyond this the run is saturated
    pad = bytes(VALUE_SIZE - STAMP.size)
    head = PRODUCE.size - 4 + VALUE_SIZE
    lag: array[int] = array("q")
    sent = sent_in_window = skipped = 0
    seq = 0
    due = t0
    while due < hi:
        now = time.monotonic_ns()
        if due > now:
            await asyncio.sleep(max(0.001, (due - now) / 1e9))  # libuv timers are whole ms
            continue
        while due <= now and due < hi:
            if sent - acked >= max_in_flight:
                skipped += 1
            else:
                partition = zlib.crc32(b"key-%d" % seq) % cfg.partitions
                sent_ns = time.monotonic_ns()
                leader_link[partition].send(
                    PRODUCE.pack(head, T_PRODUCE, partition) + STAMP.pack(sent_ns, seq) + pad
                )
                sent += 1
                if lo <= sent_ns < hi:
                    sent_in_window += 1
                    lag.append(sent_ns - due)
            seq += 1
            due = t0 + int(seq * interval)
        await asyncio.sleep(0)  # read acks, flush coalesced frames
    deadline = time.monotonic() + cfg.drain
    while acked < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    ctl.send(
        {
            "sent": sent,
            "sent_in_window": sent_in_window,
            "acked": acked,
            "skipped_saturated": skipped,
            "ack_ms": percentiles_ms(ack_latency),
            "lag_ms": percentiles_ms(lag),
        }
    )


async def run_consumer(cfg: Config, ctl: Connection) -> None:
    received = 0
    latency: array[int] = array("q")
    lo = hi = 0

    def on_frame(link: Link, frame_type: int, frame: bytes) -> None:
        nonlocal received
        if frame_type != T_RECORD:
            raise ValueError(f"consumer: unexpected frame type {frame_type}")
        now = time.monotonic_ns()
        (send_ns,) = SEND_NS.unpack_from(frame, RECORD.size)
        received += 1
        if lo <= send_ns < hi:
            latency.append(now - send_ns)

    for b in range(cfg.brokers):
        await connect(cfg, b, on_frame, ROLE_CONSUMER, 0)
    await asyncio.sleep(0.1)  # let the hellos land before the producer starts
    ctl.send("ready")
    t0: int = ctl.recv()
    lo, hi = window(cfg, t0)
    await asyncio.sleep((hi - time.monotonic_ns()) / 1e9 + cfg.drain)
    ctl.send(
        {
            "received": received,
            "received_in_window": len(latency),
            "e2e_ms": percentiles_ms(latency),
        }
    )


async def run_pull_producer(cfg: Config, ctl: Connection) -> None:
    acked = 0
    ack_latency: array[int] = array("q")
    lo = hi = 0
    queues: list[list[bytes]] = [[] for _ in range(cfg.brokers)]
    stamps: list[list[int]] = [[] for _ in range(cfg.brokers)]
    in_flight: list[list[int] | None] = [None] * cfg.brokers
    requests = records_sent = 0
    wait: array[int] = array("q")  # queued -> written in a request

    def send_request(b: int) -> None:
        nonlocal requests, records_sent
        queue, stamp = queues[b], stamps[b]
        n = min(len(queue), MAX_BATCH)
        body = b"".join(queue[:n])
        batch = stamp[:n]
        del queue[:n], stamp[:n]
        links[b].send(PRODUCE_REQ.pack(PRODUCE_REQ.size - 4 + len(body), T_PRODUCE_REQ, n) + body)
        in_flight[b] = batch
        requests += 1
        records_sent += n
        now = time.monotonic_ns()
        for s in batch:
            if lo <= s < hi:
                wait.append(now - s)

    def on_frame(link: Link, frame_type: int, frame: bytes) -> None:
        nonlocal acked
        if frame_type != T_PRODUCE_RESP:
            raise ValueError(f"producer: unexpected frame type {frame_type}")
        now = time.monotonic_ns()
        b = link.peer
        batch = in_flight[b]
        assert batch is not None
        in_flight[b] = None
        acked += len(batch)
        for s in batch:
            if lo <= s < hi:
                ack_latency.append(now - s)
        if queues[b]:
            send_request(b)

    links = []
    for b in range(cfg.brokers):
        link = await connect(cfg, b, on_frame, ROLE_PRODUCER, 0)
        link.peer = b
        links.append(link)
    ctl.send("ready")
    t0: int = ctl.recv()
    lo, hi = window(cfg, t0)
    interval = 1e9 / cfg.rate
    max_in_flight = max(10_000, 2 * cfg.rate)
    pad = bytes(VALUE_SIZE - STAMP.size)
    lag: array[int] = array("q")
    sent = sent_in_window = skipped = 0
    seq = 0
    due = t0
    window_requests = [0, 0]
    window_records = [0, 0]
    in_window = False
    while due < hi:
        now = time.monotonic_ns()
        if due > now:
            await asyncio.sleep(max(0.001, (due - now) / 1e9))
            continue
        if now >= lo and not in_window:
            in_window = True
            window_requests[0], window_records[0] = requests, records_sent
        while due <= now and due < hi:
            if sent - acked >= max_in_flight:
                skipped += 1
            else:
                partition = zlib.crc32(b"key-%d" % seq) % cfg.partitions
                b = cfg.leader(partition)
                sent_ns = time.monotonic_ns()
                queues[b].append(
                    PRODUCE_ENTRY.pack(partition, VALUE_SIZE) + STAMP.pack(sent_ns, seq) + pad
                )
                stamps[b].append(sent_ns)
                sent += 1
                if lo <= sent_ns < hi:
                    sent_in_window += 1
                    lag.append(sent_ns - due)
            seq += 1
            due = t0 + int(seq * interval)
        for b in range(cfg.brokers):
            if queues[b] and in_flight[b] is None:
                send_request(b)
        await asyncio.sleep(0)
    window_requests[1], window_records[1] = requests, records_sent
    deadline = time.monotonic() + cfg.drain
    while acked < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    n_req = window_requests[1] - window_requests[0]
    ctl.send(
        {
            "sent": sent,
            "sent_in_window": sent_in_window,
            "acked": acked,
            "skipped_saturated": skipped,
            "ack_ms": percentiles_ms(ack_latency),
            "lag_ms": percentiles_ms(lag),
            "queue_wait_ms": percentiles_ms(wait),
            "produce_reqs_per_s": round(n_req / cfg.seconds),
            "records_per_req": round((window_records[1] - window_records[0]) / max(1, n_req), 2),
        }
    )


async def run_pull_consumer(cfg: Config, ctl: Connection) -> None:
    received = 0
    latency: array[int] = array("q")
    lo = hi = 0
    offsets = [
        {p: 0 for p in range(cfg.partitions) if cfg.leader(p) == b} for b in range(cfg.brokers)
    ]
    fetches = [0]

    def send_fetch(link: Link) -> None:
        wanted = offsets[link.peer]
        entries = b"".join(FETCH_ENTRY.pack(p, o) for p, o in wanted.items())
        link.send(FETCH_HEAD.pack(FETCH_HEAD.size - 4 + len(entries), T_FETCH, len(wanted)) + entries)

    def on_frame(link: Link, frame_type: int, frame: bytes) -> None:
        nonlocal received
        if frame_type != T_FETCH_RESP:
            raise ValueError(f"consumer: unexpected frame type {frame_type}")
        now = time.monotonic_ns()
        (_, _, count) = FETCH_RESP.unpack_from(frame)
        wanted = offsets[link.peer]
        pos, size = FETCH_RESP.size, len(frame)
        while pos < size:
            (length,) = U32.unpack_from(frame, pos)
            _, _, partition, offset = RECORD.unpack_from(frame, pos)
            (send_ns,) = SEND_NS.unpack_from(frame, pos + RECORD.size)
            wanted[partition] = offset + 1
            if lo <= send_ns < hi:
                latency.append(now - send_ns)
            pos += 4 + length
        received += count
        fetches[0] += 1
        send_fetch(link)

    for b in range(cfg.brokers):
        link = await connect(cfg, b, on_frame, ROLE_CONSUMER, 0)
        link.peer = b
        send_fetch(link)
    await asyncio.sleep(0.1)
    ctl.send("ready")
    t0: int = ctl.recv()
    lo, hi = window(cfg, t0)
    await asyncio.sleep((hi - time.monotonic_ns()) / 1e9 + cfg.drain)
    ctl.send(
        {
            "received": received,
            "received_in_window": len(latency),
            "e2e_ms": percentiles_ms(latency),
            "fetch_answers": fetches[0],
        }
    )


def child(role: str, index: int, cfg: Config, ctl: Connection) -> None:
    if cfg.switch_interval_ms:
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)
    if role == "broker":
        uvloop.run(run_broker(cfg, index, ctl))
    elif role == "producer":
        uvloop.run((run_pull_producer if cfg.pull else run_producer)(cfg, ctl))
    else:
        uvloop.run((run_pull_consumer if cfg.pull else run_consumer)(cfg, ctl))


def make_certs(directory: Path) -> None:
    """A throwaway CA and a certificate for localhost / 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "latency-floor CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem))
    (directory / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def free_ports(count: int) -> tuple[int, ...]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return tuple(sock.getsockname()[1] for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of proc(5) (utime, stime); fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def expect(ctl: Connection, what: str, timeout: float) -> Any:
    if not ctl.poll(timeout):
        raise TimeoutError(f"no {what} within {timeout} s")
    return ctl.recv()


def broker_stats(ctls: dict[str, Connection], brokers: int) -> list[dict[str, int]]:
    for b in range(brokers):
        ctls[f"broker{b}"].send("stats")
    return [expect(ctls[f"broker{b}"], f"broker{b} stats", 10) for b in range(brokers)]


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    mp = multiprocessing.get_context("spawn")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="latency-floor-") as tmp:
        if not args.plain:
            make_certs(Path(tmp))
        cfg = Config(
            rate=args.rate,
            seconds=args.seconds,
            warmup=args.warmup,
            drain=args.drain,
            partitions=args.partitions,
            brokers=args.brokers,
            tls=not args.plain,
            fsync=not args.no_fsync,
            sync=args.sync,
            coalesce=args.coalesce,
            pull=args.pull,
            switch_interval_ms=args.switch_interval_ms,
            ports=free_ports(args.brokers),
            cert_dir=tmp,
            data_dir=tmp,
        )
        procs: dict[str, multiprocessing.process.BaseProcess] = {}
        ctls: dict[str, Connection] = {}
        # Brokers start together (they connect to each other), then the consumer, then
        # the producer, each once the ones before are ready.
        stages = [[("broker", b) for b in range(cfg.brokers)], [("consumer", 0)], [("producer", 0)]]
        try:
            for stage in stages:
                for role, index in stage:
                    name = f"broker{index}" if role == "broker" else role
                    parent_end, child_end = mp.Pipe()
                    proc = mp.Process(
                        target=child, args=(role, index, cfg, child_end), name=name, daemon=True
                    )
                    proc.start()
                    procs[name], ctls[name] = proc, parent_end
                for role, index in stage:
                    name = f"broker{index}" if role == "broker" else role
                    expect(ctls[name], f"{name} ready", 30)
            t0 = time.monotonic_ns() + 200_000_000
            ctls["consumer"].send(t0)
            ctls["producer"].send(t0)
            lo, hi = window(cfg, t0)
            time.sleep(max(0.0, (lo - time.monotonic_ns()) / 1e9))
            cpu_before = {name: cpu_seconds(p.pid or 0) for name, p in procs.items()}
            stats_before = broker_stats(ctls, cfg.brokers)
            time.sleep(max(0.0, (hi - time.monotonic_ns()) / 1e9))
            cpu_after = {name: cpu_seconds(p.pid or 0) for name, p in procs.items()}
            stats_after = broker_stats(ctls, cfg.brokers)
            consumer = expect(ctls["consumer"], "consumer result", cfg.drain + 30)
            producer = expect(ctls["producer"], "producer result", cfg.drain + 30)
        finally:
            for started in procs.values():
                if started.pid is not None and started.is_alive():
                    os.kill(started.pid, signal.SIGTERM)
            for started in procs.values():
                started.join(5)
                if started.pid is not None and started.is_alive():
                    os.kill(started.pid, signal.SIGKILL)
                    started.join(5)
    extra: dict[str, Any] = {}
    if cfg.pull:
        for key in ("produce_reqs", "follower_answers", "consumer_answers"):
            extra[f"broker_{key}_per_s"] = [
                round((after[key] - before[key]) / cfg.seconds)
                for before, after in zip(stats_before, stats_after, strict=True)
            ]
        for key in ("queue_wait_ms", "produce_reqs_per_s", "records_per_req"):
            extra[f"producer_{key}"] = producer[key]
    return {
        "mode": "pull" if cfg.pull else "push",
        "rate": cfg.rate,
        "tls": cfg.tls,
        "coalesce": cfg.coalesce,
        "fsync": cfg.fsync,
        "sync": cfg.sync,
        "brokers": cfg.brokers,
        "switch_interval_ms": cfg.switch_interval_ms or sys.getswitchinterval() * 1000,
        "partitions": cfg.partitions,
        "seconds": cfg.seconds,
        "load_before": [round(x, 2) for x in load],
        "e2e_ms": consumer["e2e_ms"],
        "ack_ms": producer["ack_ms"],
        "producer_lag_ms": producer["lag_ms"],
        "missing": producer["sent_in_window"] - consumer["received_in_window"],
        "skipped_saturated": producer["skipped_saturated"],
        "syncs_per_s": [
            round((after["syncs"] - before["syncs"]) / cfg.seconds)
            for before, after in zip(stats_before, stats_after, strict=True)
        ],
        "appends_per_sync": [
            round(
                (after["appends"] - before["appends"]) / max(1, after["syncs"] - before["syncs"]), 2
            )
            for before, after in zip(stats_before, stats_after, strict=True)
        ],
        "cpu_s": {n: round(cpu_after[n] - cpu_before[n], 2) for n in procs},
        "cpu_total_pct": round(
            100 * sum(cpu_after[n] - cpu_before[n] for n in procs) / cfg.seconds, 1
        ),
        **extra,
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"mode": runs[0]["mode"], "rate": runs[0]["rate"], "runs": len(runs)}
    for key in ("e2e_ms", "ack_ms", "cpu_s"):
        names = runs[0][key].keys()
        summary[key] = {
            n: round(statistics.median(run[key][n] for run in runs if n in run[key]), 3)
            for n in names
        }
    summary["cpu_total_pct"] = round(statistics.median(run["cpu_total_pct"] for run in runs), 1)
    summary["producer_lag_p99_ms"] = round(
        statistics.median(run["producer_lag_ms"].get("p99", 0) for run in runs), 3
    )
    summary["load_before"] = [run["load_before"][0] for run in runs]
    summary["missing"] = max(run["missing"] for run in runs)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=2000, help="messages per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--drain", type=float, default=1.0, help="seconds to wait at the end")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--brokers", type=int, default=3, help="1 means replication factor 1")
    parser.add_argument("--plain", action="store_true", help="no TLS")
    parser.add_argument("--no-fsync", action="store_true", help="skip fdatasync (keep hand-off)")
    parser.add_argument("--sync", choices=("thread", "inline"), default="thread")
    parser.add_argument("--coalesce", action="store_true", help="one write per peer per loop turn")
    parser.add_argument("--pull", action="store_true", help="tidemq's pull structure (see above)")
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=0.0,
        help="the GIL switch interval in every process (0: Python's default, 5 ms)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs; the last line has medians")
    args = parser.parse_args()
    if args.rate <= 0 or args.seconds <= 0 or args.warmup < 0 or args.drain < 0:
        parser.error("--rate and --seconds must be positive, --warmup and --drain not negative")
    if not 1 <= args.brokers <= 255 or not args.brokers <= args.partitions <= 65535:
        parser.error("need 1 <= --brokers <= 255 and --brokers <= --partitions <= 65535")
    if args.switch_interval_ms < 0:
        parser.error("--switch-interval-ms must not be negative")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    runs = []
    for _ in range(args.repeat):
        run = run_once(args)
        print(json.dumps(run), flush=True)
        runs.append(run)
    if args.repeat > 1:
        print(json.dumps({"median": medians(runs)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
