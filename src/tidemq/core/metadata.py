"""The coordinator's durable state as a deterministic state machine.

Owns: the cluster id, registered brokers and their URLs, topics with their partitions
(replicas, leader, leader epoch, ISR), committed consumer offsets and the producer id
counter. It changes only by :meth:`ClusterState.apply` of a command: a small frozen
dataclass that round-trips through JSON (:func:`command_to_json` /
:func:`command_from_json`), so a log (SQLite today, Raft later) can replicate it.

Must always hold:

* ``apply`` is deterministic: no clock, no randomness, no I/O. Ids and times come in
  the command. Replaying the same commands on the same snapshot gives the same state.
* ``check(command)`` raises a :class:`TideError` for a command that must not be
  applied and changes nothing; the shell calls it before persisting, so every
  persisted command applies cleanly (a failure on replay is an InvariantViolation).
* per partition: replicas are distinct registered brokers; the ISR is a subset of the
  replicas; the leader, when there is one, is in the ISR; the leader epoch only grows,
  by one at every ChangeLeader; the partition epoch grows by one at every change of
  leader, ISR or replicas, so a leader's ISR proposal (AlterIsr) can be applied as a
  compare-and-set on both epochs.
* every topic incarnation has its own ``topic_id``; deleting a topic remembers its id
  (``deleted_topic_ids``, the newest DELETED_TOPIC_IDS_MAX), which is what allows a
  broker to delete that topic's data; a topic created again under a deleted name
  starts its leader epochs above every epoch of the old incarnation
  (``recreated_epochs``), so a broker still holding the old log refuses the new
  topic's produce and fetch requests (unknown_leader_epoch) until it learns.
* an offline partition (leader None) keeps its last ISR, so only a replica that was in
  sync may lead it again (no unclean election).
* a partition being moved (a :class:`Reassignment`, core/rebalance.py plans them) holds
  original + adding replicas; it shrinks to its target only when every target replica
  is in the ISR and the leader is one of them, or back to its original (cancel) only
  while the leader is an original replica: a move never drops the last in-sync copy.
* at most MAX_TOPICS topics of at most MAX_PARTITIONS_PER_TOPIC partitions, and
  MAX_BROKERS brokers: the shell refuses a command past them (``check_bounds``, outside
  ``check`` for the same reason as the group bound below).
* at most MAX_GROUPS consumer groups are remembered (committed offsets or a session
  bound): the shell refuses a command that would add one more (``check_group_room``,
  a policy outside ``check`` so that replay never fails on it); DeleteGroup forgets
  one.
* draining brokers receive no new replica; at least max(replication factor) brokers
  stay undrained.

Soft state that is *not* persisted lives in :class:`Liveness`: broker sessions and
what brokers report about their partitions. It is rebuilt from heartbeats after a
restart (every registered broker gets a fresh session).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from tidemq.core.placement import elect_leader
from tidemq.errors import (
    ClusterStateConflict,
    InvalidRequest,
    InvariantViolation,
    NotLeader,
    StalePartitionEpoch,
    TopicExists,
    UnknownBroker,
    UnknownPartition,
    UnknownTopic,
)

MAX_TOPICS = 10_000
MAX_BROKERS = 10_000
MAX_PARTITIONS_PER_TOPIC = 10_000
# Consumer groups the state remembers (committed offsets or a session bound): a group
# new to the state past this is refused until an unused one is deleted (DeleteGroup).
MAX_GROUPS = 10_000
DELETED_TOPIC_IDS_MAX = 10_000
SNAPSHOT_VERSION = 1

TopicPartition = tuple[str, int]


# --- commands -------------------------------------------------------------------


@dataclass(frozen=True)
class InitCluster:
    cluster_id: str


@dataclass(frozen=True)
class RegisterBroker:
    broker_id: int
    url: str


@dataclass(frozen=True)
class CreateTopic:
    name: str
    partitions: int
    replication_factor: int
    assignments: tuple[tuple[int, ...], ...]  # replicas per partition, leader first
    topic_id: str = ""
    min_insync_replicas: int = 1


@dataclass(frozen=True)
class DeleteTopic:
    name: str


@dataclass(frozen=True)
class ChangeLeader:
    """A new leader (or None: offline) and ISR; bumps the leader epoch.

    ``expected_leader_epoch`` (when >= 0) makes it a compare-and-set: it applies only
    to the epoch it was planned from, so a plan made from an older state (a
    re-election racing a failover) fails instead of undoing what came between."""

    topic: str
    partition: int
    leader_id: int | None
    isr: tuple[int, ...]
    expected_leader_epoch: int = -1


@dataclass(frozen=True)
class ChangeIsr:
    """Shrinks or expands the ISR under the same leader and leader epoch."""

    topic: str
    partition: int
    isr: tuple[int, ...]


@dataclass(frozen=True)
class AlterIsr:
    """A leader's ISR proposal (Kafka's AlterPartition): applied only if the proposer
    still leads in ``leader_epoch`` and nothing changed since ``partition_epoch``."""

    topic: str
    partition: int
    broker_id: int
    leader_epoch: int
    partition_epoch: int
    isr: tuple[int, ...]


@dataclass(frozen=True)
class SetBrokerDraining:
    """Marks a broker as draining (scale-in: move everything off it) or not."""

    broker_id: int
    draining: bool


@dataclass(frozen=True)
class ReassignReplicas:
    """Starts moving a partition to ``replicas`` (its target, as many as now): the
    missing ones are added (replicas = original + adding); leader and ISR unchanged."""

    topic: str
    partition: int
    replicas: tuple[int, ...]


@dataclass(frozen=True)
class CompleteReassignment:
    """Drops the replicas a move removes: replicas = target, ISR = ISR & target."""

    topic: str
    partition: int


@dataclass(frozen=True)
class CancelReassignment:
    """Abandons a move: replicas = original, ISR = ISR & original."""

    topic: str
    partition: int


@dataclass(frozen=True)
class CommitOffsets:
    group: str
    offsets: tuple[tuple[str, int, int], ...]  # (topic, partition, next offset)


@dataclass(frozen=True)
class AllocateProducerId:
    pass


@dataclass(frozen=True)
class RecordGroupSession:
    """Raises the largest session timeout a group's members may use (it never
    shrinks): after a restart the coordinator waits that long before moving any of
    the group's partitions (see tidemq.core.groups)."""

    group: str
    session_timeout_ms: int


