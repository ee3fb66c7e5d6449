"""Real clusters for integration tests, started the way an operator starts them.

``cluster_factory(brokers=N, **options)`` runs ``tide up --brokers N --detach`` (as a
subprocess: the very code path of the CLI) in a fresh directory under ``tmp_path``
and returns a :class:`LocalCluster`; ``cluster`` is a one-broker cluster. Options
become ``tide up`` flags: ``fsync="interval"`` -> ``--fsync interval``,
``plain_http=True`` -> ``--plain-http``, ``session_timeout_ms=3000`` ->
``--session-timeout-ms 3000``.

Every process a test's clusters ever ran is stopped when the test ends, pass or
fail (``tide down``, then SIGKILL for stragglers), and the tail of each process log
is printed then, so a failing test shows what the services said.
Nothing here sleeps a fixed time: everything polls against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tidemq.cli import cluster as cluster_ops
from tidemq.cli import processes
from tidemq.cli.model import ClusterInfo, read_cluster_file

UP_TIMEOUT_S = 60.0


def tide(
    *args: str, timeout_s: float = 120.0, check: bool = True, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m tidemq ARGS`` and returns it; fails the test on a non-zero exit
    when ``check``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    completed = subprocess.run(
        [sys.executable, "-m", "tidemq", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=environment,
        input=input_text,
        stdin=None if input_text is not None else subprocess.DEVNULL,
        check=False,
    )
    if check and completed.returncode != 0:
        pytest.fail(
            f"tide {' '.join(args)} exited {completed.returncode}\n"
            f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
        )
    return completed


def option_flags(options: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


class LocalCluster:
    """One ``tide up`` cluster: its directory, cluster.json, client config, controls."""

    def __init__(
        self,
        data_dir: Path,
        brokers: int,
        options: dict[str, Any],
        seen: dict[int, tuple[str, ...]],
    ) -> None:
        self.data_dir = data_dir
        self.brokers = brokers
        self.options = options
        self._seen = seen  # every pid -> argv this cluster ever ran, for the final cleanup
        self.info: dict[str, Any] = {}
        self.cluster_info: ClusterInfo | None = None

    # -- state -------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Re-reads cluster.json into ``.info`` (the parsed JSON) and ``.cluster_info``."""
        self.cluster_info = read_cluster_file(self.data_dir)
        self.info = json.loads((self.data_dir / "cluster.json").read_text())
        for pid, argv in self._processes():
            self._seen[pid] = argv
        return self.info

    @property
    def config(self) -> dict[str, Any]:
        """bootstrap / ca_file / cert_file / key_file for Producer, Consumer, Admin."""
        return {
            "bootstrap": self.info["coordinator"]["url"],
            "ca_file": self.info["ca_file"],
            "cert_file": self.info["client_cert_file"],
            "key_file": self.info["client_key_file"],
        }

    @property
    def env(self) -> dict[str, str]:
        """The same configuration as TIDE_* environment variables."""
        names = {
            "bootstrap": "TIDE_BOOTSTRAP",
            "ca_file": "TIDE_CA_FILE",
            "cert_file": "TIDE_CERT_FILE",
            "key_file": "TIDE_KEY_FILE",
        }
        return {names[k]: v for k, v in self.config.items() if v is not None}

    def _processes(self) -> list[tuple[int, tuple[str, ...]]]:
        info = self.cluster_info
        if info is None:
            return []
        return [(broker.pid, broker.argv) for broker in info.brokers] + [
            (info.coordinator.pid, info.coordinator.argv)
        ]

    def broker_entry(self, broker_id: int) -> dict[str, Any]:
        for broker in self.info["brokers"]:
            if broker["id"] == broker_id:
                return dict(broker)
        raise KeyError(f"no broker {broker_id} in cluster.json")

    def is_running(self, pid: int) -> bool:
        argv = self._seen.get(pid)
        return argv is not None and processes.is_running(pid, argv)

    # -- controls -----------------------------------------------------------------------

    def up(self, brokers: int | None = None, timeout_s: float = UP_TIMEOUT_S) -> None:
        """``tide up --detach`` again: restarts dead processes from their argv, adds
        brokers up to ``brokers`` (scale-out), waits until healthy."""
        self.brokers = brokers or self.brokers
        tide(
            "up",
            "--brokers",
            str(self.brokers),
            "--data-dir",
            str(self.data_dir),
            "--detach",
            "--timeout-s",
            str(timeout_s),
            *option_flags(self.options),
            timeout_s=timeout_s + 60,
        )
        self.reload()

    def kill_all(self) -> None:
        """SIGKILL every process of the cluster, and wait until they are gone."""
        processes.kill(self._processes())

    def restart_all(self) -> None:
        """Start every process that is not running from its argv, wait until healthy."""
        self.up()

    def kill_broker(self, broker_id: int, signum: int = signal.SIGKILL) -> None:
        entry = self.broker_entry(broker_id)
        processes.send_signal(entry["pid"], entry["argv"], signum)
        if signum in (signal.SIGKILL, signal.SIGTERM):
            processes.wait_stopped([(entry["pid"], entry["argv"])], _deadline(15.0))

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Polls until every process runs, is ready and every broker is listed alive."""
        assert self.cluster_info is not None
        deadline = _deadline(timeout_s)
        problems = cluster_ops.unhealthy(self.cluster_info)
        while problems:
            if _now() > deadline:
                pytest.fail(f"cluster not healthy after {timeout_s} s: {problems}")
            time.sleep(0.1)  # the polling interval, not a wait for a condition
            problems = cluster_ops.unhealthy(self.cluster_info)

    def down(self) -> None:
        tide("down", "--data-dir", str(self.data_dir))

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for log in sorted((self.data_dir / "logs").glob("*.log")):
            out.append(f"----- {log} -----\n{processes.log_tail(log, lines)}")
        return "\n".join(out)

    def stop_everything(self) -> None:
        """Teardown: tide down (TERM, then KILL), then SIGKILL anything still ours."""
        if (self.data_dir / "cluster.json").exists():
            try:
                cluster_ops.down(self.data_dir, grace_s=5.0)
            except cluster_ops.ClusterError:
                pass
        processes.kill(list(self._seen.items()))


def _now() -> float:
    return time.monotonic()


def _deadline(seconds: float) -> float:
    return _now() + seconds


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    started: list[LocalCluster] = []

    def start(brokers: int = 1, **options: Any) -> LocalCluster:
        data_dir = tmp_path / f"cluster-{len(started) + 1}"
        local = LocalCluster(data_dir, brokers, options, {})
        started.append(local)
        try:
            local.up()
        except BaseException:
            if (data_dir / "cluster.json").exists():
                local.reload()
            raise
        return local

    yield start
    for local in started:
        try:
            if (local.data_dir / "cluster.json").exists():
                local.reload()
        except Exception:
            pass
        local.stop_everything()
        print(local.log_tails())


@pytest.fixture
def tide_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``tide_cli("status", "--json", check=False, input_text=...)`` runs the CLI."""
    return tide


@pytest.fixture
def adopt_cluster() -> Iterator[Callable[[Path], LocalCluster]]:
    """For tests that run ``tide up`` themselves: ``adopt_cluster(data_dir)`` returns a
    LocalCluster for it, whose processes are stopped when the test ends."""
    adopted: list[LocalCluster] = []

    def adopt(data_dir: Path) -> LocalCluster:
        local = LocalCluster(data_dir, 0, {}, {})
        adopted.append(local)
        return local

    yield adopt
    for local in adopted:
        try:
            if (local.data_dir / "cluster.json").exists():
                local.reload()
        except Exception:
            pass
        local.stop_everything()
        print(local.log_tails())


@pytest.fixture
def cluster(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    """A running one-broker cluster in tmp_path."""
    return cluster_factory(brokers=1)
