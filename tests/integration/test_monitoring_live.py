"""A real Prometheus (started by ``tide monitor``) scraping a live cluster under load.

Checks through Prometheus' HTTP API that every documented metric exists, that every
query of every dashboard panel returns data, that every series an alert rule reads
exists and every alert expression evaluates; then SIGKILLs a broker and waits for
TideBrokerDown to fire. The rules are the shipped ones with every ``for:`` cut to
2 s (a test-only variant), scraped and evaluated every second.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidemq.cli import monitor as monitor_ops
from tidemq.cli import processes
from tidemq.monitoring import asset, rules_file

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0
ALERT_FOR = "2s"

# Every metric of docs/OPERATIONS.md "Metrics" (histograms by their _bucket series).
METRICS = [
    "tide_http_request_duration_seconds_bucket",
    "tide_messages_in_total",
    "tide_bytes_in_total",
    "tide_messages_out_total",
    "tide_bytes_out_total",
    "tide_replication_bytes_in_total",
    "tide_broker_partitions",
    "tide_broker_under_replicated_partitions",
    "tide_log_size_bytes",
    "tide_log_segments",
    "tide_partition_high_watermark",
    "tide_fsync_duration_seconds_bucket",
    "tide_disk_free_bytes",
    "tide_disk_size_bytes",
    "tide_producers_active",
    "tide_replica_fetch_sessions",
    "tide_replica_fetch_sessions_opened_total",
    "tide_brokers_alive",
    "tide_brokers_registered",
    "tide_broker_up",
    "tide_broker_replicas_assigned",
    "tide_broker_leaders_assigned",
    "tide_topics",
    "tide_topic_partitions",
    "tide_partitions_offline",
    "tide_partitions_under_replicated",
    "tide_leader_elections_total",
    "tide_isr_shrinks_total",
    "tide_isr_expands_total",
    "tide_coordinator_commands_applied_total",
    "tide_consumer_group_members",
    "tide_consumer_group_rebalances_total",
    "tide_consumer_lag_messages",
    "tide_consumer_lag_seconds",
    # The process collector, on each service (a selector: either alone would do else).
    'process_cpu_seconds_total{job="tide-broker"}',
    'process_cpu_seconds_total{job="tide-coordinator"}',
    "process_resident_memory_bytes",
    "process_open_fds",
]


class PrometheusApi:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **query: str) -> Any:
        address = f"{self.url}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(address, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result


def poll(check: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """Calls ``check`` until it returns something truthy; fails with the last value."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}; last: {value!r}")
        time.sleep(0.25)


def poll_problems(check: Callable[[], list[str]], what: str) -> None:
    """Calls ``check`` until it finds no problem; fails listing the last ones."""
    deadline = time.monotonic() + DEADLINE_S
    problems = check()
    while problems:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE_S} s waiting for {what}; still: {problems}")
        time.sleep(0.25)
        problems = check()


