"""Failover time: under load, SIGKILL the leader of the most partitions, eight times,
and measure until all its partitions accept writes again. Issue 5 asks for p99 within
the session timeout + 2 s.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.fault.conftest import keep, run_scenario
from tests.fault.harness.runner import replication_available
from tests.fault.leader_kill import problems

KILLS = 8


def test_leader_kill_failover_time(tmp_path: Path) -> None:
    result = run_scenario(
        "tests.fault.leader_kill", "--kills", str(KILLS), "--session-timeout-ms", "3000",
        root=tmp_path, timeout_s=300.0,
    )  # fmt: skip
    print(json.dumps(result["leader_kill"]))
    found = problems(result)
    # while replication is missing the failure is expected: keep nothing then
    kept = keep(tmp_path) if found and replication_available() else ""
    assert found == [], f"{json.dumps(result)}\n{kept}"
    summary = result["leader_kill"]
    assert summary["kills"] == KILLS and summary["recovered"] == KILLS
    assert summary["p99_ms"] <= 3000 + 2000
