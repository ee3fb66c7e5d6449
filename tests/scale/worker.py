"""Client processes of the scalability benchmark (``python -m tests.scale.worker``).

Each role reads one JSON spec from argv and prints one JSON line on stdout:

* ``produce``: connects, prints ``{"ready": true}``, reads a start time (monotonic) as
  one line on stdin (so several producer processes start together, however long each
  took to start), then sends ``value_bytes`` values (keyless: spread over the
  partitions batch by batch) as fast as the producer accepts them, and flushes. A
  done-callback counts acknowledged records; a timer thread samples the count after
  ``warmup_s`` and again ``measure_s`` of running time later, and sending goes on until
  that second sample, so the reported rate is steady state: neither the ramp-up nor
  the final flush is in it. The window is counted in time this process ran
  (:func:`run_for`): a stall of the machine cannot shrink it to nothing.
* ``latency-consume``: joins a new group (``latest``), prints ``{"ready": true}`` once
  it owns and has fetched every partition, then records ``now - send time`` for each
  value until it has ``expected`` of them or ``deadline_s`` passes.
* ``latency-produce``: sends ``rate_per_s`` values per second for ``measure_s``, each
  starting with its send time (``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock
  for every process of the machine, namespaces included, so no skew).

The Python client costs CPU per record, so the benchmark uses 1 KB+ values and large
batches: bytes, not records, must be what the capped links limit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

_TIMESTAMP = struct.Struct(">q")
SEND_CHECK_EVERY = 64
MAX_STEP_S = 0.5


def _producer_options(spec: dict[str, Any]) -> dict[str, Any]:
    acks = spec["acks"]
    return {
        **spec["client"],
        "acks": acks if acks == "all" else int(acks),
        "batch_size": spec.get("batch_size", 131_072),
        "linger_ms": spec.get("linger_ms", 10),
        "buffer_memory": spec.get("buffer_memory", 2 * 1024 * 1024),
        "max_request_bytes": spec.get("max_request_bytes", 1024 * 1024),
    }


def running(seconds: float, step_s: float = 0.05, wall_s: float = math.inf) -> Iterator[None]:
    """Yields, then sleeps ``step_s``, until ``seconds`` of running time have passed:
    each step counts at most ``MAX_STEP_S``, so a pause of the whole machine (a stopped
    VM, a starved process) lengthens the wait instead of ending it at once. ``wall_s``
    bounds it in wall time, for callers under a wall-clock timeout."""
    ran, last = 0.0, time.monotonic()
    give_up = last + wall_s
    while ran < seconds and last < give_up:
        yield
        time.sleep(min(step_s, seconds - ran))
        now = time.monotonic()
        ran, last = ran + min(now - last, MAX_STEP_S), now


def run_for(seconds: float) -> None:
    """Sleeps for ``seconds`` of running time (see :func:`running`)."""
    for _ in running(seconds):
        pass


def produce(spec: dict[str, Any]) -> dict[str, Any]:
    from tidemq import Producer

    value = b"v" * spec["value_bytes"]
    counts = {"acked": 0, "failed": 0}
    samples: dict[str, tuple[int, float]] = {}

    def done(future: Any) -> None:
        if future.exception(0) is None:
            counts["acked"] += 1
        else:
            counts["failed"] += 1

    with Producer(**_producer_options(spec)) as producer:
        producer.partitions_for(spec["topic"])  # metadata in hand before the start
        print(json.dumps({"ready": True}), flush=True)
        start_at = float(sys.stdin.readline())  # time.monotonic(): one clock per machine
        time.sleep(max(0.0, start_at - time.monotonic()))
        window_over = threading.Event()

        def sample() -> None:
            for name, seconds in (("warm", spec["warmup_s"]), ("end", spec["measure_s"])):
                run_for(seconds)
                samples[name] = (counts["acked"], time.monotonic())
            window_over.set()

        sampler = threading.Thread(target=sample, name="sampler", daemon=True)
        sampler.start()
        topic, send, sent = spec["topic"], producer.send, 0
        while not window_over.is_set():
            for _ in range(SEND_CHECK_EVERY):
                send(topic, value).add_done_callback(done)
            sent += SEND_CHECK_EVERY
        sampler.join()
        producer.flush(spec.get("flush_timeout_s", 150.0))
    (warm_count, warm_at), (end_count, end_at) = samples["warm"], samples["end"]
    return {
        "sent": sent,
        "acked": counts["acked"],
        "failed": counts["failed"],
        "window_acked": end_count - warm_count,
        "window_s": round(end_at - warm_at, 3),
    }


def latency_consume(spec: dict[str, Any]) -> dict[str, Any]:
    from tidemq import Consumer

    latencies_ns: list[int] = []
    group = f"scale-latency-{uuid.uuid4().hex[:12]}"
    with Consumer(
        spec["topic"], group=group, auto_offset_reset="latest", **spec["client"]
    ) as consumer:
        if not consumer.wait_until_ready(60.0):
            return {"error": "consumer not assigned within 60 s"}
        print(json.dumps({"ready": True}), flush=True)
        deadline = time.monotonic() + spec["deadline_s"]
        expected = spec["expected"]
        while len(latencies_ns) < expected and time.monotonic() < deadline:
            batch = consumer.poll(timeout=0.2, max_records=10_000)
            now = time.monotonic_ns()
            for message in batch:
                if message.value is not None and len(message.value) >= _TIMESTAMP.size:
                    latencies_ns.append(now - _TIMESTAMP.unpack_from(message.value)[0])
    latencies_ns.sort()
    return {"received": len(latencies_ns), **latency_percentiles(latencies_ns)}


def latency_percentiles(sorted_ns: list[int]) -> dict[str, float | None]:
    """Nearest-rank percentiles in milliseconds; None when nothing was received."""

    def at(fraction: float) -> float | None:
        if not sorted_ns:
            return None
        rank = max(1, min(len(sorted_ns), math.ceil(fraction * len(sorted_ns))))
        return round(sorted_ns[rank - 1] / 1e6, 2)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1.0)}


def latency_produce(spec: dict[str, Any]) -> dict[str, Any]:
    from tidemq import Producer

    padding = b"v" * max(0, spec["value_bytes"] - _TIMESTAMP.size)
    total = int(spec["rate_per_s"] * spec["measure_s"])
    options = {**_producer_options(spec), "linger_ms": spec.get("linger_ms", 5)}
    sent = 0
    with Producer(**options) as producer:
        started = time.monotonic()
        while sent < total:
            due = min(total, int(spec["rate_per_s"] * (time.monotonic() - started)))
            if due <= sent:
                time.sleep(0.0005)
                continue
            for _ in range(due - sent):
                producer.send(spec["topic"], _TIMESTAMP.pack(time.monotonic_ns()) + padding)
            sent = due
        producer.flush(60.0)
    return {"sent": sent}


ROLES = {"produce": produce, "latency-consume": latency_consume, "latency-produce": latency_produce}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ROLES:
        print(
            f"usage: python -m tests.scale.worker {{{','.join(ROLES)}}} SPEC_JSON", file=sys.stderr
        )
        return 2
    if os.environ.get("TIDE_SCALE_DEBUG_DIR"):  # client debug log per worker, for diagnosis
        logging.basicConfig(
            filename=f"{os.environ['TIDE_SCALE_DEBUG_DIR']}/{argv[0]}-{os.getpid()}.log",
            level=logging.DEBUG,
        )
    result = ROLES[argv[0]](json.loads(argv[1]))
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
