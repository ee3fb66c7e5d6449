"""A small steady producer: the compose stack's producer services, and the load of
the live monitoring test. Configuration from TIDE_* (tide env).

    python examples/demo_producer.py --topic demo --rate 20 [--seconds 30]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from tidemq import Producer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topic", default="demo")
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    parser.add_argument("--keys", type=int, default=16, help="distinct keys")
    parser.add_argument("--seconds", type=float, default=None, help="stop after (default: never)")
    options = parser.parse_args()
    if options.rate <= 0 or options.keys < 1:
        parser.error("--rate must be > 0 and --keys >= 1")
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = time.monotonic()
    sent = 0
    with Producer() as producer:
        while not stopping:
            elapsed = time.monotonic() - started
            if options.seconds is not None and elapsed >= options.seconds:
                break
            due = int(elapsed * options.rate) + 1
            for number in range(sent, due):
                producer.send(
                    options.topic, f"message {number}", key=f"key-{number % options.keys}"
                )
            sent = max(sent, due)
            if sent % max(1, int(options.rate * 10)) == 0:
                print(f"sent {sent}", flush=True)
            time.sleep(min(0.1, 1 / options.rate))
        producer.flush()
    print(f"sent {sent} messages", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
