"""Load for a fault run: keyed, sequence-numbered producers and a consumer group.

Each :class:`ProducerWorker` is a thread with its own tidemq ``Producer`` (acks=all,
idempotence as configured by default). It cycles through its keys, sending
``"<producer>:<key>:<seq>"`` with a per-key seq, paced to ``rate_per_s`` and with at
most ``max_outstanding`` unacknowledged sends (a bounded queue: an offline partition
slows the worker instead of growing memory). Every acknowledgement and every failure is
one history event, written from the future's callback.

Each :class:`ConsumerWorker` is a thread polling a group member and writing a ``recv``
event per record. Errors of either kind are written as ``note`` events and the worker
goes on (the cluster is being hurt on purpose); a consumer whose client died is
replaced by a new one.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.fault.harness.history import HistoryWriter, decode_value, encode_value
from tidemq import Consumer, Producer
from tidemq.errors import TideError


class ProducerWorker(threading.Thread):
    def __init__(
        self,
        name: str,
        topic: str,
        config: dict[str, Any],
        history: HistoryWriter,
        keys: int = 8,
        rate_per_s: float = 100.0,
        max_outstanding: int = 500,
        producer_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name=f"fault-{name}", daemon=True)
        self.producer_name = name
        self.topic = topic
        self.config = config
        self.history = history
        self.keys = [f"k{i}" for i in range(keys)]
        self.interval_s = 1.0 / rate_per_s
        self.outstanding = threading.BoundedSemaphore(max_outstanding)
        self.options = {"acks": "all", "delivery_timeout_ms": 60_000, "linger_ms": 5}
        self.options.update(producer_options or {})
        self.stop_event = threading.Event()
        self.sent = 0
        self.acked = 0
        self.acked_ids: set[tuple[str, int]] = set()  # (key, seq)
        self.failed = 0
        self.error: BaseException | None = None
        self.producer: Producer | None = None

    def _callback(self, key: str, seq: int) -> Any:
        def done(future: Any) -> None:
            try:
                error = future.exception(0)
                if error is None:
                    metadata = future.result(0)
                    self.acked += 1
                    self.acked_ids.add((key, seq))
                    self.history.write(
                        "ack", producer=self.producer_name, key=key, seq=seq,
                        topic=metadata.topic, partition=metadata.partition,
                        offset=metadata.offset,
                    )  # fmt: skip
                else:
                    self.failed += 1
                    self.history.write(
                        "fail", producer=self.producer_name, key=key, seq=seq,
                        topic=self.topic, error=repr(error),
                    )  # fmt: skip
            finally:
                self.outstanding.release()

        return done

    def run(self) -> None:
        try:
            self.producer = Producer(**self.config, **self.options)
            self._loop(self.producer)
        except BaseException as error:  # surfaced by stop()
            self.error = error
            self.history.write("note", what="producer died", producer=self.producer_name,
                               error=repr(error))  # fmt: skip

    def _loop(self, producer: Producer) -> None:
        seqs = dict.fromkeys(self.keys, 0)
        next_send = time.monotonic()
        index = 0
        while not self.stop_event.is_set():
            key = self.keys[index % len(self.keys)]
            index += 1
            while not self.outstanding.acquire(timeout=0.2):
                if self.stop_event.is_set():
                    return
            seq = seqs[key]
            seqs[key] += 1
            try:
                future = producer.send(
                    self.topic, encode_value(self.producer_name, key, seq), key=key
                )
            except TideError as error:
                self.outstanding.release()
                self.failed += 1
                self.history.write("fail", producer=self.producer_name, key=key, seq=seq,
                                   topic=self.topic, error=repr(error))  # fmt: skip
                continue
            self.sent += 1
            future.add_done_callback(self._callback(key, seq))
            next_send += self.interval_s
            delay = next_send - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                next_send = time.monotonic()

    def stop(self, flush_timeout_s: float = 60.0) -> None:
        """Stops sending, waits for what is in flight (each ends acked or failed)."""
        self.stop_event.set()
        self.join(10.0)
        producer = self.producer
        if producer is not None:
            try:
                producer.flush(flush_timeout_s)
            except TideError as error:
                self.history.write("note", what="flush failed", producer=self.producer_name,
                                   error=repr(error))  # fmt: skip
            producer.close(10.0)


class ConsumerWorker(threading.Thread):
    def __init__(
        self,
        name: str,
        topics: list[str],
        group: str,
        config: dict[str, Any],
        history: HistoryWriter,
        session_timeout_ms: int = 6000,
    ) -> None:
        super().__init__(name=f"fault-{name}", daemon=True)
        self.consumer_name = name
        self.topics = topics
        self.group = group
        self.config = config
        self.history = history
        self.session_timeout_ms = session_timeout_ms
        self.stop_event = threading.Event()
        self.received = 0
        self.received_ids: set[tuple[str, str, int]] = set()  # (producer, key, seq)

    def _open(self) -> Consumer:
        return Consumer(
            *self.topics, group=self.group, session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=500, auto_commit_interval_ms=1000, **self.config,
        )  # fmt: skip

    def run(self) -> None:
        consumer: Consumer | None = None
        while not self.stop_event.is_set():
            try:
                if consumer is None:
                    consumer = self._open()
                self._record(consumer.poll(timeout=0.5, max_records=500))
            except TideError as error:
                self.history.write("note", what="consumer error", consumer=self.consumer_name,
                                   error=repr(error))  # fmt: skip
                if consumer is not None:
                    self._close(consumer)
                consumer = None
                self.stop_event.wait(0.5)  # back off before joining again
        if consumer is not None:
            self._close(consumer)

    def _record(self, messages: list[Any]) -> None:
        for message in messages:
            decoded = decode_value(message.value or b"")
            if decoded is None:
                continue
            producer, key, seq = decoded
            self.received += 1
            self.received_ids.add(decoded)
            self.history.write(
                "recv", consumer=self.consumer_name, topic=message.topic,
                partition=message.partition, offset=message.offset, producer=producer,
                key=key, seq=seq,
            )  # fmt: skip

    def _close(self, consumer: Consumer) -> None:
        try:
            consumer.close(5.0)
        except TideError as error:
            self.history.write("note", what="consumer close failed",
                               consumer=self.consumer_name, error=repr(error))  # fmt: skip

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30.0)
