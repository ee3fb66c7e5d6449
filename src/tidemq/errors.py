"""One error tree for every tidemq service and client.

Two kinds of failure (see docs/ARCHITECTURE.md):

* operating errors: subclasses of :class:`TideError`. Each has a stable ``code``
  (what goes on the wire in ``{"error": {"code", "message"}}``), one HTTP status,
  and ``retriable`` (may the same request succeed if sent again later?).
  ``error_for_code`` turns a wire body back into the same type on the client.
* broken invariants: :class:`InvariantViolation`. Never caught; the process stops.
  Raised by :func:`invariant` instead of ``assert`` (which ``python -O`` strips).
"""

from __future__ import annotations

from typing import ClassVar


class TideError(Exception):
    """Base of every operating error."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(TideError):
    code = "invalid_request"
    http_status = 400


class ClusterStateConflict(InvalidRequest):
    """A well-formed request the cluster's current state does not allow: a replication
    factor above the live brokers, draining a broker the replication factors need. It
    may succeed once brokers join or come back (409 Conflict, as RFC 9110 puts it)."""

    code = "cluster_state_conflict"
    http_status = 409


class MalformedJson(InvalidRequest):
    code = "malformed_json"


class CorruptBatch(InvalidRequest):
    """A record batch whose length, magic or CRC does not check."""

    code = "corrupt_batch"


class CorruptRecord(CorruptBatch):
    """Client side: a fetched record that cannot be decoded ("poison"). Names where it
    is; ``consumer.seek(error.topic, error.partition, error.offset + 1)`` skips it, and
    seeking to ``error.next_batch_offset`` skips the rest of its batch."""

    code = "corrupt_record"  # client side only, never on the wire

    def __init__(
        self,
        message: str = "",
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
        next_batch_offset: int = -1,
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.next_batch_offset = next_batch_offset


class RequestTooLarge(TideError):
    code = "request_too_large"
    http_status = 413


class Forbidden(TideError):
    """The caller's certificate may not call this endpoint, or may not act as the
    broker the request names (docs/PROTOCOL.md, "Who may call what")."""

    code = "forbidden"
    http_status = 403


class OffsetOutOfRange(TideError):
    code = "offset_out_of_range"
    http_status = 416


class UnknownTopic(TideError):
    code = "unknown_topic"
    http_status = 404


class UnknownPartition(TideError):
    code = "unknown_partition"
    http_status = 404


class UnknownGroup(TideError):
    code = "unknown_group"
    http_status = 404


class TopicExists(TideError):
    code = "topic_exists"
    http_status = 409


class NotLeader(TideError):
    """This broker does not lead the partition (any more): refresh metadata."""

    code = "not_leader"
    http_status = 421
    retriable = True


class FetchSessionNotHeld(TideError):
    """An incremental replica fetch names a session the leader does not hold (it
    restarted, expired the session, or a newer one replaced it): open a new one."""

    code = "fetch_session_not_held"
    http_status = 409
    retriable = True


class FencedLeaderEpoch(TideError):
    """The request carries an older leader epoch than the broker's."""

    code = "fenced_leader_epoch"
    http_status = 409
    retriable = True


class UnknownLeaderEpoch(TideError):
    """The request carries a newer leader epoch than the broker knows yet."""

    code = "unknown_leader_epoch"
    http_status = 409
    retriable = True


class NotEnoughReplicas(TideError):
    code = "not_enough_replicas"
    http_status = 503
    retriable = True


class StalePartitionEpoch(TideError):
    """An ISR proposal named a partition epoch that is no longer current."""

    code = "stale_partition_epoch"
    http_status = 409
    retriable = False


class ClusterIdMismatch(TideError):
    """A broker that joined another cluster (another coordinator store) asked to join
    this one. It keeps its data and is refused until an operator resolves it."""

    code = "cluster_id_mismatch"
    http_status = 409
    retriable = False


class BrokerBusy(TideError):
    """Admission control: the broker holds its limit of request bytes in memory."""

    code = "broker_busy"
    http_status = 503
    retriable = True


class NoBrokersAvailable(TideError):
    code = "no_brokers_available"
    http_status = 503
    retriable = True


class UnknownBroker(TideError):
    code = "unknown_broker"
    http_status = 404
    retriable = True


class Unavailable(TideError):
    """The service is starting, stopping or overloaded."""

    code = "unavailable"
    http_status = 503
    retriable = True


