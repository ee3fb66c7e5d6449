"""End-to-end latency at several rates up to saturation, consumer in another process.

Used by ``tide bench`` (its latency phase) and runnable on its own::

    python -m tidemq.cli.bench_latency sweep --data-dir D --partitions 12 \\
        --replication-factor 2 --rates 500,1000,2000,5000,10000 --json-out r.json

How a sweep works. This process creates the topic (``ControlPlane``), starts the
consumer process (``... bench_latency consume``, a new consumer group reading from the
latest offsets) and produces. Warm-up first: a message with send time 0 is sent to
every partition until the consumer has seen one from each (group joined, every
partition assigned and positioned), so joining is not counted as latency. Then for
each rate, ascending: ``--warmup-seconds`` at that rate (not measured), then
``--seconds`` measured; every value starts with its send time (8 bytes, big-endian
``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for every process on the
machine, so no skew). The consumer records ``receive time - send time``. At the end
of a step this process tells the consumer the step's window (first and last send
time) and how many messages it sent in it; the consumer waits for them (up to
``--drain-seconds``) and answers with the count and the percentiles of that window.
The sweep stops at the first saturated step (:func:`saturation_reason`).

CPU per message. Each step also reports the CPU seconds its messages cost (from the
start of the measured window until the consumer has them all) and the same per
message, in microseconds, for three parties: this process (the producer: every thread,
``time.process_time``), the consumer process (``/proc/PID/stat``; None off Linux) and
the brokers together (:class:`BrokersCpu`: their ``process_cpu_seconds_total`` on
``/metrics``, or /proc for an older broker running here; None, said on stderr, when a
live broker cannot be read or restarted during the step). The brokers' figure counts
whatever else they serve meanwhile: measure on an otherwise idle cluster. On this
machine the rounds are self-clocked, so at a low rate the CPU is used up whatever a
round costs: an optimisation shows in latency first (docs/BENCHMARKS.md).

Control protocol (JSON lines): consumer -> harness on stdout ``{"op": "ready"}`` and
``{"op": "window", "received": n, "p50_ms": ...}``; harness -> consumer on stdin
``{"op": "window", "from_ns", "to_ns", "sent", "timeout_s"}`` and ``{"op": "stop"}``.
The consumer also stops when its stdin closes (the harness died), and the harness
kills it by PID whatever happens.

Self-contained on purpose: this file imports only the standard library, click and
tidemq's public API (``Producer``, ``Consumer``, ``cli.control``'s ``ControlPlane``
and ``resolve_target``, ``cli.processes.is_running``), all of which older trees have
too (``is_running(pid, argv)`` since 335b6bc), so it measures an older
checkout unchanged: ``PYTHONPATH=OLD/src python src/tidemq/cli/bench_latency.py ...``
(docs/BENCHMARKS.md, "Latency versus throughput").
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import queue
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import click

_TIMESTAMP = struct.Struct(">q")
WARMUP_TIMESTAMP = 0
SATURATION_RATE_FRACTION = 0.9  # a step sending below this share of its rate is saturated
DEFAULT_P99_BOUND_MS = 1000.0
DEFAULT_RATES = (500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000)
WARMUP_DEADLINE_S = 60.0
RECORD_LIMIT = 5_000_000  # measured messages the consumer keeps per step (16 bytes each)
POLL_TIMEOUT_S = 0.05  # how soon the consumer sees a command; poll returns on data at once
SEND_IDLE_S = 0.0005
COMMAND_QUEUE_MAX = 16


class HarnessError(Exception):
    """The sweep cannot go on: the consumer process failed, or a deadline passed."""


# -- pure parts ------------------------------------------------------------------------


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


def latency_summary(latencies_ns: Iterable[int]) -> dict[str, float | None]:
    """p50 / p90 / p99 / p99.9 (``p999_ms``) / max in milliseconds; None when empty."""
    millis = [round(value / 1e6, 3) for value in sorted(latencies_ns)]
    return {
        "p50_ms": percentile(millis, 0.50),
        "p90_ms": percentile(millis, 0.90),
        "p99_ms": percentile(millis, 0.99),
        "p999_ms": percentile(millis, 0.999),
        "max_ms": millis[-1] if millis else None,
    }


def parse_rates(text: str) -> tuple[int, ...]:
    """``"500,1000,2000"`` -> (500, 1000, 2000): positive and strictly ascending."""
    try:
        rates = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"rates must be comma-separated integers, not {text!r}") from None
    if not rates:
        raise ValueError("no rate given")
    if any(value <= 0 for value in rates):
        raise ValueError(f"rates must be positive: {text!r}")
    if any(later <= earlier for earlier, later in itertools.pairwise(rates)):
        raise ValueError(f"rates must be strictly ascending: {text!r}")
    return rates


def achieved_rate(sent: int, seconds: float) -> float:
    return round(sent / seconds, 1) if seconds > 0 else 0.0


def saturation_reason(step: dict[str, Any], p99_bound_ms: float) -> str | None:
    """Why a measured step shows saturation, or None: the producer could not keep the
    asked rate (below 90%), the consumer did not get everything within the drain time,
    or the p99 is above the bound."""
    asked = step["rate_per_s"]
    if step["achieved_per_s"] < SATURATION_RATE_FRACTION * asked:
        return f"sent {step['achieved_per_s']:.0f} msg/s, below 90% of {asked}"
    if step["received"] < step["sent"]:
        return f"consumer received {step['received']} of {step['sent']}"
    p99 = step.get("p99_ms")
    if p99 is None or p99 > p99_bound_ms:
        return f"p99 {p99} ms above {p99_bound_ms:g} ms"
    return None


CPU_PARTIES = ("brokers", "producer", "consumer")


def cpu_per_message_us(cpu_s: dict[str, float | None], messages: int) -> dict[str, float | None]:
    """Each party's CPU seconds as microseconds per message (None stays None)."""
    return {
        party: None if seconds is None or messages <= 0 else round(seconds / messages * 1e6, 1)
        for party, seconds in cpu_s.items()
    }


