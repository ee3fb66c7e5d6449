"""``tide bench``: throughput and end-to-end latency against a running cluster.

Two phases (docs/OPERATIONS.md):

* throughput: one producer in this process sends ``--messages`` as fast as it can
  (then flushes); then a consumer of a new group drains them. Reported: messages/s
  and MB/s in (produce, acknowledged) and out (consume).
* latency: a consumer of a new group polls in a thread while the producer sends at
  ``--rate`` messages/s for ``--latency-seconds``; each value starts with its send
  time (8 bytes, big-endian ``time.monotonic_ns()``, same process, so no clock skew),
  and the consumer records ``now - send time``. Reported: p50 / p99 / p999 / max.
  Before measuring, warm-up messages (send time 0) are sent until the consumer
  sees one, so group join and assignment are not counted as latency.

The pure parts (value encoding, percentiles, the rate schedule) are plain functions.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from tidemq.cli.client_commands import data_dir_option, target_for
from tidemq.cli.control import ControlPlane, Target
from tidemq.cli.processes import ProbeError
from tidemq.errors import TideError

_TIMESTAMP = struct.Struct(">q")
WARMUP_TIMESTAMP = 0
PROGRESS_STEP = 1000
DRAIN_IDLE_TIMEOUT_S = 30.0


def encode_value(send_ns: int, size: int) -> bytes:
    """A value of ``max(size, 8)`` bytes starting with the send time."""
    return _TIMESTAMP.pack(send_ns) + b"x" * max(0, size - _TIMESTAMP.size)


def decode_send_ns(value: bytes | None) -> int | None:
    if value is None or len(value) < _TIMESTAMP.size:
        return None
    send_ns: int = _TIMESTAMP.unpack_from(value)[0]
    return send_ns


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-fraction * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


def messages_due(rate_per_s: float, elapsed_s: float) -> int:
    """How many messages a sender at ``rate_per_s`` should have sent by ``elapsed_s``."""
    return int(rate_per_s * max(0.0, elapsed_s))


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def latency_summary(latencies_ns: list[int]) -> dict[str, float | None]:
    ordered = sorted(latencies_ns)
    millis = [round(value / 1e6, 3) for value in ordered]
    return {
        "p50_ms": percentile(millis, 0.50),
        "p99_ms": percentile(millis, 0.99),
        "p999_ms": percentile(millis, 0.999),
        "max_ms": millis[-1] if millis else None,
    }


def _keys(count: int) -> list[bytes]:
    return [f"key-{index}".encode() for index in range(count)]


def _progress(length: int, label: str) -> Any:
    return click.progressbar(length=length, label=label, file=sys.stderr, width=30)


def _produce_throughput(
    target: Target,
    topic: str,
    messages: int,
    value_bytes: int,
    keys: list[bytes],
    producer_options: dict[str, Any],
) -> dict[str, float]:
    from tidemq import Producer

    value = encode_value(WARMUP_TIMESTAMP, value_bytes)
    checks = []
    key_count = len(keys)
    with Producer(**target.client_kwargs(), **producer_options) as producer:
        send = producer.send
        started = time.perf_counter()
        with _progress(messages, "producing") as bar:
            for chunk_start in range(0, messages, PROGRESS_STEP):
                chunk_end = min(messages, chunk_start + PROGRESS_STEP)
                future = None
                for index in range(chunk_start, chunk_end):
                    future = send(topic, value, key=keys[index % key_count])
                checks.append(future)
                bar.update(chunk_end - chunk_start)
            producer.flush()
        seconds = time.perf_counter() - started
    for future in checks:
        if future is not None:
            future.result()  # raises if a sampled send failed
    return _throughput(messages, len(value), seconds)


def _throughput(count: int, value_bytes: int, seconds: float) -> dict[str, float]:
    return {
        "messages": count,
        "seconds": round(seconds, 3),
        "messages_per_s": round(rate(count, seconds), 1),
        "mb_per_s": round(rate(count * value_bytes, seconds) / 1e6, 2),
    }


def _consume_throughput(target: Target, topic: str, messages: int) -> dict[str, float]:
    from tidemq import Consumer

    received = 0
    value_bytes = 0
    group = f"bench-{uuid.uuid4().hex[:12]}"
    with Consumer(
        topic, group=group, auto_offset_reset="earliest", **target.client_kwargs()
    ) as consumer:
        started = time.perf_counter()
        last_progress = time.monotonic()
        with _progress(messages, "consuming") as bar:
            while received < messages:
                batch = consumer.poll(timeout=0.5, max_records=10_000)
                if batch:
                    received += len(batch)
                    value_bytes += sum(len(message.value or b"") for message in batch)
                    bar.update(len(batch))
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > DRAIN_IDLE_TIMEOUT_S:
                    break
        seconds = time.perf_counter() - started
    result = _throughput(received, value_bytes // max(received, 1), seconds)
    result["mb_per_s"] = round(rate(value_bytes, seconds) / 1e6, 2)
    return result


@dataclass
class _LatencyConsumer:
    """Polls in a thread, recording now - send time of every measured message."""

    target: Target
    topic: str
    latencies_ns: list[int] = field(default_factory=list)
    warmed_up: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        from tidemq import Consumer

        group = f"bench-latency-{uuid.uuid4().hex[:12]}"
        try:
            with Consumer(
                self.topic, group=group, auto_offset_reset="latest", **self.target.client_kwargs()
            ) as consumer:
                while not self.stop.is_set():
                    batch = consumer.poll(timeout=0.1, max_records=10_000)
                    now = time.monotonic_ns()
                    for message in batch:
                        send_ns = decode_send_ns(message.value)
                        if send_ns == WARMUP_TIMESTAMP:
                            self.warmed_up.set()
                        elif send_ns is not None:
                            self.latencies_ns.append(now - send_ns)
        except BaseException as error:  # surfaced by the main thread
            self.error = error
            self.warmed_up.set()


def _latency_phase(
    target: Target,
    topic: str,
    rate_per_s: int,
    seconds: float,
    value_bytes: int,
    keys: list[bytes],
    producer_options: dict[str, Any],
) -> dict[str, Any]:
    from tidemq import Producer

    consumer = _LatencyConsumer(target, topic)
    thread = threading.Thread(target=consumer.run, name="bench-consumer", daemon=True)
    thread.start()
    sent = 0
    try:
        with Producer(**target.client_kwargs(), **producer_options) as producer:
            warmup_deadline = time.monotonic() + 30.0
            while not consumer.warmed_up.wait(0.2):
                if time.monotonic() > warmup_deadline:
                    raise click.ClickException("latency consumer saw no message within 30 s")
                producer.send(topic, encode_value(WARMUP_TIMESTAMP, value_bytes), key=keys[0])
                producer.flush()
            if consumer.error is not None:
                raise click.ClickException(f"latency consumer failed: {consumer.error}")
            total = int(rate_per_s * seconds)
            started = time.monotonic()
            key_count = len(keys)
            with _progress(total, f"latency @ {rate_per_s}/s") as bar:
                while sent < total:
                    due = min(total, messages_due(rate_per_s, time.monotonic() - started))
                    if due <= sent:
                        time.sleep(0.0005)
                        continue
                    for index in range(sent, due):
                        producer.send(
                            topic,
                            encode_value(time.monotonic_ns(), value_bytes),
                            key=keys[index % key_count],
                        )
                    bar.update(due - sent)
                    sent = due
            producer.flush()
        drain_deadline = time.monotonic() + 10.0
        while len(consumer.latencies_ns) < sent and time.monotonic() < drain_deadline:
            time.sleep(0.05)
    finally:
        consumer.stop.set()
        thread.join(timeout=30.0)
    if consumer.error is not None:
        raise click.ClickException(f"latency consumer failed: {consumer.error}")
    return {
        "rate_per_s": rate_per_s,
        "sent": sent,
        "received": len(consumer.latencies_ns),
        **latency_summary(consumer.latencies_ns),
    }


def _ensure_topic(target: Target, topic: str, partitions: int) -> None:
    control = ControlPlane(target)
    try:
        control.create_topic(topic, partitions, None)
    except ProbeError as error:
        if "topic_exists" not in str(error):
            raise click.ClickException(f"cannot create topic {topic}: {error}") from error
    try:
        control.wait_topic_ready(topic)
    except ProbeError as error:
        raise click.ClickException(str(error)) from error


def _format_report(report: dict[str, Any]) -> str:
    lines = [
        f"topic {report['topic']}: {report['value_bytes']}-byte values, "
        f"{report['keys']} keys, {report['partitions']} partitions"
    ]
    for label, name in (("in  (produce)", "produce"), ("out (consume)", "consume")):
        if name in report:
            phase = report[name]
            lines.append(
                f"{label}: {phase['messages_per_s']:>12,.0f} msg/s  {phase['mb_per_s']:>8.2f} MB/s"
                f"  ({phase['messages']} messages in {phase['seconds']} s)"
            )
    if "latency" in report:
        latency = report["latency"]

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} ms"

        lines.append(
            f"end-to-end latency @ {latency['rate_per_s']} msg/s ({latency['received']}/"
            f"{latency['sent']} received): p50 {ms(latency['p50_ms'])}  p99 "
            f"{ms(latency['p99_ms'])}  p999 {ms(latency['p999_ms'])}  max {ms(latency['max_ms'])}"
        )
    return "\n".join(lines)


def _group_phase(
    target: Target,
    topic: str,
    partitions: int,
    phase: str,
    members: int,
    repeat: int,
    as_json: bool,
    join_rate: int,
    scale_messages: int,
    handler_ms: float,
) -> None:
    from tidemq.cli import bench_groups

    client_kwargs = target.client_kwargs()
    report: dict[str, Any] = {"topic": topic, "partitions": partitions}
    try:
        if phase == "join":
            report["join"] = bench_groups.join_phase(
                client_kwargs, topic, members, join_rate, repeat
            )
            text = bench_groups.format_join(report["join"])
        else:
            report["scale"] = bench_groups.scale_phase(
                client_kwargs, topic, partitions, members, scale_messages, handler_ms, repeat
            )
            text = bench_groups.format_scale(report["scale"])
    except TideError as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from error
    click.echo(json.dumps(report, indent=2) if as_json else f"topic {topic}: {text}")


@click.command()
@data_dir_option
@click.option("--messages", type=click.IntRange(min=1), default=200_000, show_default=True)
@click.option("--value-bytes", type=click.IntRange(min=8), default=100, show_default=True)
@click.option("--keys", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--partitions", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--topic", default=None, help="Default: bench-<random>, created for the run.")
@click.option(
    "--rate",
    "rate_per_s",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Messages/s of the latency phase.",
)
@click.option("--latency-seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option(
    "--phase",
    type=click.Choice(["all", "throughput", "latency", "join", "scale"]),
    default="all",
    show_default=True,
    help="all = throughput + latency; join and scale measure consumer groups.",
)
@click.option(
    "--members",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Group size of the join and scale phases (scale also runs 1 member).",
)
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--join-rate",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Messages/s produced during the join phase.",
)
@click.option("--scale-messages", type=click.IntRange(min=1), default=12_000, show_default=True)
@click.option(
    "--handler-ms",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="How long the scale phase's handler sleeps per message.",
)
@click.option("--acks", type=click.Choice(["all", "1", "0"]), default="all", show_default=True)
@click.option("--linger-ms", type=click.IntRange(min=0), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(
    data_dir: str | None,
    messages: int,
    value_bytes: int,
    keys: int,
    partitions: int,
    topic: str | None,
    rate_per_s: int,
    latency_seconds: float,
    phase: str,
    members: int,
    repeat: int,
    join_rate: int,
    scale_messages: int,
    handler_ms: float,
    acks: str,
    linger_ms: int | None,
    as_json: bool,
) -> None:
    """Measure throughput (msg/s, MB/s in and out), end-to-end latency, and consumer
    groups (join latency and pause, scaling with an I/O-bound handler)."""
    target = target_for(data_dir)
    topic = topic or f"bench-{uuid.uuid4().hex[:8]}"
    _ensure_topic(target, topic, partitions)
    if phase in ("join", "scale"):
        _group_phase(
            target,
            topic,
            partitions,
            phase,
            members,
            repeat,
            as_json,
            join_rate,
            scale_messages,
            handler_ms,
        )
        return
    producer_options: dict[str, Any] = {"acks": acks if acks == "all" else int(acks)}
    if linger_ms is not None:
        producer_options["linger_ms"] = linger_ms
    key_list = _keys(keys)
    report: dict[str, Any] = {
        "topic": topic,
        "messages": messages,
        "value_bytes": value_bytes,
        "keys": keys,
        "partitions": partitions,
        "acks": acks,
    }
    try:
        if phase in ("all", "throughput"):
            report["produce"] = _produce_throughput(
                target, topic, messages, value_bytes, key_list, producer_options
            )
            report["consume"] = _consume_throughput(target, topic, messages)
        if phase in ("all", "latency"):
            report["latency"] = _latency_phase(
                target,
                topic,
                rate_per_s,
                latency_seconds,
                value_bytes,
                key_list,
                producer_options,
            )
    except TideError as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from error
    click.echo(json.dumps(report, indent=2) if as_json else _format_report(report))
    incomplete = report.get("consume", {}).get("messages", messages) < messages
    if incomplete:
        click.echo(f"error: consumed only {report['consume']['messages']} of {messages}", err=True)
        sys.exit(1)
