"""One line per event, as text (grep-able key=value pairs) or JSON (tidemq/logs.py)."""

from __future__ import annotations

import json
import logging

import pytest

from tidemq.logs import JsonFormatter, TextFormatter, configure, event


def record_of(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    logger = logging.getLogger("tidemq.test")
    with caplog.at_level(logging.INFO, logger="tidemq.test"):
        event(
            logger,
            "leader_elected",
            "orders/3: broker 2 leads",
            topic="orders",
            partition=3,
            leader_id=2,
            leader_epoch=7,
            isr=(2, 1),
        )
    [record] = caplog.records
    return record


def test_text_lines_end_with_grepable_fields(caplog: pytest.LogCaptureFixture) -> None:
    line = TextFormatter("coordinator").format(record_of(caplog))
    assert " coordinator INFO tidemq.test: orders/3: broker 2 leads" in line
    assert line.endswith(
        "event=leader_elected topic=orders partition=3 leader_id=2 leader_epoch=7 isr=[2,1]"
    )


def test_json_lines_carry_the_fields_as_keys(caplog: pytest.LogCaptureFixture) -> None:
    body = json.loads(JsonFormatter("broker-2").format(record_of(caplog)))
    assert body["service"] == "broker-2" and body["level"] == "info"
    assert body["event"] == "leader_elected" and body["message"] == "orders/3: broker 2 leads"
    assert (body["topic"], body["partition"], body["leader_epoch"], body["isr"]) == (
        "orders",
        3,
        7,
        [2, 1],
    )


def test_plain_lines_and_an_unknown_format() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain %s", ("line",), None)
    assert TextFormatter("svc").format(record).endswith("svc WARNING x: plain line")
    assert "event" not in json.loads(JsonFormatter("svc").format(record))
    with pytest.raises(ValueError, match="log format"):
        configure("svc", "info", "xml")
