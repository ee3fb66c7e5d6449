"""Round-trip microbenchmark (seventh session, docs/BENCHMARKS.md): tidemq's channel: POST /v1/fetch (wait_ms 0) to broker 1 of a `tide up` cluster in /tmp/base (with a topic `idle`), back to back and with a 5 ms idle gap."""

import json
import time

from tidemq.eventloop import run
from tidemq.tls import TlsFiles, client_context
from tidemq.transport import HttpTransport

T = "/tmp/base/tls"
c = json.load(open("/tmp/base/cluster.json"))
url = c["brokers"][0]["url"]


async def main():
    t = HttpTransport(
        client_context(TlsFiles(f"{T}/ca.pem", f"{T}/client.pem", f"{T}/client-key.pem")),
        {},
        8,
        10_000,
    )
    # a partition this broker leads
    body = None
    for p in range(12):
        b = json.dumps(
            {"partitions": [{"topic": "idle", "partition": p, "offset": 0}], "wait_ms": 0}
        ).encode()
        try:
            await t.request(
                "POST",
                f"{url}/v1/fetch",
                data=b,
                headers={
                    "Accept": "application/vnd.tidemq.fetch",
                    "Content-Type": "application/json",
                },
            )
        except Exception:
            continue
        body = b
        break
    for gap in GAPS:
        ts = []
        for i in range(2000):
            s = time.perf_counter()
            await t.request(
                "POST",
                f"{url}/v1/fetch",
                data=body,
                headers={
                    "Accept": "application/vnd.tidemq.fetch",
                    "Content-Type": "application/json",
                },
            )
            ts.append((time.perf_counter() - s) * 1e6)
            if gap:
                time.sleep(gap)
        ts.sort()
        print(
            f"tidemq fetch gap {gap * 1000:.0f} ms: p50 {ts[1000]:.0f} us p90 {ts[1800]:.0f} p99 {ts[1980]:.0f}"
        )
    await t.close()


import cProfile
import os
import pstats

GAPS = [float(x) for x in os.environ.get("GAPS", "0,0.005,0,0.005").split(",")]
if os.environ.get("PROF"):
    cProfile.run("run(main())", "/tmp/tping.prof")
    pstats.Stats("/tmp/tping.prof").sort_stats("tottime").print_stats(25)
else:
    run(main())
