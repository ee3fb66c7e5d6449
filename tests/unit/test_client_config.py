"""Client configuration: keyword arguments win over TIDE_* variables; clear errors."""

from __future__ import annotations

import pytest

from tidemq.client.config import (
    ConfigurationError,
    ConsumerOptions,
    ProducerOptions,
    parse_bootstrap,
    resolve,
)
from tidemq.errors import InvalidRequest, TideError

ENV = {
    "TIDE_BOOTSTRAP": "https://c1:9000, https://c2:9000/",
    "TIDE_CA_FILE": "/env/ca.pem",
    "TIDE_CERT_FILE": "/env/cert.pem",
    "TIDE_KEY_FILE": "/env/key.pem",
    "TIDE_TOKEN": "env-token",
}


def test_environment_fills_everything() -> None:
    connection, options = resolve(ProducerOptions, {}, ENV)
    assert connection.bootstrap == ("https://c1:9000", "https://c2:9000")
    assert connection.ca_file == "/env/ca.pem"
    assert connection.cert_file == "/env/cert.pem"
    assert connection.key_file == "/env/key.pem"
    assert connection.token == "env-token"
    assert options == ProducerOptions()


def test_keyword_arguments_win_over_environment() -> None:
    connection, _ = resolve(
        ProducerOptions,
        {"bootstrap": "https://kw:1", "ca_file": "/kw/ca.pem", "token": "kw", "key_file": None},
        ENV,
    )
    assert connection.bootstrap == ("https://kw:1",)
    assert connection.ca_file == "/kw/ca.pem"
    assert connection.token == "kw"
    assert connection.key_file == "/env/key.pem"  # None means "not given"


def test_missing_bootstrap_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="TIDE_BOOTSTRAP") as raised:
        resolve(ProducerOptions, {}, {"TIDE_BOOTSTRAP": ""})
    assert isinstance(raised.value, TideError)
    assert isinstance(raised.value, InvalidRequest)
    assert isinstance(raised.value, ValueError)


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="linger"):
        resolve(ProducerOptions, {"bootstrap": "x:1", "linger": 5}, {})


def test_options_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="acks"):
        resolve(ProducerOptions, {"bootstrap": "x:1", "acks": 2}, {})
    with pytest.raises(ConfigurationError, match="batch_size"):
        resolve(ProducerOptions, {"bootstrap": "x:1", "batch_size": 0}, {})
    with pytest.raises(ConfigurationError, match="auto_offset_reset"):
        resolve(ConsumerOptions, {"bootstrap": "x:1", "auto_offset_reset": "middle"}, {})


def test_acks_spellings() -> None:
    assert ProducerOptions().acks_parameter == "all"
    assert ProducerOptions(acks=1).acks_parameter == "1"
    assert ProducerOptions(acks=0).acks_parameter == "0"
    assert ProducerOptions(acks=-1).acks_parameter == "all"


def test_consumer_and_connection_options_split() -> None:
    connection, options = resolve(
        ConsumerOptions,
        {"bootstrap": "x:1", "auto_offset_reset": "latest", "request_timeout_ms": 5000},
        {},
    )
    assert options.auto_offset_reset == "latest"
    assert options.enable_auto_commit is True and options.auto_commit_interval_ms == 5000
    assert connection.request_timeout_ms == 5000


def test_parse_bootstrap() -> None:
    assert parse_bootstrap("a:1,,http://b:2/ ") == ("https://a:1", "http://b:2")
    assert parse_bootstrap(["https://a:1"]) == ("https://a:1",)
    with pytest.raises(ConfigurationError):
        parse_bootstrap("ftp://a:1")


def test_max_in_flight_is_bounded_by_the_broker_window_with_idempotence() -> None:
    with pytest.raises(ConfigurationError, match="max_in_flight"):
        resolve(ProducerOptions, {"bootstrap": "x:1", "max_in_flight": 6}, {})
    _, options = resolve(
        ProducerOptions, {"bootstrap": "x:1", "max_in_flight": 6, "enable_idempotence": False}, {}
    )
    assert options.max_in_flight == 6
