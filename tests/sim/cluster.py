"""A deterministic simulation of tidemq's replication: the coordinator's state machine
(``core.metadata``), the replica cores (``core.replica``) of several brokers and simple
producers and consumers, under one seeded scheduler with a fake clock and a network
that drops, delays, duplicates and partitions messages, and crashes that lose what
was not fsynced.

Everything random comes from one ``random.Random(seed)``, so a seed replays exactly.
The brokers' shells are re-implemented here in a few lines (an in-memory log of
``(epoch, value)`` entries with a durable prefix); the decisions are the real ones.

Invariants checked after every step (:meth:`Simulation.check`):

* no acknowledged record is lost: every record a producer was acknowledged for
  (acks=all), or a consumer read, sits at its offset in the durable log of every
  member of the coordinator's current ISR;
* logs of ISR members agree below the high watermark of the current leader;
* at most one broker accepts writes in a leader epoch;
* consumers never read above the high watermark (they read committed records only:
  covered by the first invariant, which treats reads like acknowledgements).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tidemq.core.metadata import (
    AlterIsr,
    ClusterState,
    CreateTopic,
    InitCluster,
    Liveness,
    RegisterBroker,
    plan_failover,
    plan_reelection,
)
from tidemq.core.replica import (
    Acks,
    Appended,
    Assigned,
    AwaitAck,
    Complete,
    Effect,
    Fail,
    Flushed,
    FollowerFetched,
    IsrAnswered,
    LeaderAnswered,
    ProposeIsr,
    ReplicaAssignment,
    ReplicaCore,
    Tick,
    Truncated,
    diverging_epoch,
    truncation_offset,
)
from tidemq.errors import TideError
from tidemq.storage.epochs import LeaderEpochCache

TOPIC = "sim"
SESSION_TIMEOUT_MS = 600
HEARTBEAT_MS = 100
LAG_TIME_MAX_MS = 400


class InvariantBroken(AssertionError):
    pass


@dataclass
class Message:
    deliver_at: int
    source: str
    target: str
    kind: str
    body: dict[str, Any]
    seq: int = 0


@dataclass
class Replica:
    """A broker's copy of one partition: entries (epoch, value), a durable prefix."""

    entries: list[tuple[int, str]] = field(default_factory=list)
    durable: int = 0
    high_watermark_checkpoint: int = 0
    core: ReplicaCore | None = None
    fetch_state: str = "idle"  # idle | fetching | flushing (next fetch after the fsync)
    fetch_sent_ms: int = 0
    fetch_id: int = 0  # answers match their fetch: a duplicated old answer is not one

    def epoch_and_end(self, epoch: int) -> tuple[int, int]:
        """OffsetsForLeaderEpoch, answered by the storage engine's own epoch cache."""
        cache = LeaderEpochCache()
        for offset, (entry_epoch, _) in enumerate(self.entries):
            cache.assign(entry_epoch, offset)
        return cache.epoch_and_end_offset(epoch, len(self.entries))

    def last_epoch(self) -> int:
        return self.entries[-1][0] if self.entries else -1


@dataclass
class Broker:
    broker_id: int
    alive: bool = True
    replicas: dict[int, Replica] = field(default_factory=dict)
    next_heartbeat_ms: int = 0
    incarnation: int = 0  # bumped by every restart; answers to older requests are ignored
    registered: bool = True
    waiters: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # id -> client


