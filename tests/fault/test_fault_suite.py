"""The fault suite: a 3-broker cluster under produce and consume load on RF 2 and RF 3
topics while the nemesis injects at least 20 faults of every kind; the history checker
must then report no acknowledged record lost, no reordering per key and no double
leader. See tests/fault/harness/ and docs/OPERATIONS.md ("Fault testing").

Without replication (before issue 5's replication lands) a killed broker's partitions
are offline until the nemesis restarts it: the run measures availability, and still
no acknowledged record may be lost. With replication the same suite keeps killed
brokers down past the session timeout, so failovers really happen.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fault.conftest import keep, run_scenario
from tests.fault.harness.checker import violations
from tests.fault.harness.cluster import FaultCluster
from tests.fault.harness.nemesis import ALL_KINDS, NETWORK_KINDS, PROCESS_KINDS
from tests.fault.harness.network import NamespaceNetwork, create_network, namespaces_available
from tests.fault.harness.runner import strict_duplicates

PER_KIND = 20


def test_faults_lose_no_acknowledged_record(tmp_path: Path) -> None:
    verdict = run_scenario(
        "tests.fault.run", "--per-kind", str(PER_KIND), "--minutes", "4", "--lanes", "3",
        "--fault-s", "0.3,1.2", "--quiet-s", "0.1,0.4", "--seed", "1",
        root=tmp_path, timeout_s=420.0,
    )  # fmt: skip
    print(json.dumps(verdict))
    problems = violations(verdict, duplicates=strict_duplicates())
    explain = f"{json.dumps(verdict)}\n{keep(tmp_path)}" if problems else ""
    assert problems == [], explain
    assert verdict["acknowledged_lost"] == 0
    assert verdict["order_violations"] == 0
    assert verdict["double_leaders"] == 0
    expected = ALL_KINDS if verdict["network"] == "netns" else PROCESS_KINDS
    for kind in expected:
        assert verdict["faults"].get(kind, 0) >= PER_KIND, verdict["faults"]
    assert verdict["acknowledged"] > 1000
    assert verdict["nemesis_errors"] == []


def test_loopback_fallback_runs_process_faults(tmp_path: Path) -> None:
    """Where namespaces are unavailable the harness runs on loopback and says so."""
    verdict = run_scenario(
        "tests.fault.run", "--network", "loopback", "--per-kind", "2", "--minutes", "1",
        "--topics", "rf2:4:2", "--producers-per-topic", "1", "--consumers", "1",
        root=tmp_path, timeout_s=180.0,
    )  # fmt: skip
    assert verdict["network"] == "loopback"
    assert violations(verdict, duplicates=strict_duplicates()) == [], json.dumps(verdict)
    assert not set(verdict["faults"]) & set(NETWORK_KINDS)
    assert all(verdict["faults"].get(kind, 0) >= 2 for kind in PROCESS_KINDS), verdict


def test_scenario_command_rejects_bad_arguments(tmp_path: Path) -> None:
    for bad in (["--kinds", "broker_kill,meteor"], ["--topics", "x:1"], ["--fault-s", "2,1"]):
        completed = subprocess.run(
            [sys.executable, "-m", "tests.fault.run", *bad, "--dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert completed.returncode == 2, completed.stderr
        assert "error" in completed.stderr
    assert not (tmp_path / "history.jsonl").exists()


@pytest.mark.skipif(not namespaces_available()[0], reason="network namespaces unavailable")
def test_network_is_private_and_torn_down_after_a_failure() -> None:
    hosts = FaultCluster.host_names(2)
    network = create_network(hosts, "netns")
    assert isinstance(network, NamespaceNetwork)
    sleeper = None
    try:
        assert network.subnet.is_private
        network.check_contained()
        sleeper = subprocess.Popen([*network.exec_prefix("broker-1"), sys.executable, "-c",
                                    "import time; time.sleep(60)"])  # fmt: skip
        network.isolate("broker-1")
        network.lossy("broker-2", 0.5)
        with pytest.raises(ValueError):
            network.lossy("broker-2", 1.5)
        network.link_down("broker-2")
        network.heal("broker-2")
        raise RuntimeError("a test fails half way")
    except RuntimeError:
        pass
    finally:
        if sleeper is not None:
            sleeper.send_signal(signal.SIGKILL)
            sleeper.wait()
        network.destroy()
    assert network.leftovers() == []