@dataclass(frozen=True)
class DeleteGroup:
    """Forgets a group's committed offsets and session bound. The shell sends it only
    for a group with no member, live or possibly left from before a restart, and
    answers 404 for a group the state does not remember; the command itself never
    fails (a snapshot may not have held what the live state did)."""

    group: str


Command = (
    InitCluster
    | RegisterBroker
    | CreateTopic
    | DeleteTopic
    | ChangeLeader
    | ChangeIsr
    | AlterIsr
    | CommitOffsets
    | AllocateProducerId
    | SetBrokerDraining
    | ReassignReplicas
    | CompleteReassignment
    | CancelReassignment
    | RecordGroupSession
    | DeleteGroup
)
_COMMAND_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        InitCluster,
        RegisterBroker,
        CreateTopic,
        DeleteTopic,
        ChangeLeader,
        ChangeIsr,
        AlterIsr,
        CommitOffsets,
        AllocateProducerId,
        SetBrokerDraining,
        ReassignReplicas,
        CompleteReassignment,
        CancelReassignment,
        RecordGroupSession,
        DeleteGroup,
    )
}


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(item) for item in value)
    return value


def command_to_json(command: Command) -> dict[str, Any]:
    return {"type": type(command).__name__, **dataclasses.asdict(command)}


def command_from_json(data: dict[str, Any]) -> Command:
    cls = _COMMAND_TYPES.get(str(data.get("type")))
    if cls is None:
        raise ValueError(f"unknown command type {data.get('type')!r}")
    # Fields added later have defaults: commands persisted before them still load.
    names = [f.name for f in dataclasses.fields(cls) if f.name in data or _required(f)]
    command: Command = cls(**{name: _to_tuples(data[name]) for name in names})
    return command


def _required(field_: dataclasses.Field[Any]) -> bool:
    return field_.default is dataclasses.MISSING and field_.default_factory is dataclasses.MISSING


# --- state ----------------------------------------------------------------------


@dataclass
class PartitionState:
    replicas: list[int]
    leader_id: int | None
    leader_epoch: int
    isr: list[int]
    partition_epoch: int = 0


@dataclass(frozen=True)
class Reassignment:
    """A partition move in progress: from ``original`` to ``target`` replicas."""

    original: tuple[int, ...]
    target: tuple[int, ...]

    @property
    def adding(self) -> tuple[int, ...]:
        return tuple(b for b in self.target if b not in self.original)

    @property
    def removing(self) -> tuple[int, ...]:
        return tuple(b for b in self.original if b not in self.target)


def min_insync_replicas(topic: TopicState) -> int:
    return topic.min_insync_replicas


@dataclass
class TopicState:
    name: str
    replication_factor: int
    partitions: list[PartitionState]
    topic_id: str = ""
    min_insync_replicas: int = 1


