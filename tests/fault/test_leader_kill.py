"""Failover time: under load, SIGKILL the leader of the most partitions, many times,
and measure until all its partitions accept writes again. Issue 5 asks for p99 within
the session timeout + 2 s. Needs replication: without it a killed leader's
partitions stay offline until it returns, so this is xfail (non-strict) until then.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fault.harness.checker import check, violations
from tests.fault.harness.cluster import FaultCluster
from tests.fault.harness.failover import measure_leader_kills
from tests.fault.harness.history import HistoryWriter, read_history
from tests.fault.harness.load import ProducerWorker
from tests.fault.harness.network import create_network
from tests.fault.harness.runner import (
    TopicSpec,
    final_read,
    record_replica_logs,
    replication_available,
    strict_duplicates,
)
from tidemq import Admin

# A client whose broker dies or vanishes mid-request can leave a socket for the garbage
# collector (ResourceWarning); under a nemesis that is expected noise, not a failure
# of the test. Anything else raised in __del__ still fails the suite.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <(socket.socket|function _SelectorTransport.__del__)"
    ":pytest.PytestUnraisableExceptionWarning"
)

SESSION_TIMEOUT_MS = 3000
KILLS = 8


@pytest.mark.xfail(not replication_available(), reason="needs replication (issue 5)", strict=False)
def test_leader_kill_failover_time(tmp_path: Path) -> None:
    topic = TopicSpec("failover", 6, 3)
    network = create_network(FaultCluster.host_names(3))
    history = HistoryWriter(tmp_path / "history.jsonl")
    cluster = FaultCluster(tmp_path / "cluster", network, 3, SESSION_TIMEOUT_MS)
    producers: list[ProducerWorker] = []
    try:
        cluster.start()
        config = cluster.client_config
        with Admin(**config) as admin:
            admin.create_topic(topic.name, topic.partitions, topic.replication_factor)
        producers = [ProducerWorker(f"p{i}", topic.name, config, history, rate_per_s=100.0)
                     for i in range(2)]  # fmt: skip
        for producer in producers:
            producer.start()
        give_up_s = SESSION_TIMEOUT_MS / 1000 + 2.0 + 3.0  # the bound plus room to measure
        report = measure_leader_kills(cluster, history, topic.name, KILLS, give_up_s)
        summary = report.summary()
        print(json.dumps({"leader_kill": summary, "network": network.kind}))
        for producer in producers:
            producer.stop(flush_timeout_s=30.0)
        producers = []
        final_read(cluster, history, (topic,), 30.0)
    finally:
        for producer in producers:
            producer.stop_event.set()
        cluster.close()
        network.destroy()
        try:
            record_replica_logs(cluster, history, (topic,))
        finally:
            history.close()
    verdict = check(read_history(tmp_path / "history.jsonl"))
    assert violations(verdict, duplicates=strict_duplicates()) == [], json.dumps(verdict)
    assert summary["stayed_offline"] == 0, summary
    assert summary["kills"] == KILLS
    assert summary["p99_ms"] is not None
    assert summary["p99_ms"] <= SESSION_TIMEOUT_MS + 2000, summary
