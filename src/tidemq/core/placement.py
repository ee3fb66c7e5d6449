"""Replica placement and leader election: pure functions over broker ids.

Owns: which brokers hold a new topic's partitions, and which replica leads a
partition after a failure.

Must always hold:

* the replicas of one partition are distinct live brokers, ``replication_factor``
  of them; the first replica is the leader;
* placing onto brokers with equal load leaves per-broker replica counts and per-broker
  leader counts differing by at most one (greedy: the leader is the broker with the
  fewest leaders, then the fewest replicas; followers are the least-loaded others,
  preferring brokers that already lead more, so low-leader brokers keep room to lead);
* the same inputs give the same placement (ties broken by a rotation from
  ``start_hint``, never by chance);
* election is clean: only a live member of the in-sync replica set may lead.

Moving existing replicas when a broker joins or leaves (rebalancing) is not done
here yet: it needs the add-catch-up-switch-drop sequence of DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from tidemq.errors import ClusterStateConflict, InvalidRequest, NoBrokersAvailable


def place_partitions(
    partitions: int,
    replication_factor: int,
    live_broker_ids: Iterable[int],
    current_load: Mapping[int, int],
    start_hint: int = 0,
    current_leaders: Mapping[int, int] | None = None,
) -> list[list[int]]:
    """Replica lists (leader first) for ``partitions`` new partitions.

    ``current_load`` counts replicas each broker already holds, ``current_leaders``
    the partitions it already leads; both steer new replicas to lighter brokers.
    """
    brokers = sorted(set(live_broker_ids))
    if not brokers:
        raise NoBrokersAvailable("no live broker to place partitions on")
    if partitions < 1:
        raise InvalidRequest(f"partitions must be >= 1, got {partitions}")
    if replication_factor < 1:
        raise InvalidRequest(f"replication_factor must be >= 1, got {replication_factor}")
    if replication_factor > len(brokers):
        raise ClusterStateConflict(
            f"replication_factor {replication_factor} needs 1 to {len(brokers)} live brokers"
        )
    count = len(brokers)
    rotation = {broker: (index - start_hint) % count for index, broker in enumerate(brokers)}
    load = {broker: current_load.get(broker, 0) for broker in brokers}
    leads = {broker: (current_leaders or {}).get(broker, 0) for broker in brokers}
    placement: list[list[int]] = []
    for partition in range(partitions):

        def turn(broker: int, partition: int = partition) -> int:
            return (rotation[broker] - partition) % count

        leader = min(brokers, key=lambda b: (leads[b], load[b], turn(b)))
        others = [broker for broker in brokers if broker != leader]
        others.sort(key=lambda b: (load[b], -leads[b], turn(b)))
        replicas = [leader, *others[: replication_factor - 1]]
        for broker in replicas:
            load[broker] += 1
        leads[leader] += 1
        placement.append(replicas)
    return placement


def elect_leader(
    replicas: Sequence[int], isr: Collection[int], live: Collection[int]
) -> int | None:
    """The first replica (in replica order) that is both in sync and live; None if none.

    No unclean election: a live replica outside the ISR may miss acknowledged records.
    """
    for broker in replicas:
        if broker in isr and broker in live:
            return broker
    return None