@dataclass
class ClusterState:
    cluster_id: str = ""
    brokers: dict[int, str] = field(default_factory=dict)  # broker id -> url
    topics: dict[str, TopicState] = field(default_factory=dict)
    offsets: dict[str, dict[TopicPartition, int]] = field(default_factory=dict)
    next_producer_id: int = 0
    deleted_topic_ids: list[str] = field(default_factory=list)
    # Per name of a deleted topic: the leader epoch a topic created again under that
    # name starts at (above every epoch of the old incarnation), the newest
    # DELETED_TOPIC_IDS_MAX names. Produce and fetch requests name a partition by topic
    # name and leader epoch: a broker that has not yet learned of the deletion would
    # otherwise take requests for the new topic's epoch 0 for its old log's epoch 0.
    recreated_epochs: dict[str, int] = field(default_factory=dict)
    # The largest first epoch of the names ``recreated_epochs`` no longer holds: every
    # topic created since starts at least there (it may carry a forgotten name).
    forgotten_epochs_floor: int = 0
    draining: set[int] = field(default_factory=set)
    reassignments: dict[TopicPartition, Reassignment] = field(default_factory=dict)
    group_session_ms: dict[str, int] = field(default_factory=dict)  # RecordGroupSession

    # -- reading --

    def topic(self, name: str) -> TopicState:
        topic = self.topics.get(name)
        if topic is None:
            raise UnknownTopic(f"no topic {name!r}")
        return topic

    def partition(self, topic: str, partition: int) -> PartitionState:
        state = self.topic(topic)
        if not 0 <= partition < len(state.partitions):
            raise UnknownPartition(f"topic {topic!r} has no partition {partition}")
        return state.partitions[partition]

    def replica_load(self) -> tuple[dict[int, int], dict[int, int]]:
        """(replicas per broker, leaders per broker) over every topic."""
        replicas: dict[int, int] = {}
        leaders: dict[int, int] = {}
        for topic in self.topics.values():
            for partition in topic.partitions:
                for broker in partition.replicas:
                    replicas[broker] = replicas.get(broker, 0) + 1
                if partition.leader_id is not None:
                    leaders[partition.leader_id] = leaders.get(partition.leader_id, 0) + 1
        return replicas, leaders

    # -- changing --

    def check(self, command: Command) -> None:
        """Raises the TideError that ``apply`` would; changes nothing."""
        checker = _CHECKS.get(type(command))
        if checker is not None:
            checker(self, command)

    def apply(self, command: Command) -> Any:
        """Checks then applies one command. Returns the command's result, if any."""
        self.check(command)
        return _APPLIES[type(command)](self, command)

    # -- snapshots --

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "version": SNAPSHOT_VERSION,
            "cluster_id": self.cluster_id,
            "brokers": [{"broker_id": b, "url": u} for b, u in sorted(self.brokers.items())],
            "topics": [_topic_to_json(t) for _, t in sorted(self.topics.items())],
            "offsets": [
                {"group": group, "topic": topic, "partition": partition, "offset": offset}
                for group, committed in sorted(self.offsets.items())
                for (topic, partition), offset in sorted(committed.items())
            ],
            "next_producer_id": self.next_producer_id,
            "deleted_topic_ids": list(self.deleted_topic_ids),
            "recreated_epochs": dict(self.recreated_epochs),
            "forgotten_epochs_floor": self.forgotten_epochs_floor,
            "draining": sorted(self.draining),
            "reassignments": [
                {"topic": t, "partition": p, "original": list(m.original), "target": list(m.target)}
                for (t, p), m in sorted(self.reassignments.items())
            ],
            "group_sessions": [
                {"group": group, "session_timeout_ms": timeout}
                for group, timeout in sorted(self.group_session_ms.items())
            ],
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> ClusterState:
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {data.get('version')!r}")
        state = cls(cluster_id=data["cluster_id"], next_producer_id=data["next_producer_id"])
        state.brokers = {int(b["broker_id"]): str(b["url"]) for b in data["brokers"]}
        for topic in data["topics"]:
            state.topics[topic["name"]] = _topic_from_json(topic)
        for row in data["offsets"]:
            group = state.offsets.setdefault(row["group"], {})
            group[(row["topic"], int(row["partition"]))] = int(row["offset"])
        state.deleted_topic_ids = [str(i) for i in data.get("deleted_topic_ids", [])]
        state.recreated_epochs = {
            str(name): int(epoch) for name, epoch in data.get("recreated_epochs", {}).items()
        }
        state.forgotten_epochs_floor = int(data.get("forgotten_epochs_floor", 0))
        state.draining = {int(b) for b in data.get("draining", [])}
        for row in data.get("reassignments", []):
            key = (str(row["topic"]), int(row["partition"]))
            state.reassignments[key] = Reassignment(
                tuple(int(b) for b in row["original"]), tuple(int(b) for b in row["target"])
            )
        for row in data.get("group_sessions", []):  # absent in older snapshots
            state.group_session_ms[str(row["group"])] = int(row["session_timeout_ms"])
        return state


