"""Client processes of the scalability benchmark (``python -m tests.scale.worker``).

Each role reads one JSON spec from argv and prints one JSON line on stdout:

* ``produce``: sends ``value_bytes`` values (keyless: spread over the partitions batch
  by batch) as fast as the producer accepts them from ``start_at`` (wall clock, so
  several producer processes start together) for ``warmup_s + measure_s``, then
  flushes. A done-callback counts acknowledged records; a timer thread samples the
  count at the end of the warm-up and of the window, so the reported rate is steady
  state: neither the ramp-up nor the final flush is in it.
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
from typing import Any

_TIMESTAMP = struct.Struct(">q")
SEND_CHECK_EVERY = 64


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
        delay = spec["start_at"] - time.time()
        if delay > 0:
            time.sleep(delay)
        started = time.monotonic()
        warm_end = started + spec["warmup_s"]
        window_end = warm_end + spec["measure_s"]

        def sample() -> None:
            for name, at in (("warm", warm_end), ("end", window_end)):
                time.sleep(max(0.0, at - time.monotonic()))
                samples[name] = (counts["acked"], time.monotonic())

        sampler = threading.Thread(target=sample, name="sampler", daemon=True)
        sampler.start()
        topic, send, sent = spec["topic"], producer.send, 0
        while time.monotonic() < window_end:
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
