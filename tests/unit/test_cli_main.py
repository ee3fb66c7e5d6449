"""`tide` commands that need no running cluster: help, env, errors, config lookup."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from click.testing import CliRunner
from tests.standins import stand_in, stand_in_argv

from tidemq.cli.control import ConfigError, ControlPlane, resolve_target, with_local_processes
from tidemq.cli.main import cli
from tidemq.cli.model import parse_cluster_info, write_cluster_file
from tidemq.cli.processes import ProbeError


def sample() -> dict[str, Any]:
    return {
        "coordinator": {"url": "https://127.0.0.1:4000", "pid": 100, "argv": ["py", "x"]},
        "brokers": [{"id": 1, "url": "https://127.0.0.1:4001", "pid": 101, "argv": ["py"]}],
        "ca_file": "/d/tls/ca.pem",
        "client_cert_file": "/d/tls/client.pem",
        "client_key_file": "/d/tls/client key.pem",
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_cluster_file(tmp_path, parse_cluster_info(sample()))
    return tmp_path


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in (
        "up",
        "down",
        "status",
        "env",
        "topics",
        "produce",
        "consume",
        "groups",
        "bench",
        "coordinator",
        "broker",
    ):
        assert f"  {name} " in result.output


def test_env_prints_exports(data_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["env", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "export TIDE_BOOTSTRAP=https://127.0.0.1:4000",
        "export TIDE_CA_FILE=/d/tls/ca.pem",
        "export TIDE_CERT_FILE=/d/tls/client.pem",
        "export TIDE_KEY_FILE='/d/tls/client key.pem'",
    ]


def test_env_without_a_cluster_fails_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["env", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "cluster.json not found" in result.output


def test_down_without_a_cluster_fails_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["down", "--data-dir", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no cluster" in result.output


def test_up_rejects_zero_brokers(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["up", "--brokers", "0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert not (tmp_path / "cluster.json").exists()


def test_status_of_an_unreachable_cluster_fails(data_dir: Path) -> None:
    # cluster.json points at port 4000 with dead PIDs: nothing answers
    info = parse_cluster_info(sample())
    port = _free_port()
    raw = info.to_json()
    raw["coordinator"]["url"] = f"https://127.0.0.1:{port}"
    raw["ca_file"] = raw["client_cert_file"] = raw["client_key_file"] = None
    write_cluster_file(data_dir, parse_cluster_info(raw))
    result = CliRunner().invoke(cli, ["status", "--data-dir", str(data_dir), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["coordinator"]["error"]
    assert report["coordinator"]["running"] is False


def _free_port() -> int:
    from tidemq.cli.launch import pick_free_ports

    return pick_free_ports(1)[0]


def test_resolve_target_order(data_dir: Path, tmp_path: Path) -> None:
    environ = {"TIDE_BOOTSTRAP": "https://a:1,https://b:2", "TIDE_CA_FILE": "/ca"}
    from_dir = resolve_target(str(data_dir), environ)
    assert from_dir.config["bootstrap"] == "https://127.0.0.1:4000"
    assert from_dir.info is not None
    from_env = resolve_target(None, environ, cwd=tmp_path)
    assert from_env.bootstrap_urls == ["https://a:1", "https://b:2"]
    assert from_env.client_kwargs() == {"bootstrap": "https://a:1,https://b:2", "ca_file": "/ca"}
    assert from_env.info is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no cluster configured"):
        resolve_target(None, {}, cwd=empty)


@pytest.fixture
def running_here(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """./data/cluster.json of a "cluster" whose coordinator is a live stand-in process
    started from the argv the file records (its broker is not running)."""
    argv = stand_in_argv("coordinator", tmp_path / "data" / "coordinator")
    with stand_in(argv) as process:
        cluster = sample()
        cluster["coordinator"].update(pid=process.pid, argv=argv)
        (tmp_path / "data").mkdir()
        write_cluster_file(tmp_path / "data", parse_cluster_info(cluster))
        yield cluster


def test_status_with_variables_naming_the_local_cluster_shows_its_processes(
    tmp_path: Path, running_here: dict[str, Any]
) -> None:
    """`eval "$(tide env --data-dir data)"; tide status` (the README's tour): the
    variables say where to connect, ./data/cluster.json which PIDs are its processes."""
    same = {"TIDE_BOOTSTRAP": "https://127.0.0.1:4000", "TIDE_CA_FILE": "/elsewhere/ca"}
    bare = resolve_target(None, same, cwd=tmp_path)
    assert bare.info is None  # every other command: the variables alone, ./data unread
    target = with_local_processes(bare, cwd=tmp_path)
    assert target.client_kwargs() == {
        "bootstrap": "https://127.0.0.1:4000",
        "ca_file": "/elsewhere/ca",
    }
    assert target.info is not None
    assert target.info.coordinator.pid == running_here["coordinator"]["pid"]
    for spelled in ("HTTPS://127.0.0.1:4000/", "https://[::1]:1,https://127.0.0.1:04000"):
        found = resolve_target(None, {"TIDE_BOOTSTRAP": spelled}, cwd=tmp_path)
        assert with_local_processes(found, tmp_path).info, spelled  # the same URL
    for other in ("https://10.0.0.9:4000", "https://127.0.0.1:4001", "http://127.0.0.1:4000"):
        elsewhere = resolve_target(None, {"TIDE_BOOTSTRAP": other}, cwd=tmp_path)
        assert with_local_processes(elsewhere, cwd=tmp_path).info is None  # another cluster


def test_the_status_command_shows_the_local_pids_under_the_variables(
    tmp_path: Path, running_here: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("TIDE_CA_FILE", "TIDE_CERT_FILE", "TIDE_KEY_FILE", "TIDE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TIDE_BOOTSTRAP", "https://127.0.0.1:4000")  # nothing listens
    with patch("tidemq.cli.main.ControlPlane.brokers", side_effect=ProbeError("refused")):
        result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1, result.output  # the coordinator did not answer
    pid = running_here["coordinator"]["pid"]
    assert f"pid {pid} running" in result.output
    broker_row = re.compile(r"^1\s+https://127\.0\.0\.1:4001\s.*\s101\s+stopped$", re.M)
    assert broker_row.search(result.output), result.output  # the broker's PID, from the file


def test_status_ignores_a_file_none_of_whose_processes_runs(tmp_path: Path) -> None:
    """A stale ./data (or another cluster's on the same host and port): its PIDs are
    not this cluster's, so none are shown."""
    (tmp_path / "data").mkdir()
    write_cluster_file(tmp_path / "data", parse_cluster_info(sample()))  # PIDs 100, 101
    same = resolve_target(None, {"TIDE_BOOTSTRAP": "https://127.0.0.1:4000"}, cwd=tmp_path)
    assert with_local_processes(same, cwd=tmp_path).info is None


def test_status_shows_the_brokers_pids_while_the_coordinator_is_down(
    tmp_path: Path, running_here: dict[str, Any]
) -> None:
    """The coordinator crashed and its brokers run on: when the PIDs matter most."""
    cluster = sample()
    cluster["brokers"][0].update(running_here["coordinator"])  # the live stand-in...
    cluster["brokers"][0]["url"] = "https://127.0.0.1:4001"
    write_cluster_file(tmp_path / "data", parse_cluster_info(cluster))  # ...as a broker
    same = resolve_target(None, {"TIDE_BOOTSTRAP": "https://127.0.0.1:4000"}, cwd=tmp_path)
    target = with_local_processes(same, cwd=tmp_path)
    assert target.info is not None and target.info.coordinator.pid == 100  # not running


@pytest.mark.parametrize(
    "damage", ["not json", "not utf-8", "deep", "fifo", "huge pid", "too large", "denied"]
)
def test_status_ignores_a_damaged_local_cluster_file(
    tmp_path: Path, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / "cluster.json"
    if damage == "not json":
        path.write_text("{not json")
    elif damage == "not utf-8":
        path.write_bytes(b'{"coordinator": "\xff"}')
    elif damage == "deep":
        path.write_text("[" * 100_000)
    elif damage == "fifo":
        os.mkfifo(path)  # reading it would block until a writer came
    elif damage == "huge pid":
        cluster = sample()
        cluster["coordinator"]["pid"] = 2**31  # os.kill would raise OverflowError
        path.write_text(json.dumps(cluster))
    elif damage == "too large":
        path.write_text(json.dumps(sample()) + " " * (1 << 20))
    else:  # a directory the user may not search (root passes chmod, so raise it here)
        write_cluster_file(data, parse_cluster_info(sample()))

        def denied(*_: Any, **__: Any) -> int:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(os, "open", denied)
    same = resolve_target(None, {"TIDE_BOOTSTRAP": "https://127.0.0.1:4000"}, cwd=tmp_path)
    assert with_local_processes(same, cwd=tmp_path).info is None


def test_resolve_target_defaults_to_dot_data(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_cluster_file(tmp_path / "data", parse_cluster_info(sample()))
    target = resolve_target(None, {}, cwd=tmp_path)
    assert target.config["bootstrap"] == "https://127.0.0.1:4000"


def test_control_plane_reports_connection_failures(tmp_path: Path) -> None:
    from tidemq.cli.control import Target
    from tidemq.cli.processes import ProbeError

    target = Target(
        {
            "bootstrap": f"http://127.0.0.1:{_free_port()}",
            "ca_file": None,
            "cert_file": None,
            "key_file": None,
        }
    )
    with pytest.raises(ProbeError):
        ControlPlane(target, timeout_s=1.0).topics()
    with pytest.raises(ConfigError):
        ControlPlane(Target({"bootstrap": " , "}))


def test_split_line() -> None:
    from tidemq.cli.client_commands import split_line

    assert split_line("k:v:w", ":") == ("k", "v:w")
    assert split_line("no separator", ":") == (None, "no separator")
    assert split_line("k:v", None) == (None, "k:v")
    assert split_line(":v", ":") == ("", "v")