def _topic_to_json(topic: TopicState) -> dict[str, Any]:
    return {
        "name": topic.name,
        "topic_id": topic.topic_id,
        "replication_factor": topic.replication_factor,
        "min_insync_replicas": topic.min_insync_replicas,
        "partitions": [dataclasses.asdict(p) for p in topic.partitions],
    }


def _topic_from_json(data: dict[str, Any]) -> TopicState:
    partitions = [
        PartitionState(
            replicas=list(p["replicas"]),
            leader_id=p["leader_id"],
            leader_epoch=int(p["leader_epoch"]),
            isr=list(p["isr"]),
            partition_epoch=int(p.get("partition_epoch", 0)),
        )
        for p in data["partitions"]
    ]
    return TopicState(
        data["name"],
        int(data["replication_factor"]),
        partitions,
        str(data.get("topic_id", "")),
        int(data.get("min_insync_replicas", 1)),
    )


# --- checks (raise, never mutate) -------------------------------------------------


def _check_register(state: ClusterState, command: RegisterBroker) -> None:
    if command.broker_id < 0 or not command.url:
        raise InvalidRequest("a broker needs an id >= 0 and a url")


def _check_create(state: ClusterState, command: CreateTopic) -> None:
    if command.name in state.topics:
        raise TopicExists(f"topic {command.name!r} exists")
    if command.partitions < 1:  # the upper bound is policy: check_bounds
        raise InvalidRequest("a topic needs at least 1 partition")
    if len(command.assignments) != command.partitions:
        raise InvalidRequest("one replica list per partition is required")
    for replicas in command.assignments:
        if len(replicas) != command.replication_factor or len(set(replicas)) != len(replicas):
            raise InvalidRequest(f"replicas {list(replicas)} are not distinct or miscounted")
        if any(broker not in state.brokers for broker in replicas):
            raise InvalidRequest(f"replicas {list(replicas)} name an unregistered broker")
    if not 1 <= command.min_insync_replicas <= command.replication_factor:
        raise InvalidRequest(
            f"min_insync_replicas must be 1 to the replication factor "
            f"({command.replication_factor}), got {command.min_insync_replicas}"
        )


def _check_delete(state: ClusterState, command: DeleteTopic) -> None:
    state.topic(command.name)


def _check_isr(partition: PartitionState, leader_id: int | None, isr: tuple[int, ...]) -> None:
    if len(set(isr)) != len(isr) or any(b not in partition.replicas for b in isr):
        raise InvalidRequest(f"isr {list(isr)} is not a set of replicas {partition.replicas}")
    if leader_id is not None and leader_id not in isr:
        raise InvalidRequest(f"leader {leader_id} is not in isr {list(isr)}")


def _check_change_leader(state: ClusterState, command: ChangeLeader) -> None:
    partition = state.partition(command.topic, command.partition)
    expected = command.expected_leader_epoch
    if expected >= 0 and partition.leader_epoch != expected:
        raise StalePartitionEpoch(
            f"{command.topic}/{command.partition}: planned from leader epoch {expected}, "
            f"now {partition.leader_epoch}"
        )
    _check_isr(partition, command.leader_id, command.isr)


def _check_change_isr(state: ClusterState, command: ChangeIsr) -> None:
    partition = state.partition(command.topic, command.partition)
    _check_isr(partition, partition.leader_id, command.isr)


def _check_alter_isr(state: ClusterState, command: AlterIsr) -> None:
    partition = state.partition(command.topic, command.partition)
    if partition.leader_id != command.broker_id or partition.leader_epoch != command.leader_epoch:
        raise NotLeader(
            f"{command.topic}/{command.partition}: broker {command.broker_id} does not lead "
            f"in epoch {command.leader_epoch} (leader {partition.leader_id}, "
            f"epoch {partition.leader_epoch})"
        )
    if partition.partition_epoch != command.partition_epoch:
        raise StalePartitionEpoch(
            f"{command.topic}/{command.partition}: partition epoch {command.partition_epoch} "
            f"!= current {partition.partition_epoch}"
        )
    _check_isr(partition, partition.leader_id, command.isr)


