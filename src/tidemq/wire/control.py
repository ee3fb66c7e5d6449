"""Typed control-plane messages between brokers and the coordinator.

Each message is a ``msgspec.Struct``: built and parsed here, in one place, with the
validation (types, ranges, sizes) declared on the fields. :func:`decode` turns a JSON
body into a message or raises :class:`~tidemq.errors.InvalidRequest` naming the
offending field; :func:`encode` gives the JSON bytes; :func:`schema` gives the JSON
Schema that /openapi.json publishes. Unknown fields are ignored (forward compatible);
missing optional fields take their defaults.

Why msgspec: validation, JSON and JSON Schema from one declaration, and it is the
fastest of the well-kept options (docs/ARCHITECTURE.md has the measurement).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec

from tidemq.errors import InvalidRequest

BrokerId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 31) - 1)]
Offset = Annotated[int, msgspec.Meta(ge=0)]
Epoch = Annotated[int, msgspec.Meta(ge=-1)]
PartitionIndex = Annotated[int, msgspec.Meta(ge=0, le=9_999)]
TopicName = Annotated[str, msgspec.Meta(min_length=1, max_length=249)]
Id = Annotated[str, msgspec.Meta(max_length=64)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=2000, pattern=r"^https?://")]
ReplicaList = Annotated[list[BrokerId], msgspec.Meta(max_length=100)]


class BrokerRegistration(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A broker (re)registers: its id, the URL clients should use, and the cluster id
    it joined before ("" on first start)."""

    broker_id: BrokerId
    url: Url
    cluster_id: Id = ""
    # It runs fsync=interval|never and did not shut down cleanly: what it acknowledged
    # may be lost, so it must not lead or count as in sync until it has caught up.
    unclean_weak_fsync: bool = False


class RegistrationAnswer(msgspec.Struct, frozen=True):
    broker_id: BrokerId
    cluster_id: Id
    heartbeat_interval_ms: int
    session_timeout_ms: int


class PartitionReport(msgspec.Struct, frozen=True):
    """What a broker says about one replica it holds, in every heartbeat."""

    topic: TopicName
    partition: PartitionIndex
    leader_epoch: Epoch = -1
    log_start_offset: Offset = 0
    log_end_offset: Offset = 0
    high_watermark: Offset = 0
    topic_id: Id = ""


class BrokerHeartbeat(msgspec.Struct, frozen=True):
    cluster_id: Id = ""
    partitions: Annotated[list[PartitionReport], msgspec.Meta(max_length=1_000_000)] = []


class PartitionAssignment(msgspec.Struct, frozen=True):
    """The coordinator's desired state for one partition replica on one broker."""

    topic: TopicName
    partition: PartitionIndex
    topic_id: Id
    leader_id: BrokerId | None
    leader_url: str | None
    leader_epoch: Epoch
    partition_epoch: Epoch
    replicas: ReplicaList
    isr: ReplicaList
    min_insync_replicas: Annotated[int, msgspec.Meta(ge=1)] = 1


class TopicSummary(msgspec.Struct, frozen=True):
    topic_id: Id
    partitions: int


class HeartbeatAnswer(msgspec.Struct, frozen=True):
    """Level-triggered: the complete desired state for the broker that asked.

    ``deleted_topic_ids`` are the ids of topics deleted explicitly: the only data a
    broker may delete besides replicas the coordinator moved away from it."""

    cluster_id: Id
    assignments: list[PartitionAssignment]
    topics: dict[str, TopicSummary]
    deleted_topic_ids: list[Id]
    heartbeat_interval_ms: int


class AlterIsrRequest(msgspec.Struct, frozen=True):
    """A leader's ISR proposal: applied only if both epochs are still current."""

    topic: TopicName
    partition: PartitionIndex
    topic_id: Id
    leader_epoch: Epoch
    partition_epoch: Epoch
    isr: ReplicaList


class AlterIsrAnswer(msgspec.Struct, frozen=True):
    leader_epoch: Epoch
    partition_epoch: Epoch
    isr: list[int]


