"""Placement and election: balance, distinctness, determinism, clean election."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidemq.core.placement import elect_leader, place_partitions
from tidemq.errors import InvalidRequest, NoBrokersAvailable


def counts(placement: list[list[int]]) -> tuple[Counter[int], Counter[int]]:
    replicas = Counter(b for replica_list in placement for b in replica_list)
    leaders = Counter(replica_list[0] for replica_list in placement)
    return replicas, leaders


def test_twelve_partitions_on_three_brokers_are_even() -> None:
    placement = place_partitions(12, 2, [1, 2, 3], {})
    replicas, leaders = counts(placement)
    assert replicas == {1: 8, 2: 8, 3: 8}
    assert leaders == {1: 4, 2: 4, 3: 4}
    assert all(len(set(r)) == 2 for r in placement)


def test_same_inputs_same_placement() -> None:
    first = place_partitions(7, 3, [5, 1, 9, 4], {1: 3}, start_hint=11)
    assert first == place_partitions(7, 3, [4, 9, 1, 5], {1: 3}, start_hint=11)


def test_existing_load_steers_new_replicas_away() -> None:
    loaded = {1: 10, 2: 10}
    assert place_partitions(2, 1, [1, 2, 3], loaded, 0, loaded) == [[3], [3]]
    # the followers of a new topic avoid the loaded brokers too
    assert [r[1] for r in place_partitions(2, 2, [1, 2, 3, 4], {1: 9, 2: 9})] == [4, 3]


def test_no_live_broker_and_too_high_replication_factor() -> None:
    with pytest.raises(NoBrokersAvailable):
        place_partitions(1, 1, [], {})
    with pytest.raises(InvalidRequest):
        place_partitions(1, 3, [1, 2], {})


@given(
    brokers=st.lists(st.integers(0, 50), min_size=1, max_size=12, unique=True),
    partitions=st.integers(1, 200),
    factor_seed=st.integers(0, 100),
    start_hint=st.integers(0, 1000),
)
def test_balance_property(
    brokers: list[int], partitions: int, factor_seed: int, start_hint: int
) -> None:
    factor = 1 + factor_seed % len(brokers)
    placement = place_partitions(partitions, factor, brokers, {}, start_hint)
    assert len(placement) == partitions
    assert all(len(r) == factor and len(set(r)) == factor for r in placement)
    assert all(set(r) <= set(brokers) for r in placement)
    replicas, leaders = counts(placement)
    replica_counts = [replicas.get(b, 0) for b in brokers]
    leader_counts = [leaders.get(b, 0) for b in brokers]
    assert max(replica_counts) - min(replica_counts) <= 1
    assert max(leader_counts) - min(leader_counts) <= 1


def test_election_is_clean_and_ordered() -> None:
    assert elect_leader([1, 2, 3], isr=[2, 3], live=[1, 2, 3]) == 2
    assert elect_leader([3, 2, 1], isr=[1, 2, 3], live=[1, 2]) == 2
    assert elect_leader([1, 2], isr=[1], live=[2]) is None  # 2 is live but not in sync
