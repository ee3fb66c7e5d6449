"""``tide bench``: throughput and end-to-end latency against a running cluster.

Two phases (docs/OPERATIONS.md):

* throughput: one producer in this process sends ``--messages`` as fast as it can
  (then flushes); then a consumer of a new group drains them. Reported: messages/s
  and MB/s in (produce, acknowledged) and out (consume).
* latency (cli/bench_latency.py): a consumer of a new group runs in ANOTHER process
  (so this process's GIL does not delay it) while the producer sends at ``--rate``
  messages/s, or at each of ``--rates`` in turn up to saturation, for
  ``--latency-seconds`` each after ``--warmup-seconds``; each value starts with its
  send time (``time.monotonic_ns()``, one clock for every process). Reported per rate:
  sent, received, achieved rate, p50 / p90 / p99 / p99.9 / max. ``--curve PATH`` draws
  latency versus throughput (cli/bench_curve.py), also from saved ``--from`` reports.

The pure parts (value encoding, percentiles, the rate schedule, the stop rule) are
plain functions in bench_latency.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

import click

from tidemq.cli import bench_latency
from tidemq.cli.bench_latency import (
    WARMUP_TIMESTAMP,
    decode_send_ns,
    encode_value,
    latency_summary,
    messages_due,
    percentile,
)
from tidemq.cli.client_commands import data_dir_option, target_for
from tidemq.cli.control import ControlPlane, Target
from tidemq.cli.processes import ProbeError
from tidemq.errors import TideError

__all__ = [
    "WARMUP_TIMESTAMP",
    "bench",
    "decode_send_ns",
    "encode_value",
    "latency_summary",
    "messages_due",
    "percentile",
]

PROGRESS_STEP = 1000
DRAIN_IDLE_TIMEOUT_S = 30.0


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


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


def _ensure_topic(
    target: Target, topic: str, partitions: int, replication_factor: int | None
) -> dict[str, Any]:
    """Creates the topic (an existing one is used as it is); returns GET /v1/topics/{t}
    once every partition has a serving leader."""
    control = ControlPlane(target)
    try:
        control.create_topic(topic, partitions, replication_factor)
    except ProbeError as error:
        if "topic_exists" not in str(error):
            raise click.ClickException(f"cannot create topic {topic}: {error}") from error
    try:
        return control.wait_topic_ready(topic)
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
        lines.append("end-to-end latency: " + bench_latency.describe_step(report["latency"]))
    if "latency_sweep" in report:
        sweep = report["latency_sweep"]
        lines.append(f"end-to-end latency, {sweep['label']}:")
        lines += ["  " + bench_latency.describe_step(step) for step in sweep["steps"]]
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


def _latency(
    target: Target,
    topic: str,
    topic_info: dict[str, Any],
    settings: bench_latency.SweepSettings,
    single: bool,
) -> tuple[str, dict[str, Any]]:
    """Runs the latency sweep (one rate when ``single``); returns the report key and
    value: ``latency`` (the one step) or ``latency_sweep`` (bench_latency's report)."""
    try:
        brokers_cpu = bench_latency.brokers_cpu_probe(ControlPlane(target), target)
        sweep = bench_latency.sweep_report(
            target.client_kwargs(), topic, topic_info, settings, True, brokers_cpu
        )
    except bench_latency.HarnessError as error:
        raise click.ClickException(f"latency phase: {error}") from error
    if single:
        return "latency", sweep["steps"][0]
    return "latency_sweep", sweep


def _draw_curve(paths: list[str], reports: list[dict[str, Any]], out: str) -> None:
    from tidemq.cli import bench_curve

    try:
        loaded = [bench_curve.load_report(path) for path in paths] + reports
        bench_curve.draw(bench_curve.series_of(loaded), out)
    except bench_curve.CurveError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {out}", err=True)


def _check_curve_options(curve: str | None, from_reports: tuple[str, ...], phase: str) -> None:
    if from_reports and curve is None:
        raise click.UsageError("--from needs --curve PATH (the image to draw)")
    if curve is not None and not from_reports and phase not in ("all", "latency"):
        raise click.UsageError("--curve needs a latency phase (--phase all or latency)")
    if curve is not None:
        try:
            import matplotlib  # noqa: F401  (fail before measuring, not after)
        except ImportError:
            raise click.UsageError(
                "--curve needs matplotlib: pip install 'tidemq[bench]'"
            ) from None


@click.command()
@data_dir_option
@click.option("--messages", type=click.IntRange(min=1), default=200_000, show_default=True)
@click.option("--value-bytes", type=click.IntRange(min=8), default=100, show_default=True)
@click.option("--keys", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--partitions", type=click.IntRange(min=1), default=12, show_default=True)
@click.option(
    "--replication-factor",
    type=click.IntRange(min=1),
    default=None,
    help="Of the topic the bench creates (default: the cluster's).",
)
@click.option("--topic", default=None, help="Default: bench-<random>, created for the run.")
@click.option(
    "--rate",
    "rate_per_s",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Messages/s of the latency phase.",
)
@click.option(
    "--rates",
    callback=bench_latency._rates_option,
    default=None,
    help="Ascending msg/s, e.g. 500,1000,2000,5000,10000: the latency phase at each rate "
    "until saturation (achieved < 90%, not all received, or p99 above --p99-bound-ms). "
    "Replaces --rate.",
)
@click.option(
    "--latency-seconds",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Measured seconds per rate.",
)
@click.option(
    "--warmup-seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Unmeasured seconds at each rate before measuring it.",
)
@click.option(
    "--p99-bound-ms",
    type=click.FloatRange(min=0),
    default=bench_latency.DEFAULT_P99_BOUND_MS,
    show_default=True,
    help="A rate whose p99 is above this is saturated (the sweep stops).",
)
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
@click.option("--label", default=None, help="The sweep's name on the curve.")
@click.option(
    "--curve",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw latency versus throughput into this image (needs tidemq[bench]).",
)
@click.option(
    "--from",
    "from_reports",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A saved --json report to draw (repeatable); with --from nothing is measured.",
)
def bench(
    data_dir: str | None,
    messages: int,
    value_bytes: int,
    keys: int,
    partitions: int,
    replication_factor: int | None,
    topic: str | None,
    rate_per_s: int,
    rates: tuple[int, ...] | None,
    latency_seconds: float,
    warmup_seconds: float,
    p99_bound_ms: float,
    phase: str,
    members: int,
    repeat: int,
    join_rate: int,
    scale_messages: int,
    handler_ms: float,
    acks: str,
    linger_ms: int | None,
    as_json: bool,
    label: str | None,
    curve: str | None,
    from_reports: tuple[str, ...],
) -> None:
    """Measure throughput (msg/s, MB/s in and out), end-to-end latency, and consumer
    groups (join latency and pause, scaling with an I/O-bound handler)."""
    _check_curve_options(curve, from_reports, phase)
    if from_reports:
        assert curve is not None
        _draw_curve(list(from_reports), [], curve)
        return
    target = target_for(data_dir)
    generated = topic is None
    topic = topic or f"bench-{uuid.uuid4().hex[:8]}"
    with bench_latency.deleted_after(ControlPlane(target), topic, generated):
        topic_info = _ensure_topic(target, topic, partitions, replication_factor)
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
            "replication_factor": bench_latency.topic_replication_factor(topic_info),
            "acks": acks,
        }
        try:
            if phase in ("all", "throughput"):
                report["produce"] = _produce_throughput(
                    target, topic, messages, value_bytes, key_list, producer_options
                )
                report["consume"] = _consume_throughput(target, topic, messages)
            if phase in ("all", "latency"):
                settings = bench_latency.SweepSettings(
                    rates or (rate_per_s,), latency_seconds, warmup_seconds,
                    value_bytes=value_bytes, keys=keys, acks=acks, linger_ms=linger_ms,
                    p99_bound_ms=p99_bound_ms, label=label,
                )  # fmt: skip
                name, value = _latency(target, topic, topic_info, settings, single=rates is None)
                report[name] = value
        except TideError as error:
            raise click.ClickException(f"{type(error).__name__}: {error}") from error
        click.echo(json.dumps(report, indent=2) if as_json else _format_report(report))
        if curve is not None:
            _draw_curve([], [report], curve)
        incomplete = report.get("consume", {}).get("messages", messages) < messages
        if incomplete:
            click.echo(
                f"error: consumed only {report['consume']['messages']} of {messages}", err=True
            )
            sys.exit(1)
