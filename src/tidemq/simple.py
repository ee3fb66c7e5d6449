"""The smallest API: one topic ("default"), one group ("default"), config from TIDE_*.

    from tidemq import simple
    simple.push("k", "v")          # returns once the message is acknowledged
    simple.pull()                  # -> (b"k", b"v") or None
    simple.subscribe(print)        # calls print(key, value) from a daemon thread

The producer and consumer are created lazily, once per process, and closed at exit
(flushing, committing, leaving the group). ``pull`` and ``subscribe`` share the one
consumer: use one or the other in a process. Delivery is at-least-once: pulled
messages are committed every few seconds and at exit.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable

from tidemq.client.consumer import Consumer
from tidemq.client.producer import Producer

TOPIC = "default"
GROUP = "default"
FIRST_PULL_WAIT_S = 15.0  # joining the group and a first fetch of each partition

_lock = threading.Lock()
_producer: Producer | None = None
_consumer: Consumer | None = None
_subscriber: threading.Thread | None = None
_ready = False


def _get_producer() -> Producer:
    global _producer
    with _lock:
        if _producer is None:
            _producer = Producer()
        return _producer


def _get_consumer() -> Consumer:
    global _consumer
    with _lock:
        if _consumer is None:
            _consumer = Consumer(TOPIC, group=GROUP)
        return _consumer


def push(key: bytes | str | None, value: bytes | str) -> None:
    """Sends one message to "default" and waits until it is acknowledged."""
    producer = _get_producer()
    future = producer.send(TOPIC, value, key=key)
    producer.flush()
    future.result()


def pull(timeout: float = 1.0) -> tuple[bytes | None, bytes | None] | None:
    """The next message of "default" for group "default" as (key, value), or None if
    none arrives within ``timeout`` s (the first call also waits to join the group).
    """
    global _ready
    consumer = _get_consumer()
    if not _ready:
        consumer.wait_until_ready(FIRST_PULL_WAIT_S)
        _ready = True
    messages = consumer.poll(timeout=timeout, max_records=1)
    if not messages:
        return None
    return messages[0].key, messages[0].value


def subscribe(handler: Callable[[bytes | None, bytes | None], object]) -> threading.Thread:
    """Calls ``handler(key, value)`` per message from a daemon thread; returns at once."""
    global _subscriber
    consumer = _get_consumer()
    thread = threading.Thread(
        target=consumer.subscribe,
        args=(lambda message: handler(message.key, message.value),),
        name="tidemq-simple-subscribe",
        daemon=True,
    )
    thread.start()
    _subscriber = thread
    return thread


def close() -> None:
    """Flushes the producer and closes both clients (also run at interpreter exit)."""
    global _producer, _consumer, _ready
    with _lock:
        producer, consumer = _producer, _consumer
        _producer = _consumer = None
        _ready = False
    if producer is not None:
        producer.close()
    if consumer is not None:
        consumer.close()


atexit.register(close)
