"""Who may call an endpoint: identities from verified certificates, and caller rules.

Every service listens with mutual TLS: a caller presents a certificate signed by the
cluster CA, and its common name is its identity (certificates are issued by ``tide up``,
see tidemq/tls.py):

    coordinator     the coordinator
    broker-<id>     broker <id>; <id> is a decimal without sign or leading zero
    anything else   a client (``tide up`` issues ``client``; an operator may issue
                    more client certificates under other names)
    no certificate  anonymous: only where a TLS server does not ask for one (the
                    coordinator and brokers always do: the handshake fails without)

Each endpoint declares its callers as data (``Endpoint.callers`` in service/http.py), a
union of grants built with ``|``:

    PUBLIC                     anyone who can connect, certificate or not
                               (monitoring: /healthz, /readyz, /metrics, /openapi.json)
    ANY                        every verified certificate
    ANONYMOUS                  callers without a certificate
    CLIENTS                    client certificates
    BROKERS                    any broker's certificate
    COORDINATOR                the coordinator's certificate
    broker_self(path="x")      broker N's certificate, where N is the request's path
    broker_self(query="x")     parameter, query parameter or JSON body field "x"
    broker_self(body="x")

One middleware (service/http.py) checks the rule before the handler runs and answers
403 ``forbidden`` otherwise. This module is the pure half: no aiohttp, no I/O, so the
rules are tested without a server.

Must always hold: a broker-self grant reads the broker id the same way the handler
does (``_as_int`` mirrors ``http.check_int``: ``int(raw)``, booleans refused), so a
request can never name one broker to the check and another to the handler. A request
whose value cannot be read is refused.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Location = Literal["path", "query", "body"]
LOCATIONS: tuple[Location, ...] = ("path", "query", "body")
_BROKER_NAME = re.compile(r"broker-(0|[1-9][0-9]{0,8})")


class Role(enum.Enum):
    COORDINATOR = "coordinator"
    BROKER = "broker"
    CLIENT = "client"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Identity:
    """Who is calling: a certificate's common name and what it stands for."""

    name: str
    role: Role
    broker_id: int | None = None

    @staticmethod
    def from_common_name(name: str) -> Identity:
        if name == "coordinator":
            return Identity(name, Role.COORDINATOR)
        match = _BROKER_NAME.fullmatch(name)
        if match is not None:
            return Identity(name, Role.BROKER, int(match.group(1)))
        return Identity(name, Role.CLIENT)

    @staticmethod
    def from_peercert(peercert: Mapping[str, Any] | None) -> Identity | None:
        """The identity in ``SSLObject.getpeercert()``'s answer (empty when the caller
        sent no certificate: anonymous); None for a certificate without exactly one
        common name."""
        if not peercert:
            return ANONYMOUS_IDENTITY
        names = [
            value
            for relative_name in peercert.get("subject", ())
            for key, value in relative_name
            if key == "commonName"
        ]
        if len(names) != 1 or not isinstance(names[0], str) or not names[0]:
            return None
        return Identity.from_common_name(names[0])


@dataclass(frozen=True)
class RoleGrant:
    """Any caller whose role is in ``roles``."""

    roles: frozenset[Role]
    label: str

    def allows(self, identity: Identity, values: Mapping[tuple[Location, str], Any]) -> bool:
        return identity.role in self.roles


@dataclass(frozen=True)
class BrokerSelf:
    """Broker N's certificate, where N is the value ``name`` found at ``location``."""

    location: Location
    name: str

    @property
    def label(self) -> str:
        return f"broker-{{{self.location}.{self.name}}}"

    def allows(self, identity: Identity, values: Mapping[tuple[Location, str], Any]) -> bool:
        if identity.role is not Role.BROKER:
            return False
        named = _as_int(values.get((self.location, self.name)))
        return named is not None and named == identity.broker_id


Grant = RoleGrant | BrokerSelf


@dataclass(frozen=True)
class Callers:
    """Who may call one endpoint: a union of grants (``CLIENTS | BROKERS``)."""

    grants: tuple[Grant, ...]

    def __or__(self, other: Callers) -> Callers:
        return Callers(self.grants + tuple(g for g in other.grants if g not in self.grants))

    def labels(self) -> list[str]:
        """For /openapi.json's ``x-callers``: ``any``, ``client``, ``broker``,
        ``coordinator``, ``broker-{path.broker_id}``, ..."""
        return [grant.label for grant in self.grants]

    def broker_self_grants(self) -> list[BrokerSelf]:
        return [grant for grant in self.grants if isinstance(grant, BrokerSelf)]

    def needs_values(self, identity: Identity) -> bool:
        """Must the request's named values be read to decide? Only when a role grant
        does not already decide and the caller is a broker with a broker-self grant."""
        if any(isinstance(g, RoleGrant) and g.allows(identity, {}) for g in self.grants):
            return False
        return identity.role is Role.BROKER and bool(self.broker_self_grants())

    def allows(self, identity: Identity, values: Mapping[tuple[Location, str], Any]) -> bool:
        """``values`` maps (location, name) to the raw value the request carries there,
        for each broker-self grant; a missing entry means the request has none."""
        return any(grant.allows(identity, values) for grant in self.grants)

    def refusal(self, identity: Identity, values: Mapping[tuple[Location, str], Any]) -> str | None:
        """None if ``identity`` may call, else why not (for the 403 message)."""
        if self.allows(identity, values):
            return None
        expected = ", ".join(self.labels()) or "nobody"
        if identity.role is Role.BROKER and self.broker_self_grants():
            named = [
                f"{grant.location} {grant.name}={_shown(values.get((grant.location, grant.name)))}"
                for grant in self.broker_self_grants()
            ]
            return (
                f"certificate {identity.name!r} may not act for the broker this request "
                f"names ({'; '.join(named)}); allowed callers: {expected}"
            )
        return (
            f"certificate {identity.name!r} may not call this endpoint; allowed callers: {expected}"
        )


def broker_self(
    *, path: str | None = None, query: str | None = None, body: str | None = None
) -> Callers:
    """Broker N's certificate only, N read from exactly one place of the request."""
    given = [
        (location, name)
        for location, name in zip(LOCATIONS, (path, query, body), strict=True)
        if name
    ]
    if len(given) != 1:
        raise ValueError("broker_self takes exactly one of path=, query=, body=")
    location, name = given[0]
    return Callers((BrokerSelf(location, name),))


def _shown(raw: Any, chars_max: int = 40) -> str:
    """A request's value for an error message: its repr, cut to ``chars_max``."""
    text = repr(raw)
    return text if len(text) <= chars_max else text[: chars_max - 3] + "..."


def _as_int(raw: Any) -> int | None:
    """``raw`` as the handler's ``check_int`` reads it (``int(raw)``, no booleans, no
    fractions)."""
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, float) and not raw.is_integer():
        return None
    try:
        return int(raw)
    except (TypeError, ValueError, OverflowError):
        return None


ANONYMOUS_IDENTITY = Identity("", Role.ANONYMOUS)
CLIENTS = Callers((RoleGrant(frozenset({Role.CLIENT}), "client"),))
BROKERS = Callers((RoleGrant(frozenset({Role.BROKER}), "broker"),))
COORDINATOR = Callers((RoleGrant(frozenset({Role.COORDINATOR}), "coordinator"),))
ANY = Callers((RoleGrant(frozenset(Role) - {Role.ANONYMOUS}, "any"),))
ANONYMOUS = Callers((RoleGrant(frozenset({Role.ANONYMOUS}), "anonymous"),))
PUBLIC = Callers((RoleGrant(frozenset(Role), "public"),))
