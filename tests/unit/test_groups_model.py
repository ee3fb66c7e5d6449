"""The one-owner invariant of tidemq.core.groups, under a hostile network.

A hypothesis state machine drives one group through members joining, heartbeating,
committing, leaving and going silent; a network that delays, reorders, duplicates
and drops every request and answer; time advancing; expiry ticks; and coordinator
restarts that lose all soft state (only the persisted session bound survives).

Members follow the consumer's contract (tidemq.core.groups): they take an answered
assignment at once (revoking first, committing what they revoke with the new epoch),
drop everything when fenced, and stop fetching once their session timeout has passed
since they *sent* their last successfully answered heartbeat; an answer that arrives
after that is ignored. After every step:

* no partition is owned by two members that could still be fetching it;
* a commit the coordinator accepts comes from the only member that may be fetching
  the partition (or from a member that just revoked it and no one fetches it yet);
* no two members' assignments share a partition (the coordinator's own view).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tidemq.core.groups import ConsumerGroup, HeartbeatResult, recover_until_ms
from tidemq.errors import FencedMember, InvalidRequest, StaleMemberEpoch, Unavailable

COUNTS = {"t": 4, "u": 2}
SUBSCRIPTIONS = [("t",), ("t", "u"), ("u",)]
SESSIONS_MS = [300, 500, 1000]
MAX_CLIENTS = 5
MAX_IN_FLIGHT = 12

TopicPartition = tuple[str, int]


@dataclass
class Client:
    """A consumer process, as the coordinator's contract requires it to behave."""

    number: int
    topics: tuple[str, ...]
    session_ms: int
    member_id: str | None = None
    epoch: int = 0
    owned: set[TopicPartition] = field(default_factory=set)  # what it fetches now
    last_success_sent_ms: int | None = None
    outstanding: int | None = None  # the one heartbeat it still waits for
    left: bool = False

    def reset(self) -> None:
        """Fenced or out of session: stop everything, rejoin as a new member."""
        self.owned.clear()
        self.member_id = None
        self.epoch = 0
        self.last_success_sent_ms = None


@dataclass(frozen=True)
class Heartbeat:
    request: int
    client: int
    member_id: str | None
    epoch: int
    topics: tuple[str, ...]
    owned: frozenset[TopicPartition]
    session_ms: int
    sent_ms: int


@dataclass(frozen=True)
class Answer:
    request: int
    client: int
    result: HeartbeatResult | None  # None: fenced
    sent_ms: int


@dataclass(frozen=True)
class Commit:
    client: int
    member_id: str
    epoch: int
    partitions: frozenset[TopicPartition]


@dataclass(frozen=True)
class Leave:
    member_id: str


Message = Heartbeat | Answer | Commit | Leave


