"""Review 6: a non-retriable heartbeat error other than fenced (a wrong token, an ACL
that forbids the group, a session timeout the coordinator refuses) is only logged;
poll() returns [] for ever instead of raising it."""

import time

import pytest

import tidemq.client.consumer as consumer_module
from tidemq.errors import Forbidden


class ForbiddingTransport:
    def __init__(self, connection) -> None:
        self.heartbeats = 0

    async def coordinator(self, method, path, json_body=None, **_):
        if path.endswith("/heartbeat"):
            self.heartbeats += 1
        raise Forbidden("token may not read group g")

    async def close(self) -> None:
        pass


class NoMetadata:
    def __init__(self, transport, max_age_ms) -> None:
        pass


def test_a_forbidden_heartbeat_reaches_poll(monkeypatch) -> None:
    monkeypatch.setattr(consumer_module, "Transport", ForbiddingTransport)
    monkeypatch.setattr(consumer_module, "MetadataCache", NoMetadata)
    consumer = consumer_module.Consumer(
        "t", group="g", bootstrap="https://coordinator", retry_backoff_ms=10
    )
    try:
        deadline = time.monotonic() + 3
        with pytest.raises(Forbidden):
            while time.monotonic() < deadline:
                consumer.poll(timeout=0.2)
    finally:
        consumer.close(timeout=2)
