"""``tide bench --phase join|scale``: consumer-group rebalancing and scaling.

Members run as separate processes (``multiprocessing`` spawn), each with its own
:class:`~tidemq.Consumer`, so that N members are N Python interpreters, as in a real
deployment, and the client's loop thread and the GIL do not serialize them. Every
process reads ``time.monotonic()``, which on Linux is one system-wide clock, so times
from different members compare directly.

* join: ``members - 1`` members of a new group read a topic while this process
  produces at ``--join-rate`` msg/s; once each of them has received a message and a
  baseline window has passed, the last member creates its Consumer. Reported: the
  time from that creation to its first message, and for the members that kept
  partitions (received from them both before the join and at the end), the longest
  gap between messages of those partitions from the join until the window after the
  new member's first message ends, against the longest gap before the join.
* scale: ``--scale-messages`` are produced first (spread evenly over the partitions);
  then a new group of ``members`` members joins, and once the partitions are spread
  over all of them (nothing handed out yet) every member starts ``subscribe()`` with a
  handler that sleeps ``--handler-ms`` per message. Reported: messages/s from that
  start until the group has handled every message.

The pure parts (gaps, kept partitions, medians) are plain functions, unit tested.
"""

from __future__ import annotations

import itertools
import multiprocessing
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

Receipt = tuple[float, int]  # (monotonic s when poll returned it, partition)

START_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 60.0
BASELINE_S = 3.0
AFTER_FIRST_S = 3.0
KEPT_TAIL_S = 1.0


# -- pure helpers ---------------------------------------------------------------------


def longest_gap(times: Sequence[float]) -> float:
    """The longest interval between consecutive times (sorted here); 0 for < 2."""
    ordered = sorted(times)
    return max((later - earlier for earlier, later in itertools.pairwise(ordered)), default=0.0)


def kept_partitions(
    receipts: Sequence[Receipt], before: tuple[float, float], after: tuple[float, float]
) -> set[int]:
    """Partitions received from both in ``before`` and in ``after`` (half-open windows)."""

    def seen(window: tuple[float, float]) -> set[int]:
        return {partition for at, partition in receipts if window[0] <= at < window[1]}

    return seen(before) & seen(after)


def gap_in_window(
    receipts: Sequence[Receipt], partitions: set[int], start: float, end: float
) -> float:
    """Longest gap between receipts of ``partitions`` in [start, end], counting from the
    last receipt before ``start`` (so a pause that began before the window counts)."""
    times = [at for at, partition in receipts if partition in partitions and at <= end]
    before = [at for at in times if at < start]
    inside = [at for at in times if at >= start]
    return longest_gap(before[-1:] + inside + [end])


@dataclass(frozen=True)
class JoinRun:
    join_to_first_ms: float
    pause_ms: float  # longest gap around the join, over members that kept partitions
    baseline_ms: float  # longest gap before the join, same members and partitions
    members_kept: int


def analyse_join(
    receipts_by_member: Sequence[Sequence[Receipt]], joined_at: float, first_at: float
) -> JoinRun:
    """One join run: ``joined_at`` the new member's Consumer creation, ``first_at``
    its first message; ``receipts_by_member`` the other members' receipts."""
    end = first_at + AFTER_FIRST_S
    before = (joined_at - BASELINE_S, joined_at)
    pauses = []
    baselines = []
    for receipts in receipts_by_member:
        kept = kept_partitions(receipts, before, (end - KEPT_TAIL_S, end))
        if not kept:
            continue
        pauses.append(gap_in_window(receipts, kept, joined_at, end))
        baselines.append(gap_in_window(receipts, kept, before[0], joined_at))
    return JoinRun(
        join_to_first_ms=round((first_at - joined_at) * 1000, 1),
        pause_ms=round(max(pauses, default=0.0) * 1000, 1),
        baseline_ms=round(max(baselines, default=0.0) * 1000, 1),
        members_kept=len(pauses),
    )


def median_of(values: Sequence[float]) -> float:
    return round(statistics.median(values), 1) if values else 0.0


# -- member processes -----------------------------------------------------------------


@dataclass(frozen=True)
class MemberSpec:
    client_kwargs: dict[str, Any]
    topic: str
    group: str
    index: int


