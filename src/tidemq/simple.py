"""The smallest API: one topic ("default"), one group ("default"), config from TIDE_*.

    from tidemq.simple import push, pull, subscribe
    push("k", "v")          # returns once the message is acknowledged
    pull()                  # -> (b"k", b"v") or None
    subscribe(print)        # calls print(key, value) from a background thread

This is the seed's client API, so its scripts run unchanged but for the import line:

* each ``subscribe(f)`` call is its own member of group "default": four calls, four
  subscribers sharing the partitions. ``f`` receives ``(key, value)`` as bytes.
* a script whose last statement is ``subscribe(f)`` keeps running and handling
  messages until it is interrupted (Ctrl-C, SIGINT or SIGTERM); then every member
  commits what its handler finished and leaves the group. A signal that arrives
  while the script itself still runs interrupts it as usual.
* ``pull`` uses one more member of its own (created on first use).

Delivery is at least once: a message counts as processed when ``f`` returns (or when
``pull`` is called again). If ``f`` raises, the error is logged and the message is
delivered again after a second. A record that cannot be decoded ("poison") is logged
with its topic, partition and offset and skipped by subscribers; ``pull`` raises
:class:`~tidemq.errors.CorruptRecord` and ``skip(error)`` moves past it.

The producer and the consumers are created lazily, once per process, and closed at
exit (flushing, committing, leaving the group).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import threading
import types
from collections.abc import Callable
from typing import Any

from tidemq.client.consumer import Consumer
from tidemq.client.fetch_buffer import Message
from tidemq.client.producer import Producer
from tidemq.errors import ClientClosed, CorruptRecord

TOPIC = "default"
GROUP = "default"
FIRST_PULL_WAIT_S = 15.0  # joining the group and a first fetch of each partition
HANDLER_RETRY_S = 1.0  # after a handler raised, before its message is delivered again

log = logging.getLogger("tidemq.simple")

Handler = Callable[[bytes | None, bytes | None], object]

_lock = threading.Lock()
_producer: Producer | None = None
_consumer: Consumer | None = None
_subscribers: list[Consumer] = []
_ready = False
_stop = threading.Event()  # set by close(): subscribers and the keeper end
_keeper: threading.Thread | None = None
_script_finished = False  # the main thread reached the end of the script


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
    Raises CorruptRecord at an undecodable record: ``skip(error)`` moves past it.
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


def skip(error: CorruptRecord) -> None:
    """Moves ``pull`` past the undecodable record ``error`` names."""
    _get_consumer().seek(error.topic, error.partition, error.offset + 1)


def subscribe(handler: Handler) -> threading.Thread:
    """Joins group "default" as a new member and calls ``handler(key, value)`` per
    message from a background thread; returns at once. The process keeps running
    after the script ends, until it is interrupted."""
    consumer = Consumer(TOPIC, group=GROUP)
    with _lock:
        _subscribers.append(consumer)
    _keep_process_alive()
    thread = threading.Thread(
        target=_run_subscriber,
        args=(consumer, handler),
        name=f"tidemq-simple-subscriber-{len(_subscribers)}",
        daemon=True,
    )
    thread.start()
    return thread


def _run_subscriber(consumer: Consumer, handler: Handler) -> None:
    def deliver(message: Message) -> None:
        handler(message.key, message.value)

    while not _stop.is_set():
        try:
            consumer.subscribe(deliver)
            return  # closed
        except ClientClosed:
            return
        except CorruptRecord as error:
            log.error("skipping an undecodable record: %s", error)
            try:
                consumer.seek(error.topic, error.partition, error.offset + 1)
            except ClientClosed:
                return
        except Exception:
            if consumer.background_error is not None:
                log.exception("subscriber of group %s stopped", GROUP)
                return
            log.exception("the subscribe handler raised; its message will be delivered again")
            _stop.wait(HANDLER_RETRY_S)


def _keep_process_alive() -> None:
    """A non-daemon thread keeps the interpreter running after the script's last line
    until close(); a SIGINT / SIGTERM that arrives after that line ends it cleanly."""
    global _keeper
    with _lock:
        if _keeper is not None and _keeper.is_alive():
            return
        _stop.clear()
        _keeper = threading.Thread(target=_stop.wait, name="tidemq-simple-keeper")
        _keeper.start()
    if threading.current_thread() is not threading.main_thread():
        return
    register = getattr(threading, "_register_atexit", None)
    if register is not None:  # runs when the main thread finished the script
        register(_mark_script_finished)
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if previous in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(signum, functools.partial(_on_signal, previous))


def _mark_script_finished() -> None:
    global _script_finished
    _script_finished = True


def _on_signal(previous: Any, signum: int, frame: types.FrameType | None) -> None:
    if _script_finished:
        log.info("signal %d: leaving group %s", signum, GROUP)
        _stop.set()  # the keeper ends, the interpreter exits, close() runs at exit
        return
    signal.signal(signum, previous)
    if previous is signal.default_int_handler:
        raise KeyboardInterrupt
    os.kill(os.getpid(), signum)


def close() -> None:
    """Flushes the producer and closes every client (also run at interpreter exit)."""
    global _producer, _consumer, _ready
    _stop.set()
    with _lock:
        producer, consumer = _producer, _consumer
        subscribers = list(_subscribers)
        _subscribers.clear()
        _producer = _consumer = None
        _ready = False
    if producer is not None:
        producer.close()
    for member in [*subscribers, *([consumer] if consumer is not None else [])]:
        member.close()


atexit.register(close)
