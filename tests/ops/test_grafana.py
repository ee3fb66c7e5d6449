"""Grafana provisioning and dashboards: well-formed, wired to the provisioned
datasource, and every panel query valid PromQL (checked by promtool). That each
query returns data from a live cluster is tests/ops/test_live_prometheus.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from ops_helpers import tool

from tidemq.monitoring import asset

DASHBOARDS = asset("grafana", "dashboards")
REQUIRED = {"cluster-overview", "brokers", "topics", "consumer-groups"}


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel."""
    return [
        (name, panel["title"], target["expr"])
        for name, board in dashboards().items()
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def concrete(expr: str) -> str:
    """A panel query as Prometheus runs it once Grafana filled in its variables."""
    return expr.replace("$__rate_interval", "1m")


def test_the_datasource_and_dashboard_providers() -> None:
    datasources = yaml.safe_load(
        asset("grafana", "provisioning", "datasources", "prometheus.yml").read_text()
    )
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        asset("grafana", "provisioning", "dashboards", "tidemq.yml").read_text()
    )
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/var/lib/grafana")
    uids = set()
    for name, board in dashboards().items():
        assert board["uid"] not in uids, f"{name}: duplicate uid"
        uids.add(board["uid"])
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == source["uid"], f"{name}/{panel['title']}"
            assert panel["targets"], f"{name}/{panel['title']} has no query"
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{name}/{panel['title']}"
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"


def test_the_required_dashboards_exist() -> None:
    assert set(dashboards()) >= REQUIRED
    lag = [q for board, _, q in panel_queries() if board == "consumer-groups"]
    assert any("tide_consumer_lag_seconds" in q for q in lag)
    assert any("tide_consumer_lag_messages" in q for q in lag)


def test_the_brokers_dashboard_shows_the_replica_fetch_sessions() -> None:
    queries = [q for board, _, q in panel_queries() if board == "brokers"]
    assert any("tide_replica_fetch_sessions_opened_total" in q for q in queries)
    assert any(re.search(r"\btide_replica_fetch_sessions\b(?!_)", q) for q in queries)


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "panels",
                "rules": [
                    {"record": f"panel:query_{index}", "expr": concrete(expr)}
                    for index, (_, _, expr) in enumerate(panel_queries())
                ],
            }
        ]
    }
    path = tmp_path / "panels.yml"
    path.write_text(json.dumps(rules))
    checked = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