def _check_draining(state: ClusterState, command: SetBrokerDraining) -> None:
    if command.broker_id not in state.brokers:
        raise UnknownBroker(f"broker {command.broker_id} is not registered")
    if not command.draining:
        return
    staying = set(state.brokers) - state.draining - {command.broker_id}
    needed = max((t.replication_factor for t in state.topics.values()), default=1)
    if len(staying) < needed:
        raise ClusterStateConflict(
            f"draining broker {command.broker_id} would leave {len(staying)} brokers "
            f"for a replication factor of {needed}"
        )


def _check_reassign(state: ClusterState, command: ReassignReplicas) -> None:
    partition = state.partition(command.topic, command.partition)
    if (command.topic, command.partition) in state.reassignments:
        raise InvalidRequest(f"{command.topic}/{command.partition} is already being moved")
    target = command.replicas
    if len(set(target)) != len(target) or len(target) != len(partition.replicas):
        raise InvalidRequest(
            f"target {list(target)} must be {len(partition.replicas)} distinct brokers"
        )
    if set(target) == set(partition.replicas):
        raise InvalidRequest(f"{command.topic}/{command.partition} is already on {list(target)}")
    for broker in target:
        if broker not in state.brokers:
            raise InvalidRequest(f"target {list(target)} names an unregistered broker")
        if broker in state.draining and broker not in partition.replicas:
            raise InvalidRequest(f"broker {broker} is draining: no new replica goes there")
    if partition.leader_id is None:
        raise InvalidRequest(f"{command.topic}/{command.partition} is offline: not moved")


def _moving(state: ClusterState, topic: str, index: int) -> Reassignment:
    state.partition(topic, index)
    move = state.reassignments.get((topic, index))
    if move is None:
        raise InvalidRequest(f"{topic}/{index} is not being moved")
    return move


def _check_shrink(state: ClusterState, topic: str, index: int, keep: tuple[int, ...]) -> None:
    """Dropping every replica outside ``keep`` must keep the leader and an ISR that is
    not empty and, where it shrinks, not below min_insync_replicas."""
    partition = state.partition(topic, index)
    if partition.leader_id is None or partition.leader_id not in keep:
        raise InvalidRequest(
            f"{topic}/{index}: leader {partition.leader_id} would not be among {list(keep)}"
        )
    kept_isr = [b for b in partition.isr if b in keep]
    floor = min(min_insync_replicas(state.topic(topic)), len(partition.isr))
    if not kept_isr or len(kept_isr) < floor:
        raise InvalidRequest(
            f"{topic}/{index}: dropping to {list(keep)} would leave isr {kept_isr}"
        )


def _check_complete(state: ClusterState, command: CompleteReassignment) -> None:
    move = _moving(state, command.topic, command.partition)
    isr = state.partition(command.topic, command.partition).isr
    lagging = [b for b in move.target if b not in isr]
    if lagging:
        raise InvalidRequest(
            f"{command.topic}/{command.partition}: target replicas {lagging} are not in sync"
        )
    _check_shrink(state, command.topic, command.partition, move.target)


def _check_cancel(state: ClusterState, command: CancelReassignment) -> None:
    move = _moving(state, command.topic, command.partition)
    _check_shrink(state, command.topic, command.partition, move.original)


def _check_commit(state: ClusterState, command: CommitOffsets) -> None:
    for topic, partition, offset in command.offsets:
        state.partition(topic, partition)
        if offset < 0:
            raise InvalidRequest(f"offset must be >= 0, got {offset}")


def _check_group_session(state: ClusterState, command: RecordGroupSession) -> None:
    if command.session_timeout_ms <= state.group_session_ms.get(command.group, 0):
        raise InvalidRequest("a group's session bound only grows")


def check_bounds(state: ClusterState, commands: Iterable[Command]) -> None:
    """Raises InvalidRequest unless the topics and brokers ``commands`` add fit within
    MAX_TOPICS and MAX_BROKERS, and each new topic within MAX_PARTITIONS_PER_TOPIC.
    Like ``check_group_room``, a policy the shell applies before it persists commands,
    not a rule of ``check``: a persisted command must apply on replay whatever the
    bounds are then (a later version may lower them), and the commands of one batch
    are counted together."""
    new_topics: set[str] = set()
    new_brokers: set[int] = set()
    for command in commands:
        if isinstance(command, CreateTopic):
            if command.partitions > MAX_PARTITIONS_PER_TOPIC:
                raise InvalidRequest(f"partitions must be 1 to {MAX_PARTITIONS_PER_TOPIC}")
            if command.name not in state.topics:
                new_topics.add(command.name)
        elif isinstance(command, RegisterBroker) and command.broker_id not in state.brokers:
            new_brokers.add(command.broker_id)
    if new_topics and len(state.topics) + len(new_topics) > MAX_TOPICS:
        raise InvalidRequest(f"the cluster holds the maximum of {MAX_TOPICS} topics")
    if new_brokers and len(state.brokers) + len(new_brokers) > MAX_BROKERS:
        raise InvalidRequest(f"the cluster holds the maximum of {MAX_BROKERS} brokers")


