"""Run the fault harness for longer than CI does: ``python -m tests.fault.run --minutes 10``.

Prints progress on stderr and the checker's verdict as ONE JSON line on stdout; exits 1
when the verdict shows a safety violation (see tests/fault/harness/checker.py). The
history and every process log stay in ``--dir`` (default: a new directory under /tmp).
Run as root for network namespaces (and network faults); otherwise it falls back to
loopback processes and says so.
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
from tests.fault.harness.runner import RunConfig, run


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fault.run", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the nemesis runs")
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
    if arguments.minutes <= 0 or arguments.brokers < 3 or arguments.lanes < 1:
        parser.error("--minutes must be > 0, --brokers >= 3 (RF 3 topic), --lanes >= 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse(sys.argv[1:] if argv is None else argv)
    root = arguments.dir or Path(tempfile.mkdtemp(prefix="tidemq-fault-"))
    nemesis = NemesisConfig(
        kinds=tuple(k for k in arguments.kinds.split(",") if k),
        per_kind=10**9,  # the clock ends the run
        max_duration_s=arguments.minutes * 60.0,
        lanes=arguments.lanes,
        seed=arguments.seed,
    )
    replication = {"auto": None, "on": True, "off": False}[arguments.replication]
    config = replace(
        RunConfig(),
        brokers=arguments.brokers,
        network=arguments.network,
        rate_per_producer=arguments.rate,
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
