"""The scalability benchmark (docs/BENCHMARKS.md): ``python -m tests.scale.bench`` or
``scripts/bench-scale``. Root only: every broker is its own host in a network namespace
whose link is capped with ``tc tbf`` both ways (tests/scale/network.py), so that the
brokers' links, not the machine's two cores, bound the throughput.

Two parts:

* ``scaling``: for each broker count (default 1, 2, 3) a fresh cluster; per run a new
  topic (12 partitions, replication factor 1, spread evenly by the coordinator's
  placement) and ``--producers`` producer processes sending as fast as they can for a
  warm-up then a measured window (tests/scale/worker.py). Reported per run: msg/s and
  MB/s acknowledged in the window, each capped link's use (bytes through its tbf
  qdiscs in the window / the cap) and the machine's CPU use; per broker count the
  median, and the ratio of the largest count's median to one broker's.
* ``replication``: one cluster of the largest broker count; for RF 1, 2, 3 and acks 1,
  all: the same throughput run, then end-to-end latency at a fixed moderate
  ``--latency-rate`` (a consumer process records receive time - send time).

Prints a JSON document on stdout (``--json-out`` writes it too). Every namespace,
bridge and process is removed on exit, on failure and on SIGTERM/SIGINT too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.scale.cluster import BenchCluster
from tests.scale.network import (
    CappedNetwork,
    NetworkError,
    create_network,
    signals_held,
    stop_on_signal,
)
from tidemq.cli import bench_latency
from tidemq.cli.launch import COORDINATOR, broker_name

REPOSITORY = Path(__file__).resolve().parents[2]
_SENT = re.compile(r"Sent (\d+) bytes")


@dataclass(frozen=True)
class Settings:
    rate_mbit: float = 24.0
    partitions: int = 12
    producers: int = 3
    value_bytes: int = 1024
    warmup_s: float = 3.0
    measure_s: float = 10.0
    latency_rate: int = 1000
    latency_s: float = 10.0
    batch_size: int = 131_072
    buffer_bytes: int = 6 * 1024 * 1024
    request_bytes: int = 128 * 1024


# -- measuring the machine -----------------------------------------------------------


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def process_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (0 for a gone one)."""
    return sum(bench_latency.process_cpu_s(pid) or 0.0 for pid in pids)


