"""The coordinator's Prometheus metrics (docs/OPERATIONS.md, "Metrics").

Two kinds: counters of what the coordinator did (commands applied, leader
elections, ISR shrinks and expands, consumer group rebalances), incremented on the
commit path; and gauges computed from the cluster state at scrape time by
:class:`ClusterCollector` (brokers alive, partitions and leaders per broker,
offline and under-replicated partitions, group members, consumer lag in messages
and seconds). Names follow Prometheus' naming guide: base units, ``_total`` for
counters, label sets bounded by brokers, topics, partitions and groups.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from tidemq.core.lag import HighWatermarkTimeline
from tidemq.core.metadata import AlterIsr, ChangeIsr, ChangeLeader, ClusterState, Command
from tidemq.logs import event

log = logging.getLogger("tidemq.coordinator.events")

if TYPE_CHECKING:
    from tidemq.coordinator.server import Coordinator


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader_elections = Counter(
            "tide_leader_elections_total",
            "Leader changes decided by the coordinator",
            registry=registry,
        )
        self.commands_applied = Counter(
            "tide_coordinator_commands_applied_total",
            "Commands committed to the store and applied, by command type",
            ["command"],
            registry=registry,
        )
        self.isr_shrinks = Counter(
            "tide_isr_shrinks_total",
            "Committed ISR changes (failover or a leader's AlterIsr) that removed a replica",
            registry=registry,
        )
        self.isr_expands = Counter(
            "tide_isr_expands_total",
            "Committed ISR changes (a leader's AlterIsr) that added a replica",
            registry=registry,
        )
        self.rebalances = Counter(
            "tide_consumer_group_rebalances_total",
            "Consumer group target recomputations (join, leave, expiry, new subscription)",
            ["group"],
            registry=registry,
        )
        self.high_watermarks = HighWatermarkTimeline()

    def before_apply(self, state: ClusterState, command: Command) -> None:
        """Counts one committed command; called after the commit, before the apply,
        so the ISR it replaces is still in ``state``."""
        self.commands_applied.labels(type(command).__name__).inc()
        if isinstance(command, ChangeLeader):
            self.leader_elections.inc()
        if isinstance(command, ChangeIsr | ChangeLeader | AlterIsr):
            topic = state.topics.get(command.topic)
            if topic is None or not 0 <= command.partition < len(topic.partitions):
                return
            old = set(topic.partitions[command.partition].isr)
            new = set(command.isr)
            if old - new:
                self.isr_shrinks.inc()
            if new - old:
                self.isr_expands.inc()

    def group_changed(self, group: str, epoch_before: int, epoch_after: int) -> None:
        """Counts (and logs) a rebalance: the group's epoch moved."""
        if epoch_after != epoch_before:
            self.rebalances.labels(group).inc()
            event(
                log,
                "group_rebalance",
                f"group {group} rebalances (group epoch {epoch_after})",
                group=group,
                group_epoch=epoch_after,
            )

    def group_deleted(self, group: str) -> None:
        """A deleted group's series goes too: its label set stays bounded."""
        with contextlib.suppress(KeyError):
            self.rebalances.remove(group)
        event(log, "group_deleted", f"group {group} deleted", group=group)


