"""cluster.json: the public contract's exact shape, validation, atomic write, env lines."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest

from tidemq.cli.model import (
    CLUSTER_FILE_BYTES_MAX,
    BrokerEntry,
    ClusterFileError,
    ClusterInfo,
    CoordinatorEntry,
    config_from_env,
    env_lines,
    parse_cluster_info,
    read_cluster_file,
    write_cluster_file,
)


def sample() -> dict[str, Any]:
    return {
        "coordinator": {
            "url": "https://127.0.0.1:4000",
            "pid": 100,
            "argv": ["/usr/bin/python3", "-m", "tidemq", "coordinator", "--port", "4000"],
        },
        "brokers": [
            {"id": 1, "url": "https://127.0.0.1:4001", "pid": 101, "argv": ["py", "broker"]},
            {"id": 2, "url": "https://127.0.0.1:4002", "pid": 102, "argv": ["py", "broker"]},
        ],
        "ca_file": "/d/tls/ca.pem",
        "client_cert_file": "/d/tls/client.pem",
        "client_key_file": "/d/tls/client key.pem",
    }


def test_round_trip_keeps_the_exact_shape() -> None:
    info = parse_cluster_info(sample())
    assert info.to_json() == sample()
    assert set(info.to_json()) == {
        "coordinator",
        "brokers",
        "ca_file",
        "client_cert_file",
        "client_key_file",
    }
    assert set(info.to_json()["coordinator"]) == {"url", "pid", "argv"}
    assert all(set(b) == {"id", "url", "pid", "argv"} for b in info.to_json()["brokers"])


def test_cert_fields_may_be_null() -> None:
    data = sample() | {"ca_file": None, "client_cert_file": None, "client_key_file": None}
    info = parse_cluster_info(data)
    assert info.client_config()["ca_file"] is None
    assert info.to_json() == data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("coordinator"), "coordinator"),
        (lambda d: d.update(extra=1), "unexpected fields"),
        (lambda d: d["coordinator"].update(pid="1"), "coordinator.pid"),
        (lambda d: d["coordinator"].update(pid=True), "coordinator.pid"),
        (lambda d: d["coordinator"].update(pid=0), "a PID from 1 to"),
        (lambda d: d["coordinator"].update(pid=2**31), "a PID from 1 to 4194304, got 2147483648"),
        (lambda d: d["coordinator"].update(argv=[]), "argv"),
        (lambda d: d["brokers"][0].update(argv=["a", 1]), "argv"),
        (lambda d: d["brokers"][1].update(id=1), "duplicate"),
        (lambda d: d["brokers"][0].pop("url"), "brokers[0]"),
        (lambda d: d.update(ca_file=3), "ca_file"),
        (lambda d: d.pop("client_key_file"), "client_key_file"),
        (lambda d: d.update(brokers={}), "brokers"),
    ],
)
def test_invalid_files_name_the_bad_field(mutate: Any, message: str) -> None:
    data = sample()
    mutate(data)
    with pytest.raises(ClusterFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_cluster_info(data)


def test_with_broker_adds_or_replaces_and_keeps_order() -> None:
    info = parse_cluster_info(sample())
    added = info.with_broker(BrokerEntry(3, "https://127.0.0.1:4003", 103, ("x",)))
    assert [b.id for b in added.brokers] == [1, 2, 3]
    replaced = added.with_broker(BrokerEntry(1, "https://127.0.0.1:4001", 999, ("x",)))
    assert [b.id for b in replaced.brokers] == [1, 2, 3]
    assert replaced.broker(1) == BrokerEntry(1, "https://127.0.0.1:4001", 999, ("x",))
    assert replaced.broker(7) is None


def test_write_then_read(tmp_path: Path) -> None:
    info = parse_cluster_info(sample())
    write_cluster_file(tmp_path, info)
    assert read_cluster_file(tmp_path) == info
    assert json.loads((tmp_path / "cluster.json").read_text()) == sample()
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.json"]  # no temp file left


def test_read_reports_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ClusterFileError, match="not found"):
        read_cluster_file(tmp_path)
    (tmp_path / "cluster.json").write_text("{not json")
    with pytest.raises(ClusterFileError, match="not JSON"):
        read_cluster_file(tmp_path)
    (tmp_path / "cluster.json").write_text("[" * 100_000)  # past the parser's nesting
    with pytest.raises(ClusterFileError, match="not JSON"):
        read_cluster_file(tmp_path)
    (tmp_path / "cluster.json").write_bytes(b'{"coordinator": "\xff"}')
    with pytest.raises(ClusterFileError, match="not UTF-8"):
        read_cluster_file(tmp_path)


def test_read_refuses_a_cluster_file_that_is_no_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "cluster.json")  # reading it would block until a writer came
    with pytest.raises(ClusterFileError, match="not a regular file"):
        read_cluster_file(tmp_path)
    (tmp_path / "cluster.json").unlink()
    (tmp_path / "cluster.json").symlink_to("/dev/zero")  # passes no size check by itself
    with pytest.raises(ClusterFileError, match="not a regular file"):
        read_cluster_file(tmp_path)


def test_read_refuses_a_cluster_file_past_its_bound(tmp_path: Path) -> None:
    body = json.dumps(sample())
    (tmp_path / "cluster.json").write_text(body + " " * (CLUSTER_FILE_BYTES_MAX - len(body)))
    assert read_cluster_file(tmp_path) == parse_cluster_info(sample())  # at the bound
    (tmp_path / "cluster.json").write_text(body + " " * (CLUSTER_FILE_BYTES_MAX + 1))
    with pytest.raises(ClusterFileError, match="larger than"):
        read_cluster_file(tmp_path)


def test_env_lines_are_shell_quoted_and_unset_nulls() -> None:
    info = parse_cluster_info(sample())
    lines = env_lines(info)
    assert lines[0] == "export TIDE_BOOTSTRAP=https://127.0.0.1:4000"
    assert lines[3] == "export TIDE_KEY_FILE='/d/tls/client key.pem'"
    assert shlex.split(lines[3]) == ["export", "TIDE_KEY_FILE=/d/tls/client key.pem"]
    plain = ClusterInfo(CoordinatorEntry("http://127.0.0.1:1", 1, ("a",)), (), None, None, None)
    assert env_lines(plain)[1:] == [
        "unset TIDE_CA_FILE",
        "unset TIDE_CERT_FILE",
        "unset TIDE_KEY_FILE",
    ]


def test_config_from_env() -> None:
    assert config_from_env({}) is None
    assert config_from_env({"TIDE_BOOTSTRAP": ""}) is None
    config = config_from_env({"TIDE_BOOTSTRAP": "https://a:1", "TIDE_CA_FILE": "/ca"})
    assert config == {
        "bootstrap": "https://a:1",
        "ca_file": "/ca",
        "cert_file": None,
        "key_file": None,
    }