class Simulation:
    def __init__(
        self,
        seed: int,
        brokers: int = 3,
        partitions: int = 2,
        replication_factor: int = 2,
        drop: float = 0.05,
        duplicate: float = 0.03,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now_ms = 0
        self.drop, self.duplicate = drop, duplicate
        self.messages: list[Message] = []
        self.seq = 0
        self.cut: set[frozenset[str]] = set()
        self.trace: list[str] = []
        self.brokers = {b: Broker(b) for b in range(1, brokers + 1)}
        self.state = ClusterState()
        self.liveness = Liveness(SESSION_TIMEOUT_MS)
        self.state.apply(InitCluster("sim"))
        for broker_id in self.brokers:
            self.state.apply(RegisterBroker(broker_id, f"sim://{broker_id}"))
            self.liveness.start_session(broker_id, 0)
        assignments = tuple(
            tuple(((p + i) % brokers) + 1 for i in range(replication_factor))
            for p in range(partitions)
        )
        min_isr = 2 if replication_factor >= 3 else 1
        self.state.apply(
            CreateTopic(TOPIC, partitions, replication_factor, assignments, "t" * 32, min_isr)
        )
        self.partitions = partitions
        for broker in self.brokers.values():
            for partition in range(partitions):
                broker.replicas[partition] = Replica()
                self._open_core(broker, partition)
        self.acknowledged: dict[tuple[int, int], str] = {}  # (partition, offset) -> value
        self.read: dict[tuple[int, int], str] = {}
        self.leaders_by_epoch: dict[tuple[int, int], int] = {}
        self.next_value = 0
        self.next_waiter = 1
        self.consumer_positions = dict.fromkeys(range(partitions), 0)

    # -- plumbing ------------------------------------------------------------------------

    def _open_core(self, broker: Broker, partition: int) -> None:
        replica = broker.replicas[partition]
        durable = replica.durable
        replica.core = ReplicaCore(
            broker_id=broker.broker_id,
            log_end_offset=len(replica.entries),
            durable_offset=durable,
            high_watermark=min(replica.high_watermark_checkpoint, durable),
            lag_time_max_ms=LAG_TIME_MAX_MS,
        )
        replica.fetch_state = "idle"

    def send(self, source: str, target: str, kind: str, body: dict[str, Any]) -> None:
        if frozenset((source, target)) in self.cut or self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            self.seq += 1
            delay = self.rng.choice((1, 2, 5, 10, 30, 80))
            self.messages.append(Message(self.now_ms + delay, source, target, kind, body, self.seq))

    def log(self, text: str) -> None:
        self.trace.append(f"{self.now_ms:>6} {text}")

    # -- the scheduler -------------------------------------------------------------------

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
            self.check()
        self.heal()
        for _ in range(400):  # quiesce: everything reachable, no new faults
            self.step(faults=False)
            self.check()

    def step(self, faults: bool = True) -> None:
        roll = self.rng.random()
        if faults and roll < 0.004:
            self.restart_coordinator()
        elif faults and roll < 0.02:
            self.crash_or_restart()
        elif faults and roll < 0.035:
            self.partition_or_heal()
        elif roll < 0.20:
            self.produce()
        elif roll < 0.25:
            self.consume()
        elif roll < 0.40:
            self.fsync_someone()
        self.advance(self.rng.choice((1, 5, 20)))

    def advance(self, delta_ms: int) -> None:
        self.now_ms += delta_ms
        due = sorted(
            (m for m in self.messages if m.deliver_at <= self.now_ms),
            key=lambda m: (m.deliver_at, m.seq),
        )
        self.messages = [m for m in self.messages if m.deliver_at > self.now_ms]
        for message in due:
            self.deliver(message)
        self.coordinator_tick()
        for broker in self.brokers.values():
            if broker.alive:
                self.broker_tick(broker)

    # -- faults --------------------------------------------------------------------------

    def crash_or_restart(self) -> None:
        broker = self.brokers[self.rng.choice(sorted(self.brokers))]
        if broker.alive:
            self.log(f"crash broker {broker.broker_id}")
            broker.alive = False
            broker.waiters.clear()
            for replica in broker.replicas.values():
                del replica.entries[replica.durable :]  # not fsynced: gone
                replica.core = None
        else:
            self.crash_or_restart_specific(broker)

    def restart_coordinator(self) -> None:
        """Its state is durable (every command persisted before it applied); broker
        sessions are soft state: every registered broker gets a fresh one."""
        self.log("restart coordinator")
        self.messages = [m for m in self.messages if "coordinator" not in (m.source, m.target)]
        self.liveness = Liveness(SESSION_TIMEOUT_MS)
        for broker_id in self.state.brokers:
            self.liveness.start_session(broker_id, self.now_ms)

    def partition_or_heal(self) -> None:
        if self.cut and self.rng.random() < 0.5:
            self.log("heal network")
            self.cut.clear()
            return
        names = ["coordinator", *(f"b{b}" for b in self.brokers)]
        a, b = self.rng.sample(names, 2)
        self.log(f"cut {a} <-> {b}")
        self.cut.add(frozenset((a, b)))

    def heal(self) -> None:
        self.cut.clear()
        for broker in self.brokers.values():
            if not broker.alive:
                self.crash_or_restart_specific(broker)
        self.drop = self.duplicate = 0.0

    def crash_or_restart_specific(self, broker: Broker) -> None:
        broker.alive = True
        broker.incarnation += 1
        broker.registered = False  # a new process registers before anything else
        broker.next_heartbeat_ms = self.now_ms
        for partition in broker.replicas:
            self._open_core(broker, partition)
        self.log(f"restart broker {broker.broker_id}")

    def fsync_someone(self) -> None:
        broker = self.brokers[self.rng.choice(sorted(self.brokers))]
        if not broker.alive:
            return
        for partition, replica in broker.replicas.items():
            if replica.durable < len(replica.entries):
                replica.durable = len(replica.entries)
                self.feed(broker, partition, Flushed(replica.durable))
                if replica.fetch_state == "flushing":
                    replica.fetch_state = "idle"
            if replica.core is not None:
                replica.high_watermark_checkpoint = replica.core.high_watermark

    # -- coordinator ---------------------------------------------------------------------

    def coordinator_tick(self) -> None:
        self.liveness.expire(self.now_ms)
        live = self.liveness.alive_ids()
        for command in plan_failover(self.state, live):
            self.state.apply(command)
            self.log(f"coordinator: {command}")

    def coordinator_receive(self, message: Message) -> None:
        broker_id = message.body["broker_id"]
        if message.kind in ("heartbeat", "register"):
            if message.kind == "register":
                for command in plan_reelection(self.state, broker_id):
                    self.state.apply(command)
                    self.log(f"coordinator: {command} (registration)")
                self.liveness.start_session(broker_id, self.now_ms)
            elif self.liveness.heartbeat(broker_id, self.now_ms):
                self.coordinator_tick()
            assignments = {}
            for index, partition in enumerate(self.state.topic(TOPIC).partitions):
                if broker_id in partition.replicas:
                    assignments[index] = ReplicaAssignment(
                        partition.leader_id,
                        partition.leader_epoch,
                        partition.partition_epoch,
                        tuple(partition.replicas),
                        tuple(partition.isr),
                        self.state.topic(TOPIC).min_insync_replicas,
                    )
            answer = {
                "assignments": assignments,
                "incarnation": message.body["incarnation"],
                "registered": message.kind == "register",
            }
            self.send("coordinator", message.source, "assignment", answer)
        elif message.kind == "alter_isr":
            body = {**message.body, "proposed_partition_epoch": message.body["partition_epoch"]}
            command = AlterIsr(
                TOPIC,
                body["partition"],
                broker_id,
                body["leader_epoch"],
                body["partition_epoch"],
                body["isr"],
            )
            try:
                partition = self.state.apply(command)
            except TideError:
                self.send("coordinator", message.source, "alter_isr_answer", {**body, "ok": False})
                return
            self.log(f"coordinator: {command}")
            answer = {
                **body,
                "ok": True,
                "partition_epoch": partition.partition_epoch,
                "isr": tuple(partition.isr),
            }
            self.send("coordinator", message.source, "alter_isr_answer", answer)

    # -- brokers -------------------------------------------------------------------------

    def feed(self, broker: Broker, partition: int, event: Any) -> None:
        replica = broker.replicas[partition]
        assert replica.core is not None
        self.effects(broker, partition, replica.core.handle(event, self.now_ms))

    def effects(self, broker: Broker, partition: int, effects: list[Effect]) -> None:
        replica = broker.replicas[partition]
        assert replica.core is not None
        for effect in effects:
            if isinstance(effect, Complete | Fail):
                client = broker.waiters.pop(effect.waiter_id, None)
                if client is not None and isinstance(effect, Complete):
                    value, offset = client[0], client[1]
                    self.send(f"b{broker.broker_id}", "producer", "ack", {
                        "partition": partition, "offset": offset, "value": value,
                    })  # fmt: skip
            elif isinstance(effect, ProposeIsr):
                self.send(f"b{broker.broker_id}", "coordinator", "alter_isr", {
                    "broker_id": broker.broker_id, "partition": partition,
                    "leader_epoch": effect.leader_epoch,
                    "partition_epoch": effect.partition_epoch, "isr": effect.isr,
                })  # fmt: skip

    def broker_tick(self, broker: Broker) -> None:
        if self.now_ms >= broker.next_heartbeat_ms:
            broker.next_heartbeat_ms = self.now_ms + HEARTBEAT_MS
            name = f"b{broker.broker_id}"
            kind = "heartbeat" if broker.registered else "register"
            body = {"broker_id": broker.broker_id, "incarnation": broker.incarnation}
            self.send(name, "coordinator", kind, body)
        for partition, replica in broker.replicas.items():
            core = replica.core
            assert core is not None
            self.feed(broker, partition, Tick())
            if core.role.value == "follower" and core.leader_id is not None:
                stale = self.now_ms - replica.fetch_sent_ms > 200
                if replica.fetch_state == "idle" or (replica.fetch_state == "fetching" and stale):
                    self.send_fetch(broker, partition)

    def send_fetch(self, broker: Broker, partition: int) -> None:
        replica = broker.replicas[partition]
        core = replica.core
        assert core is not None and core.leader_id is not None
        replica.fetch_state = "fetching"
        replica.fetch_sent_ms = self.now_ms
        replica.fetch_id += 1
        self.send(f"b{broker.broker_id}", f"b{core.leader_id}", "fetch", {
            "broker_id": broker.broker_id, "partition": partition,
            "leader_epoch": core.leader_epoch, "offset": len(replica.entries),
            "last_epoch": replica.last_epoch(), "durable": replica.durable,
            "fetch_id": replica.fetch_id,
        })  # fmt: skip

    def broker_receive(self, broker: Broker, message: Message) -> None:
        handler: dict[str, Callable[[Broker, Message], None]] = {
            "assignment": self.on_assignment,
            "alter_isr_answer": self.on_alter_isr_answer,
            "fetch": self.on_fetch,
            "fetch_answer": self.on_fetch_answer,
            "produce": self.on_produce,
        }
        handler[message.kind](broker, message)

    def on_assignment(self, broker: Broker, message: Message) -> None:
        if message.body["incarnation"] != broker.incarnation:
            return  # an answer to the previous process: it died with its connections
        if message.body["registered"]:
            broker.registered = True
        if not broker.registered:
            return
        for partition, assignment in message.body["assignments"].items():
            replica = broker.replicas[partition]
            assert replica.core is not None
            before = replica.core.leader_epoch
            self.feed(broker, partition, Assigned(assignment))
            if replica.core.leader_epoch != before:
                replica.fetch_state = "idle"

    def on_alter_isr_answer(self, broker: Broker, message: Message) -> None:
        body = message.body
        proposed = body["proposed_partition_epoch"]
        event = (
            IsrAnswered(True, proposed, body["leader_epoch"], body["partition_epoch"], body["isr"])
            if body["ok"]
            else IsrAnswered(False, proposed)
        )
        self.feed(broker, body["partition"], event)

    def on_fetch(self, leader: Broker, message: Message) -> None:
        body = message.body
        partition = body["partition"]
        replica = leader.replicas[partition]
        core = replica.core
        assert core is not None
        reply = {
            "partition": partition,
            "leader_epoch": body["leader_epoch"],
            "fetch_id": body["fetch_id"],
            "offset": body["offset"],
        }
        if not core.is_leader or core.leader_epoch != body["leader_epoch"]:
            self.send(message.target, message.source, "fetch_answer", {**reply, "error": True})
            return
        diverging = diverging_epoch(
            body["offset"], body["last_epoch"], replica.epoch_and_end(body["last_epoch"]), 0
        )
        if diverging is None and body["offset"] > len(replica.entries):
            diverging = (replica.last_epoch(), len(replica.entries))
        if diverging is not None:
            answer = {**reply, "diverging": diverging}
            self.send(message.target, message.source, "fetch_answer", answer)
            return
        self.feed(leader, partition, FollowerFetched(body["broker_id"], body["offset"],
                                                     body["durable"]))  # fmt: skip
        entries = replica.entries[body["offset"] : body["offset"] + 5]
        answer = {**reply, "entries": list(entries), "high_watermark": core.high_watermark}
        self.send(message.target, message.source, "fetch_answer", answer)

    def on_fetch_answer(self, follower: Broker, message: Message) -> None:
        body = message.body
        replica = follower.replicas[body["partition"]]
        core = replica.core
        assert core is not None
        if (
            replica.fetch_state != "fetching"
            or body["leader_epoch"] != core.leader_epoch
            or body["fetch_id"] != replica.fetch_id
        ):
            return  # a duplicate or a late answer to an old fetch
        replica.fetch_state = "idle"
        if body.get("error") or core.is_leader:
            return
        if body["offset"] != len(replica.entries):
            return  # the log changed since this fetch was sent
        if "diverging" in body:
            epoch = body["diverging"][0]
            own = replica.epoch_and_end(epoch) if epoch != -1 else (-1, -1)
            cut = truncation_offset(body["diverging"], own, 0, len(replica.entries))
            if cut >= len(replica.entries):
                raise InvariantBroken(
                    f"b{follower.broker_id} p{body['partition']}: told it diverges, but "
                    f"the cut at {cut} removes nothing (log end {len(replica.entries)})"
                )
            if cut < len(replica.entries):
                self.log(f"b{follower.broker_id} p{body['partition']} truncates to {cut}")
                del replica.entries[cut:]
                replica.durable = min(replica.durable, cut)
                replica.high_watermark_checkpoint = min(replica.high_watermark_checkpoint, cut)
                self.feed(follower, body["partition"], Truncated(cut))
            return
        if body["entries"]:
            replica.entries.extend(body["entries"])
            self.feed(follower, body["partition"], Appended(len(replica.entries)))
            replica.fetch_state = "flushing"
        self.feed(follower, body["partition"], LeaderAnswered(body["high_watermark"]))
        replica.high_watermark_checkpoint = core.high_watermark

    def on_produce(self, broker: Broker, message: Message) -> None:
        body = message.body
        partition = body["partition"]
        replica = broker.replicas[partition]
        core = replica.core
        assert core is not None
        try:
            core.check_produce(Acks.ALL)
        except TideError:
            return
        epoch = core.leader_epoch
        owner = self.leaders_by_epoch.setdefault((partition, epoch), broker.broker_id)
        if owner != broker.broker_id:
            raise InvariantBroken(
                f"two leaders accept writes in epoch {epoch} of partition {partition}: "
                f"{owner} and {broker.broker_id}"
            )
        offset = len(replica.entries)
        replica.entries.append((epoch, body["value"]))
        waiter = self.next_waiter
        self.next_waiter += 1
        broker.waiters[waiter] = (body["value"], offset, partition)
        self.feed(broker, partition, Appended(offset + 1))
        self.feed(broker, partition, AwaitAck(waiter, offset + 1, Acks.ALL))

    # -- clients -------------------------------------------------------------------------

    def produce(self) -> None:
        partition = self.rng.randrange(self.partitions)
        leader = self.state.topic(TOPIC).partitions[partition].leader_id
        if leader is None:
            return
        value = f"v{self.next_value}"
        self.next_value += 1
        body = {"partition": partition, "value": value}
        self.send("producer", f"b{leader}", "produce", body)

    def producer_receive(self, message: Message) -> None:
        body = message.body
        key = (body["partition"], body["offset"])
        previous = self.acknowledged.setdefault(key, body["value"])
        if previous != body["value"]:
            raise InvariantBroken(f"offset {key} acknowledged for {previous} and {body['value']}")

    def consume(self) -> None:
        """Reads, as a consumer does, from the current leader up to its high watermark."""
        partition = self.rng.randrange(self.partitions)
        leader = self.state.topic(TOPIC).partitions[partition].leader_id
        if leader is None or not self.brokers[leader].alive:
            return
        if frozenset(("consumer", f"b{leader}")) in self.cut:
            return
        replica = self.brokers[leader].replicas[partition]
        core = replica.core
        assert core is not None
        if not core.is_leader:
            return
        position = self.consumer_positions[partition]
        for offset in range(min(position, core.high_watermark), core.high_watermark):
            self.read.setdefault((partition, offset), replica.entries[offset][1])
            if self.read[(partition, offset)] != replica.entries[offset][1]:
                raise InvariantBroken(f"offset {(partition, offset)} read as two values")
        self.consumer_positions[partition] = max(position, core.high_watermark)

    # -- delivery ------------------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        if frozenset((message.source, message.target)) in self.cut:
            return
        if message.target == "coordinator":
            self.coordinator_receive(message)
        elif message.target == "producer":
            self.producer_receive(message)
        else:
            broker = self.brokers[int(message.target[1:])]
            if broker.alive:
                self.broker_receive(broker, message)

    # -- invariants ----------------------------------------------------------------------

    def check(self) -> None:
        for partition in range(self.partitions):
            state = self.state.topic(TOPIC).partitions[partition]
            committed = {
                offset: value
                for (p, offset), value in [*self.acknowledged.items(), *self.read.items()]
                if p == partition
            }
            for member in state.isr:
                replica = self.brokers[member].replicas[partition]
                for offset, value in committed.items():
                    if offset >= replica.durable or replica.entries[offset][1] != value:
                        raise InvariantBroken(
                            f"partition {partition}: committed {value}@{offset} missing from "
                            f"the durable log of ISR member {member} "
                            f"(durable {replica.durable}, isr {state.isr})"
                        )
            self._check_agreement(partition, state.leader_id, state.leader_epoch, state.isr)

    def _check_agreement(
        self, partition: int, leader_id: int | None, epoch: int, isr: list[int]
    ) -> None:
        if leader_id is None or not self.brokers[leader_id].alive:
            return
        leader = self.brokers[leader_id].replicas[partition]
        if leader.core is None or leader.core.leader_epoch != epoch or not leader.core.is_leader:
            return
        high_watermark = leader.core.high_watermark
        prefix = leader.entries[:high_watermark]
        for member in isr:
            entries = self.brokers[member].replicas[partition].entries[:high_watermark]
            if entries != prefix[: len(entries)]:
                raise InvariantBroken(
                    f"partition {partition}: ISR member {member} disagrees with leader "
                    f"{leader_id} below the high watermark {high_watermark}"
                )

    def summary(self) -> dict[str, int]:
        return {
            "acknowledged": len(self.acknowledged),
            "read": len(self.read),
            "elections": sum(p.leader_epoch for p in self.state.topic(TOPIC).partitions),
        }
