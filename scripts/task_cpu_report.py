#!/usr/bin/env python3
"""CPU per kind of asyncio task, per process, over a window: reads the counters that
scripts/task_cpu/sitecustomize.py writes (see there), waits, reads again, prints.

Usage: .venv/bin/python scripts/task_cpu_report.py DIR [--seconds 8] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def read(directory: Path) -> dict[int, dict[str, Any]]:
    found = {}
    for path in directory.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found[int(data["pid"])] = data
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    before = read(args.directory)
    time.sleep(args.seconds)
    after = read(args.directory)
    for pid, end in sorted(after.items()):
        start = before.get(pid)
        if start is None or end["t"] <= start["t"]:
            continue
        window = end["t"] - start["t"]
        process = (end["process_cpu"] - start["process_cpu"]) / window
        loop = (end["loop_threads_cpu"] - start["loop_threads_cpu"]) / window
        rows = []
        for kind, (steps, cpu, tasks) in end["tasks"].items():
            steps0, cpu0, tasks0 = start["tasks"].get(kind, (0, 0.0, 0))
            if cpu - cpu0 > 0:
                rows.append((cpu - cpu0, kind, steps - steps0, tasks - tasks0))
        in_tasks = sum(row[0] for row in rows) / window
        print(
            f"== {pid} {end['name']}: {window:.1f} s; process {process:.0%} of a core, "
            f"loop thread {loop:.0%} (tasks {in_tasks:.0%}, outside tasks {loop - in_tasks:.0%})"
        )
        for cpu, kind, steps, tasks in sorted(rows, reverse=True)[: args.top]:
            per_step = cpu / steps * 1e6 if steps else 0.0
            per_task = f"{cpu / tasks * 1e6:5.0f} us/task" if tasks else " " * 12
            print(
                f"  {cpu / window:6.1%}  {steps / window:6.0f} steps/s {per_step:5.0f} us/step"
                f"  {tasks / window:6.0f} tasks/s {per_task}  {kind}"
            )


if __name__ == "__main__":
    main()
