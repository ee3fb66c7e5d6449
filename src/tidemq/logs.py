"""Logging for every tidemq process: one line per event, as text or JSON.

Owns: the ``--log-format text|json`` choice of the services (:func:`configure`) and
:func:`event`, which logs one important event (a broker registered or declared dead,
a leader elected, an ISR changed, a rebalance, a truncation, a topic created or
deleted) with its context as fields: topic, partition, epochs, broker ids.

Text lines end with the fields as ``key=value`` pairs, in a fixed order, so that
``grep 'topic=orders partition=3'`` follows one partition's history across the
coordinator's and the brokers' logs; JSON lines carry the same fields as keys
(``jq 'select(.topic=="orders" and .partition==3)'``). Every line names the service
(``coordinator``, ``broker-2``), so merged logs stay readable.

Pure apart from installing a handler on the root logger; no other tidemq import.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

LOG_FORMATS = ("text", "json")
_FIELDS = "tide_fields"
_EVENT = "tide_event"


def event(
    logger: logging.Logger, name: str, message: str, level: int = logging.INFO, **fields: Any
) -> None:
    """Logs event ``name`` (snake_case) with ``fields`` as structured context."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={_EVENT: name, _FIELDS: fields})


def _render(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(str(item) for item in value) + "]"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        name = getattr(record, _EVENT, None)
        if name is None:
            return line
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        pairs = " ".join(f"{key}={_render(value)}" for key, value in fields.items())
        head, newline, rest = line.partition("\n")  # keep a traceback below the pairs
        return f"{head} event={name}{' ' + pairs if pairs else ''}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        body: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        name = getattr(record, _EVENT, None)
        if name is not None:
            body["event"] = name
            for key, value in getattr(record, _FIELDS, {}).items():
                body.setdefault(key, list(value) if isinstance(value, tuple) else value)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure(service: str, level: str = "info", log_format: str = "text") -> None:
    """Installs one stderr handler on the root logger (replacing any earlier one)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(service) if log_format == "json" else TextFormatter(service)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