class ClusterCollector:
    """Computes the coordinator's gauges from its state at scrape time."""

    def __init__(self, coordinator: Coordinator, clock_ms: Callable[[], int]) -> None:
        self.coordinator = coordinator
        self.clock_ms = clock_ms

    def sample_high_watermarks(self) -> None:
        """Feeds the lag timeline; the coordinator calls it on every tick."""
        coordinator = self.coordinator
        timeline = coordinator.metrics.high_watermarks
        now_ms = self.clock_ms()
        keys = []
        for name, topic in coordinator.state.topics.items():
            for index in range(len(topic.partitions)):
                keys.append((name, index))
                high_watermark = coordinator.high_watermark(name, index)
                if high_watermark is not None:
                    timeline.record((name, index), high_watermark, now_ms)
        timeline.retain(keys)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        coordinator = self.coordinator
        state = coordinator.state
        partitions = [p for topic in state.topics.values() for p in topic.partitions]
        live = coordinator.live_brokers()
        yield _gauge("tide_brokers_alive", "Registered brokers with a live session", len(live))
        yield _gauge("tide_brokers_registered", "Registered brokers", len(state.brokers))
        yield _gauge("tide_topics", "Topics", len(state.topics))
        yield _gauge(
            "tide_partitions_offline",
            "Partitions without a leader",
            sum(p.leader_id is None for p in partitions),
        )
        # A partition being moved lists original + adding replicas until the move
        # completes; count it against its replication factor (Kafka's KIP-352), or
        # every healthy rebalance or drain would page as under-replicated.
        yield _gauge(
            "tide_partitions_under_replicated",
            "Partitions whose ISR is smaller than their replication factor",
            sum(
                len(p.isr) < min(len(p.replicas), topic.replication_factor)
                for topic in state.topics.values()
                for p in topic.partitions
            ),
        )
        yield _gauge(
            "tide_reassignments_in_progress",
            "Partition moves (rebalance, drain, replacement) in progress",
            len(state.reassignments),
        )
        yield _gauge("tide_brokers_draining", "Brokers being drained", len(state.draining))
        yield from self._brokers(live)
        yield self._topic_partitions(state)
        yield self._members()
        yield from self._lag()

    def _brokers(self, live: set[int]) -> Iterator[GaugeMetricFamily]:
        replicas, leaders = self.coordinator.state.replica_load()
        alive = GaugeMetricFamily(
            "tide_broker_up", "1 if the broker's session is live, else 0", labels=["broker"]
        )
        replica_gauge = GaugeMetricFamily(
            "tide_broker_replicas_assigned",
            "Partition replicas the coordinator assigned to each broker",
            labels=["broker"],
        )
        leader_gauge = GaugeMetricFamily(
            "tide_broker_leaders_assigned",
            "Partitions each broker leads, as the coordinator decided",
            labels=["broker"],
        )
        draining = GaugeMetricFamily(
            "tide_broker_draining",
            "1 if the broker is drained (scale-in), else 0",
            labels=["broker"],
        )
        for broker_id in sorted(self.coordinator.state.brokers):
            label = [str(broker_id)]
            alive.add_metric(label, 1 if broker_id in live else 0)
            draining.add_metric(label, 1 if broker_id in self.coordinator.state.draining else 0)
            replica_gauge.add_metric(label, replicas.get(broker_id, 0))
            leader_gauge.add_metric(label, leaders.get(broker_id, 0))
        yield from (alive, replica_gauge, leader_gauge, draining)

    @staticmethod
    def _topic_partitions(state: ClusterState) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily("tide_topic_partitions", "Partitions per topic", labels=["topic"])
        for name, topic in sorted(state.topics.items()):
            gauge.add_metric([name], len(topic.partitions))
        return gauge

    def _members(self) -> GaugeMetricFamily:
        members = GaugeMetricFamily(
            "tide_consumer_group_members", "Live members per consumer group", labels=["group"]
        )
        for name, group in sorted(self.coordinator.groups.items()):
            members.add_metric([name], len(group.members))
        return members

    def _lag(self) -> Iterator[GaugeMetricFamily]:
        labels = ["group", "topic", "partition"]
        messages = GaugeMetricFamily(
            "tide_consumer_lag_messages",
            "Leader high watermark minus committed offset",
            labels=labels,
        )
        seconds = GaugeMetricFamily(
            "tide_consumer_lag_seconds",
            "Age of the oldest message not committed by the group (0 when caught up)",
            labels=labels,
        )
        timeline = self.coordinator.metrics.high_watermarks
        now_ms = self.clock_ms()
        for group, committed in sorted(self.coordinator.state.offsets.items()):
            for (topic, partition), offset in sorted(committed.items()):
                high_watermark = self.coordinator.high_watermark(topic, partition)
                if high_watermark is None:
                    continue
                label = [group, topic, str(partition)]
                messages.add_metric(label, max(0, high_watermark - offset))
                age_ms = timeline.age_ms((topic, partition), offset, now_ms)
                if age_ms is not None:
                    seconds.add_metric(label, age_ms / 1000)
        yield messages
        yield seconds


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
