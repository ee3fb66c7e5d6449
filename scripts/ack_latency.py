#!/usr/bin/env python3
"""Producer acknowledgement latency (send -> ack) at a fixed rate, and the start-up stall.

Usage: .venv/bin/python scripts/ack_latency.py --data-dir DIR [--rate 2000]
       [--seconds 10] [--partitions 1,12] [--replication-factor 2] [--linger-ms 5]

Against a running cluster (``tide up --data-dir DIR``). For each partition count a new
topic is created with ``Admin.create_topic``; then one record is sent and the time from
``create_topic`` returning to its acknowledgement is reported (the start-up stall).
Then records of 100 bytes with random keys are sent at ``--rate`` per second (acks=all)
for ``--seconds``; each record's latency is the time from ``send`` to its done-callback
(on the producer's thread, so no user-thread wake-up is counted). Reported per
partition count: p50, p90, p99, p99.9 and max in milliseconds, one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

from tidemq import Admin, Producer


def cluster_config(data_dir: Path) -> dict[str, Any]:
    cluster = json.loads((data_dir / "cluster.json").read_text())
    return {
        "bootstrap": cluster["coordinator"]["url"],
        "ca_file": cluster.get("ca_file"),
        "cert_file": cluster.get("client_cert_file"),
        "key_file": cluster.get("client_key_file"),
    }


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(config: dict[str, Any], partitions: int, args: argparse.Namespace) -> dict[str, Any]:
    topic = f"acklat-{partitions}-{uuid.uuid4().hex[:8]}"
    admin = Admin(**config)
    started = time.perf_counter()
    admin.create_topic(topic, partitions=partitions, replication_factor=args.replication_factor)
    created = time.perf_counter()
    admin.close()
    latencies: list[float] = []
    with Producer(**config, linger_ms=args.linger_ms) as producer:
        producer.partitions_for(topic)
        first_sent = time.perf_counter()
        producer.send(topic, b"first", key=b"first").result(timeout=30)
        first_acked = time.perf_counter()
        value = os.urandom(50).hex().encode()
        keys = [b"key-%d" % i for i in range(1000)]
        rng = random.Random(1)
        interval = 1 / args.rate
        total = int(args.rate * args.seconds)
        begin = time.perf_counter()
        for index in range(total):
            due = begin + index * interval
            delay = due - time.perf_counter()
            if delay > 0.0005:
                time.sleep(delay)
            sent = time.perf_counter()
            future = producer.send(topic, value, key=rng.choice(keys))
            future.add_done_callback(
                lambda _f, sent=sent: latencies.append(time.perf_counter() - sent)
            )
        producer.flush(timeout=60)
    ordered = sorted(latency * 1000 for latency in latencies)
    return {
        "partitions": partitions,
        "replication_factor": args.replication_factor,
        "rate_per_s": args.rate,
        "records": len(ordered),
        "create_topic_ms": round((created - started) * 1000, 1),
        "first_ack_after_create_ms": round((first_acked - created) * 1000, 1),
        "first_ack_ms": round((first_acked - first_sent) * 1000, 1),
        **{
            name: round(percentile(ordered, fraction), 3)
            for name, fraction in (
                ("p50_ms", 0.5),
                ("p90_ms", 0.9),
                ("p99_ms", 0.99),
                ("p999_ms", 0.999),
            )
        },
        "max_ms": round(ordered[-1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--partitions", default="1,12")
    parser.add_argument("--replication-factor", type=int, default=2)
    parser.add_argument("--linger-ms", type=int, default=5)
    args = parser.parse_args()
    config = cluster_config(args.data_dir)
    for count in args.partitions.split(","):
        print(json.dumps(run(config, int(count), args)), flush=True)


if __name__ == "__main__":
    main()
