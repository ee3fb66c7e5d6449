"""The tidemq client: Producer, Consumer, Admin (see docs/ARCHITECTURE.md, "Client")."""

from tidemq.client.accumulator import RecordFuture, RecordMetadata
from tidemq.client.admin import Admin
from tidemq.client.config import ConfigurationError, ResultTimeout
from tidemq.client.consumer import Consumer
from tidemq.client.fetch_buffer import Message
from tidemq.client.producer import Producer

__all__ = [
    "Admin",
    "ConfigurationError",
    "Consumer",
    "Message",
    "Producer",
    "RecordFuture",
    "RecordMetadata",
    "ResultTimeout",
]
