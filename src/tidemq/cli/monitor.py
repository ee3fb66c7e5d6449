"""``tide monitor``: a local Prometheus for the local cluster of ``tide up``.

Layout, inside the cluster's data directory::

    DIR/monitor/tidemq-prometheus.yml   generated scrape configuration (JSON is YAML)
    DIR/monitor/rules.yml               the alert rules it loads (the package's, or --rules)
    DIR/monitor/data/                   Prometheus' time series database
    DIR/monitor/monitor.json            {"url", "pid", "argv"} of the running Prometheus
    DIR/logs/monitor.log                Prometheus' output

Prometheus (Debian's ``prometheus`` package, or ``--prometheus PATH``) scrapes every
service of cluster.json over HTTPS with the cluster CA and the client certificate.
``tide down`` stops it too (:func:`stop`). Like the services, the process is only
signalled when its /proc cmdline is still the argv we started (the config path holds
"tidemq", which ``launch.cmdline_matches`` requires).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidemq.cli import processes
from tidemq.cli.launch import HOST, pick_free_ports
from tidemq.cli.model import ClusterInfo
from tidemq.monitoring import prometheus_config, rules_file
from tidemq.tls import TlsFiles

Say = Callable[[str], None]
MONITOR_DIR = "monitor"
STATE_FILE = "monitor.json"
CONFIG_FILE = "tidemq-prometheus.yml"
READY_POLL_S = 0.1


class MonitorError(Exception):
    """tide monitor could not start or find Prometheus; the message says why."""


@dataclass(frozen=True)
class MonitorEntry:
    url: str
    pid: int
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "pid": self.pid, "argv": list(self.argv)}


def monitor_dir(data_dir: Path) -> Path:
    return data_dir / MONITOR_DIR


def read_entry(data_dir: Path) -> MonitorEntry | None:
    """The recorded Prometheus, or None when there is none (or the file is damaged)."""
    try:
        raw = json.loads((monitor_dir(data_dir) / STATE_FILE).read_text())
        return MonitorEntry(str(raw["url"]), int(raw["pid"]), tuple(str(a) for a in raw["argv"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_entry(data_dir: Path, entry: MonitorEntry) -> None:
    path = monitor_dir(data_dir) / STATE_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(entry.to_json(), indent=2) + "\n")
    os.replace(temporary, path)


def find_prometheus(explicit: str | None) -> str:
    found = shutil.which(explicit or "prometheus")
    if found is None:
        raise MonitorError(
            f"{explicit or 'prometheus'} not found: install Debian's prometheus package "
            "(apt-get install prometheus) or pass --prometheus PATH"
        )
    return found


def write_config(data_dir: Path, info: ClusterInfo, rules: Path, scrape_interval_s: float) -> Path:
    """Writes the rules copy and the scrape configuration; returns the config path."""
    directory = monitor_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    rules_copy = directory / "rules.yml"
    shutil.copyfile(rules, rules_copy)
    tls = None
    if info.ca_file is not None:
        tls = TlsFiles(info.ca_file, info.client_cert_file, info.client_key_file)
    config = prometheus_config(
        info.coordinator.url,
        {broker.id: broker.url for broker in info.brokers},
        tls,
        [str(rules_copy)],
        scrape_interval_s=scrape_interval_s,
        evaluation_interval_s=scrape_interval_s,
    )
    path = directory / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def prometheus_argv(binary: str, config: Path, storage: Path, listen: str) -> list[str]:
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={storage}",
        f"--web.listen-address={listen}",
        "--storage.tsdb.retention.time=7d",
    ]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def start(
    data_dir: Path,
    info: ClusterInfo,
    listen: str | None = None,
    scrape_interval_s: float = 5.0,
    rules: Path | None = None,
    prometheus: str | None = None,
    timeout_s: float = 30.0,
) -> MonitorEntry:
    """Starts Prometheus for this cluster (or returns the one already running)."""
    data_dir = data_dir.resolve()
    running = read_entry(data_dir)
    if running is not None and processes.is_running(running.pid, running.argv):
        return running
    binary = find_prometheus(prometheus)
    config = write_config(data_dir, info, rules or rules_file(), scrape_interval_s)
    listen = listen or f"{HOST}:{pick_free_ports(1)[0]}"
    argv = prometheus_argv(binary, config, monitor_dir(data_dir) / "data", listen)
    log_file = data_dir / "logs" / "monitor.log"
    pid = processes.spawn(argv, log_file, monitor_dir(data_dir))
    entry = MonitorEntry(f"http://{listen}", pid, tuple(argv))
    _write_entry(data_dir, entry)
    deadline = time.monotonic() + timeout_s
    while not _ready(entry.url):
        if processes.has_exited(pid):
            raise MonitorError(
                f"prometheus (pid {pid}) exited while starting; last lines of {log_file}:\n"
                + processes.log_tail(log_file)
            )
        if time.monotonic() > deadline:
            processes.stop([(pid, argv)], grace_s=5.0)
            raise MonitorError(f"prometheus not ready after {timeout_s:g} s; see {log_file}")
        time.sleep(READY_POLL_S)
    return entry


def stop(data_dir: Path, grace_s: float, say: Say) -> None:
    """Stops the recorded Prometheus, if it runs (called by ``tide down``)."""
    entry = read_entry(data_dir.resolve())
    if entry is None:
        return
    outcome = processes.stop([(entry.pid, entry.argv)], grace_s)
    say(f"monitor (pid {entry.pid}): {outcome[entry.pid]}")
