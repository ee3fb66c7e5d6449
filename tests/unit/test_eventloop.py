"""The event loop's exception handler: one known uvloop race is not reported as a
fatal error; everything else is, as asyncio reports it."""

from __future__ import annotations

import logging

import pytest

from tidemq import eventloop


def _context(message: str, error: BaseException) -> dict[str, object]:
    return {"message": message, "exception": error, "protocol": object()}


def test_a_tls_write_to_a_socket_closed_meanwhile_is_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = eventloop.new_event_loop()
    try:
        caplog.set_level(logging.DEBUG)
        error = RuntimeError(
            "unable to perform operation on <TCPTransport closed=True reading=False "
            "0x7fa47c3de9b0>; the handler is closed"
        )
        loop.call_exception_handler(_context("Fatal error on SSL protocol", error))
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert records == []
        assert any("peer was still writing" in r.getMessage() for r in caplog.records)
    finally:
        loop.close()


@pytest.mark.parametrize(
    "message, error",
    [
        ("Fatal error on SSL protocol", RuntimeError("something else broke")),
        ("Fatal error on SSL protocol", OSError("the handler is closed")),
        ("Task exception was never retrieved", RuntimeError("the handler is closed")),
    ],
)
def test_every_other_error_is_reported_as_asyncio_does(
    caplog: pytest.LogCaptureFixture, message: str, error: BaseException
) -> None:
    loop = eventloop.new_event_loop()
    try:
        caplog.set_level(logging.DEBUG)
        loop.call_exception_handler(_context(message, error))
        reported = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(reported) == 1 and reported[0].startswith(message)
    finally:
        loop.close()
