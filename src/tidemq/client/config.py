"""Client configuration: connection settings from keyword arguments or the environment,
and the option sets of the producer, the consumer and the admin client.

Precedence: a keyword argument that is not None wins over the environment variable;
an empty environment variable counts as unset. ``bootstrap`` is mandatory: one or more
coordinator URLs (a list, or one comma-separated string); the client tries each in turn.
Unknown keyword arguments are an error, so that a typo (``linger=5``) does not pass
silently. Every option name carries its unit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from tidemq.core.producers import WINDOW_BATCHES
from tidemq.errors import InvalidRequest, RequestTimedOut

ENVIRONMENT = {
    "bootstrap": "TIDE_BOOTSTRAP",
    "ca_file": "TIDE_CA_FILE",
    "cert_file": "TIDE_CERT_FILE",
    "key_file": "TIDE_KEY_FILE",
    "token": "TIDE_TOKEN",
}


class ConfigurationError(InvalidRequest, ValueError):
    """A missing, unknown or out-of-range client option (also a ValueError)."""

    code = "invalid_configuration"  # client side only, never on the wire


class ResultTimeout(RequestTimedOut, TimeoutError):
    """A wait ran out of time: ``future.result(timeout)``, ``flush(timeout)``, a full
    buffer past ``max_block_ms``. Also a TimeoutError, as ``concurrent.futures`` raises.
    """

    code = "client_timeout"  # client side only, never on the wire


@dataclass(frozen=True)
class ConnectionConfig:
    """Where the cluster is and how to talk to it; shared by every client object."""

    bootstrap: tuple[str, ...]
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    request_timeout_ms: int = 30_000
    metadata_max_age_ms: int = 30_000
    retry_backoff_ms: int = 100
    retry_backoff_max_ms: int = 1_000
    connections_per_host: int = 32

    def __post_init__(self) -> None:
        _positive(self, "request_timeout_ms", "metadata_max_age_ms", "connections_per_host")
        _non_negative(self, "retry_backoff_ms", "retry_backoff_max_ms")


@dataclass(frozen=True)
class ProducerOptions:
    linger_ms: int = 20
    batch_size: int = 65_536
    max_in_flight: int = 5
    acks: Literal["all", 0, 1] | str | int = "all"
    retries: int = 2**31 - 1
    delivery_timeout_ms: int = 120_000
    buffer_memory: int = 32 * 1024 * 1024
    max_block_ms: int = 60_000
    max_request_bytes: int = 1024 * 1024
    enable_idempotence: bool = True
    # Batches drained for one leader broker and not yet acknowledged, in bytes: beyond
    # it the sender waits rather than piling requests behind a slow link.
    max_in_flight_bytes_per_broker: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        _non_negative(self, "linger_ms", "retries", "max_block_ms")
        _positive(
            self,
            "batch_size",
            "max_in_flight",
            "delivery_timeout_ms",
            "buffer_memory",
            "max_request_bytes",
            "max_in_flight_bytes_per_broker",
        )
        if str(self.acks) not in ("all", "-1", "0", "1"):
            raise ConfigurationError(f"acks must be 'all', 1 or 0, not {self.acks!r}")
        if self.enable_idempotence and self.max_in_flight > WINDOW_BATCHES:
            raise ConfigurationError(
                f"max_in_flight must be at most {WINDOW_BATCHES} with enable_idempotence "
                f"(the batches a broker remembers per producer), not {self.max_in_flight}"
            )

    @property
    def acks_parameter(self) -> str:
        return "all" if str(self.acks) in ("all", "-1") else str(self.acks)


DELIVERY_MODES = ("at_least_once", "at_most_once", "manual")


@dataclass(frozen=True)
class ConsumerOptions:
    auto_offset_reset: str = "earliest"
    enable_auto_commit: bool = True
    auto_commit_interval_ms: int = 5_000
    heartbeat_interval_ms: int = 1_000
    session_timeout_ms: int = 10_000
    fetch_max_bytes: int = 1024 * 1024
    fetch_wait_ms: int = 500
    max_partition_buffer_bytes: int = 4 * 1024 * 1024
    close_timeout_ms: int = 30_000
    delivery: str = "at_least_once"
    max_poll_interval_ms: int = 300_000

    def __post_init__(self) -> None:
        if self.delivery not in DELIVERY_MODES:
            raise ConfigurationError(
                f"delivery must be one of {', '.join(DELIVERY_MODES)}, not {self.delivery!r}"
            )
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigurationError(
                f"auto_offset_reset must be 'earliest' or 'latest', not {self.auto_offset_reset!r}"
            )
        _positive(
            self,
            "auto_commit_interval_ms",
            "heartbeat_interval_ms",
            "session_timeout_ms",
            "fetch_max_bytes",
            "max_partition_buffer_bytes",
            "close_timeout_ms",
            "max_poll_interval_ms",
        )
        _non_negative(self, "fetch_wait_ms")
        if self.fetch_wait_ms > 30_000:
            raise ConfigurationError("fetch_wait_ms must be at most 30000 (protocol limit)")


@dataclass(frozen=True)
class AdminOptions:
    pass


def _positive(options: object, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigurationError(f"{name} must be a positive integer, not {value!r}")


def _non_negative(options: object, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigurationError(f"{name} must be a non-negative integer, not {value!r}")


def parse_bootstrap(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"a:1, https://b:2/"`` -> ``("https://a:1", "https://b:2")``; https by default."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    urls = []
    for part in parts:
        url = part.strip().rstrip("/")
        if not url:
            continue
        if "://" not in url:
            url = "https://" + url
        if not url.startswith(("https://", "http://")):
            raise ConfigurationError(f"bootstrap URL {url!r}: only https:// or http://")
        urls.append(url)
    return tuple(urls)


OptionsT = TypeVar("OptionsT")


def resolve(
    options_type: type[OptionsT],
    kwargs: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> tuple[ConnectionConfig, OptionsT]:
    """Splits keyword arguments into the connection config and ``options_type``.

    Raises ConfigurationError for unknown names, bad values and a missing bootstrap.
    """
    env = os.environ if environ is None else environ
    connection_names = {field.name for field in dataclasses.fields(ConnectionConfig)}
    option_names = {field.name for field in dataclasses.fields(options_type)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - connection_names - option_names)
    if unknown:
        raise ConfigurationError(f"unknown client option(s): {', '.join(unknown)}")
    connection: dict[str, Any] = {}
    for name, variable in ENVIRONMENT.items():
        value = kwargs.get(name)
        if value is None:
            value = env.get(variable) or None
        connection[name] = value
    if connection["bootstrap"] is None:
        raise ConfigurationError(
            "no bootstrap: pass bootstrap='https://host:port' or set TIDE_BOOTSTRAP "
            "(`tide env --data-dir DIR` prints it)"
        )
    connection["bootstrap"] = parse_bootstrap(connection["bootstrap"])
    if not connection["bootstrap"]:
        raise ConfigurationError("bootstrap is empty: give at least one coordinator URL")
    for name in connection_names - set(ENVIRONMENT):
        if kwargs.get(name) is not None:
            connection[name] = kwargs[name]
    options = {name: kwargs[name] for name in option_names if kwargs.get(name) is not None}
    return ConnectionConfig(**connection), options_type(**options)