# --- client requests to the coordinator ----------------------------------------------
# The bodies clients send, as /openapi.json describes them (the handlers check the same
# rules; tests/integration/test_openapi_contract.py holds both to each other). Fields
# that may be left out but not sent as null are UNSET when absent.

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")]
MemberId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
INT64_MAX = (1 << 63) - 1
Int64 = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]  # offsets and epochs on disk
# A consumer group member epoch a client reports: half of Int64, so that the bumps the
# coordinator adds (adoption after a restart, then one per assignment change) stay in it.
MEMBER_EPOCH_MAX = INT64_MAX // 2
MemberEpoch = Annotated[int, msgspec.Meta(ge=0, le=MEMBER_EPOCH_MAX)]
Factor = Annotated[int, msgspec.Meta(ge=1, le=100)]
# The coordinator's bounds (coordinator/server.py; tests/unit/test_control_schemas.py).
GROUP_SESSION_TIMEOUT_MS_MIN = 100
GROUP_SESSION_TIMEOUT_MS_MAX = 300_000


class CreateTopicRequest(msgspec.Struct, frozen=True):
    name: Name
    partitions: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | msgspec.UnsetType = msgspec.UNSET
    replication_factor: Factor | None = None
    min_insync_replicas: Factor | None = None


class AllocateProducerRequest(msgspec.Struct, frozen=True):
    """An empty object today: room for a transactional id later."""


class GroupPartition(msgspec.Struct, frozen=True):
    topic: Name
    partition: NonNegative


class GroupHeartbeatRequest(msgspec.Struct, frozen=True):
    member_id: MemberId | None = None
    member_epoch: MemberEpoch | msgspec.UnsetType = msgspec.UNSET
    topics: Annotated[list[Name], msgspec.Meta(max_length=10_000)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    owned: Annotated[list[GroupPartition], msgspec.Meta(max_length=1_000_000)] | (
        msgspec.UnsetType
    ) = msgspec.UNSET
    session_timeout_ms: Annotated[
        int, msgspec.Meta(ge=GROUP_SESSION_TIMEOUT_MS_MIN, le=GROUP_SESSION_TIMEOUT_MS_MAX)
    ] | (msgspec.UnsetType) = msgspec.UNSET


class GroupLeaveRequest(msgspec.Struct, frozen=True):
    member_id: MemberId | None


class CommittedOffset(msgspec.Struct, frozen=True):
    topic: Name
    partition: Int64
    offset: Int64


class CommitOffsetsRequest(msgspec.Struct, frozen=True):
    offsets: Annotated[list[CommittedOffset], msgspec.Meta(max_length=1_000_000)]
    member_id: MemberId | None = None
    member_epoch: Int64 | None = None


M = TypeVar("M", bound=msgspec.Struct)


def decode(body: bytes, kind: type[M]) -> M:
    """JSON bytes -> message; InvalidRequest with the field path on any mismatch."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as error:
        # JSON Schema (and so /openapi.json) counts 3.0 as an integer; msgspec does
        # not. No message has a float field, so an integral float means an integer.
        # (The typed decode stops at the first wrong field: the bytes after it may
        # still be malformed, which this second decode then finds.)
        try:
            return msgspec.convert(_integral_floats_as_ints(msgspec.json.decode(body)), kind)
        except msgspec.ValidationError:
            raise InvalidRequest(f"{kind.__name__}: {error}") from error
        except _MALFORMED as malformed:
            raise InvalidRequest(f"{kind.__name__}: malformed JSON ({malformed})") from error
    except _MALFORMED as error:
        raise InvalidRequest(f"{kind.__name__}: malformed JSON ({error})") from error


# What msgspec raises for bytes that are no JSON it reads: DecodeError, and outside
# its own hierarchy RecursionError (deep nesting) and UnicodeDecodeError (bad UTF-8
# in a string or key).
_MALFORMED = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


def check(body: Any, kind: type[M]) -> M:
    """An already parsed JSON body -> message, by the same rules as :func:`decode`
    (for handlers that read the body themselves: their body then is what
    :func:`schema` says)."""
    try:
        return msgspec.convert(_integral_floats_as_ints(body), kind)
    except msgspec.ValidationError as error:
        raise InvalidRequest(f"{kind.__name__}: {error}") from error


def _integral_floats_as_ints(node: Any) -> Any:
    if isinstance(node, float) and node.is_integer():
        return int(node)
    if isinstance(node, dict):
        return {key: _integral_floats_as_ints(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_integral_floats_as_ints(item) for item in node]
    return node


def encode(message: msgspec.Struct) -> bytes:
    return msgspec.json.encode(message)


def to_builtins(message: msgspec.Struct) -> Any:
    return msgspec.to_builtins(message)


def schema(kind: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON Schema of a message with every reference inlined, so it can sit
    anywhere in /openapi.json (the messages are not recursive)."""
    raw: dict[str, Any] = msgspec.json.schema(kind, ref_template="{name}")
    definitions: dict[str, Any] = raw.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    result: dict[str, Any] = inline(raw)
    return result
