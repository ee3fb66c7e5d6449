import collections
import glob
from pathlib import Path

rows = collections.defaultdict(dict)
ws = {}
for f in glob.glob("/tmp/trace/out-*.txt"):
    for line in Path(f).read_text().splitlines():
        p = line.split()
        k, s = p[0], int(p[1])
        ts = list(map(int, p[2:]))
        d = rows[s]
        if k == "W":
            ws.setdefault(f, []).append(ts[0])
            continue
        if k == "P":
            d.setdefault("P0", ts[0])
            d.setdefault("P1", ts[1])
        else:
            d.setdefault(k, ts[0])


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


seq = [
    ("send->encoded", None, "S"),
    ("->leader produce start", "S", "P0"),
    ("->leader appended", "P0", "A"),
    ("->session read", "A", "B"),
    ("->follower decoded", "B", "G"),
    ("->follower apply", "G", "F"),
    ("->follower durable", "F", "D"),
    ("->leader sees durable", "D", "H"),
    ("->consumer answer read", "H", "C"),
    ("->consumer decoded", "C", "R"),
    ("send->received", None, "R"),
    ("send->ack", None, "P1"),
]
import bisect

wall = sorted(t for v in ws.values() for t in v)
for s, d in rows.items():
    if "C" in d:
        i = bisect.bisect_right(wall, d["C"]) - 1
        if i >= 0 and wall[i] >= d.get("H", 0):
            d["Wk"] = wall[i]
seq[8:9] = [
    ("->ack ready (P1)", "H", "P1"),
    ("->consumer woken", "H", "Wk"),
    ("woken->answer read", "Wk", "C"),
]
keys = {k for _, a, b in seq for k in (a, b) if k}
full = {s: d for s, d in rows.items() if all(k in d for k in keys)}
print("batches", len(rows), "full", len(full))
for name, a, b in seq:
    v = [(d[b] - (d[a] if a else s)) / 1e6 for s, d in full.items()]
    print(f"{name:26s} p50 {pct(v, 0.5):6.3f} p90 {pct(v, 0.9):6.3f} p99 {pct(v, 0.99):6.3f}")