class RequestTimedOut(TideError):
    code = "request_timed_out"
    http_status = 504
    retriable = True


class ConnectionFailed(TideError):
    """Client side: the transport failed (refused, reset, TLS). Never on the wire."""

    code = "connection_failed"
    http_status = 503
    retriable = True


class OutcomeUnknown(TideError):
    """Client side (``tide proxy`` answers it, 504): the producer gave up on records
    that may have been appended (an attempt's answer was lost or timed out, or a close
    cancelled it, then a resend failed or never came). The last error is
    ``__cause__``. Sending them again may write them twice; an error of any other type
    means they were not written."""

    code = "outcome_unknown"
    http_status = 504


class ClientClosed(TideError):
    code = "client_closed"
    http_status = 400


class InternalError(TideError):
    code = "internal_error"
    http_status = 500
    retriable = True


class FencedMember(TideError):
    """A consumer group member's epoch is stale, or the member is unknown: rejoin
    the group with member_epoch 0. Its commits are rejected meanwhile."""

    code = "fenced_member"
    http_status = 409
    retriable = False


class StaleMemberEpoch(TideError):
    """An offset commit carried an older epoch of a member that is still the only
    holder of every partition it names: a grant moved the member's epoch on while the
    commit was on its way. Resend it with the epoch the member's heartbeat brought; the
    request as sent never succeeds (a late copy must not move an offset backwards)."""

    code = "stale_member_epoch"
    http_status = 409
    retriable = False


class OutOfOrderSequence(TideError):
    """Idempotent produce: the batch's sequence does not follow the producer's last one
    on this partition (a gap, or a batch older than the ones the broker remembers).
    Not retriable as such; a producer with an earlier batch still outstanding resends
    in order (Kafka's rule), otherwise it starts a new producer epoch."""

    code = "out_of_order_sequence"
    http_status = 409
    retriable = False

    def __init__(self, message: str = "", earlier_missing: bool = False) -> None:
        super().__init__(message)
        # Broker side: a batch this one follows may still be on its way (it may fit later).
        self.earlier_missing = earlier_missing


class ProducerFenced(TideError):
    """Idempotent produce: the batch carries an older producer epoch than the broker's."""

    code = "producer_fenced"
    http_status = 409
    retriable = False


class UnknownProducerId(TideError):
    """Idempotent produce: the partition has no state for this producer id and the batch
    does not start at sequence 0 (state evicted or lost, or an earlier batch of a new
    producer is still on its way). The producer resends in order or starts a new epoch."""

    code = "unknown_producer_id"
    http_status = 409
    retriable = False
    earlier_missing = True  # the producer's first batch may still be on its way


class TooManyRequests(TideError):
    """A limit was reached: sessions or requests in flight, per client or in total
    (``tide proxy``). Retry later, or close something first."""

    code = "too_many_requests"
    http_status = 429
    retriable = True


class UnknownSession(TideError):
    """No such ``tide proxy`` session for this client (never created, deleted, or
    expired after being idle): create a new one."""

    code = "unknown_session"
    http_status = 404


class SessionBusy(TideError):
    """The ``tide proxy`` session is already in use by a request that excludes this
    one (a second pull, or an open event stream)."""

    code = "session_busy"
    http_status = 409


class BatchMismatch(TideError):
    """A ``tide proxy`` commit named a batch that is not the session's latest one
    (an older one: committing would also commit records handed out after it)."""

    code = "batch_mismatch"
    http_status = 409


class InvariantViolation(Exception):
    """A broken invariant: a bug. Not a TideError; nothing should catch it."""


def invariant(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)


def _all_subclasses(cls: type[TideError]) -> list[type[TideError]]:
    out: list[type[TideError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def errors_by_code() -> dict[str, type[TideError]]:
    """Every TideError class by its wire code (computed on call, so subclasses
    defined anywhere in this module are included)."""
    classes: list[type[TideError]] = [TideError, *_all_subclasses(TideError)]
    table = {cls.code: cls for cls in classes}
    table["internal_error"] = InternalError
    return table


def error_for_code(code: str, message: str) -> TideError:
    """The client-side exception for an error body received on the wire."""
    cls = errors_by_code().get(code, InternalError)
    return cls(message)


ERRORS_BY_CODE: dict[str, type[TideError]] = errors_by_code()
