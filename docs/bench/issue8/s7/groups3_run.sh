#!/usr/bin/env bash
# The latency bench with two extra consumer groups (extra_consumer.py) on its topic:
# three groups wait on every high-watermark advance. A = SRC_A, B = SRC_B, alternating.
# (seventh session) SRC_A / SRC_B: the src/ trees to compare (e.g. a worktree at db24a79 and
# this checkout's src). Run from anywhere; it works in the repository root.
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../../../.." && pwd); cd "$root"; OUT=${OUT:-/tmp/multi}; rm -rf $OUT; mkdir -p $OUT; REPS=${REPS:-3}; RATE=${RATE:-2000}
for side in A B; do src=$(eval echo \${SRC_$side}); .venv/bin/tide down --data-dir /tmp/mc-$side >/dev/null 2>&1; rm -rf /tmp/mc-$side
  PYTHONPATH=$src .venv/bin/tide up --brokers 3 --data-dir /tmp/mc-$side --detach >/dev/null 2>&1; done
for r in $(seq $REPS); do for side in A B; do src=$(eval echo \${SRC_$side}); t=mc$side$r
  PYTHONPATH=$src .venv/bin/python "$root/src/tidemq/cli/bench_latency.py" sweep --data-dir /tmp/mc-$side --topic $t --partitions 12 --replication-factor 2 --acks all --rates $RATE --warmup-seconds 5 --seconds 10 --p99-bound-ms 100000 --json-out $OUT/$side-$r.json >/dev/null 2>>$OUT/err.txt &
  bp=$!; sleep 2; pids=""
  for g in 1 2; do PYTHONPATH=$src .venv/bin/python $here/extra_consumer.py /tmp/mc-$side $t extra$g > /dev/null 2>>$OUT/err.txt & pids="$pids $!"; done
  wait $bp; kill $pids 2>/dev/null; wait $pids 2>/dev/null
done; done
for side in A B; do .venv/bin/tide down --data-dir /tmp/mc-$side >/dev/null 2>&1; done
python3 - $OUT $REPS <<'PY'
import json,sys,statistics
out,reps=sys.argv[1],int(sys.argv[2])
for side in 'AB':
  v=[json.load(open(f'{out}/{side}-{r}.json'))['steps'][0] for r in range(1,reps+1)]
  print(side,'p50 med %.2f'%statistics.median(s['p50_ms'] for s in v),'p99 med %.2f'%statistics.median(s['p99_ms'] for s in v),[s['p99_ms'] for s in v])
PY
