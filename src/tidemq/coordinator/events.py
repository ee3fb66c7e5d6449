"""One log line per important decision of the coordinator (tidemq.logs.event).

:func:`log_committed` is called for every committed command just before it is
applied, while ``state`` still holds what the command replaces, so a line can say
both the old and the new leader, epoch and ISR. Events: ``broker_registered``,
``topic_created``, ``topic_deleted``, ``leader_elected``, ``partition_offline``,
``isr_changed`` (failover's ChangeIsr or a leader's AlterIsr). The shell logs
``broker_declared_dead``, ``broker_alive_again`` and ``group_rebalance`` where it
sees them.
"""

from __future__ import annotations

import logging

from tidemq.core.metadata import (
    AlterIsr,
    ChangeIsr,
    ChangeLeader,
    ClusterState,
    Command,
    CreateTopic,
    DeleteTopic,
    RegisterBroker,
)
from tidemq.logs import event

log = logging.getLogger("tidemq.coordinator.events")


def log_committed(state: ClusterState, command: Command) -> None:
    if isinstance(command, RegisterBroker):
        event(
            log,
            "broker_registered",
            f"broker {command.broker_id} registered at {command.url}",
            broker_id=command.broker_id,
            url=command.url,
        )
    elif isinstance(command, CreateTopic):
        event(
            log,
            "topic_created",
            f"topic {command.name} created",
            topic=command.name,
            partitions=command.partitions,
            replication_factor=command.replication_factor,
        )
    elif isinstance(command, DeleteTopic):
        event(log, "topic_deleted", f"topic {command.name} deleted", topic=command.name)
    elif isinstance(command, ChangeLeader | ChangeIsr | AlterIsr):
        _log_partition_change(state, command)


def _log_partition_change(
    state: ClusterState, command: ChangeLeader | ChangeIsr | AlterIsr
) -> None:
    topic = state.topics.get(command.topic)
    if topic is None or not 0 <= command.partition < len(topic.partitions):
        return
    before = topic.partitions[command.partition]
    where = f"{command.topic}/{command.partition}"
    if isinstance(command, ChangeIsr | AlterIsr):
        proposed_by = "leader" if isinstance(command, AlterIsr) else "failover"
        event(
            log,
            "isr_changed",
            f"{where}: ISR {before.isr} -> {list(command.isr)} ({proposed_by})",
            topic=command.topic,
            partition=command.partition,
            leader_id=before.leader_id,
            leader_epoch=before.leader_epoch,
            partition_epoch=before.partition_epoch + 1,
            isr_before=before.isr,
            isr=command.isr,
            proposed_by=proposed_by,
        )
        return
    name, what = (
        ("partition_offline", "no live in-sync replica: offline")
        if command.leader_id is None
        else ("leader_elected", f"broker {command.leader_id} leads")
    )
    event(
        log,
        name,
        f"{where}: {what} (epoch {before.leader_epoch + 1})",
        logging.WARNING if command.leader_id is None else logging.INFO,
        topic=command.topic,
        partition=command.partition,
        leader_id=command.leader_id,
        previous_leader_id=before.leader_id,
        leader_epoch=before.leader_epoch + 1,
        partition_epoch=before.partition_epoch + 1,
        isr_before=before.isr,
        isr=command.isr,
    )