def step_report(
    rate_per_s: int,
    sent: int,
    seconds: float,
    window: dict[str, Any],
    p99_bound_ms: float,
    cpu_s: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """One step's line of the report, ``saturated`` holding the reason or None."""
    cpu_s = {
        party: None if seconds is None else round(seconds, 3)
        for party, seconds in (cpu_s or dict.fromkeys(CPU_PARTIES)).items()
    }
    step: dict[str, Any] = {
        "rate_per_s": rate_per_s,
        "seconds": round(seconds, 3),
        "sent": sent,
        "received": int(window.get("received", 0)),
        "achieved_per_s": achieved_rate(sent, seconds),
        **{key: window.get(key) for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")},
        "cpu_s": cpu_s,
        "cpu_us_per_message": cpu_per_message_us(cpu_s, sent),
    }
    step["saturated"] = saturation_reason(step, p99_bound_ms)
    return step


def metric_sum(text: str, name: str) -> float | None:
    """The sum of every sample of metric ``name`` in Prometheus text format (labels
    or not); None when there is none."""
    total: float | None = None
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest[:1] not in ("{", " "):
            continue  # another metric whose name starts with this one
        if rest.startswith("{"):
            rest = rest[rest.rfind("}") + 1 :]
        try:
            value = float(rest.split()[0])  # a timestamp may follow the value
        except (ValueError, IndexError):
            continue
        if not math.isfinite(value):
            continue
        total = value if total is None else total + value
    return total


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` from /proc; None if unreadable."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[float, float] | None:
    """(start time in clock ticks since boot, user + system CPU seconds) of ``pid``
    from /proc/PID/stat; None if unreadable (no such process, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:  # the name may be any bytes
            fields = stat.read().rsplit(b")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return float(fields[19]), (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return None


METRICS_BYTES_MAX = 8 * 1024 * 1024
BrokerReading = tuple[str, float, float]  # (source, process start time, CPU seconds)
LocalProcess = tuple[int, Sequence[str]]  # (PID, argv) of a broker cluster.json lists


class BrokersCpu:
    """CPU seconds of the cluster's brokers, summed: ``process_cpu_seconds_total`` from
    each one's ``/metrics`` (mutual TLS with the client's certificate), else, for a
    broker that does not export it (an older tree) but runs on this machine, its
    process's /proc counters. Each broker is read on its own, with its process start
    time, so that a broker restarted between two readings (its counter started over)
    voids the step's figure instead of shrinking it."""

    def __init__(
        self, brokers: Sequence[tuple[str, LocalProcess | None]], tls: Any, timeout_s: float = 2.0
    ) -> None:
        self.brokers = list(dict(brokers).items())  # one entry per URL
        self.timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None
        if tls is not None and any(url.startswith("https:") for url, _ in self.brokers):
            self._context = ssl.create_default_context(cafile=tls.ca_file)
            if tls.cert_file and tls.key_file:
                self._context.load_cert_chain(tls.cert_file, tls.key_file)

    def read(self) -> dict[str, BrokerReading | str]:
        """Per broker URL its reading, or why there is none."""
        return {url: self._read_one(url, process) for url, process in self.brokers}

    def _read_one(self, url: str, process: LocalProcess | None) -> BrokerReading | str:
        try:
            with urllib.request.urlopen(
                url.rstrip("/") + "/metrics", timeout=self.timeout_s, context=self._context
            ) as answer:
                body = answer.read(METRICS_BYTES_MAX + 1)
                if len(body) > METRICS_BYTES_MAX or answer.length:  # too long, or cut short
                    return f"{url}/metrics answer cut short or over {METRICS_BYTES_MAX} bytes"
            text = body.decode(errors="replace")
        except Exception as error:  # any failure voids this broker's figure, not the sweep
            return f"{url}/metrics: {error}"
        seconds = metric_sum(text, "process_cpu_seconds_total")
        started = metric_sum(text, "process_start_time_seconds")
        if seconds is not None and started is not None:
            return ("metrics", started, seconds)
        try:
            stat = _proc_stat(process[0]) if process and _is_running(*process) else None
        except Exception:  # an older tree's is_running raises on a PID past the C int
            stat = None
        if stat is not None:
            return ("proc", stat[0], stat[1])
        return f"{url} exports no process_cpu_seconds_total and is no broker process here"

    @staticmethod
    def used(
        before: dict[str, BrokerReading | str], after: dict[str, BrokerReading | str]
    ) -> tuple[float | None, str | None]:
        """The CPU seconds every broker used between two readings, or None and why."""
        total = 0.0
        for url, first in before.items():
            last = after.get(url, f"{url} not read again")
            if isinstance(first, str):
                return None, first
            if isinstance(last, str):
                return None, last
            if first[:2] != last[:2]:
                return None, f"{url} restarted during the step"
            if last[2] < first[2]:
                return None, f"{url}'s CPU counter went backwards"
            total += last[2] - first[2]
        return (total, None) if before else (None, "no broker listed")


def _is_running(pid: int, argv: Sequence[str]) -> bool:
    """Is ``pid`` still the process cluster.json started with ``argv`` (not a PID
    reused by something else)?"""
    from tidemq.cli.processes import is_running

    return is_running(pid, argv)


def brokers_cpu_probe(control: Any, target: Any) -> BrokersCpu | None:
    """A :class:`BrokersCpu` over the live brokers the coordinator lists now (with their
    PIDs from cluster.json when the cluster runs here); None (the brokers' CPU left
    out, said on stderr) when it cannot list them."""
    try:
        info = getattr(target, "info", None)
        processes: dict[str, LocalProcess] = {
            str(b.url): (int(b.pid), tuple(b.argv)) for b in getattr(info, "brokers", ()) if b.pid
        }
        urls = [
            str(broker["url"])
            for broker in control.brokers()
            if broker.get("url") and broker.get("alive", True)
        ]
        brokers = [(url, processes.get(url)) for url in urls]
        return BrokersCpu(brokers, target.tls) if urls else None
    except Exception as error:  # the measurement goes on without the brokers' CPU
        click.echo(f"warning: brokers' CPU not measured: {error}", err=True)
        return None


CpuReading = dict[str, Any]


class CpuMeter:
    """Reads the three parties' CPU counters; ``since`` gives the seconds used from a
    reading taken earlier (None for a party that could not be read either time; the
    brokers' reason is said once on stderr)."""

    def __init__(self, consumer_pid: int | None, brokers: BrokersCpu | None = None) -> None:
        self.consumer_pid = consumer_pid
        self.brokers = brokers
        self._said: set[str] = set()

    def read(self) -> CpuReading:
        # This process and the consumer first: the brokers' scrapes cost this process
        # CPU (TLS handshakes), which is not the producer's.
        producer = time.process_time()
        consumer = None if self.consumer_pid is None else process_cpu_s(self.consumer_pid)
        brokers = self.brokers.read() if self.brokers is not None else None
        return {"brokers": brokers, "producer": producer, "consumer": consumer}

    def since(self, before: CpuReading) -> dict[str, float | None]:
        now = self.read()
        used: dict[str, float | None] = {}
        for party in ("producer", "consumer"):
            start, end = before.get(party), now.get(party)
            if start is None or end is None or end < start:
                used[party] = None
            else:
                used[party] = end - start
        used["brokers"] = None
        if self.brokers is not None and before["brokers"] is not None:
            seconds, why = self.brokers.used(before["brokers"], now["brokers"])
            used["brokers"] = seconds
            if why is not None and why not in self._said:
                self._said.add(why)
                click.echo(f"warning: brokers' CPU not measured for a step: {why}", err=True)
        return {party: used[party] for party in CPU_PARTIES}


def next_rates(rates: Sequence[int], steps: Sequence[dict[str, Any]]) -> list[int]:
    """The sweep's stop rule: the rates still to run after ``steps`` (none once a step
    is saturated: higher rates would only measure a growing queue)."""
    if any(step.get("saturated") for step in steps):
        return []
    return list(rates[len(steps) :])


class Recorder:
    """The consumer's bookkeeping (no I/O): latencies per send time, warm-up partitions,
    and the open window's count. Keeps at most ``limit`` measured messages."""

    def __init__(self, limit: int = RECORD_LIMIT) -> None:
        self.limit = limit
        self.send_ns = array("q")
        self.latency_ns = array("q")
        self.warm_partitions: set[int] = set()
        self.overflow = 0
        self.window: tuple[int, int] | None = None
        self.in_window = 0

    def add(self, messages: Iterable[Any], now_ns: int) -> None:
        for message in messages:
            send_ns = decode_send_ns(message.value)
            if send_ns is None:
                continue
            if send_ns == WARMUP_TIMESTAMP:
                self.warm_partitions.add(message.partition)
                continue
            if len(self.send_ns) >= self.limit:
                self.overflow += 1
                continue
            self.send_ns.append(send_ns)
            self.latency_ns.append(now_ns - send_ns)
            if self.window is not None and self.window[0] <= send_ns < self.window[1]:
                self.in_window += 1

    def open_window(self, from_ns: int, to_ns: int) -> None:
        self.window = (from_ns, to_ns)
        self.in_window = sum(1 for send_ns in self.send_ns if from_ns <= send_ns < to_ns)

    def close_window(self) -> dict[str, Any]:
        """The window's count and percentiles; forgets everything sent before its end
        (warm-up, the window itself and stragglers of earlier steps)."""
        assert self.window is not None, "close_window without open_window"
        from_ns, to_ns = self.window
        pairs = list(zip(self.send_ns, self.latency_ns, strict=True))
        latencies = [latency for send_ns, latency in pairs if from_ns <= send_ns < to_ns]
        kept = [(send_ns, latency) for send_ns, latency in pairs if send_ns >= to_ns]
        self.send_ns = array("q", (send_ns for send_ns, _ in kept))
        self.latency_ns = array("q", (latency for _, latency in kept))
        answer = {"received": len(latencies), "overflow": self.overflow}
        self.window, self.in_window, self.overflow = None, 0, 0
        return {**answer, **latency_summary(latencies)}


# -- the consumer process --------------------------------------------------------------


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _read_commands(stream: IO[str], commands: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        if line.strip():
            commands.put(json.loads(line))
    commands.put({"op": "stop"})  # stdin closed: the harness is gone


def consume(topic: str, group: str, partitions: int, client_config: dict[str, Any]) -> None:
    """The consumer process's loop: poll, record, answer window commands."""
    from tidemq import Consumer

    commands: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=COMMAND_QUEUE_MAX)
    reader = threading.Thread(target=_read_commands, args=(sys.stdin, commands), daemon=True)
    reader.start()
    recorder = Recorder()
    ready = False
    pending: dict[str, Any] | None = None
    with Consumer(topic, group=group, auto_offset_reset="latest", **client_config) as consumer:
        while True:
            batch = consumer.poll(timeout=POLL_TIMEOUT_S, max_records=10_000)
            if batch:
                recorder.add(batch, time.monotonic_ns())
            if not ready and len(recorder.warm_partitions) >= partitions:
                ready = True
                _emit({"op": "ready"})
            if pending is None:
                try:
                    command = commands.get_nowait()
                except queue.Empty:
                    continue
                if command["op"] == "stop":
                    return
                recorder.open_window(int(command["from_ns"]), int(command["to_ns"]))
                pending = {**command, "deadline": time.monotonic() + float(command["timeout_s"])}
            if recorder.in_window >= int(pending["sent"]) or time.monotonic() > pending["deadline"]:
                _emit({"op": "window", **recorder.close_window()})
                pending = None


class ConsumerProcess:
    """The harness's handle on the consumer process: JSON lines both ways, and a kill
    by PID in ``close`` whatever state it is in."""

    def __init__(self, command: list[str]) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close)
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue(maxsize=COMMAND_QUEUE_MAX)
        self._reader = threading.Thread(target=self._read, name="bench-consumer-out", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except OSError as error:
            raise HarnessError(f"consumer process is gone: {self._failure()}") from error

    def answer(self, op: str, timeout_s: float) -> dict[str, Any] | None:
        """The consumer's next ``op`` message, or None if none came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                self._lines.put(None)
                raise HarnessError(f"consumer process ended: {self._failure()}")
            if line.startswith("{"):
                message: dict[str, Any] = json.loads(line)
                if message.get("op") == op:
                    return message
        return None

    def _failure(self) -> str:
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        tail = self._stderr.read()[-2000:].decode(errors="replace").strip()
        return f"exit code {code}; stderr: {tail or '(empty)'}"

    def close(self, grace_s: float = 5.0) -> None:
        """Asks the process to stop, kills it (by PID) after ``grace_s``, reaps it."""
        if self.process.poll() is None:
            try:
                self.send({"op": "stop"})
                self.process.wait(timeout=grace_s)
            except (HarnessError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._reader.join(timeout=5.0)
        self._stderr.close()


def _consumer_command() -> list[str]:
    """How to start this module again: ``-m`` when imported from a package, else by file
    (so ``python .../bench_latency.py`` works against a tree that lacks this module)."""
    spec = globals().get("__spec__")
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name]
    return [sys.executable, os.path.abspath(__file__)]


# -- the producing side ----------------------------------------------------------------


@dataclass(frozen=True)
class SweepSettings:
    rates: tuple[int, ...]
    step_seconds: float = 5.0
    warmup_seconds: float = 1.0
    drain_seconds: float = 10.0
    value_bytes: int = 100
    keys: int = 1000
    acks: str = "all"
    linger_ms: int | None = None  # None: the client's default
    p99_bound_ms: float = DEFAULT_P99_BOUND_MS
    label: str | None = None

    def producer_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"acks": self.acks if self.acks == "all" else int(self.acks)}
        if self.linger_ms is not None:
            options["linger_ms"] = self.linger_ms
        return options


def _send_at_rate(
    producer: Any, topic: str, rate_per_s: int, seconds: float, value_bytes: int, keys: list[bytes]
) -> tuple[int, list[Any]]:
    """Sends ``rate_per_s * seconds`` messages on schedule (catching up in bursts when
    late); returns the count and one future per burst, to check for failures."""
    total = int(rate_per_s * seconds)
    sent = 0
    bursts = []
    key_count = len(keys)
    send = producer.send
    started = time.monotonic()
    while sent < total:
        due = min(total, messages_due(rate_per_s, time.monotonic() - started))
        if due <= sent:
            time.sleep(SEND_IDLE_S)
            continue
        future = None
        for index in range(sent, due):
            future = send(
                topic, encode_value(time.monotonic_ns(), value_bytes), key=keys[index % key_count]
            )
        bursts.append(future)
        sent = due
    return sent, bursts


def _warm_up(producer: Any, consumer: ConsumerProcess, topic: str, value_bytes: int) -> int:
    """Sends send-time-0 messages to every partition until the consumer has seen one
    from each; returns the partition count."""
    partitions = int(producer.partitions_for(topic))
    value = encode_value(WARMUP_TIMESTAMP, value_bytes)
    deadline = time.monotonic() + WARMUP_DEADLINE_S
    while True:
        for partition in range(partitions):
            producer.send(topic, value, partition=partition)
        producer.flush()
        if consumer.answer("ready", 0.2) is not None:
            return partitions
        if time.monotonic() > deadline:
            raise HarnessError(f"the consumer saw no message within {WARMUP_DEADLINE_S:g} s")


def _measure_step(
    producer: Any,
    consumer: ConsumerProcess,
    topic: str,
    rate_per_s: int,
    settings: SweepSettings,
    keys: list[bytes],
    meter: CpuMeter | None = None,
) -> dict[str, Any]:
    _send_at_rate(producer, topic, rate_per_s, settings.warmup_seconds, settings.value_bytes, keys)
    cpu_before = meter.read() if meter is not None else None
    from_ns = time.monotonic_ns()
    sent, bursts = _send_at_rate(
        producer, topic, rate_per_s, settings.step_seconds, settings.value_bytes, keys
    )
    to_ns = time.monotonic_ns()
    producer.flush()
    for future in bursts:
        future.result()  # raises if a send of the step failed
    consumer.send(
        {
            "op": "window",
            "from_ns": from_ns,
            "to_ns": to_ns,
            "sent": sent,
            "timeout_s": settings.drain_seconds,
        }
    )
    window = consumer.answer("window", settings.drain_seconds + 30.0)
    if window is None:
        raise HarnessError("the consumer did not answer for the step's window")
    cpu_s = meter.since(cpu_before) if meter is not None and cpu_before is not None else None
    seconds = (to_ns - from_ns) / 1e9
    return step_report(rate_per_s, sent, seconds, window, settings.p99_bound_ms, cpu_s)


def describe_step(step: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    text = (
        f"{step['rate_per_s']:>7}/s asked {step['achieved_per_s']:>9.0f}/s sent "
        f"{step['received']}/{step['sent']} received  p50 {ms(step['p50_ms'])}  "
        f"p90 {ms(step['p90_ms'])}  p99 {ms(step['p99_ms'])}  p99.9 {ms(step['p999_ms'])}  "
        f"max {ms(step['max_ms'])} ms"
    )
    per_message = step.get("cpu_us_per_message") or {}
    if any(value is not None for value in per_message.values()):
        shown = "  ".join(
            f"{party} {'-' if value is None else f'{value:.0f}'}"
            for party, value in per_message.items()
        )
        text += f"  CPU us/msg: {shown}"
    return text + (f"  SATURATED: {step['saturated']}" if step["saturated"] else "")


def run_sweep(
    client_config: dict[str, Any],
    topic: str,
    settings: SweepSettings,
    progress: bool = True,
    brokers_cpu: BrokersCpu | None = None,
) -> dict[str, Any]:
    """Runs the sweep against an existing topic; returns the steps (with saturation).
    ``brokers_cpu`` reads the brokers' CPU for each step; None leaves it out."""
    from tidemq import Producer

    keys = [f"key-{index}".encode() for index in range(settings.keys)]
    steps: list[dict[str, Any]] = []
    with Producer(**client_config, **settings.producer_options()) as producer:
        partitions = int(producer.partitions_for(topic))
        group = f"bench-latency-{uuid.uuid4().hex[:12]}"
        consumer = ConsumerProcess(
            [
                *_consumer_command(),
                "consume",
                "--topic",
                topic,
                "--group",
                group,
                "--partitions",
                str(partitions),
                "--client-config",
                json.dumps(client_config),
            ]
        )
        meter = CpuMeter(consumer.process.pid, brokers_cpu)
        try:
            _warm_up(producer, consumer, topic, settings.value_bytes)
            while rates := next_rates(settings.rates, steps):
                step = _measure_step(producer, consumer, topic, rates[0], settings, keys, meter)
                steps.append(step)
                if progress:
                    click.echo(describe_step(step), err=True)
        finally:
            consumer.close()
    saturated = next((step for step in steps if step["saturated"]), None)
    return {
        "partitions": partitions,
        "steps": steps,
        "saturated_at_per_s": saturated["rate_per_s"] if saturated else None,
        "stop_reason": saturated["saturated"] if saturated else None,
    }


def describe_settings(settings: SweepSettings) -> dict[str, Any]:
    fields = asdict(settings)
    fields["rates"] = list(settings.rates)
    del fields["label"]  # the report's label is the resolved one
    return fields


def default_label(partitions: int, replication_factor: int | None, label: str | None) -> str:
    if label:
        return label
    rf = "RF ?" if replication_factor is None else f"RF {replication_factor}"
    return f"{partitions} partition{'s' if partitions != 1 else ''}, {rf}"


def topic_replication_factor(topic_info: dict[str, Any]) -> int | None:
    """The replication factor from ``GET /v1/topics/{t}`` (its field, else replicas)."""
    factor = topic_info.get("replication_factor")
    if isinstance(factor, int):
        return factor
    partitions = topic_info.get("partitions") or []
    replicas = partitions[0].get("replicas") if partitions else None
    return len(replicas) if isinstance(replicas, list) else None


# -- the standalone command ------------------------------------------------------------


def _rates_option(_context: Any, _parameter: Any, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return parse_rates(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


@click.group()
def main() -> None:
    """tidemq latency harness (sweep rates; `consume` is its consumer process)."""


@main.command("consume", hidden=True)
@click.option("--topic", required=True)
@click.option("--group", required=True)
@click.option("--partitions", type=click.IntRange(min=1), required=True)
@click.option("--client-config", required=True, help="JSON: Consumer keyword arguments.")
def consume_command(topic: str, group: str, partitions: int, client_config: str) -> None:
    consume(topic, group, partitions, json.loads(client_config))


@main.command("sweep")
@click.option("--data-dir", default=None, help="The cluster's directory (else TIDE_* / ./data).")
@click.option("--topic", default=None, help="Default: bench-latency-<random>, created.")
@click.option("--partitions", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--replication-factor", type=click.IntRange(min=1), default=None)
@click.option(
    "--rates",
    callback=_rates_option,
    default=",".join(map(str, DEFAULT_RATES)),
    show_default=True,
    help="Ascending msg/s; the sweep stops at the first saturated rate.",
)
@click.option("--seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--warmup-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--drain-seconds", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@click.option("--value-bytes", type=click.IntRange(min=8), default=100, show_default=True)
@click.option("--keys", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--acks", type=click.Choice(["all", "1", "0"]), default="all", show_default=True)
@click.option("--linger-ms", type=click.IntRange(min=0), default=None)
@click.option("--p99-bound-ms", type=click.FloatRange(min=0), default=DEFAULT_P99_BOUND_MS)
@click.option("--label", default=None, help="The curve's series name (default: the config).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
def sweep_command(
    data_dir: str | None,
    topic: str | None,
    partitions: int,
    replication_factor: int | None,
    rates: tuple[int, ...],
    seconds: float,
    warmup_seconds: float,
    drain_seconds: float,
    value_bytes: int,
    keys: int,
    acks: str,
    linger_ms: int | None,
    p99_bound_ms: float,
    label: str | None,
    json_out: str | None,
) -> None:
    """Creates a topic and measures end-to-end latency at each rate up to saturation."""
    from tidemq.cli.control import ControlPlane, resolve_target

    settings = SweepSettings(
        rates, seconds, warmup_seconds, drain_seconds, value_bytes, keys, acks, linger_ms,
        p99_bound_ms, label,
    )  # fmt: skip
    try:
        target = resolve_target(data_dir)
        control = ControlPlane(target)
        generated = topic is None
        topic = topic or f"bench-latency-{uuid.uuid4().hex[:8]}"
        control.create_topic(topic, partitions, replication_factor)
        with deleted_after(control, topic, generated):
            topic_info = control.wait_topic_ready(topic)
            brokers_cpu = brokers_cpu_probe(control, target)
            report = sweep_report(
                target.client_kwargs(), topic, topic_info, settings, brokers_cpu=brokers_cpu
            )
    except Exception as error:  # one clear line for the operator, whatever failed
        raise click.ClickException(f"{type(error).__name__}: {error}") from error
    text = json.dumps(report, indent=2)
    if json_out:
        with open(json_out, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    click.echo(text)


@contextlib.contextmanager
def deleted_after(control: Any, topic: str, generated: bool) -> Iterator[None]:
    """Deletes ``topic`` when the block ends, however it ends, if the bench created it
    for itself (``generated``). Why: every broker keeps serving the partitions of a
    topic until it is deleted (its followers fetch them, its checkpoints list them), so
    topics left by earlier runs make the next runs measure a busier cluster. A failed
    delete is reported, not raised: the measurement stands."""
    try:
        yield
    finally:
        if generated:
            try:
                control.delete_topic(topic)
            except Exception as error:  # best effort, said on stderr
                click.echo(f"warning: could not delete the bench topic {topic}: {error}", err=True)


def sweep_report(
    client_config: dict[str, Any],
    topic: str,
    topic_info: dict[str, Any],
    settings: SweepSettings,
    progress: bool = True,
    brokers_cpu: BrokersCpu | None = None,
) -> dict[str, Any]:
    """The JSON report of one sweep: settings, topic, steps (docs/BENCHMARKS.md)."""
    import tidemq

    factor = topic_replication_factor(topic_info)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = run_sweep(client_config, topic, settings, progress, brokers_cpu)
    return {
        "kind": "tidemq-latency-sweep",
        "label": default_label(result["partitions"], factor, settings.label),
        "topic": topic,
        "partitions": result["partitions"],
        "replication_factor": factor,
        "tidemq": os.path.dirname(os.path.abspath(tidemq.__file__)),
        "started_at": started_at,
        **describe_settings(settings),
        "steps": result["steps"],
        "saturated_at_per_s": result["saturated_at_per_s"],
        "stop_reason": result["stop_reason"],
    }


if __name__ == "__main__":
    main()