def remembers_group(state: ClusterState, group: str) -> bool:
    return group in state.offsets or group in state.group_session_ms


def check_group_room(state: ClusterState, new_groups: Collection[str]) -> None:
    """Raises ClusterStateConflict unless the state can remember ``new_groups`` (names
    it does not remember yet) within MAX_GROUPS. A policy the shell applies before it
    persists a command, deliberately not a rule of ``check``: a persisted command must
    apply on replay whatever the bound is then, and commands persisted together are
    each checked against the state before them (the shell counts the batch's new
    groups itself)."""
    if not new_groups:
        return
    remembered = len(state.offsets.keys() | state.group_session_ms.keys())
    if remembered + len(new_groups) > MAX_GROUPS:
        raise ClusterStateConflict(
            f"the cluster already remembers {remembered} consumer groups (committed "
            f"offsets or sessions), at most {MAX_GROUPS}: delete unused ones "
            f"(tide groups delete NAME) first"
        )


_CHECKS: dict[type[Any], Any] = {
    RegisterBroker: _check_register,
    CreateTopic: _check_create,
    DeleteTopic: _check_delete,
    ChangeLeader: _check_change_leader,
    ChangeIsr: _check_change_isr,
    AlterIsr: _check_alter_isr,
    CommitOffsets: _check_commit,
    SetBrokerDraining: _check_draining,
    ReassignReplicas: _check_reassign,
    CompleteReassignment: _check_complete,
    CancelReassignment: _check_cancel,
    RecordGroupSession: _check_group_session,
}


# --- applies (mutate; checks already passed) -------------------------------------


def _apply_init(state: ClusterState, command: InitCluster) -> None:
    if state.cluster_id and state.cluster_id != command.cluster_id:
        raise InvariantViolation("the cluster id never changes once set")
    state.cluster_id = command.cluster_id


def _apply_register(state: ClusterState, command: RegisterBroker) -> None:
    state.brokers[command.broker_id] = command.url


def _apply_create(state: ClusterState, command: CreateTopic) -> None:
    """A new partition's ISR is every replica: all are empty, hence all in sync (as in
    Kafka). A follower that then fails to fetch leaves it through its leader's
    proposal (AlterIsr) or, if its broker dies, through failover."""
    first_epoch = state.recreated_epochs.get(command.name, state.forgotten_epochs_floor)
    partitions = [
        PartitionState(list(replicas), replicas[0], first_epoch, list(replicas))
        for replicas in command.assignments
    ]
    state.topics[command.name] = TopicState(
        command.name,
        command.replication_factor,
        partitions,
        command.topic_id,
        command.min_insync_replicas,
    )


def _apply_delete(state: ClusterState, command: DeleteTopic) -> None:
    """Deleting a topic forgets its committed offsets too, so a topic created again
    under the same name starts clean."""
    topic = state.topics.pop(command.name)
    state.recreated_epochs.pop(command.name, None)  # re-inserted as the newest
    state.recreated_epochs[command.name] = 1 + max(
        (partition.leader_epoch for partition in topic.partitions), default=0
    )
    for name in list(state.recreated_epochs)[:-DELETED_TOPIC_IDS_MAX]:
        epoch = state.recreated_epochs.pop(name)
        state.forgotten_epochs_floor = max(state.forgotten_epochs_floor, epoch)
    if topic.topic_id:
        state.deleted_topic_ids.append(topic.topic_id)
        del state.deleted_topic_ids[:-DELETED_TOPIC_IDS_MAX]
    for committed in state.offsets.values():
        for key in [key for key in committed if key[0] == command.name]:
            del committed[key]
    for group in [group for group, committed in state.offsets.items() if not committed]:
        del state.offsets[group]
    for key in [key for key in state.reassignments if key[0] == command.name]:
        del state.reassignments[key]


def _apply_change_leader(state: ClusterState, command: ChangeLeader) -> int:
    partition = state.partition(command.topic, command.partition)
    partition.leader_id = command.leader_id
    partition.isr = list(command.isr)
    partition.leader_epoch += 1
    partition.partition_epoch += 1
    return partition.leader_epoch


def _apply_change_isr(state: ClusterState, command: ChangeIsr) -> None:
    partition = state.partition(command.topic, command.partition)
    partition.isr = list(command.isr)
    partition.partition_epoch += 1


