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


M = TypeVar("M", bound=msgspec.Struct)


def decode(body: bytes, kind: type[M]) -> M:
    """JSON bytes -> message; InvalidRequest with the field path on any mismatch."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as error:
        raise InvalidRequest(f"{kind.__name__}: {error}") from error
    except msgspec.DecodeError as error:
        raise InvalidRequest(f"{kind.__name__}: malformed JSON ({error})") from error


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