def link_bytes(network: CappedNetwork, host: str) -> dict[str, int]:
    """Bytes that went through ``host``'s tbf qdiscs so far, each direction."""
    ingress = subprocess.run(
        ["tc", "-s", "qdisc", "show", "dev", network.veth(host), "root"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    egress = subprocess.run(
        [*network.exec_prefix(host), "tc", "-s", "qdisc", "show", "dev", "eth0", "root"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    found = {"ingress": _SENT.search(ingress), "egress": _SENT.search(egress)}
    return {key: int(match.group(1)) if match else 0 for key, match in found.items()}


def wait_links_idle(
    network: CappedNetwork, hosts: list[str], rate_mbit: float, timeout_s: float = 120.0
) -> float:
    """Waits until every capped link carries under 5 % of its cap (replication of an
    earlier run's backlog has ended); returns the seconds waited."""
    started = time.monotonic()
    limit = 0.05 * rate_mbit * 1e6 / 8 * 0.5  # bytes per half second
    before = {h: link_bytes(network, h) for h in hosts}
    while time.monotonic() - started < timeout_s:
        time.sleep(0.5)
        after = {h: link_bytes(network, h) for h in hosts}
        busiest = max(after[h][d] - before[h][d] for h in hosts for d in after[h])
        if busiest < limit:
            break
        before = after
    return round(time.monotonic() - started, 1)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else 0.0


# -- worker processes ----------------------------------------------------------------


class Workers:
    """Worker processes (tests/scale/worker.py) in the root namespace; killed on exit."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, role: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
        with signals_held():
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.scale.worker", role, json.dumps(spec)],
                cwd=REPOSITORY, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, start_new_session=True,
            )  # fmt: skip
            self.processes.append(process)
        return process

    @staticmethod
    def tell(process: subprocess.Popen[str], line: str) -> None:
        assert process.stdin is not None
        try:
            process.stdin.write(line)
            process.stdin.flush()
        except OSError as error:  # it died after saying ready
            raise RuntimeError(f"worker exited {process.poll()}: {error}") from error

    @staticmethod
    def result(process: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"worker exited {process.returncode}: {stderr[-2000:]}")
        answer: dict[str, Any] = json.loads(lines[-1])
        return answer

    @staticmethod
    def wait_line(process: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
        """The next JSON line of a running worker (e.g. ``{"ready": true}``)."""
        assert process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.2)
            if ready:
                line = process.stdout.readline()
                if not line:
                    break
                if line.startswith("{"):
                    answer: dict[str, Any] = json.loads(line)
                    return answer
        process.kill()
        try:
            stderr = process.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            stderr = "(its stderr could not be read within 10 s of SIGKILL)"
        raise RuntimeError(
            f"worker gave no line within {timeout_s} s (exit {process.returncode}): "
            f"{stderr[-2000:]}"
        )

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.communicate(timeout=10)  # reaps it and closes its pipes
            except subprocess.TimeoutExpired:
                log(f"worker {process.pid} did not exit within 10 s of SIGKILL")


# -- one measurement -----------------------------------------------------------------


def throughput_run(
    cluster: BenchCluster,
    workers: Workers,
    settings: Settings,
    replication_factor: int,
    acks: str,
) -> dict[str, Any]:
    topic = f"scale-{uuid.uuid4().hex[:8]}"
    rows = cluster.create_topic(topic, settings.partitions, replication_factor)
    spec = {
        "client": cluster.client_config,
        "topic": topic,
        "acks": acks,
        "value_bytes": settings.value_bytes,
        "batch_size": settings.batch_size,
        "buffer_memory": settings.buffer_bytes,
        "max_request_bytes": settings.request_bytes,
        "warmup_s": settings.warmup_s,
        "measure_s": settings.measure_s,
    }
    producers: list[subprocess.Popen[str]] = []
    try:
        for _ in range(settings.producers):
            producers.append(workers.start("produce", spec))
        for producer in producers:  # each connected: a slow start cannot eat the warm-up
            Workers.wait_line(producer, 120.0)
        start_at = time.monotonic() + 0.5  # CLOCK_MONOTONIC: one clock for the machine
        for producer in producers:
            Workers.tell(producer, f"{start_at}\n")
        brokers = [broker_name(i) for i in cluster.broker_ids]
        window_start = start_at + settings.warmup_s
        time.sleep(max(0.0, window_start - time.monotonic()))
        pids = [p.pid for p in cluster.processes.values()] + [p.pid for p in producers]
        links_before = {b: link_bytes(cluster.network, b) for b in brokers}
        cpu_before, started = cpu_times(), time.monotonic()
        own_before = process_cpu_s(pids)
        time.sleep(max(0.0, window_start + settings.measure_s - time.monotonic()))
        links_after = {b: link_bytes(cluster.network, b) for b in brokers}
        cpu_after, seconds = cpu_times(), time.monotonic() - started
        own_cpu = process_cpu_s(pids) - own_before
        results = [workers.result(p, 200.0) for p in producers]
    except BaseException:
        for producer in producers:  # none may go on sending into the next measurement
            producer.kill()
        raise
    cluster.delete_topic(topic)  # its followers stop copying a backlog: next run starts idle
    idle_after_s = wait_links_idle(cluster.network, brokers, settings.rate_mbit)
    messages_per_s = sum(r["window_acked"] / r["window_s"] for r in results)
    cap_bytes_per_s = settings.rate_mbit * 1e6 / 8
    link_use = {
        broker: {
            direction: round(
                (links_after[broker][direction] - before) / seconds / cap_bytes_per_s, 3
            )
            for direction, before in links_before[broker].items()
        }
        for broker in brokers
    }
    busy, total = (cpu_after[0] - cpu_before[0]), (cpu_after[1] - cpu_before[1])
    return {
        "topic": topic,
        "replication_factor": replication_factor,
        "acks": acks,
        "messages_per_s": round(messages_per_s, 1),
        "mb_per_s": round(messages_per_s * settings.value_bytes / 1e6, 3),
        "failed": sum(r["failed"] for r in results),
        "leaders_per_broker": _leaders(rows, cluster.broker_ids),
        "link_use_of_cap": link_use,
        "cpu_busy": round(busy / total, 3) if total else None,
        "own_cpu_cores": round(own_cpu / seconds, 3),
        "seconds_until_links_idle": idle_after_s,
    }


def _leaders(rows: list[dict[str, Any]], broker_ids: list[int]) -> dict[str, int]:
    return {str(b): sum(1 for r in rows if r["leader_id"] == b) for b in broker_ids}


def latency_run(
    cluster: BenchCluster,
    workers: Workers,
    settings: Settings,
    replication_factor: int,
    acks: str,
) -> dict[str, Any]:
    topic = f"scale-latency-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(topic, settings.partitions, replication_factor)
    expected = int(settings.latency_rate * settings.latency_s)
    common = {"client": cluster.client_config, "topic": topic}
    consumer = workers.start(
        "latency-consume", {**common, "expected": expected, "deadline_s": settings.latency_s + 30}
    )
    Workers.wait_line(consumer, 90.0)
    producer = workers.start(
        "latency-produce",
        {
            **common,
            "acks": acks,
            "value_bytes": settings.value_bytes,
            "rate_per_s": settings.latency_rate,
            "measure_s": settings.latency_s,
        },
    )
    sent = Workers.result(producer, settings.latency_s + 90.0)["sent"]
    received = Workers.result(consumer, settings.latency_s + 90.0)
    cluster.delete_topic(topic)
    brokers = [broker_name(i) for i in cluster.broker_ids]
    wait_links_idle(cluster.network, brokers, settings.rate_mbit)
    return {"rate_per_s": settings.latency_rate, "sent": sent, **received}


# -- the two parts -------------------------------------------------------------------


@contextmanager
def capped_cluster(root: Path, brokers: int, settings: Settings) -> Iterator[BenchCluster]:
    """A network and a cluster of ``brokers`` capped brokers; both gone on exit."""
    hosts = BenchCluster.host_names(brokers)
    network: CappedNetwork | None = None
    cluster: BenchCluster | None = None
    failed = True
    try:  # the network too: a stop between building it and this try would leak it
        network = create_network(hosts, capped=hosts[1:], rate_mbit=settings.rate_mbit)
        cluster = BenchCluster(root / f"cluster-{brokers}-{uuid.uuid4().hex[:6]}", network, brokers)
        yield cluster.start()
        failed = False
    finally:
        if cluster is not None:
            cluster.close()
        if network is not None:
            network.destroy()
        if cluster is not None and failed:
            log(f"kept the cluster's logs in {cluster.layout.logs_dir}")
        elif cluster is not None:
            shutil.rmtree(cluster.root, ignore_errors=True)


def describe_network(cluster: BenchCluster) -> dict[str, Any]:
    network = cluster.network
    return {
        "namespaces": [network.namespace(h) for h in network.hosts],
        "bridge": network.bridge,
        "veths": [network.veth(h) for h in network.hosts],
        "subnet": str(network.subnet),
        "caps": network.caps(),
        "coordinator": network.address(COORDINATOR),
        "pids": {name: process.pid for name, process in cluster.processes.items()},
    }


def scaling(root: Path, broker_counts: list[int], runs: int, settings: Settings) -> dict[str, Any]:
    by_count: dict[str, Any] = {}
    for brokers in broker_counts:
        with capped_cluster(root, brokers, settings) as cluster:
            workers = Workers()
            try:
                network = describe_network(cluster)
                measured = []
                for run in range(runs):
                    result = throughput_run(cluster, workers, settings, 1, "all")
                    log(f"{brokers} broker(s), run {run + 1}: {_short(result)}")
                    measured.append(result)
            finally:
                workers.close()
        by_count[str(brokers)] = {
            "network": network,
            "runs": measured,
            "median_messages_per_s": median([r["messages_per_s"] for r in measured]),
            "median_mb_per_s": median([r["mb_per_s"] for r in measured]),
        }
    smallest, largest = str(min(broker_counts)), str(max(broker_counts))
    base = by_count[smallest]["median_mb_per_s"]
    ratio = by_count[largest]["median_mb_per_s"] / base if base else 0.0
    return {"by_brokers": by_count, "ratio": {f"{largest}_vs_{smallest}": round(ratio, 2)}}


def replication(
    root: Path, brokers: int, factors: list[int], runs: int, settings: Settings
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with capped_cluster(root, brokers, settings) as cluster:
        workers = Workers()
        try:
            for factor in factors:
                for acks in ("1", "all"):
                    try:
                        measured = [
                            throughput_run(cluster, workers, settings, factor, acks)
                            for _ in range(runs)
                        ]
                        latency = latency_run(cluster, workers, settings, factor, acks)
                    except RuntimeError as error:  # a stuck worker: report it, go on
                        log(f"RF {factor} acks {acks} failed: {str(error)[-300:]}")
                        shutil.copytree(
                            cluster.layout.logs_dir, root / f"logs-rf{factor}-acks{acks}"
                        )
                        rows.append(
                            {
                                "replication_factor": factor,
                                "acks": acks,
                                "error": str(error)[-2000:],
                            }
                        )
                        continue
                    row = {
                        "replication_factor": factor,
                        "acks": acks,
                        "runs": measured,
                        "median_messages_per_s": median([r["messages_per_s"] for r in measured]),
                        "median_mb_per_s": median([r["mb_per_s"] for r in measured]),
                        "latency": latency,
                    }
                    log(f"RF {factor} acks {acks}: {_short(row)} latency {latency}")
                    rows.append(row)
        finally:
            workers.close()
    return {"brokers": brokers, "rows": rows}


def _short(result: dict[str, Any]) -> str:
    mb = result.get("mb_per_s", result.get("median_mb_per_s"))
    msgs = result.get("messages_per_s", result.get("median_messages_per_s"))
    extra = ""
    if "link_use_of_cap" in result:
        extra = (
            f" link use {result['link_use_of_cap']} cpu {result['cpu_busy']}"
            f" own {result['own_cpu_cores']}"
        )
    return f"{msgs} msg/s {mb} MB/s{extra}"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- command line --------------------------------------------------------------------


def _counts(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from error
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"give positive integers, not {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="scripts/bench-scale", description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "scaling", "replication"], default="all")
    parser.add_argument("--brokers", type=_counts, default=[1, 2, 3], help="e.g. 1,2,3")
    parser.add_argument("--factors", type=_counts, default=[1, 2, 3], help="replication factors")
    parser.add_argument("--runs", type=int, default=3, help="runs per scaling point")
    parser.add_argument("--replication-runs", type=int, default=1)
    parser.add_argument("--rate-mbit", type=float, default=defaults.rate_mbit)
    parser.add_argument("--partitions", type=int, default=defaults.partitions)
    parser.add_argument("--producers", type=int, default=defaults.producers)
    parser.add_argument("--value-bytes", type=int, default=defaults.value_bytes)
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s)
    parser.add_argument("--measure-s", type=float, default=defaults.measure_s)
    parser.add_argument("--latency-rate", type=int, default=defaults.latency_rate)
    parser.add_argument("--latency-s", type=float, default=defaults.latency_s)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--buffer-bytes", type=int, default=defaults.buffer_bytes)
    parser.add_argument("--request-bytes", type=int, default=defaults.request_bytes)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: tmp)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("runs", "replication_runs", "partitions", "producers", "latency_rate"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.value_bytes < 16 or args.rate_mbit <= 0 or args.measure_s <= 0 or args.warmup_s < 0:
        parser.error("--value-bytes >= 16, --rate-mbit > 0, --measure-s > 0, --warmup-s >= 0")
    if args.part != "scaling" and max(args.factors) > max(args.brokers):
        parser.error("a replication factor cannot exceed the largest broker count")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = Settings(
        rate_mbit=args.rate_mbit,
        partitions=args.partitions,
        producers=args.producers,
        value_bytes=args.value_bytes,
        warmup_s=args.warmup_s,
        measure_s=args.measure_s,
        latency_rate=args.latency_rate,
        latency_s=args.latency_s,
        batch_size=args.batch_size,
        buffer_bytes=args.buffer_bytes,
        request_bytes=args.request_bytes,
    )
    # SIGTERM unwinds like Ctrl-C, so every finally (processes, namespaces) runs.
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    root = args.dir or Path(tempfile.mkdtemp(prefix="tidemq-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": asdict(settings), "cpus": os.cpu_count()}
    try:
        if args.part in ("all", "scaling"):
            report["scaling"] = scaling(root, args.brokers, args.runs, settings)
        if args.part in ("all", "replication"):
            report["replication"] = replication(
                root, max(args.brokers), args.factors, args.replication_runs, settings
            )
    except NetworkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
