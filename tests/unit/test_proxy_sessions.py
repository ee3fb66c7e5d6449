"""tide proxy's session table and request slots: limits, ownership, idleness."""

from __future__ import annotations

import pytest

from tidemq.client.proxy.sessions import RequestSlots, SessionLimits, SessionTable
from tidemq.errors import InvalidRequest, SessionBusy, TooManyRequests, UnknownSession


def test_limits_per_client_and_in_total_change_nothing_when_refused() -> None:
    table = SessionTable(SessionLimits(max_sessions=3, max_sessions_per_client=2))
    table.reserve("a1", "A", 0)
    table.reserve("a2", "A", 0)
    with pytest.raises(TooManyRequests, match="client A"):
        table.reserve("a3", "A", 0)
    assert len(table) == 2 and table.count_for("A") == 2
    table.reserve("b1", "B", 0)
    with pytest.raises(TooManyRequests, match="maximum of 3 sessions"):
        table.reserve("c1", "C", 0)
    assert table.count_for("C") == 0 and "c1" not in table
    table.remove("a1")
    table.reserve("a3", "A", 0)
    assert sorted(table.ids()) == ["a2", "a3", "b1"]


def test_a_session_belongs_to_its_client() -> None:
    table = SessionTable(SessionLimits())
    table.reserve("s", "A", 0)
    assert table.get("s", "A").client == "A"
    with pytest.raises(UnknownSession):
        table.get("s", "B")
    with pytest.raises(UnknownSession):
        table.get("nope", "A")
    with pytest.raises(InvalidRequest):
        table.reserve("s", "A", 0)


def test_idle_sessions_expire_but_busy_and_streaming_ones_do_not() -> None:
    table = SessionTable(SessionLimits(idle_timeout_ms=100))
    for name in ("idle", "busy", "streaming", "touched"):
        table.reserve(name, "A", 0)
    table.begin_request("busy", "A", 10)
    table.attach_stream("streaming", "A", 10)
    table.touch("touched", 60)
    assert table.expired(99) == []
    assert table.expired(100) == ["idle"]
    assert sorted(table.expired(500)) == ["idle", "touched"]
    table.end_request("busy", 450)
    table.detach_stream("streaming", 460)
    assert sorted(table.expired(549)) == ["idle", "touched"]
    assert sorted(table.expired(560)) == ["busy", "idle", "streaming", "touched"]


def test_one_event_stream_per_session() -> None:
    table = SessionTable(SessionLimits())
    table.reserve("s", "A", 0)
    table.attach_stream("s", "A", 0)
    with pytest.raises(SessionBusy):
        table.attach_stream("s", "A", 0)
    table.detach_stream("s", 1)
    table.attach_stream("s", "A", 2)


def test_request_slots() -> None:
    slots = RequestSlots("pushes", per_client=2, total=3)
    slots.acquire("A")
    slots.acquire("A")
    with pytest.raises(TooManyRequests, match="client A"):
        slots.acquire("A")
    slots.acquire("B")
    with pytest.raises(TooManyRequests, match="3 pushes in flight"):
        slots.acquire("C")
    assert slots.in_flight == 3
    slots.release("A")
    slots.acquire("C")
    slots.release("nobody")
    assert slots.in_flight == 3
    with pytest.raises(InvalidRequest):
        RequestSlots("x", 0, 1)
