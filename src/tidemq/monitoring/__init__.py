"""Monitoring assets shipped inside the package, and the Prometheus configuration
for a local cluster.

Files (package data, so ``tide monitor`` works from an installed package; the
compose stack mounts the same files from the repository)::

    prometheus/rules.yml          alert rules (runbooks: docs/OPERATIONS.md)
    prometheus/prometheus.yml     scrape configuration of the compose stack
    grafana/provisioning/...      Grafana datasource and dashboard providers
    grafana/dashboards/*.json     the dashboards

:func:`prometheus_config` is pure: it turns a cluster's URLs and TLS files into the
configuration ``tide monitor`` writes, with the same job names and labels as the
compose configuration (``tide-coordinator``; ``tide-broker`` with a ``broker``
label), so the rules and dashboards work on both.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tidemq.tls import TlsFiles

COORDINATOR_JOB = "tide-coordinator"
BROKER_JOB = "tide-broker"


def asset(*parts: str) -> Path:
    """The path of a shipped monitoring file, e.g. ``asset("prometheus", "rules.yml")``."""
    return Path(str(resources.files(__name__).joinpath(*parts)))


def rules_file() -> Path:
    return asset("prometheus", "rules.yml")


def _target(url: str) -> tuple[str, str]:
    """(scheme, host:port) of a service URL; ValueError when it has no port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"expected http(s)://host:port, got {url!r}")
    return parts.scheme, parts.netloc


def _scrape_job(
    job: str, targets: list[tuple[str, dict[str, str]]], tls: TlsFiles | None
) -> dict[str, Any]:
    schemes = {scheme for scheme, _ in (_target(url) for url, _ in targets)}
    if len(schemes) > 1:
        raise ValueError(f"{job}: mixed http and https targets")
    scheme = schemes.pop() if schemes else "https"
    config: dict[str, Any] = {
        "job_name": job,
        "scheme": scheme,
        "metrics_path": "/metrics",
        "static_configs": [
            {"targets": [_target(url)[1]], "labels": labels} for url, labels in targets
        ],
    }
    if scheme == "https" and tls is not None:
        tls_config = {
            key: value
            for key, value in (
                ("ca_file", tls.ca_file),
                ("cert_file", tls.cert_file),
                ("key_file", tls.key_file),
            )
            if value
        }
        config["tls_config"] = tls_config
    return config


def prometheus_config(
    coordinator_url: str,
    broker_urls: Mapping[int, str],
    tls: TlsFiles | None,
    rule_files: list[str],
    scrape_interval_s: float = 5.0,
    evaluation_interval_s: float = 5.0,
) -> dict[str, Any]:
    """A Prometheus configuration (JSON is YAML) scraping one cluster."""
    if scrape_interval_s <= 0 or evaluation_interval_s <= 0:
        raise ValueError("intervals must be positive")
    brokers = [(url, {"broker": str(broker_id)}) for broker_id, url in sorted(broker_urls.items())]
    return {
        "global": {
            "scrape_interval": _duration(scrape_interval_s),
            "scrape_timeout": _duration(min(scrape_interval_s, 10.0)),
            "evaluation_interval": _duration(evaluation_interval_s),
        },
        "rule_files": list(rule_files),
        "scrape_configs": [
            _scrape_job(COORDINATOR_JOB, [(coordinator_url, {})], tls),
            _scrape_job(BROKER_JOB, brokers, tls),
        ],
    }


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"
