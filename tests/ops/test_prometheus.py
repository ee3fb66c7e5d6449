"""Prometheus configuration and alert rules: promtool checks, unit tests, runbooks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_helpers import ROOT, tool

from tidemq.monitoring import BROKER_JOB, COORDINATOR_JOB, asset, prometheus_config, rules_file
from tidemq.tls import ensure_cluster_pki

ALERTS_TEST = ROOT / "tests" / "ops" / "alerts_test.yml"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    assert completed.returncode == 0, (
        f"promtool {' '.join(args)}:\n{completed.stdout}{completed.stderr}"
    )
    return completed


def alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load(rules_file().read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", str(rules_file())).stdout
    assert f"SUCCESS: {len(alerts())} rules found" in out


def test_every_alert_has_unit_tests_that_pass() -> None:
    document = yaml.safe_load(ALERTS_TEST.read_text())
    tested = {
        case["alertname"]
        for test in document["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")  # at least one case where it fires
    }
    quiet = {
        case["alertname"]
        for test in document["tests"]
        for case in test["alert_rule_test"]
        if not case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in alerts()}
    assert names <= tested, f"alerts never tested firing: {sorted(names - tested)}"
    assert names <= quiet, f"alerts never tested quiet: {sorted(names - quiet)}"
    assert "SUCCESS" in promtool("test", "rules", str(ALERTS_TEST)).stdout


def test_the_required_alerts_exist_and_have_a_runbook() -> None:
    rules = {rule["alert"]: rule for rule in alerts()}
    required = {
        "TideBrokerDown",
        "TideCoordinatorUnreachable",
        "TidePartitionsOffline",
        "TidePartitionsUnderReplicated",
        "TideConsumerLagGrowing",
        "TideDiskNearlyFull",
        "TideFsyncSlow",
    }
    assert required <= set(rules)
    assert rules["TidePartitionsUnderReplicated"]["for"] == "1m"
    headings = {
        "#" + heading.strip().lower().replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), re.MULTILINE)
    }
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/OPERATIONS.md" and f"#{anchor}" in headings, (
            f"{name}: runbook {rule['annotations']['runbook']} is not a heading of OPERATIONS.md"
        )


def _with_pki(directory: Path) -> None:
    pki = ensure_cluster_pki(directory / "tls-src", ["client"])
    (directory / "tls").mkdir()
    client = pki["client"]
    for source, name in (
        (client.ca_file, "ca.pem"),
        (client.cert_file, "client.pem"),
        (client.key_file, "client-key.pem"),
    ):
        assert source is not None
        shutil.copy(source, directory / "tls" / name)


def test_the_compose_configuration_passes_promtool(tmp_path: Path) -> None:
    """As mounted in the compose stack: prometheus.yml and rules.yml side by side,
    the cluster CA and the client certificate under tls/."""
    shutil.copy(asset("prometheus", "prometheus.yml"), tmp_path / "prometheus.yml")
    shutil.copy(rules_file(), tmp_path / "rules.yml")
    _with_pki(tmp_path)
    out = promtool("check", "config", str(tmp_path / "prometheus.yml")).stdout
    assert "SUCCESS: 1 rule files found" in out
    compose = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in compose["scrape_configs"]}
    assert set(jobs) == {COORDINATOR_JOB, BROKER_JOB}
    brokers = [c["labels"]["broker"] for c in jobs[BROKER_JOB]["static_configs"]]
    assert brokers == ["1", "2", "3"]
    assert all(job["scheme"] == "https" and job["tls_config"]["cert_file"] for job in jobs.values())


def test_the_generated_configuration_passes_promtool(tmp_path: Path) -> None:
    _with_pki(tmp_path)
    tls = ensure_cluster_pki(tmp_path / "tls-src", ["client"])["client"]
    config = prometheus_config(
        "https://127.0.0.1:4000",
        {2: "https://127.0.0.1:4002", 1: "https://127.0.0.1:4001"},
        tls,
        [str(rules_file())],
        scrape_interval_s=1,
    )
    path = tmp_path / "generated.yml"
    path.write_text(json.dumps(config))
    assert "SUCCESS" in promtool("check", "config", str(path)).stdout
    brokers = config["scrape_configs"][1]["static_configs"]
    assert brokers[0] == {"targets": ["127.0.0.1:4001"], "labels": {"broker": "1"}}
    assert config["scrape_configs"][0]["tls_config"]["key_file"] == tls.key_file


def test_the_generated_configuration_refuses_bad_urls() -> None:
    with pytest.raises(ValueError, match="host:port"):
        prometheus_config("https://127.0.0.1", {}, None, [])
    with pytest.raises(ValueError, match="mixed"):
        prometheus_config(
            "https://127.0.0.1:1", {1: "http://127.0.0.1:2", 2: "https://127.0.0.1:3"}, None, []
        )
