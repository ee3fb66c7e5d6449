"""A small consumer group member: polls, then commits what it processed. The
compose stack's consumer services, and the load of the live monitoring test.
Configuration from TIDE_* (tide env).

    python examples/demo_consumer.py --topic demo --group demo [--seconds 30]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from tidemq import Consumer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topic", default="demo")
    parser.add_argument("--group", default="demo")
    parser.add_argument("--seconds", type=float, default=None, help="stop after (default: never)")
    options = parser.parse_args()
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = time.monotonic()
    received = 0
    last_report = started
    with Consumer(options.topic, group=options.group) as consumer:
        while not stopping:
            if options.seconds is not None and time.monotonic() - started >= options.seconds:
                break
            messages = consumer.poll(timeout=0.5, max_records=500)
            if messages:
                received += len(messages)
                consumer.commit()
            if time.monotonic() - last_report >= 10:
                print(f"received {received}", flush=True)
                last_report = time.monotonic()
    print(f"received {received} messages", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
