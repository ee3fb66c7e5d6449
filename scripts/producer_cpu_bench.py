"""The producer client's CPU per record and per request, against fake brokers.

Why: the latency bench (cli/bench_latency.py) needs a 3-broker cluster and measures
every process at once on a shared 2-core machine; the producer's own cost is lost in
the noise. Here one helper process plays the coordinator and three leader brokers
(plain HTTP, the request channel, answers shaped like the broker's, each held
``--answer-delay-ms`` as a replicated ack would be), and the measured process runs
the real ``Producer`` unchanged, sending keyed 100-byte records at a steady rate.
The helper's CPU is not the producer's: the numbers are the producer process's own
(all threads, and its loop thread alone).

    # side by side: alternate two source trees, several rounds, medians
    python scripts/producer_cpu_bench.py ab --a /work/main/src --b src --rounds 5

    python scripts/producer_cpu_bench.py serve --port 19500       # the fake brokers
    python scripts/producer_cpu_bench.py run --port 19500          # one measurement

Each ``run`` prints one JSON line: records and requests a second, CPU us per record
and per request (process and loop thread), and the loop thread's share of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import Any

BROKERS = 3


# -- the fake cluster (helper process) -------------------------------------------------


def serve(port: int, partitions: int, answer_delay_ms: float) -> None:
    import msgspec
    from aiohttp import WSMsgType, web

    from tidemq.wire.batch import iter_headers
    from tidemq.wire.channel import HELLO_ID, ChannelAnswer, decode_request, encode_answer
    from tidemq.wire.produce import decode_produce

    urls = [f"http://127.0.0.1:{port + index}" for index in range(BROKERS)]
    log_end: dict[tuple[str, int], int] = {}
    stats = {"requests": 0, "entries": 0, "records": 0}
    delay_s = answer_delay_ms / 1000

    def topic_json(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "partitions": [
                {"partition": p, "leader_url": urls[p % BROKERS], "leader_epoch": 1}
                for p in range(partitions)
            ],
        }

    async def metadata(request: web.Request) -> web.Response:
        names = request.query.get("topics", "").split(",")
        return web.json_response({"topics": [topic_json(name) for name in names if name]})

    async def producers(_: web.Request) -> web.Response:
        return web.json_response({"producer_id": 1, "producer_epoch": 0})

    async def stats_handler(_: web.Request) -> web.Response:
        return web.json_response(stats)

    def entry_result(topic: str, partition: int, batches: memoryview) -> dict[str, Any]:
        tp = (topic, partition)
        base = log_end.get(tp, 0)
        offsets = []
        end = base
        for header in iter_headers(batches):
            offsets.append(end)
            end += header.record_count
        log_end[tp] = end
        stats["records"] += end - base
        return {
            "topic": topic,
            "partition": partition,
            "base_offset": base,
            "last_offset": end - 1,
            "batch_base_offsets": offsets,
            "log_end_offset": end,
            "high_watermark": end,
        }

    async def answer(socket: web.WebSocketResponse, frame: bytes) -> None:
        request = decode_request(frame)
        entries = decode_produce(request.body)
        stats["requests"] += 1
        stats["entries"] += len(entries)
        results = [entry_result(e.topic, e.partition, e.batches) for e in entries]
        await asyncio.sleep(delay_s)
        body = msgspec.json.encode({"results": results})
        reply = ChannelAnswer(request.request_id, 200, "application/json", {}, body)
        await socket.send_bytes(encode_answer(reply))

    async def channel(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(max_msg_size=1 << 24)
        await socket.prepare(request)
        hello = json.dumps({"max_body_bytes": 1 << 20}).encode()
        await socket.send_bytes(encode_answer(ChannelAnswer(HELLO_ID, 200, "", {}, hello)))
        tasks = set()
        async for message in socket:
            if message.type is not WSMsgType.BINARY:
                break
            task = asyncio.ensure_future(answer(socket, message.data))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return socket

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/metadata", metadata)
        app.router.add_post("/v1/producers", producers)
        app.router.add_get("/stats", stats_handler)
        app.router.add_get("/v1/channel", channel)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for index in range(BROKERS):
            await web.TCPSite(runner, "127.0.0.1", port + index).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(main())


# -- the measured producer -------------------------------------------------------------


def thread_cpu_s(thread: threading.Thread) -> float:
    ident = thread.ident
    if ident is None:
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def broker_stats(port: int) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as answer:
        stats: dict[str, int] = json.loads(answer.read())
        return stats


def send_at_rate(producer: Any, rate: int, seconds: float, keys: list[bytes]) -> int:
    """Like bench_latency's ``_send_at_rate``: on schedule, catching up in bursts."""
    total = int(rate * seconds)
    sent = 0
    pack = struct.Struct(">q").pack
    pad = b"x" * 92
    send = producer.send
    started = time.monotonic()
    while sent < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1)
        if due <= sent:
            time.sleep(0.0005)  # bench_latency's SEND_IDLE_S
            continue
        for index in range(sent, due):
            send("bench", pack(time.monotonic_ns()) + pad, key=keys[index % len(keys)])
        sent = due
    return sent