def _join_member(spec: MemberSpec, go: Any, stop: Any, received: Any, results: Any) -> None:
    """Waits for ``go`` (None: start at once), then polls until ``stop``."""
    from tidemq import Consumer

    if go is not None and not go.wait(START_TIMEOUT_S):
        results.put((spec.index, 0.0, [], "never told to start"))
        return
    created = time.monotonic()
    receipts: list[Receipt] = []
    try:
        with Consumer(
            spec.topic, group=spec.group, auto_offset_reset="latest", **spec.client_kwargs
        ) as consumer:
            while not stop.is_set():
                batch = consumer.poll(timeout=0.05, max_records=1000)
                now = time.monotonic()
                receipts.extend((now, message.partition) for message in batch)
                if batch:
                    received[spec.index] += len(batch)
    except Exception as error:  # reported by the parent
        results.put((spec.index, created, receipts, f"{type(error).__name__}: {error}"))
        return
    results.put((spec.index, created, receipts, None))


def _scale_member(
    spec: MemberSpec, handler_s: float, go: Any, stop: Any, owned: Any, handled: Any, results: Any
) -> None:
    """Joins, reports how many partitions it owns until ``go``, then subscribes with a
    handler that sleeps ``handler_s`` per message until ``stop``."""
    from tidemq import Consumer

    def handler(message: object) -> None:
        time.sleep(handler_s)
        with handled.get_lock():
            handled.value += 1

    try:
        consumer = Consumer(
            spec.topic, group=spec.group, auto_offset_reset="earliest", **spec.client_kwargs
        )
        while not go.wait(0.02):
            if stop.is_set():
                break
            owned[spec.index] = len(consumer.assignment())

        def close_on_stop() -> None:
            stop.wait()
            consumer.close()

        closer = threading.Thread(target=close_on_stop, daemon=True)
        closer.start()
        consumer.subscribe(handler)
        closer.join(timeout=60.0)
    except Exception as error:  # reported by the parent
        results.put((spec.index, f"{type(error).__name__}: {error}"))
        return
    results.put((spec.index, None))


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.01)


def _stop_processes(processes: list[Any]) -> None:
    for process in processes:
        process.join(timeout=30.0)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)


# -- join ----------------------------------------------------------------------------


class _SteadyLoad:
    """Produces ``rate_per_s`` messages/s in a thread until stopped."""

    def __init__(self, client_kwargs: dict[str, Any], topic: str, rate_per_s: int) -> None:
        self._stop = threading.Event()
        self._client_kwargs = client_kwargs
        self._topic = topic
        self._rate = rate_per_s
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from tidemq import Producer
        from tidemq.cli.bench import messages_due

        try:
            with Producer(**self._client_kwargs) as producer:
                started = time.monotonic()
                sent = 0
                while not self._stop.is_set():
                    due = messages_due(self._rate, time.monotonic() - started)
                    for index in range(sent, due):
                        producer.send(self._topic, b"x" * 100, key=f"key-{index % 1000}")
                    sent = max(sent, due)
                    time.sleep(0.002)
        except BaseException as error:  # surfaced by the caller
            self.error = error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30.0)
        if self.error is not None:
            raise click.ClickException(f"load producer failed: {self.error}")


def join_run(client_kwargs: dict[str, Any], topic: str, members: int) -> JoinRun:
    context = multiprocessing.get_context("spawn")
    group = f"bench-join-{uuid.uuid4().hex[:12]}"
    go = context.Event()
    stop = context.Event()
    received = context.Array("l", members)
    results = context.Queue()
    processes = [
        context.Process(
            target=_join_member,
            args=(
                MemberSpec(client_kwargs, topic, group, index),
                go if index == members - 1 else None,
                stop,
                received,
                results,
            ),
            daemon=True,
        )
        for index in range(members)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[float, list[Receipt]]] = {}
    try:
        _wait_for(
            lambda: all(received[index] > 0 for index in range(members - 1)),
            START_TIMEOUT_S,
            f"{members - 1} members to receive",
        )
        time.sleep(BASELINE_S + 0.5)
        go.set()
        last = members - 1
        _wait_for(lambda: received[last] > 0, JOIN_TIMEOUT_S, "the new member's first message")
        time.sleep(AFTER_FIRST_S + 0.5)
    finally:
        go.set()
        stop.set()
        for _ in processes:
            index, created, receipts, error = results.get(timeout=60.0)
            if error is not None:
                raise click.ClickException(f"member {index} failed: {error}")
            outcomes[index] = (created, receipts)
        _stop_processes(processes)
    joined_at, new_receipts = outcomes[members - 1]
    first_at = min(at for at, _ in new_receipts)
    others = [outcomes[index][1] for index in range(members - 1)]
    return analyse_join(others, joined_at, first_at)


