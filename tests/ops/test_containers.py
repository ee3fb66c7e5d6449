"""Dockerfile and docker-compose.yml: linted, validated, and running exactly the
command lines that ``tide up`` runs (so the tests that run ``tide up`` also prove the
compose services). No Docker engine runs here: hadolint and ``docker-compose config``."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_helpers import ROOT, tool

from tidemq.cli.launch import Layout, ServiceOptions, broker_argv, coordinator_argv
from tidemq.tls import TlsFiles

BROKERS = (1, 2, 3)
COORDINATOR_PORT = 7000
REQUIRED = {
    "certs",
    "coordinator",
    *(f"broker-{b}" for b in BROKERS),
    "producer-1",
    "producer-2",
    "consumer-1",
    "consumer-2",
    "prometheus",
    "grafana",
}


def venv_tool(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else tool(name)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (anchors, merges, paths)."""
    completed = subprocess.run(
        [tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    document: dict[str, Any] = yaml.safe_load(completed.stdout)
    return document


def tls(name: str) -> TlsFiles:
    return TlsFiles("/tls/ca.pem", f"/tls/{name}.pem", f"/tls/{name}-key.pem")


def test_the_dockerfile_passes_hadolint() -> None:
    linted = subprocess.run(
        [venv_tool("hadolint"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_image_is_slim_non_root_and_has_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert base.endswith("-slim")
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD \[\"tide\", \"health\"\]", text, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "docker_volumes", ".git"} <= set(ignored)


def test_the_compose_stack_has_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= REQUIRED
    tide_image = services["coordinator"]["image"]
    for name in REQUIRED - {"prometheus", "grafana"}:
        assert services[name]["image"] == tide_image, name


def test_compose_services_run_the_argv_of_tide_up(compose: dict[str, Any]) -> None:
    services = compose["services"]
    layout = Layout(Path("/data"))
    options = ServiceOptions()
    expected = coordinator_argv(
        layout,
        COORDINATOR_PORT,
        tls("coordinator"),
        options,
        len(BROKERS),
        python="python",
        host="0.0.0.0",
        advertised_host="coordinator",
    )
    assert services["coordinator"]["command"] == expected
    coordinator_url = f"https://coordinator:{COORDINATOR_PORT}"
    for broker_id in BROKERS:
        name = f"broker-{broker_id}"
        expected = broker_argv(
            layout,
            broker_id,
            COORDINATOR_PORT + broker_id,
            coordinator_url,
            tls(name),
            options,
            python="python",
            host="0.0.0.0",
            advertised_host=name,
        )
        assert services[name]["command"] == expected, name
    for name in ("producer-1", "producer-2", "consumer-1", "consumer-2"):
        environment = services[name]["environment"]
        assert environment["TIDE_BOOTSTRAP"] == coordinator_url
        script = services[name]["command"][1]
        assert (ROOT / script).is_file(), f"{name}: {script} is not in the repository"


def test_certificates_cover_every_service_name(compose: dict[str, Any]) -> None:
    command = compose["services"]["certs"]["command"]
    pairs = list(itertools.pairwise(command))
    names = {value for flag, value in pairs if flag == "--name"}
    hosts = {value for flag, value in pairs if flag == "--host"}
    assert names == {"coordinator", "client", *(f"broker-{b}" for b in BROKERS)}
    assert hosts >= {"coordinator", *(f"broker-{b}" for b in BROKERS)}
    for name in ("coordinator", *(f"broker-{b}" for b in BROKERS)):
        depends = compose["services"][name]["depends_on"]
        assert depends["certs"]["condition"] == "service_completed_successfully", name


def _host_sources(service: dict[str, Any]) -> list[Path]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
        sources.append(Path(source))
    return sources


def test_volumes_live_under_docker_volumes_or_are_repository_files(
    compose: dict[str, Any],
) -> None:
    volumes_root = (ROOT / "docker_volumes").resolve()
    monitoring = (ROOT / "src" / "tidemq" / "monitoring").resolve()
    for name, service in compose["services"].items():
        for source in _host_sources(service):
            source = source.resolve()
            if source.is_relative_to(monitoring):
                assert source.exists(), f"{name}: {source} is missing"
            else:
                assert source.is_relative_to(volumes_root), f"{name}: volume {source}"


def test_prometheus_scrapes_the_ports_the_services_listen_on() -> None:
    config = yaml.safe_load((ROOT / "src/tidemq/monitoring/prometheus/prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {f"coordinator:{COORDINATOR_PORT}"} | {
        f"broker-{b}:{COORDINATOR_PORT + b}" for b in BROKERS
    }
    assert targets == expected