def fast_rules(directory: Path) -> Path:
    """The shipped rules with every ``for:`` cut to ALERT_FOR."""
    document = yaml.safe_load(rules_file().read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = ALERT_FOR
    path = directory / "fast-rules.yml"
    path.write_text(yaml.safe_dump(document))
    return path


@contextmanager
def demo_load(cluster: Any, directory: Path) -> Iterator[None]:
    """The compose stack's demo producer and consumer, against this cluster."""
    environment = {**os.environ, **cluster.env, "PYTHONUNBUFFERED": "1"}
    started = []
    for script, args in (
        ("demo_producer.py", ["--topic", "demo", "--rate", "50", "--seconds", "120"]),
        ("demo_consumer.py", ["--topic", "demo", "--group", "watchers", "--seconds", "120"]),
    ):
        log = open(directory / f"{script}.log", "wb")  # noqa: SIM115 - closed below
        child = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / script), *args],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        started.append((child, log))
    try:
        yield
    finally:
        for child, _ in started:
            child.terminate()
        for child, log in started:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)
            log.close()
        for script in ("demo_producer.py", "demo_consumer.py"):
            print(f"----- {script} -----\n{(directory / f'{script}.log').read_text()[-2000:]}")


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for path in sorted(asset("grafana", "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m")
                out.append((f"{path.stem}/{panel['title']}", expr))
    return out


SELECTOR = re.compile(r"\b((?:tide_|up\b)[a-z_]*)(\{[^}]*\})?")


def alert_selectors() -> list[tuple[str, str, str]]:
    """(alert, expression, each series selector it reads)."""
    document = yaml.safe_load(rules_file().read_text())
    out = []
    for group in document["groups"]:
        for rule in group["rules"]:
            for name, labels in SELECTOR.findall(rule["expr"]):
                out.append((rule["alert"], rule["expr"], name + labels))
    return out


def test_prometheus_scrapes_a_live_cluster_and_the_broker_down_alert_fires(
    cluster_factory: Callable[..., Any], tmp_path: Path
) -> None:
    cluster = cluster_factory(
        brokers=3, session_timeout_ms=2000, default_partitions=3, log_format="json"
    )
    assert cluster.info["coordinator"]["argv"][-2:] == ["--log-format", "json"]
    started = subprocess.run(
        [
            sys.executable, "-m", "tidemq", "monitor",
            "--data-dir", str(cluster.data_dir),
            "--scrape-interval-s", "1",
            "--rules", str(fast_rules(tmp_path)),
        ],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    entry = monitor_ops.read_entry(cluster.data_dir)
    assert entry is not None and started.stdout.strip() == entry.url
    try:
        healthy = subprocess.run(
            [sys.executable, "-m", "tidemq", "health", "--url", cluster.config["bootstrap"]],
            env={**os.environ, **cluster.env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )  # the container healthcheck, over mutual TLS
        assert (healthy.returncode, healthy.stdout.strip()) == (0, "ok"), healthy.stderr
        api = PrometheusApi(entry.url)
        with demo_load(cluster, tmp_path):
            check_everything_returns_data(api)
        cluster.kill_broker(2)
        firing = poll(lambda: broker_down_alerts(api), "TideBrokerDown to fire for broker 2")
        assert firing == [{"alertname": "TideBrokerDown", "broker": "2", "severity": "critical"}]
        poll(
            lambda: firing_alerts(api, "TidePartitionsUnderReplicated"),
            "TidePartitionsUnderReplicated to fire once broker 2 left the ISRs",
        )
        check_the_event_log(cluster.data_dir / "logs")
    finally:
        processes.stop([(entry.pid, entry.argv)], grace_s=5.0)


def check_everything_returns_data(api: PrometheusApi) -> None:
    def missing_metrics() -> list[str]:
        return [name for name in METRICS if not api.query(f"count({name})")]

    poll_problems(missing_metrics, "every metric to be scraped")
    queries = dashboard_queries()
    assert len(queries) > 30

    def empty_panels() -> list[str]:
        return [where for where, expr in queries if not api.query(expr)]

    poll_problems(empty_panels, "every dashboard query to return data")
    selectors = alert_selectors()
    assert {alert for alert, _, _ in selectors} >= {"TideBrokerDown", "TideFsyncSlow"}
    for alert, expr, selector in selectors:
        assert api.query(selector), f"{alert}: {selector} returns no data"
        api.query(expr)  # evaluates (an alert expression is empty while all is well)


def firing_alerts(api: PrometheusApi, name: str) -> list[dict[str, str]]:
    alerts = api.get("/api/v1/alerts")["alerts"]
    return [
        a["labels"] for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"
    ]


def broker_down_alerts(api: PrometheusApi) -> list[dict[str, str]]:
    alerts = api.get("/api/v1/alerts")["alerts"]
    return [
        alert["labels"]
        for alert in alerts
        if alert["labels"]["alertname"] == "TideBrokerDown" and alert["state"] == "firing"
    ]


def events(log_file: Path) -> list[dict[str, Any]]:
    """The JSON event lines of a service log (other lines: process start banners)."""
    out = []
    for line in log_file.read_text().splitlines():
        if line.startswith("{"):
            body = json.loads(line)
            if "event" in body:
                out.append(body)
    return out


def check_the_event_log(logs: Path) -> None:
    """JSON logs (tide up --log-format json) tell one partition's story across services."""
    coordinator = events(logs / "coordinator.log")
    registered = {e["broker_id"] for e in coordinator if e["event"] == "broker_registered"}
    assert registered == {1, 2, 3}
    assert any(e["event"] == "topic_created" and e["topic"] == "demo" for e in coordinator)
    assert any(e["event"] == "group_rebalance" and e["group"] == "watchers" for e in coordinator)

    def broker_2_dead() -> list[dict[str, Any]]:
        return [
            e
            for e in events(logs / "coordinator.log")
            if e["event"] == "broker_declared_dead" and e["broker_id"] == 2
        ]

    poll(broker_2_dead, "the coordinator to log broker 2 dead")

    def moved() -> list[dict[str, Any]]:
        return [
            e
            for e in events(logs / "coordinator.log")
            if e["event"] in ("leader_elected", "partition_offline")
            and e["previous_leader_id"] == 2
        ]

    [change, *_] = poll(moved, "a leadership change of a partition broker 2 led")
    roles = [
        e
        for log in ("broker-1.log", "broker-2.log", "broker-3.log")
        for e in events(logs / log)
        if e["event"] == "replica_role_changed"
        and (e["topic"], e["partition"]) == (change["topic"], change["partition"])
    ]
    assert any(e["role"] == "leader" and e["leader_id"] == 2 for e in roles), roles
    assert all(e["service"].startswith("broker-") for e in roles)
