"""Caller rules as data (service/callers.py): identities from certificate names, the
broker-self rule on a dummy endpoint's path and query parameters, the endpoint table's
validation and the OpenAPI ``x-callers``. Pure: no server, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from tidemq.errors import InvalidRequest
from tidemq.service.callers import (
    ANONYMOUS,
    ANONYMOUS_IDENTITY,
    ANY,
    BROKERS,
    CLIENTS,
    COORDINATOR,
    PUBLIC,
    Identity,
    Role,
    _as_int,
    broker_self,
)
from tidemq.service.http import Endpoint, check_int, openapi_document

BROKER_1 = Identity.from_common_name("broker-1")
BROKER_2 = Identity.from_common_name("broker-2")
CLIENT = Identity.from_common_name("client")
COORDINATOR_ID = Identity.from_common_name("coordinator")


async def _handler(_: web.Request) -> web.Response:
    return web.Response()


def test_identities_from_common_names() -> None:
    assert Identity("broker-1", Role.BROKER, 1) == BROKER_1
    assert Identity.from_common_name("broker-0").broker_id == 0
    assert Identity.from_common_name("broker-123456789").broker_id == 123456789
    assert COORDINATOR_ID.role is Role.COORDINATOR
    for name in ("client", "broker-01", "broker-", "broker-x", "broker--1", "Broker-1", "app"):
        identity = Identity.from_common_name(name)
        assert (identity.role, identity.broker_id) == (Role.CLIENT, None), name


def test_identity_from_peercert() -> None:
    subject = ((("organizationName", "tidemq cluster"),), (("commonName", "broker-2"),))
    assert Identity.from_peercert({"subject": subject}) == BROKER_2
    assert Identity.from_peercert(None) == Identity("", Role.ANONYMOUS)  # no certificate
    assert Identity.from_peercert({}) == Identity("", Role.ANONYMOUS)
    assert Identity.from_peercert({"subject": ((("organizationName", "x"),),)}) is None
    two = ((("commonName", "client"),), (("commonName", "broker-1"),))
    assert Identity.from_peercert({"subject": two}) is None


def test_broker_self_on_a_dummy_endpoint_with_path_and_query_parameters() -> None:
    by_path = Endpoint(
        "POST",
        "/v1/brokers/{broker_id}/alter-isr",
        _handler,
        "dummy",
        callers=broker_self(path="broker_id"),
    )
    by_query = Endpoint(
        "GET",
        "/v1/replica/{topic}/{partition}/records",
        _handler,
        "dummy",
        callers=broker_self(query="broker_id"),
    )
    for endpoint, location in ((by_path, "path"), (by_query, "query")):
        rule = endpoint.callers
        assert rule.allows(BROKER_1, {(location, "broker_id"): "1"})
        assert rule.allows(BROKER_2, {(location, "broker_id"): "2"})
        assert not rule.allows(BROKER_2, {(location, "broker_id"): "1"})
        assert not rule.allows(BROKER_1, {})  # the request names no broker
        assert not rule.allows(BROKER_1, {(location, "broker_id"): "one"})
        other = "query" if location == "path" else "path"
        assert not rule.allows(BROKER_1, {(other, "broker_id"): "1"})  # wrong place
        for identity in (CLIENT, COORDINATOR_ID, ANONYMOUS_IDENTITY):
            assert not rule.allows(identity, {(location, "broker_id"): "1"})
            assert not rule.needs_values(identity)
        assert rule.needs_values(BROKER_1)
        refusal = rule.refusal(BROKER_2, {(location, "broker_id"): "1"})
        assert refusal is not None and "'broker-2'" in refusal
        assert rule.refusal(BROKER_1, {(location, "broker_id"): "1"}) is None
        long_refusal = rule.refusal(BROKER_1, {(location, "broker_id"): "9" * 10_000})
        assert long_refusal is not None and len(long_refusal) < 300


def test_role_grants_and_unions() -> None:
    assert CLIENTS.allows(CLIENT, {}) and not CLIENTS.allows(BROKER_1, {})
    assert BROKERS.allows(BROKER_2, {}) and not BROKERS.allows(CLIENT, {})
    assert COORDINATOR.allows(COORDINATOR_ID, {}) and not COORDINATOR.allows(BROKER_1, {})
    assert all(ANY.allows(identity, {}) for identity in (CLIENT, BROKER_1, COORDINATOR_ID))
    assert not ANY.allows(ANONYMOUS_IDENTITY, {})
    assert PUBLIC.allows(ANONYMOUS_IDENTITY, {}) and PUBLIC.allows(BROKER_1, {})
    assert ANONYMOUS.allows(ANONYMOUS_IDENTITY, {}) and not ANONYMOUS.allows(CLIENT, {})
    for rule in (CLIENTS, BROKERS, COORDINATOR, broker_self(query="broker_id")):
        assert not rule.allows(ANONYMOUS_IDENTITY, {("query", "broker_id"): "1"})
    union = CLIENTS | broker_self(query="broker_id")
    assert union.labels() == ["client", "broker-{query.broker_id}"]
    assert union.allows(CLIENT, {}) and not union.needs_values(CLIENT)
    assert union.allows(BROKER_1, {("query", "broker_id"): "1"})
    assert not union.allows(BROKER_1, {("query", "broker_id"): "2"})
    assert not (BROKERS | broker_self(path="b")).needs_values(BROKER_1)  # decided by role
    assert (CLIENTS | CLIENTS).labels() == ["client"]


def test_rules_are_checked_when_the_table_is_built() -> None:
    with pytest.raises(ValueError, match="names no path part"):
        Endpoint("GET", "/v1/replica/records", _handler, "x", callers=broker_self(path="id"))
    with pytest.raises(ValueError, match="exactly one"):
        broker_self()
    with pytest.raises(ValueError, match="exactly one"):
        broker_self(path="broker_id", query="broker_id")
    with pytest.raises(TypeError):
        Endpoint("GET", "/v1/x", _handler, "no callers")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "raw", ["1", " 2 ", "+3", "04", "1_0", "x", "", "1.5", 1, 2.9, True, False, None, [1], {}]
)
def test_the_rule_reads_a_broker_id_as_the_handler_does(raw: Any) -> None:
    try:
        expected: int | None = check_int(raw, "broker_id")
    except InvalidRequest:
        expected = None
    if raw is None:
        expected = None  # absent: nothing is named
    assert _as_int(raw) == expected


def test_openapi_lists_callers_and_403() -> None:
    endpoints = [
        Endpoint("GET", "/healthz", _handler, "alive", callers=PUBLIC),
        Endpoint("POST", "/v1/b/{broker_id}", _handler, "b", callers=broker_self(path="broker_id")),
    ]
    paths = openapi_document("t", endpoints)["paths"]
    assert paths["/healthz"]["get"]["x-callers"] == ["public"]
    assert "403" not in paths["/healthz"]["get"]["responses"]
    operation = paths["/v1/b/{broker_id}"]["post"]
    assert operation["x-callers"] == ["broker-{path.broker_id}"]
    assert operation["responses"]["403"] == {"description": "forbidden"}
    assert operation["parameters"][0]["name"] == "broker_id"
