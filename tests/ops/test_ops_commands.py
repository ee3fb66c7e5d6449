"""`tide certs` and `tide health` (the compose stack's certificate service and
container healthcheck); `tide monitor` against a live cluster is in
tests/integration/test_monitoring_live.py."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509

from tidemq.cli.main import cli
from tidemq.cli.model import BrokerEntry, ClusterInfo, CoordinatorEntry, write_cluster_file


def test_certs_are_valid_for_the_given_hosts_and_kept(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["certs", "--dir", str(tmp_path), "--name", "broker-1", "--host", "broker-1"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    pem = (tmp_path / "broker-1.pem").read_bytes()
    certificate = x509.load_pem_x509_certificate(pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"broker-1", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert (tmp_path / "broker-1-key.pem").stat().st_mode & 0o777 == 0o600
    assert runner.invoke(cli, args).exit_code == 0
    assert (tmp_path / "broker-1.pem").read_bytes() == pem  # an existing identity is kept


def test_health_needs_a_url_and_reports_an_unreachable_service(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["health"], env={"TIDE_HEALTH_URL": ""})
    assert result.exit_code != 0 and "TIDE_HEALTH_URL" in result.output
    result = runner.invoke(cli, ["health", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "unhealthy" in result.output


def test_monitor_explains_a_missing_cluster_or_prometheus(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["monitor", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "cluster.json" in result.output


def test_monitor_reports_a_prometheus_that_dies_at_start(tmp_path: Path) -> None:
    info = ClusterInfo(
        coordinator=CoordinatorEntry("https://127.0.0.1:1", 1, ("tidemq",)),
        brokers=(BrokerEntry(1, "https://127.0.0.1:2", 1, ("tidemq",)),),
        ca_file=None,
        client_cert_file=None,
        client_key_file=None,
    )
    write_cluster_file(tmp_path, info)
    args = ["monitor", "--data-dir", str(tmp_path), "--prometheus", "false", "--timeout-s", "20"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "exited while starting" in result.output, result.output
    config = json.loads((tmp_path / "monitor" / "tidemq-prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == [
        "tide-coordinator",
        "tide-broker",
    ]
