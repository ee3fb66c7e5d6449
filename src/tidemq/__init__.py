"""tidemq: a distributed, replicated, partitioned message queue over HTTPS.

The SDK's public surface::

    from tidemq import Producer, Consumer, Admin

    with Producer() as producer:                 # configured from TIDE_* variables
        producer.send("orders", b"...", key="customer-42").result()

    with Consumer("orders", group="billing") as consumer:
        consumer.subscribe(handle)               # handle(message) per message

Errors are ``tidemq.errors.TideError`` subclasses, re-exported here. The client
classes are imported on first use, so services that import ``tidemq.errors`` or
``tidemq.wire`` do not load the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tidemq import errors
from tidemq.errors import (
    ClientClosed,
    ConnectionFailed,
    CorruptRecord,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    RequestTimedOut,
    RequestTooLarge,
    TideError,
    TopicExists,
    Unavailable,
    UnknownGroup,
    UnknownPartition,
    UnknownTopic,
)

if TYPE_CHECKING:
    from tidemq.client.accumulator import RecordFuture, RecordMetadata
    from tidemq.client.admin import Admin
    from tidemq.client.config import ConfigurationError, ResultTimeout
    from tidemq.client.consumer import Consumer
    from tidemq.client.fetch_buffer import Message
    from tidemq.client.producer import Producer

__version__ = "0.1.0"

_LAZY = {
    "Producer": "tidemq.client.producer",
    "Consumer": "tidemq.client.consumer",
    "Admin": "tidemq.client.admin",
    "RecordMetadata": "tidemq.client.accumulator",
    "RecordFuture": "tidemq.client.accumulator",
    "Message": "tidemq.client.fetch_buffer",
    "ConfigurationError": "tidemq.client.config",
    "ResultTimeout": "tidemq.client.config",
}

__all__ = [
    "Admin",
    "ClientClosed",
    "ConfigurationError",
    "ConnectionFailed",
    "Consumer",
    "CorruptRecord",
    "InvalidRequest",
    "Message",
    "NotLeader",
    "OffsetOutOfRange",
    "Producer",
    "RecordFuture",
    "RecordMetadata",
    "RequestTimedOut",
    "RequestTooLarge",
    "ResultTimeout",
    "TideError",
    "TopicExists",
    "Unavailable",
    "UnknownGroup",
    "UnknownPartition",
    "UnknownTopic",
    "errors",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tidemq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
