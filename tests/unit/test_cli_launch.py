"""Ports, the data directory layout, argv building and PID ownership checks."""

from __future__ import annotations

from pathlib import Path

from tidemq.cli.launch import (
    Layout,
    ServiceOptions,
    argv_option,
    broker_argv,
    cmdline_matches,
    coordinator_argv,
    pick_free_ports,
    url_for,
)
from tidemq.tls import TlsFiles

LAYOUT = Layout(Path("/data/cluster"))
TLS = TlsFiles("/data/cluster/tls/ca.pem", "/data/cluster/tls/x.pem", "/data/cluster/tls/x-key.pem")


def test_pick_free_ports_are_distinct_and_valid() -> None:
    ports = pick_free_ports(5)
    assert len(set(ports)) == 5
    assert all(1024 <= port <= 65535 for port in ports)


def test_layout() -> None:
    assert LAYOUT.log_file("broker-2") == Path("/data/cluster/logs/broker-2.log")
    assert LAYOUT.process_dir("coordinator") == Path("/data/cluster/coordinator")
    assert LAYOUT.tls_dir == Path("/data/cluster/tls")


def test_coordinator_argv_is_absolute_and_fixed() -> None:
    argv = coordinator_argv(LAYOUT, 4000, TLS, ServiceOptions(), broker_count=3, python="/py")
    assert argv[:4] == ["/py", "-m", "tidemq", "coordinator"]
    assert argv_option(argv, "--data-dir") == "/data/cluster/coordinator"
    assert argv_option(argv, "--port") == "4000"
    assert argv_option(argv, "--host") == "127.0.0.1"
    assert argv_option(argv, "--advertised-url") == "https://127.0.0.1:4000"
    assert argv_option(argv, "--ca-file") == TLS.ca_file
    assert argv_option(argv, "--cert-file") == TLS.cert_file
    assert argv_option(argv, "--key-file") == TLS.key_file
    assert "--plain-http" not in argv
    assert "--default-replication-factor" not in argv


def test_coordinator_replication_factor_fits_a_single_broker() -> None:
    argv = coordinator_argv(LAYOUT, 4000, TLS, ServiceOptions(), broker_count=1, python="/py")
    assert argv_option(argv, "--default-replication-factor") == "1"
    options = ServiceOptions(default_replication_factor=3, session_timeout_ms=2000)
    argv = coordinator_argv(LAYOUT, 4000, TLS, options, broker_count=1, python="/py")
    assert argv_option(argv, "--default-replication-factor") == "3"
    assert argv_option(argv, "--session-timeout-ms") == "2000"


def test_broker_argv() -> None:
    options = ServiceOptions(fsync="interval", segment_bytes=1024)
    argv = broker_argv(LAYOUT, 2, 4002, "https://127.0.0.1:4000", TLS, options, python="/py")
    assert argv[:4] == ["/py", "-m", "tidemq", "broker"]
    assert argv_option(argv, "--id") == "2"
    assert argv_option(argv, "--data-dir") == "/data/cluster/broker-2"
    assert argv_option(argv, "--coordinator") == "https://127.0.0.1:4000"
    assert argv_option(argv, "--advertised-url") == "https://127.0.0.1:4002"
    assert argv_option(argv, "--fsync") == "interval"
    assert argv_option(argv, "--segment-bytes") == "1024"
    assert argv_option(argv, "--retention-ms") is None


def test_plain_http_has_no_tls_files() -> None:
    options = ServiceOptions(plain_http=True)
    argv = broker_argv(LAYOUT, 1, 4001, "http://127.0.0.1:4000", None, options, python="/py")
    assert "--plain-http" in argv
    assert "--ca-file" not in argv
    assert argv_option(argv, "--advertised-url") == "http://127.0.0.1:4001"
    assert url_for(5, plain_http=False) == "https://127.0.0.1:5"


def test_cmdline_matches_only_our_process() -> None:
    argv = broker_argv(LAYOUT, 1, 4001, "https://127.0.0.1:4000", TLS, ServiceOptions(), "/py")
    assert cmdline_matches(argv, argv)
    # the same process seen through a different interpreter path
    assert cmdline_matches(["/usr/bin/python3.11", *argv[1:]], argv)
    assert not cmdline_matches([], argv)  # zombie or gone
    assert not cmdline_matches(["/bin/sleep", "100"], argv)  # a reused PID
    other = broker_argv(Layout(Path("/elsewhere")), 1, 4001, "u", TLS, ServiceOptions(), "/py")
    assert not cmdline_matches(other, argv)  # another cluster's broker
    coordinator = coordinator_argv(LAYOUT, 4000, TLS, ServiceOptions(), 3, "/py")
    assert not cmdline_matches(coordinator, argv)
