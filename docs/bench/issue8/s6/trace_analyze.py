"""Joins the stage rows trace_sitecustomize.py wrote (/tmp/trace/out-PID.txt) by
each batch's first send time and prints each stage's p50/p90/p99."""

import collections
import glob
from pathlib import Path

rows = collections.defaultdict(dict)
for f in glob.glob("/tmp/trace/out-*.txt"):
    for line in Path(f).read_text().splitlines():
        p = line.split()
        k, s = p[0], int(p[1])
        ts = list(map(int, p[2:]))
        d = rows[s]
        if k == "P":
            d.setdefault("P0", ts[0])
            d.setdefault("P1", ts[1])
        else:
            d.setdefault(k, ts[0])


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


full = {s: d for s, d in rows.items() if all(k in d for k in ("S", "P0", "P1", "F", "D", "C", "R"))}
print("batches", len(rows), "with every stage", len(full))
stages = [
    ("send->drained (producer)", None, "S"),
    ("drained->leader", "S", "P0"),
    ("send->leader", None, "P0"),
    ("leader->follower apply", "P0", "F"),
    ("follower apply->durable", "F", "D"),
    ("durable->consumer answer", "D", "C"),
    ("consumer answer->received", "C", "R"),
    ("send->received", None, "R"),
    ("send->ack(leader)", None, "P1"),
]
for name, a, b in stages:
    v = [((d[b] - (d[a] if a else s)) / 1e6) for s, d in full.items()]
    print(f"{name:28s} p50 {pct(v, 0.5):6.2f}  p90 {pct(v, 0.9):6.2f}  p99 {pct(v, 0.99):6.2f} ms")