class GroupUnderFire(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now_ms = 0
        self.session_bound_ms = 0  # persisted: survives restarts
        self.group = ConsumerGroup("g")
        self.clients: list[Client] = []
        self.network: list[Message] = []
        self.ids = (f"m{n}" for n in itertools.count())
        self.requests = itertools.count()

    # -- clients --------------------------------------------------------------------

    @initialize(
        sessions=st.lists(st.sampled_from(SESSIONS_MS), min_size=2, max_size=3),
        topics=st.sampled_from(SUBSCRIPTIONS),
    )
    def first_clients(self, sessions: list[int], topics: tuple[str, ...]) -> None:
        for session_ms in sessions:
            self.clients.append(Client(len(self.clients), topics, session_ms))

    @rule(topics=st.sampled_from(SUBSCRIPTIONS), session_ms=st.sampled_from(SESSIONS_MS))
    def start_client(self, topics: tuple[str, ...], session_ms: int) -> None:
        if len(self.clients) < MAX_CLIENTS:
            self.clients.append(Client(len(self.clients), topics, session_ms))

    @rule(pick=st.integers(0, MAX_CLIENTS - 1))
    def send_heartbeat(self, pick: int) -> None:
        client = self._client(pick)
        if client is None or len(self.network) >= MAX_IN_FLIGHT:
            return
        request = next(self.requests)
        client.outstanding = request  # an earlier one timed out, as far as it cares
        self.network.append(
            Heartbeat(
                request,
                client.number,
                client.member_id,
                client.epoch,
                client.topics,
                frozenset(client.owned),
                client.session_ms,
                self.now_ms,
            )
        )

    @rule(pick=st.integers(0, MAX_CLIENTS - 1))
    def heartbeat_round_trip(self, pick: int) -> None:
        """The common case: a heartbeat answered at once."""
        self.send_heartbeat(pick)
        if self.network and isinstance(self.network[-1], Heartbeat):
            self.deliver(len(self.network) - 1, duplicate=False)
            if self.network and isinstance(self.network[-1], Answer):
                self.deliver(len(self.network) - 1, duplicate=False)

    @rule(pick=st.integers(0, MAX_CLIENTS - 1))
    def send_commit(self, pick: int) -> None:
        client = self._client(pick)
        if client is None or client.member_id is None or not client.owned:
            return
        if len(self.network) < MAX_IN_FLIGHT:
            self.network.append(
                Commit(client.number, client.member_id, client.epoch, frozenset(client.owned))
            )

    @rule(pick=st.integers(0, MAX_CLIENTS - 1))
    def leave(self, pick: int) -> None:
        client = self._client(pick)
        if client is None:
            return
        client.owned.clear()  # it stops fetching before it says goodbye
        client.left = True
        if client.member_id is not None:
            self.network.append(Leave(client.member_id))

    # -- network --------------------------------------------------------------------

    @rule(pick=st.integers(0, MAX_IN_FLIGHT - 1), duplicate=st.sampled_from([False] * 3 + [True]))
    def deliver(self, pick: int, duplicate: bool) -> None:
        if not self.network:
            return
        message = self.network[pick % len(self.network)]
        if not duplicate or isinstance(message, Answer):
            self.network.remove(message)
        if isinstance(message, Heartbeat):
            self._coordinator_heartbeat(message)
        elif isinstance(message, Answer):
            self._client_answer(message)
        elif isinstance(message, Commit):
            self._coordinator_commit(message)
        else:
            self.group.leave(message.member_id)

    @rule(pick=st.integers(0, MAX_IN_FLIGHT - 1))
    def drop(self, pick: int) -> None:
        if self.network:
            del self.network[pick % len(self.network)]

    # -- time and the coordinator ---------------------------------------------------

    @rule(ms=st.sampled_from([1, 50, 150, 301, 600]))
    def advance(self, ms: int) -> None:
        self.now_ms += ms
        for client in self.clients:
            sent = client.last_success_sent_ms
            if sent is not None and self.now_ms - sent > client.session_ms:
                client.reset()  # its own session ran out: it stops fetching

    @rule()
    def tick(self) -> None:
        self.group.expire(self.now_ms)

    @rule()
    def restart_coordinator(self) -> None:
        self.group = ConsumerGroup(
            "g", recover_until_ms=recover_until_ms(self.now_ms, self.session_bound_ms)
        )
        if any(c.owned for c in self.clients):
            event("restart with owners")

    # -- what the coordinator and the clients do with a message ----------------------

    def _coordinator_heartbeat(self, message: Heartbeat) -> None:
        self.session_bound_ms = max(self.session_bound_ms, message.session_ms)
        try:
            result: HeartbeatResult | None = self.group.heartbeat(
                message.member_id,
                message.epoch,
                message.topics,
                message.owned,
                self.now_ms,
                COUNTS,
                next(self.ids),
                message.session_ms,
            )
        except FencedMember:
            result = None
        except InvalidRequest:  # the group is full
            return
        if len(self.network) < 2 * MAX_IN_FLIGHT:
            self.network.append(Answer(message.request, message.client, result, message.sent_ms))

    def _client_answer(self, answer: Answer) -> None:
        client = self.clients[answer.client]
        if client.left or client.outstanding != answer.request:
            return  # it gave up on this request long ago
        client.outstanding = None
        if self.now_ms - answer.sent_ms > client.session_ms:
            return  # too late: its session is over, whatever the answer says
        if answer.result is None:
            client.reset()
            return
        assignment = set(answer.result.assignment)
        revoked = client.owned - assignment
        client.member_id = answer.result.member_id
        client.epoch = answer.result.member_epoch
        client.last_success_sent_ms = max(client.last_success_sent_ms or 0, answer.sent_ms)
        client.owned = assignment
        if assignment:
            event("client got partitions")
        if revoked:  # the commit on revocation, sent with the new epoch
            self.network.append(
                Commit(client.number, client.member_id, client.epoch, frozenset(revoked))
            )

    def _coordinator_commit(self, commit: Commit) -> None:
        try:
            self.group.validate_commit(
                commit.member_id, commit.epoch, commit.partitions, self.now_ms
            )
        except (FencedMember, StaleMemberEpoch, Unavailable):
            return
        for client in self.clients:
            if client.number != commit.client:
                fetching = client.owned & commit.partitions
                assert not fetching, f"commit accepted while {client} fetches {fetching}"

    def _client(self, pick: int) -> Client | None:
        live = [client for client in self.clients if not client.left]
        return live[pick % len(live)] if live else None

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def one_fetcher_per_partition(self) -> None:
        seen: dict[TopicPartition, int] = {}
        for client in self.clients:
            for tp in client.owned:
                assert tp not in seen, f"{tp} fetched by clients {seen[tp]} and {client.number}"
                seen[tp] = client.number

    @invariant()
    def assignments_are_disjoint(self) -> None:
        assigned: set[TopicPartition] = set()
        for member in self.group.members.values():
            assert not assigned & member.assignment
            assigned |= member.assignment


GroupUnderFire.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_one_owner_under_a_hostile_network = GroupUnderFire.TestCase
