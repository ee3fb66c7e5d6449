"""Measure failover: ``python -m tests.fault.leader_kill --kills 20``.

Kills the leader of the most partitions of an RF 3 topic under load, ``--kills``
times, and measures until all its partitions accept writes again
(tests/fault/harness/failover.py). Prints ONE JSON line: ``{"leader_kill": {kills,
recovered, stayed_offline, p50_ms, p99_ms, max_ms}, "bound_ms", "verdict": ...}``.
Exits 1 when a partition stayed offline, the p99 exceeds the session timeout + 2 s or
the checker found a safety violation (duplicates only with
``TIDE_FAULT_STRICT_DUPLICATES=1``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.fault.harness.checker import violations
from tests.fault.harness.failover import run_leader_kills
from tests.fault.harness.runner import strict_duplicates


def problems(result: dict[str, Any]) -> list[str]:
    summary = result["leader_kill"]
    found = violations(result["verdict"], duplicates=strict_duplicates())
    if summary["stayed_offline"]:
        found.append(f"{summary['stayed_offline']} kill(s) left partitions offline")
    if summary["p99_ms"] is None or summary["p99_ms"] > result["bound_ms"]:
        found.append(f"p99 {summary['p99_ms']} ms exceeds {result['bound_ms']} ms")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault.leader_kill", description=__doc__)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--session-timeout-ms", type=int, default=3000)
    parser.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto")
    parser.add_argument("--dir", type=Path, default=None, help="where history and logs go")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if arguments.kills < 1 or arguments.session_timeout_ms < 1:
        parser.error("--kills and --session-timeout-ms must be positive")
    root = arguments.dir or Path(tempfile.mkdtemp(prefix="tidemq-failover-"))
    print(f"history and logs in {root}", file=sys.stderr)
    result = run_leader_kills(
        root, arguments.kills, arguments.session_timeout_ms, arguments.network
    )
    print(json.dumps(result), flush=True)
    found = problems(result)
    for problem in found:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