def _apply_alter_isr(state: ClusterState, command: AlterIsr) -> PartitionState:
    partition = state.partition(command.topic, command.partition)
    partition.isr = list(command.isr)
    partition.partition_epoch += 1
    return partition


def _apply_draining(state: ClusterState, command: SetBrokerDraining) -> None:
    if command.draining:
        state.draining.add(command.broker_id)
    else:
        state.draining.discard(command.broker_id)


def _apply_reassign(state: ClusterState, command: ReassignReplicas) -> None:
    partition = state.partition(command.topic, command.partition)
    original = tuple(partition.replicas)
    partition.replicas = [*original, *(b for b in command.replicas if b not in original)]
    partition.partition_epoch += 1
    move = Reassignment(original, command.replicas)
    state.reassignments[(command.topic, command.partition)] = move


def _shrink_to(state: ClusterState, topic: str, index: int, keep: tuple[int, ...]) -> None:
    partition = state.partition(topic, index)
    partition.isr = [b for b in keep if b in partition.isr]
    partition.replicas = list(keep)
    partition.partition_epoch += 1
    del state.reassignments[(topic, index)]


def _apply_complete(state: ClusterState, command: CompleteReassignment) -> None:
    move = state.reassignments[(command.topic, command.partition)]
    _shrink_to(state, command.topic, command.partition, move.target)


def _apply_cancel(state: ClusterState, command: CancelReassignment) -> None:
    move = state.reassignments[(command.topic, command.partition)]
    _shrink_to(state, command.topic, command.partition, move.original)


def _apply_commit(state: ClusterState, command: CommitOffsets) -> int:
    if not command.offsets:  # remembers nothing: a snapshot has no row for it either
        return 0
    committed = state.offsets.setdefault(command.group, {})
    for topic, partition, offset in command.offsets:
        committed[(topic, partition)] = offset
    return len(command.offsets)


def _apply_allocate(state: ClusterState, command: AllocateProducerId) -> int:
    producer_id = state.next_producer_id
    state.next_producer_id += 1
    return producer_id


def _apply_group_session(state: ClusterState, command: RecordGroupSession) -> None:
    state.group_session_ms[command.group] = command.session_timeout_ms


def _apply_delete_group(state: ClusterState, command: DeleteGroup) -> None:
    state.offsets.pop(command.group, None)
    state.group_session_ms.pop(command.group, None)


_APPLIES: dict[type[Any], Any] = {
    InitCluster: _apply_init,
    RegisterBroker: _apply_register,
    CreateTopic: _apply_create,
    DeleteTopic: _apply_delete,
    ChangeLeader: _apply_change_leader,
    ChangeIsr: _apply_change_isr,
    AlterIsr: _apply_alter_isr,
    CommitOffsets: _apply_commit,
    AllocateProducerId: _apply_allocate,
    SetBrokerDraining: _apply_draining,
    ReassignReplicas: _apply_reassign,
    CompleteReassignment: _apply_complete,
    CancelReassignment: _apply_cancel,
    RecordGroupSession: _apply_group_session,
    DeleteGroup: _apply_delete_group,
}


# --- failover planning (pure: state + who is alive -> commands) -------------------


def plan_failover(state: ClusterState, live: Collection[int]) -> list[Command]:
    """Level-triggered: the commands that bring leaders and ISRs in line with ``live``.

    * a dead leader: the first live ISR replica leads (epoch bump), the dead leave
      the ISR; with no live ISR replica the partition goes offline and keeps its ISR;
    * an offline partition: a live replica from its last ISR leads again;
    * a dead follower leaves the ISR (no epoch bump), so acks=all stops waiting for it.
    """
    commands: list[Command] = []
    for name, topic in sorted(state.topics.items()):
        for index, partition in enumerate(topic.partitions):
            command = _partition_failover(name, index, partition, live)
            if command is not None:
                commands.append(command)
    return commands


def _partition_failover(
    topic: str, index: int, partition: PartitionState, live: Collection[int]
) -> Command | None:
    leader = partition.leader_id
    if leader is None or leader not in live:
        new_leader = elect_leader(partition.replicas, partition.isr, live)
        if new_leader is None:
            if leader is None:
                return None
            return ChangeLeader(topic, index, None, tuple(partition.isr), partition.leader_epoch)
        live_isr = tuple(b for b in partition.isr if b in live)
        return ChangeLeader(topic, index, new_leader, live_isr, partition.leader_epoch)
    live_isr = tuple(b for b in partition.isr if b in live)
    if live_isr != tuple(partition.isr):
        return ChangeIsr(topic, index, live_isr)
    return None


