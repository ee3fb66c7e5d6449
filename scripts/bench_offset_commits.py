#!/usr/bin/env python3
"""Offset commits per second one coordinator sustains with N group members committing.

Usage: .venv/bin/python scripts/bench_offset_commits.py [--members 16] [--seconds 5]
       [--runs 3]

Each run starts a fresh coordinator process (TLS, client certificates, SQLite with
synchronous=FULL) twice, alternately: once with ``--no-group-commit`` (one SQLite
transaction, hence one fsync, per commit, as before group commit) and once with group
commit (the default). A topic of N partitions is created, N members join one group
until each owns one partition, then every member commits its partition's offset in a
loop (one request in flight per member, as a consumer does) for ``--seconds``.
Reported: successful commits per second per run, and the median per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tidemq.tls import TlsFiles, client_context, ensure_cluster_pki

TOPIC = "bench"
GROUP = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_coordinator(data_dir: Path, tls: TlsFiles, port: int, group_commit: bool) -> Any:
    argv = [
        sys.executable,
        "-m",
        "tidemq",
        "coordinator",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--ca-file",
        str(tls.ca_file),
        "--cert-file",
        str(tls.cert_file),
        "--key-file",
        str(tls.key_file),
        "--log-level",
        "warning",
    ]
    if not group_commit:
        argv.append("--no-group-commit")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


async def call(session: aiohttp.ClientSession, url: str, method: str, body: Any = None) -> Any:
    async with session.request(method, url, json=body) as response:
        answer = await response.json()
        if response.status >= 400:
            raise RuntimeError(f"{method} {url}: {response.status} {answer}")
        return answer


async def wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the coordinator did not become ready")


async def join(session: aiohttp.ClientSession, base: str, members: int) -> list[dict[str, Any]]:
    """Heartbeat rounds until every member owns exactly one partition."""
    state: list[dict[str, Any]] = [
        {"member_id": None, "member_epoch": 0, "owned": []} for _ in range(members)
    ]
    for _ in range(20):
        for member in state:
            answer = await call(
                session,
                f"{base}/v1/groups/{GROUP}/heartbeat",
                "POST",
                {
                    "member_id": member["member_id"],
                    "member_epoch": member["member_epoch"],
                    "topics": [TOPIC],
                    "owned": member["owned"],
                    "session_timeout_ms": 60_000,
                },
            )
            member.update(
                member_id=answer["member_id"],
                member_epoch=answer["member_epoch"],
                owned=answer["assignment"],
            )
        if all(len(member["owned"]) == 1 for member in state):
            return state
    raise RuntimeError("the group did not settle")


async def commit_loop(
    session: aiohttp.ClientSession, base: str, member: dict[str, Any], stop_at: float
) -> int:
    partition = member["owned"][0]["partition"]
    offset = 0
    while time.monotonic() < stop_at:
        offset += 1
        await call(
            session,
            f"{base}/v1/groups/{GROUP}/offsets",
            "POST",
            {
                "member_id": member["member_id"],
                "member_epoch": member["member_epoch"],
                "offsets": [{"topic": TOPIC, "partition": partition, "offset": offset}],
            },
        )
    return offset


async def measure(base: str, client: TlsFiles, members: int, seconds: float) -> float:
    connector = aiohttp.TCPConnector(ssl=client_context(client), limit=members + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        await wait_ready(session, base)
        await call(
            session,
            f"{base}/v1/brokers/register",
            "POST",
            {"broker_id": 1, "url": "https://127.0.0.1:1"},
        )
        await call(
            session,
            f"{base}/v1/topics",
            "POST",
            {"name": TOPIC, "partitions": members, "replication_factor": 1},
        )
        state = await join(session, base, members)
        started = time.monotonic()
        counts = await asyncio.gather(
            *(commit_loop(session, base, m, started + seconds) for m in state)
        )
        return sum(counts) / (time.monotonic() - started)


def run_once(
    root: Path, pki: dict[str, TlsFiles], members: int, seconds: float, group_commit: bool
) -> float:
    data_dir = Path(tempfile.mkdtemp(dir=root))
    port = free_port()
    process = start_coordinator(data_dir, pki["coordinator"], port, group_commit)
    try:
        return asyncio.run(measure(f"https://127.0.0.1:{port}", pki["client"], members, seconds))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="tide-bench-commits-") as directory:
        root = Path(directory)
        pki = ensure_cluster_pki(root / "pki", ["coordinator", "client"])
        for run in range(1, args.runs + 1):
            for group_commit in (False, True):
                rate = run_once(root, pki, args.members, args.seconds, group_commit)
                results[group_commit].append(rate)
                mode = "group commit" if group_commit else "one fsync per commit"
                print(f"run {run}: {mode:>22}: {rate:9,.0f} commits/s", flush=True)
    print(f"{args.members} members, {args.seconds} s per run, {args.runs} runs")
    for group_commit in (False, True):
        mode = "group commit" if group_commit else "one fsync per commit"
        rates = ", ".join(f"{r:,.0f}" for r in results[group_commit])
        median = statistics.median(results[group_commit])
        print(f"{mode:>22}: {rates} -> median {median:,.0f} commits/s")


if __name__ == "__main__":
    main()
