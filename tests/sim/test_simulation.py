"""Thousands of seeded simulations of replication under faults (tests/sim/cluster.py).

A failing seed prints itself and its trace; replay it with
``python -m tests.sim.run --seed N --verbose``.
"""

from __future__ import annotations

import os

import pytest
from tests.sim.cluster import InvariantBroken, Simulation

SEEDS = int(os.environ.get("TIDE_SIM_SEEDS", "2000"))
STEPS = 300
CONFIGURATIONS = [(3, 2, 2), (3, 1, 3), (4, 2, 3)]  # brokers, partitions, replication factor


def run_seed(seed: int) -> Simulation:
    brokers, partitions, factor = CONFIGURATIONS[seed % len(CONFIGURATIONS)]
    simulation = Simulation(seed, brokers, partitions, factor)
    try:
        simulation.run(STEPS)
    except InvariantBroken as error:
        trace = "\n".join(simulation.trace[-60:])
        pytest.fail(f"seed {seed}: {error}\nlast steps:\n{trace}", pytrace=False)
    return simulation


@pytest.mark.parametrize("chunk", range(10))
def test_no_acknowledged_record_is_lost_under_faults(chunk: int) -> None:
    per_chunk = SEEDS // 10
    totals = {"acknowledged": 0, "read": 0, "elections": 0}
    for seed in range(chunk * per_chunk, (chunk + 1) * per_chunk):
        for name, value in run_seed(seed).summary().items():
            totals[name] += value
    # The runs did something: records were acknowledged and read, leaders changed.
    assert totals["acknowledged"] > per_chunk and totals["read"] > per_chunk
    assert totals["elections"] > per_chunk


def test_a_seed_replays_exactly() -> None:
    first, second = run_seed(7), run_seed(7)
    assert first.trace == second.trace and first.acknowledged == second.acknowledged
