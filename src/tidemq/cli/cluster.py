"""Local cluster procedures: ``tide up``, ``tide down``, ``tide status``.

``up`` is idempotent and level-triggered: whatever cluster.json lists and is not
running is started again from its argv (same port, same data); brokers 1..N that
are not listed are added (scale-out); the coordinator comes first, because brokers
need its URL. cluster.json is rewritten (atomically) after every start, so that
``tide down`` can always find what runs, even when ``up`` failed half way.

Health is: the coordinator answers /readyz, every broker answers /readyz, and the
coordinator lists every broker as alive. Everything is polled against a deadline.
"""

from __future__ import annotations

import fcntl
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from tidemq.cli import monitor, processes
from tidemq.cli.launch import (
    CLIENT,
    COORDINATOR,
    Layout,
    ServiceOptions,
    broker_argv,
    broker_name,
    coordinator_argv,
    pick_free_ports,
    url_for,
)
from tidemq.cli.model import (
    BrokerEntry,
    ClusterFileError,
    ClusterInfo,
    CoordinatorEntry,
    cluster_file,
    read_cluster_file,
    write_cluster_file,
)
from tidemq.tls import TlsFiles, ensure_cluster_pki

Say = Callable[[str], None]
POLL_INTERVAL_S = 0.1


class ClusterError(Exception):
    """A cluster operation failed; the message says what and where to look."""


def _quiet(_: str) -> None:
    pass


@contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """One `tide up` / `tide down` at a time per data directory."""
    with open(layout.root / ".tide.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def client_tls(info: ClusterInfo) -> TlsFiles | None:
    if info.ca_file is None and info.client_cert_file is None:
        return None
    return TlsFiles(info.ca_file, info.client_cert_file, info.client_key_file)


def _read_existing(layout: Layout) -> ClusterInfo | None:
    if not cluster_file(layout.root).exists():
        return None
    try:
        return read_cluster_file(layout.root)
    except ClusterFileError as error:
        raise ClusterError(str(error)) from error


def _start_coordinator(
    layout: Layout,
    existing: ClusterInfo | None,
    pki: dict[str, TlsFiles],
    options: ServiceOptions,
    broker_count: int,
    say: Say,
) -> CoordinatorEntry:
    if existing is not None:
        entry = existing.coordinator
        if processes.is_running(entry.pid, entry.argv):
            say(f"coordinator already running (pid {entry.pid}) at {entry.url}")
            return entry
        pid = processes.spawn(entry.argv, layout.log_file(COORDINATOR), layout.root)
        say(f"coordinator restarted from cluster.json (pid {pid}) at {entry.url}")
        return replace(entry, pid=pid)
    (port,) = pick_free_ports(1)
    argv = coordinator_argv(layout, port, pki.get(COORDINATOR), options, broker_count)
    pid = processes.spawn(argv, layout.log_file(COORDINATOR), layout.root)
    url = url_for(port, options.plain_http)
    say(f"coordinator started (pid {pid}) at {url}")
    return CoordinatorEntry(url=url, pid=pid, argv=tuple(argv))


def _start_brokers(
    layout: Layout,
    info: ClusterInfo,
    broker_count: int,
    pki: dict[str, TlsFiles],
    options: ServiceOptions,
    say: Say,
) -> ClusterInfo:
    wanted = sorted({broker.id for broker in info.brokers} | set(range(1, broker_count + 1)))
    new_ids = [broker_id for broker_id in wanted if info.broker(broker_id) is None]
    ports = dict(zip(new_ids, pick_free_ports(len(new_ids)), strict=True))
    for broker_id in wanted:
        name = broker_name(broker_id)
        entry = info.broker(broker_id)
        if entry is not None and processes.is_running(entry.pid, entry.argv):
            say(f"{name} already running (pid {entry.pid}) at {entry.url}")
            continue
        if entry is not None:
            pid = processes.spawn(entry.argv, layout.log_file(name), layout.root)
            entry = replace(entry, pid=pid)
            say(f"{name} restarted from cluster.json (pid {pid}) at {entry.url}")
        else:
            port = ports[broker_id]
            argv = broker_argv(
                layout, broker_id, port, info.coordinator.url, pki.get(name), options
            )
            pid = processes.spawn(argv, layout.log_file(name), layout.root)
            entry = BrokerEntry(broker_id, url_for(port, options.plain_http), pid, tuple(argv))
            say(f"{name} started (pid {pid}) at {entry.url}")
        info = info.with_broker(entry)
        write_cluster_file(layout.root, info)
    return info


def up(
    data_dir: Path,
    brokers: int = 3,
    options: ServiceOptions | None = None,
    timeout_s: float = 20.0,
    say: Say = _quiet,
) -> ClusterInfo:
    """Starts (or completes) the local cluster in ``data_dir`` and waits until healthy.

    Raises ClusterError when a process dies while starting or the deadline passes.
    """
    if brokers < 1:
        raise ClusterError("a cluster needs at least one broker")
    options = options or ServiceOptions()
    layout = Layout(data_dir.resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.logs_dir.mkdir(exist_ok=True)
    with _locked(layout):
        existing = _read_existing(layout)
        if existing is not None:
            # An existing cluster keeps the transport it was created with.
            options = replace(options, plain_http=existing.ca_file is None)
        broker_ids = {broker.id for broker in existing.brokers} if existing else set()
        broker_ids |= set(range(1, brokers + 1))
        pki: dict[str, TlsFiles] = {}
        if not options.plain_http:
            names = [COORDINATOR, *(broker_name(i) for i in sorted(broker_ids)), CLIENT]
            pki = ensure_cluster_pki(layout.tls_dir, names)
        coordinator = _start_coordinator(layout, existing, pki, options, brokers, say)
        client = pki.get(CLIENT)
        if existing is not None:
            info = replace(existing, coordinator=coordinator)
        else:
            info = ClusterInfo(
                coordinator=coordinator,
                brokers=(),
                ca_file=client.ca_file if client else None,
                client_cert_file=client.cert_file if client else None,
                client_key_file=client.key_file if client else None,
            )
        write_cluster_file(layout.root, info)
        deadline = time.monotonic() + timeout_s
        _wait_coordinator(layout, info, deadline, timeout_s)
        info = _start_brokers(layout, info, brokers, pki, options, say)
        write_cluster_file(layout.root, info)
        _wait_brokers(layout, info, deadline, timeout_s)
    if len(info.brokers) > brokers:
        say(f"note: {len(info.brokers)} brokers listed in cluster.json, more than --brokers")
    return info


def _died(layout: Layout, name: str, pid: int) -> ClusterError:
    tail = processes.log_tail(layout.log_file(name))
    return ClusterError(
        f"{name} (pid {pid}) exited while starting; last lines of {layout.log_file(name)}:\n{tail}"
    )


def _timed_out(layout: Layout, name: str, why: str, timeout_s: float) -> ClusterError:
    tail = processes.log_tail(layout.log_file(name))
    return ClusterError(
        f"{name} not healthy after {timeout_s:g} s ({why}); last lines of "
        f"{layout.log_file(name)}:\n{tail}"
    )


def _wait_coordinator(layout: Layout, info: ClusterInfo, deadline: float, timeout_s: float) -> None:
    entry, tls = info.coordinator, client_tls(info)
    while True:
        if not processes.is_running(entry.pid, entry.argv):
            raise _died(layout, COORDINATOR, entry.pid)
        if processes.is_ready(entry.url, tls):
            return
        if time.monotonic() >= deadline:
            raise _timed_out(layout, COORDINATOR, "/readyz not answering 200", timeout_s)
        time.sleep(POLL_INTERVAL_S)


def alive_broker_ids(info: ClusterInfo) -> set[int]:
    """Ids the coordinator lists as alive; empty if it does not answer."""
    try:
        answer = processes.http_json("GET", f"{info.coordinator.url}/v1/brokers", client_tls(info))
    except processes.ProbeError:
        return set()
    return _alive_ids(answer)


def _alive_ids(answer: Any) -> set[int]:
    if not isinstance(answer, dict) or not isinstance(answer.get("brokers"), list):
        return set()
    return {
        broker["id"]
        for broker in answer["brokers"]
        if isinstance(broker, dict) and broker.get("alive") and isinstance(broker.get("id"), int)
    }


def unhealthy(info: ClusterInfo) -> dict[str, str]:
    """name -> why, for every process that is not running, not ready, or not alive."""
    tls = client_tls(info)
    problems: dict[str, str] = {}
    entry = info.coordinator
    if not processes.is_running(entry.pid, entry.argv):
        problems[COORDINATOR] = "not running"
    elif not processes.is_ready(entry.url, tls):
        problems[COORDINATOR] = "/readyz not answering 200"
    alive = alive_broker_ids(info) if not problems else set()
    for broker in info.brokers:
        name = broker_name(broker.id)
        if not processes.is_running(broker.pid, broker.argv):
            problems[name] = "not running"
        elif not processes.is_ready(broker.url, tls):
            problems[name] = "/readyz not answering 200"
        elif broker.id not in alive:
            problems[name] = "not listed alive by the coordinator"
    return problems


def _wait_brokers(layout: Layout, info: ClusterInfo, deadline: float, timeout_s: float) -> None:
    while True:
        problems = unhealthy(info)
        for name, why in problems.items():
            if why == "not running":
                entry = info.coordinator if name == COORDINATOR else None
                pid = entry.pid if entry else _broker_pid(info, name)
                raise _died(layout, name, pid)
        if not problems:
            return
        if time.monotonic() >= deadline:
            name, why = next(iter(problems.items()))
            raise _timed_out(layout, name, why, timeout_s)
        time.sleep(POLL_INTERVAL_S)


def _broker_pid(info: ClusterInfo, name: str) -> int:
    for broker in info.brokers:
        if broker_name(broker.id) == name:
            return broker.pid
    return 0


@dataclass(frozen=True)
class StopReport:
    name: str
    pid: int
    outcome: str  # "stopped", "killed" or "not running"


def down(data_dir: Path, grace_s: float = 10.0, say: Say = _quiet) -> list[StopReport]:
    """Stops the cluster's ``tide monitor`` Prometheus, the brokers (together), then
    the coordinator. Keeps every file."""
    layout = Layout(data_dir.resolve())
    if not cluster_file(layout.root).exists():
        raise ClusterError(f"no cluster in {layout.root} ({cluster_file(layout.root)} not found)")
    with _locked(layout):
        info = _read_existing(layout)
        if info is None:
            raise ClusterError(f"no cluster in {layout.root}")
        monitor.stop(layout.root, grace_s, say)
        reports: list[StopReport] = []
        groups = [
            [(broker_name(b.id), b.pid, b.argv) for b in info.brokers],
            [(COORDINATOR, info.coordinator.pid, info.coordinator.argv)],
        ]
        for group in groups:
            outcome = processes.stop([(pid, argv) for _, pid, argv in group], grace_s)
            for name, pid, _ in group:
                report = StopReport(name, pid, outcome[pid])
                say(f"{name} (pid {pid}): {report.outcome}")
                reports.append(report)
    return reports


def local_processes(info: ClusterInfo) -> list[dict[str, Any]]:
    """name, pid, url and running for each process in cluster.json."""
    rows: list[dict[str, Any]] = [
        {
            "name": COORDINATOR,
            "pid": info.coordinator.pid,
            "url": info.coordinator.url,
            "running": processes.is_running(info.coordinator.pid, info.coordinator.argv),
        }
    ]
    for broker in info.brokers:
        rows.append(
            {
                "name": broker_name(broker.id),
                "pid": broker.pid,
                "url": broker.url,
                "running": processes.is_running(broker.pid, broker.argv),
            }
        )
    return rows


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def run_foreground(
    data_dir: Path, info: ClusterInfo, status_line: Callable[[ClusterInfo], str], say: Say
) -> None:
    """Prints a status line every few seconds until Ctrl-C or SIGTERM, then stops all."""
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        while True:
            say(status_line(info))
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                time.sleep(0.2)
    except (KeyboardInterrupt, _Stop):
        say("stopping the cluster")
    finally:
        signal.signal(signal.SIGTERM, previous)
    down(data_dir, say=say)
