"""Run more simulation seeds than CI does: ``python -m tests.sim.run --seeds 100000``;
replay one: ``python -m tests.sim.run --seed 1234 --verbose``."""

from __future__ import annotations

import argparse
import sys
import time

from tests.sim.cluster import InvariantBroken
from tests.sim.test_simulation import CONFIGURATIONS, STEPS, Simulation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None, help="replay one seed")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    started = time.monotonic()
    for count, seed in enumerate(seeds, start=1):
        brokers, partitions, factor = CONFIGURATIONS[seed % len(CONFIGURATIONS)]
        simulation = Simulation(seed, brokers, partitions, factor)
        try:
            simulation.run(args.steps)
        except InvariantBroken as error:
            print("\n".join(simulation.trace[-200:]))
            print(f"FAILED seed {seed}: {error}")
            return 1
        if args.verbose:
            print("\n".join(simulation.trace))
            print(simulation.summary())
        if count % 1000 == 0:
            print(f"{count} seeds passed ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"all {len(seeds)} seeds passed in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