def run(port: int, rate: int, seconds: float, profile: str | None) -> dict[str, Any]:
    import tidemq
    from tidemq import Producer

    keys = [b"key-%d" % index for index in range(1000)]
    producer = Producer(bootstrap=f"http://127.0.0.1:{port}")
    try:
        producer.partitions_for("bench")
        send_at_rate(producer, rate, 1.0, keys)  # warm-up: channels open, caches filled
        producer.flush()
        loop_thread = producer._thread._thread
        before = broker_stats(port)
        cpu0, loop0, wall0 = time.process_time(), thread_cpu_s(loop_thread), time.monotonic()
        caller0 = time.thread_time()
        if profile:
            import yappi

            yappi.set_clock_type("cpu")
            yappi.start()
        sent = send_at_rate(producer, rate, seconds, keys)
        producer.flush()
        if profile:
            yappi.stop()
            yappi.get_func_stats().save(profile, type="pstat")
        caller = time.thread_time() - caller0
        cpu, loop, wall = (
            time.process_time() - cpu0,
            thread_cpu_s(loop_thread) - loop0,
            time.monotonic() - wall0,
        )
        after = broker_stats(port)
    finally:
        producer.close()
    requests = after["requests"] - before["requests"]
    records = after["records"] - before["records"]
    if records != sent:
        raise SystemExit(f"sent {sent} records, the brokers saw {records}")
    return {
        "tidemq": os.path.dirname(tidemq.__file__),
        "records_per_s": round(records / wall),
        "requests_per_s": round(requests / wall),
        "records_per_request": round(records / requests, 2),
        "entries_per_request": round((after["entries"] - before["entries"]) / requests, 2),
        "cpu_us_per_record": round(cpu / records * 1e6, 1),
        "cpu_us_per_request": round(cpu / requests * 1e6, 1),
        "loop_us_per_request": round(loop / requests * 1e6, 1),
        "caller_us_per_record": round(caller / records * 1e6, 1),
        "loop_core_share": round(loop / wall, 3),
        "process_core_share": round(cpu / wall, 3),
    }


def ab(args: argparse.Namespace) -> None:
    """Alternates the two trees' runs against one fake cluster; prints medians."""
    here = os.path.abspath(__file__)
    server = subprocess.Popen(
        [
            sys.executable,
            here,
            "serve",
            "--port",
            str(args.port),
            "--partitions",
            "12",
            "--answer-delay-ms",
            str(args.answer_delay_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.abspath(args.a)},
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the fake cluster did not start")
        results: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        for round_number in range(args.rounds):
            order = ("a", "b") if round_number % 2 == 0 else ("b", "a")
            for side in order:
                tree = os.path.abspath(getattr(args, side))
                output = subprocess.run(
                    [
                        sys.executable,
                        here,
                        "run",
                        "--port",
                        str(args.port),
                        "--rate",
                        str(args.rate),
                        "--seconds",
                        str(args.seconds),
                    ],
                    env={**os.environ, "PYTHONPATH": tree},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                result = json.loads(output.strip().splitlines()[-1])
                results[side].append(result)
                print(side, json.dumps(result), flush=True)
        fields = [
            "records_per_request",
            "cpu_us_per_record",
            "cpu_us_per_request",
            "loop_us_per_request",
            "caller_us_per_record",
            "loop_core_share",
            "process_core_share",
        ]
        print("median over", args.rounds, "rounds:")
        for field in fields:
            a = statistics.median(r[field] for r in results["a"])
            b = statistics.median(r[field] for r in results["b"])
            change = (b - a) / a * 100 if a else 0.0
            print(f"  {field:22s} a {a:9.2f}   b {b:9.2f}   {change:+6.1f} %")
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve")
    serve_parser.add_argument("--port", type=int, default=19500)
    serve_parser.add_argument("--partitions", type=int, default=12)
    serve_parser.add_argument("--answer-delay-ms", type=float, default=2.5)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--port", type=int, default=19500)
    run_parser.add_argument("--rate", type=int, default=2000)
    run_parser.add_argument("--seconds", type=float, default=8.0)
    run_parser.add_argument("--profile", help="write a yappi CPU profile (pstat) here")
    ab_parser = commands.add_parser("ab")
    ab_parser.add_argument("--a", required=True, help="source tree A (PYTHONPATH)")
    ab_parser.add_argument("--b", required=True, help="source tree B (PYTHONPATH)")
    ab_parser.add_argument("--port", type=int, default=19500)
    ab_parser.add_argument("--rate", type=int, default=2000)
    ab_parser.add_argument("--seconds", type=float, default=8.0)
    ab_parser.add_argument("--rounds", type=int, default=5)
    ab_parser.add_argument("--answer-delay-ms", type=float, default=2.5)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port, args.partitions, args.answer_delay_ms)
    elif args.command == "run":
        print(json.dumps(run(args.port, args.rate, args.seconds, args.profile)))
    else:
        ab(args)


if __name__ == "__main__":
    main()
