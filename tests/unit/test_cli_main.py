"""`tide` commands that need no running cluster: help, env, errors, config lookup."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tidemq.cli.control import ConfigError, ControlPlane, resolve_target, with_local_processes
from tidemq.cli.main import cli
from tidemq.cli.model import parse_cluster_info, write_cluster_file


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


def test_status_with_variables_naming_the_local_cluster_shows_its_processes(
    tmp_path: Path,
) -> None:
    """`eval "$(tide env --data-dir data)"; tide status` (the README's tour): the
    variables say where to connect, ./data/cluster.json which PIDs are its processes."""
    (tmp_path / "data").mkdir()
    write_cluster_file(tmp_path / "data", parse_cluster_info(sample()))
    same = {"TIDE_BOOTSTRAP": "https://127.0.0.1:4000", "TIDE_CA_FILE": "/elsewhere/ca"}
    bare = resolve_target(None, same, cwd=tmp_path)
    assert bare.info is None  # every other command: the variables alone, ./data unread
    target = with_local_processes(bare, cwd=tmp_path)
    assert target.client_kwargs() == {
        "bootstrap": "https://127.0.0.1:4000",
        "ca_file": "/elsewhere/ca",
    }
    assert target.info is not None and target.info.coordinator.pid == sample()["coordinator"]["pid"]
    spelled = {"TIDE_BOOTSTRAP": "HTTPS://127.0.0.1:4000/"}  # the same URL, spelled otherwise
    assert with_local_processes(resolve_target(None, spelled, cwd=tmp_path), tmp_path).info
    for other in ("https://10.0.0.9:4000", "https://127.0.0.1:4001", "http://127.0.0.1:4000"):
        elsewhere = resolve_target(None, {"TIDE_BOOTSTRAP": other}, cwd=tmp_path)
        assert with_local_processes(elsewhere, cwd=tmp_path).info is None  # another cluster


@pytest.mark.parametrize("damage", ["not json", "not utf-8", "deep", "fifo", "denied"])
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
    else:  # a directory the user may not search (root passes chmod, so raise it here)
        write_cluster_file(data, parse_cluster_info(sample()))

        def denied(self: Path) -> bool:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "is_file", denied)
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