def join_phase(
    client_kwargs: dict[str, Any], topic: str, members: int, rate_per_s: int, repeat: int
) -> dict[str, Any]:
    if members < 2:
        raise click.ClickException("the join phase needs --members 2 or more")
    load = _SteadyLoad(client_kwargs, topic, rate_per_s)
    runs = []
    try:
        for _ in range(repeat):
            runs.append(join_run(client_kwargs, topic, members))
    finally:
        load.stop()
    return {
        "members": members,
        "rate_per_s": rate_per_s,
        "runs": [vars(run) for run in runs],
        "median_join_to_first_ms": median_of([run.join_to_first_ms for run in runs]),
        "median_pause_ms": median_of([run.pause_ms for run in runs]),
        "median_baseline_ms": median_of([run.baseline_ms for run in runs]),
    }


# -- scale ---------------------------------------------------------------------------


def produce_evenly(client_kwargs: dict[str, Any], topic: str, partitions: int, count: int) -> None:
    from tidemq import Producer

    with Producer(**client_kwargs) as producer:
        for index in range(count):
            producer.send(topic, b"x" * 100, key=f"key-{index}", partition=index % partitions)
        producer.flush()


def scale_run(
    client_kwargs: dict[str, Any],
    topic: str,
    partitions: int,
    members: int,
    messages: int,
    handler_ms: float,
) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    group = f"bench-scale-{uuid.uuid4().hex[:12]}"
    go = context.Event()
    stop = context.Event()
    owned = context.Array("l", members)
    handled = context.Value("l", 0)
    results = context.Queue()
    processes = [
        context.Process(
            target=_scale_member,
            args=(
                MemberSpec(client_kwargs, topic, group, index),
                handler_ms / 1000,
                go,
                stop,
                owned,
                handled,
                results,
            ),
            daemon=True,
        )
        for index in range(members)
    ]
    spread = min(members, partitions)
    try:
        for process in processes:
            process.start()
        _wait_for(
            lambda: sum(owned[:]) == partitions and sum(1 for n in owned[:] if n) == spread,
            START_TIMEOUT_S,
            f"{partitions} partitions spread over {spread} members",
        )
        go.set()
        started = time.monotonic()
        _wait_for(lambda: handled.value >= messages, 600.0, f"{messages} messages handled")
        seconds = time.monotonic() - started
    finally:
        go.set()
        stop.set()
        errors = [results.get(timeout=60.0) for _ in processes]
        _stop_processes(processes)
    for index, error in errors:
        if error is not None:
            raise click.ClickException(f"member {index} failed: {error}")
    return {
        "members": members,
        "seconds": round(seconds, 3),
        "messages_per_s": round(messages / seconds, 1),
        "handled": handled.value,
    }


def scale_phase(
    client_kwargs: dict[str, Any],
    topic: str,
    partitions: int,
    members: int,
    messages: int,
    handler_ms: float,
    repeat: int,
) -> dict[str, Any]:
    produce_evenly(client_kwargs, topic, partitions, messages)
    report: dict[str, Any] = {"messages": messages, "handler_ms": handler_ms}
    for size in sorted({1, members}):
        runs = [
            scale_run(client_kwargs, topic, partitions, size, messages, handler_ms)
            for _ in range(repeat)
        ]
        report[f"members_{size}"] = {
            "runs": runs,
            "median_messages_per_s": median_of([run["messages_per_s"] for run in runs]),
        }
    single = report["members_1"]["median_messages_per_s"]
    many = report[f"members_{members}"]["median_messages_per_s"]
    report["speedup"] = round(many / single, 2) if single else 0.0
    return report


def format_join(report: dict[str, Any]) -> str:
    lines = [f"join, {report['members']} members, load {report['rate_per_s']} msg/s:"]
    for run in report["runs"]:
        lines.append(
            f"  join->first {run['join_to_first_ms']:.0f} ms, pause {run['pause_ms']:.0f} ms "
            f"(before the join {run['baseline_ms']:.0f} ms), {run['members_kept']} kept"
        )
    lines.append(
        f"  median: join->first {report['median_join_to_first_ms']:.0f} ms, pause "
        f"{report['median_pause_ms']:.0f} ms (before {report['median_baseline_ms']:.0f} ms)"
    )
    return "\n".join(lines)


def format_scale(report: dict[str, Any]) -> str:
    lines = [f"scale, {report['messages']} messages, handler {report['handler_ms']} ms each:"]
    for name, phase in report.items():
        if name.startswith("members_"):
            runs = ", ".join(f"{run['messages_per_s']:.0f}" for run in phase["runs"])
            lines.append(
                f"  {name.removeprefix('members_')} member(s): {runs} msg/s, median "
                f"{phase['median_messages_per_s']:.0f}"
            )
    lines.append(f"  speedup {report['speedup']}x")
    return "\n".join(lines)