def plan_reelection(
    state: ClusterState,
    broker_id: int,
    may_have_lost_acknowledged: bool = False,
    live: Collection[int] = (),
) -> list[Command]:
    """A broker (re)registered: a new process, which may have lost what it had not
    fsynced. For every partition it leads, the same leader in a new epoch (same ISR:
    everything committed is durable on it). Without the bump it would lead on in the
    old epoch and could write new records at offsets its followers already hold from
    before the crash, with the same epoch, where no divergence check could see it.

    ``may_have_lost_acknowledged``: the broker runs a weaker fsync policy than
    ``always`` and did not shut down cleanly, so what it counted as durable (and
    acknowledged) may be gone. Then it must neither lead (another live ISR member
    takes over, when there is one) nor stay in any ISR until it has caught up again;
    otherwise its followers would truncate acknowledged records to match it."""
    commands: list[Command] = []
    for name, topic in sorted(state.topics.items()):
        for index, partition in enumerate(topic.partitions):
            others = tuple(b for b in partition.isr if b != broker_id)
            epoch = partition.leader_epoch
            if partition.leader_id == broker_id:
                successor = next((b for b in others if b in live), None)
                if may_have_lost_acknowledged and successor is not None:
                    commands.append(ChangeLeader(name, index, successor, others, epoch))
                else:
                    commands.append(
                        ChangeLeader(name, index, broker_id, tuple(partition.isr), epoch)
                    )
            elif may_have_lost_acknowledged and broker_id in partition.isr and others:
                commands.append(ChangeIsr(name, index, others))
    return commands


@dataclass(frozen=True)
class PartitionReport:
    """What a broker says about one replica in its heartbeat."""

    leader_epoch: int
    log_start_offset: int
    log_end_offset: int
    high_watermark: int


# --- soft state -----------------------------------------------------------------


@dataclass
class _Session:
    last_heartbeat_ms: int
    alive: bool = True
    reports: dict[TopicPartition, PartitionReport] = field(default_factory=dict)


class Liveness:
    """Broker sessions and their latest partition reports. Soft state: not persisted.

    A broker is alive from its registration (or the coordinator's start) until
    ``session_timeout_ms`` pass without a heartbeat; a heartbeat revives it.
    """

    def __init__(self, session_timeout_ms: int) -> None:
        self.session_timeout_ms = session_timeout_ms
        self._sessions: dict[int, _Session] = {}

    def start_session(self, broker_id: int, now_ms: int) -> None:
        self._sessions[broker_id] = _Session(now_ms)

    def heartbeat(
        self,
        broker_id: int,
        now_ms: int,
        reports: Iterable[tuple[TopicPartition, PartitionReport]] = (),
    ) -> bool:
        """Records a heartbeat; True if it brought a dead broker back to life."""
        session = self._sessions.setdefault(broker_id, _Session(now_ms))
        revived = not session.alive
        session.last_heartbeat_ms = now_ms
        session.alive = True
        session.reports = dict(reports)
        return revived

    def expire(self, now_ms: int) -> list[int]:
        """Marks brokers past their session dead; returns those that just died."""
        died = []
        for broker_id, session in sorted(self._sessions.items()):
            late = now_ms - session.last_heartbeat_ms > self.session_timeout_ms
            if session.alive and late:
                session.alive = False
                session.reports = {}
                died.append(broker_id)
        return died

    def dead_for(self, now_ms: int, at_least_ms: int) -> set[int]:
        """Brokers whose last heartbeat is at least ``at_least_ms`` past their session:
        the coordinator replaces their replicas on live brokers."""
        return {
            broker
            for broker, session in self._sessions.items()
            if not session.alive
            and now_ms - session.last_heartbeat_ms - self.session_timeout_ms >= at_least_ms
        }

    def is_alive(self, broker_id: int) -> bool:
        session = self._sessions.get(broker_id)
        return session is not None and session.alive

    def alive_ids(self) -> set[int]:
        return {broker for broker, session in self._sessions.items() if session.alive}

    def hosting(self, topic: str) -> list[int]:
        """Live brokers whose latest heartbeat reports a replica of ``topic``."""
        return sorted(
            broker
            for broker, session in self._sessions.items()
            if session.alive and any(name == topic for name, _ in session.reports)
        )

    def report(self, broker_id: int, topic: str, partition: int) -> PartitionReport | None:
        session = self._sessions.get(broker_id)
        return None if session is None else session.reports.get((topic, partition))

    def forget(self, broker_id: int) -> None:
        self._sessions.pop(broker_id, None)
