"""The proxy's session table: who holds which session, the limits, and idleness.

Pure bookkeeping (no I/O, time passed in as ``now_ms``); the HTTP shell keeps the
Consumer that belongs to each session and closes it when this table says so.

A *session* is one consumer group member that the proxy runs for a client. A
*client* is the peer's IP address (with the cluster's certificates every program
presents the same ``client`` certificate, so the certificate cannot tell them apart).

Invariants:

* at most ``max_sessions`` sessions in total and ``max_sessions_per_client`` per
  client, counting sessions still being opened (``reserve`` happens before the
  Consumer exists, so concurrent creations cannot overshoot);
* a session belongs to the client that created it: ``use`` by another client is
  ``unknown_session``, as if it did not exist (ids are random, never listed);
* a session with an open event stream or a request in progress is never idle; any
  other session whose last use is ``idle_timeout_ms`` or longer ago is ``expired``;
* at most one event stream per session.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidemq.errors import InvalidRequest, SessionBusy, TooManyRequests, UnknownSession


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 64
    max_sessions_per_client: int = 8
    idle_timeout_ms: int = 60_000

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_sessions_per_client", "idle_timeout_ms"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1")


@dataclass
class SessionEntry:
    session_id: str
    client: str
    last_used_ms: int
    requests_in_progress: int = 0
    streaming: bool = False

    def idle_ms(self, now_ms: int) -> int:
        if self.streaming or self.requests_in_progress:
            return 0
        return max(0, now_ms - self.last_used_ms)


class SessionTable:
    def __init__(self, limits: SessionLimits) -> None:
        self.limits = limits
        self._entries: dict[str, SessionEntry] = {}
        self._per_client: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    def ids(self) -> list[str]:
        return list(self._entries)

    def count_for(self, client: str) -> int:
        return self._per_client.get(client, 0)

    def reserve(self, session_id: str, client: str, now_ms: int) -> SessionEntry:
        """Adds a session for ``client``, or raises TooManyRequests (changing nothing)."""
        if session_id in self._entries:
            raise InvalidRequest(f"session {session_id} exists")
        if len(self._entries) >= self.limits.max_sessions:
            raise TooManyRequests(
                f"the proxy holds its maximum of {self.limits.max_sessions} sessions; "
                "close one (DELETE /v1/sessions/{id}) or retry later"
            )
        if self.count_for(client) >= self.limits.max_sessions_per_client:
            raise TooManyRequests(
                f"client {client} holds its maximum of "
                f"{self.limits.max_sessions_per_client} sessions; close one first"
            )
        entry = SessionEntry(session_id, client, now_ms)
        self._entries[session_id] = entry
        self._per_client[client] = self.count_for(client) + 1
        return entry

    def get(self, session_id: str, client: str) -> SessionEntry:
        entry = self._entries.get(session_id)
        if entry is None or entry.client != client:
            raise UnknownSession(
                f"no session {session_id!r} for this client "
                "(never created, deleted, or closed after being idle)"
            )
        return entry

    def touch(self, session_id: str, now_ms: int) -> None:
        entry = self._entries.get(session_id)
        if entry is not None:
            entry.last_used_ms = now_ms

    def begin_request(self, session_id: str, client: str, now_ms: int) -> SessionEntry:
        entry = self.get(session_id, client)
        entry.requests_in_progress += 1
        entry.last_used_ms = now_ms
        return entry

    def end_request(self, session_id: str, now_ms: int) -> None:
        entry = self._entries.get(session_id)
        if entry is not None:
            entry.requests_in_progress = max(0, entry.requests_in_progress - 1)
            entry.last_used_ms = now_ms

    def attach_stream(self, session_id: str, client: str, now_ms: int) -> SessionEntry:
        entry = self.get(session_id, client)
        if entry.streaming:
            raise SessionBusy(f"session {session_id} already has an open event stream")
        entry.streaming = True
        entry.last_used_ms = now_ms
        return entry

    def detach_stream(self, session_id: str, now_ms: int) -> None:
        entry = self._entries.get(session_id)
        if entry is not None:
            entry.streaming = False
            entry.last_used_ms = now_ms

    def remove(self, session_id: str) -> SessionEntry | None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            left = self._per_client[entry.client] - 1
            if left:
                self._per_client[entry.client] = left
            else:
                del self._per_client[entry.client]
        return entry

    def expired(self, now_ms: int) -> list[str]:
        """Sessions idle for ``idle_timeout_ms`` or longer (the caller removes them)."""
        limit = self.limits.idle_timeout_ms
        return [sid for sid, entry in self._entries.items() if entry.idle_ms(now_ms) >= limit]


class RequestSlots:
    """Requests of one kind in flight, bounded per client and in total.

    ``acquire`` raises TooManyRequests (and counts nothing) when either bound is
    reached; every successful ``acquire`` must be paired with one ``release``.
    """

    def __init__(self, what: str, per_client: int, total: int) -> None:
        if per_client < 1 or total < 1:
            raise InvalidRequest(f"{what} limits must be at least 1")
        self.what = what
        self.per_client = per_client
        self.total = total
        self._in_flight = 0
        self._by_client: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def acquire(self, client: str) -> None:
        if self._in_flight >= self.total:
            raise TooManyRequests(f"the proxy has {self.total} {self.what} in flight; retry later")
        mine = self._by_client.get(client, 0)
        if mine >= self.per_client:
            raise TooManyRequests(
                f"client {client} has {self.per_client} {self.what} in flight; "
                "wait for an answer before sending more"
            )
        self._in_flight += 1
        self._by_client[client] = mine + 1

    def release(self, client: str) -> None:
        mine = self._by_client.get(client, 0)
        if mine <= 0:
            return
        self._in_flight -= 1
        if mine == 1:
            del self._by_client[client]
        else:
            self._by_client[client] = mine - 1
