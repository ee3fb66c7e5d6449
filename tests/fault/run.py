"""Run the fault harness: ``python -m tests.fault.run --minutes 10``.

Prints progress on stderr and the checker's verdict as ONE JSON line on stdout; exits 1
when the verdict shows a safety violation (see tests/fault/harness/checker.py), 2 on
bad arguments. The history and every process log stay in ``--dir`` (default: a new
directory under /tmp). Run as root for network namespaces (and network faults);
otherwise it falls back to loopback processes and says so. The CI suite runs this
very command (``--per-kind 20``) in a subprocess, so client threads and sockets of a
hurt cluster never outlive the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from tests.fault.harness.checker import violations
from tests.fault.harness.nemesis import ALL_KINDS, NemesisConfig
from tests.fault.harness.runner import RunConfig, TopicSpec, run


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fault.run", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the nemesis runs")
    parser.add_argument(
        "--per-kind", type=int, default=None, help="stop once every kind was injected N times"
    )
    parser.add_argument("--fault-s", type=_span, default=(0.5, 2.0), help="MIN,MAX seconds")
    parser.add_argument("--quiet-s", type=_span, default=(0.2, 0.8), help="MIN,MAX seconds")
    parser.add_argument("--topics", type=_topics, default=RunConfig().topics,
                        help="NAME:PARTITIONS:RF,... (default rf2:6:2,rf3:6:3)")  # fmt: skip
    parser.add_argument("--producers-per-topic", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto")
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument("--lanes", type=int, default=2, help="faults at the same time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(ALL_KINDS), help="comma-separated")
    parser.add_argument("--rate", type=float, default=80.0, help="msg/s per producer")
    parser.add_argument("--session-timeout-ms", type=int, default=3000)
    parser.add_argument("--replication", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--dir", type=Path, default=None, help="where history and logs go")
    arguments = parser.parse_args(argv)
    if arguments.minutes <= 0 or arguments.lanes < 1:
        parser.error("--minutes must be > 0 and --lanes >= 1")
    if max(t.replication_factor for t in arguments.topics) > arguments.brokers:
        parser.error("a topic's replication factor exceeds --brokers")
    unknown = set(arguments.kinds.split(",")) - set(ALL_KINDS) - {""}
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(ALL_KINDS)}")
    if arguments.per_kind is not None and arguments.per_kind < 1:
        parser.error("--per-kind must be >= 1")
    return arguments


def _span(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, not {text!r}") from error
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, not {text!r}")
    return low, high


def _topics(text: str) -> tuple[TopicSpec, ...]:
    topics = []
    for item in text.split(","):
        try:
            name, partitions, replication_factor = item.split(":")
            topics.append(TopicSpec(name, int(partitions), int(replication_factor)))
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected NAME:PARTITIONS:RF, not {item!r}"
            ) from error
    return tuple(topics)


def main(argv: list[str] | None = None) -> int:
    arguments = parse(sys.argv[1:] if argv is None else argv)
    root = arguments.dir or Path(tempfile.mkdtemp(prefix="tidemq-fault-"))
    nemesis = NemesisConfig(
        kinds=tuple(k for k in arguments.kinds.split(",") if k),
        per_kind=arguments.per_kind or 10**9,  # without --per-kind the clock ends the run
        max_duration_s=arguments.minutes * 60.0,
        lanes=arguments.lanes,
        seed=arguments.seed,
        fault_s=arguments.fault_s,
        quiet_s=arguments.quiet_s,
    )
    replication = {"auto": None, "on": True, "off": False}[arguments.replication]
    config = replace(
        RunConfig(),
        brokers=arguments.brokers,
        network=arguments.network,
        rate_per_producer=arguments.rate,
        topics=arguments.topics,
        producers_per_topic=arguments.producers_per_topic,
        consumers=arguments.consumers,
        session_timeout_ms=arguments.session_timeout_ms,
        nemesis=nemesis,
        replication=replication,
    )
    print(f"history and logs in {root}", file=sys.stderr)
    verdict = run(root, config)
    print(json.dumps(verdict), flush=True)
    problems = violations(verdict)
    for problem in problems:
        print(f"VIOLATION: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
