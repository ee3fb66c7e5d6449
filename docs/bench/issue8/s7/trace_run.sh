#!/usr/bin/env bash
# Usage (from the repository root): docs/bench/issue8/s7/trace_run.sh RATE
# A traced latency run on a fresh 3-broker cluster (12 partitions, RF 2, acks=all):
# the tracer is installed as sitecustomize for the cluster and the bench; brokers
# dump their stage rows on SIGUSR2, the bench at exit; then the stages are joined.
# Diagnosis only: it wraps a few functions, so absolute times are ~5% higher.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
rate=$1
site=$(mktemp -d); cp "$here/trace_sitecustomize.py" "$site/sitecustomize.py"
data=$(mktemp -d)/cluster
mkdir -p /tmp/trace; rm -f /tmp/trace/out-*.txt
PYTHONPATH=$site .venv/bin/tide up --brokers 3 --data-dir "$data" --detach >/dev/null
PYTHONPATH=$site .venv/bin/python src/tidemq/cli/bench_latency.py sweep --data-dir "$data" \
    --partitions 12 --replication-factor 2 --acks all --rates "$rate" --seconds 10 \
    --p99-bound-ms 100000 --json-out "$site/run.json" >/dev/null 2>&1
for pid in $(python3 -c "import json,sys;print(' '.join(str(b['pid']) for b in json.load(open(sys.argv[1]))['brokers']))" "$data/cluster.json"); do
    kill -USR2 "$pid"
done
sleep 1
python3 -c "import json,sys;[print('bench', s['rate_per_s'], 'p50', s['p50_ms'], 'p99', s['p99_ms']) for s in json.load(open(sys.argv[1]))['steps']]" "$site/run.json"
python3 "$here/trace_analyze.py"
.venv/bin/tide down --data-dir "$data" >/dev/null 2>&1
rm -rf "$site" "$(dirname "$data")"
