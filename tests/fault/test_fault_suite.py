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
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.fault.harness.checker import violations
from tests.fault.harness.cluster import FaultCluster
from tests.fault.harness.nemesis import NETWORK_KINDS, NemesisConfig
from tests.fault.harness.network import NamespaceNetwork, create_network, namespaces_available
from tests.fault.harness.runner import RunConfig, run, strict_duplicates

# A client whose broker dies or vanishes mid-request can leave a socket for the garbage
# collector (ResourceWarning); under a nemesis that is expected noise, not a failure
# of the test. Anything else raised in __del__ still fails the suite.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <(socket.socket|function _SelectorTransport.__del__)"
    ":pytest.PytestUnraisableExceptionWarning"
)

PER_KIND = 20


def keep_on_failure(root: Path, verdict: dict[str, object]) -> str:
    """Copies the history and logs out of pytest's rotating tmp dirs; returns where."""
    kept = Path(tempfile.mkdtemp(prefix="tidemq-fault-failed-"))
    shutil.copy(root / "history.jsonl", kept)
    shutil.copytree(root / "cluster" / "logs", kept / "logs")
    return f"{json.dumps(verdict)}\nhistory and logs kept in {kept}"


def test_faults_lose_no_acknowledged_record(tmp_path: Path) -> None:
    nemesis = NemesisConfig(
        per_kind=PER_KIND, max_duration_s=240.0, seed=1, lanes=3,
        fault_s=(0.3, 1.2), quiet_s=(0.1, 0.4),
    )  # fmt: skip
    config = RunConfig(nemesis=nemesis)
    verdict = run(tmp_path, config)
    print(json.dumps(verdict))
    problems = violations(verdict, duplicates=strict_duplicates())
    assert problems == [], keep_on_failure(tmp_path, verdict)
    assert verdict["acknowledged_lost"] == 0
    assert verdict["order_violations"] == 0
    assert verdict["double_leaders"] == 0
    expected = set(config.nemesis.kinds)
    if verdict["network"] != "netns":
        expected -= set(NETWORK_KINDS)
    for kind in expected:
        assert verdict["faults"].get(kind, 0) >= PER_KIND, verdict["faults"]
    assert verdict["acknowledged"] > 1000
    assert verdict["nemesis_errors"] == []


def test_loopback_fallback_runs_process_faults(tmp_path: Path) -> None:
    """Where namespaces are unavailable the harness runs on loopback and says so."""
    config = RunConfig(
        network="loopback",
        topics=RunConfig().topics[:1],
        producers_per_topic=1,
        consumers=1,
        nemesis=NemesisConfig(per_kind=2, max_duration_s=60.0, seed=2),
    )
    verdict = run(tmp_path, config)
    assert verdict["network"] == "loopback"
    assert violations(verdict, duplicates=strict_duplicates()) == [], json.dumps(verdict)
    assert not set(verdict["faults"]) & set(NETWORK_KINDS)
    assert all(verdict["faults"].get(k, 0) >= 2 for k in ("broker_kill", "broker_pause"))


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
