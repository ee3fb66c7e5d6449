"""subscribe() paths on the pure FetchBuffer (found by an adversarial review): a
chunk cut short by a lapsed session is fetched again, and at most once stops handing
out a partition that was released."""

import asyncio
import types

from tidemq.client.consumer import Consumer
from tidemq.client.fetch_buffer import FetchBuffer, Message

TP = ("t", 0)


def msg(offset: int) -> Message:
    return Message("t", 0, offset, b"k", str(offset).encode(), 0, ())


class InlineThread:
    def call(self, coro, timeout):
        return asyncio.run(coro)


def consumer_with(buffer: FetchBuffer, delivery: str) -> tuple[Consumer, list]:
    consumer = Consumer.__new__(Consumer)
    consumer._buffer, consumer._closed, consumer._delivery = buffer, False, delivery
    consumer._thread = InlineThread()
    consumer._connection = types.SimpleNamespace(request_timeout_ms=1000)
    consumer.group = "g"
    commits: list = []

    async def commit(positions):
        commits.append(dict(positions))

    consumer._commit = commit

    async def seek(positions, commit=False, strict=True):  # the fetcher starts over there
        for tp, position in positions.items():
            buffer.seek(tp, position)
            buffer.put(tp, [msg(offset) for offset in range(position, 4)], 100)

    consumer._seek = seek
    return consumer, commits


def test_a_chunk_cut_short_by_a_lapsed_session_is_fetched_again() -> None:
    now = [0.0]
    buffer = FetchBuffer(1 << 20, lambda p: None, clock=lambda: now[0])
    buffer.assign(TP)
    buffer.seek(TP, 0)
    buffer.set_session_deadline(8.0)  # heartbeat sent at 0, session 10 s, margin 2 s
    buffer.put(TP, [msg(i) for i in range(4)], 100)
    consumer, _ = consumer_with(buffer, "at_least_once")
    seen: list[int] = []

    def handler(m: Message) -> None:
        seen.append(m.offset)
        if m.offset == 1:
            now[0] = 8.5  # slow handler; the heartbeat sent at 1.0 is still waiting

    consumer._handle_chunk(handler, buffer.take(500, 0, advance=False))
    # The slow heartbeat (sent at 1.0) now succeeds: deadline 9.0 > now, so the
    # membership loop never runs _session_lapsed; the fetcher resumes at offset 4.
    buffer.set_session_deadline(9.0 + 5)
    buffer.put(TP, [msg(4), msg(5)], 50)
    consumer._handle_chunk(handler, buffer.take(500, 0, advance=False))
    assert seen == [0, 1, 2, 3, 4, 5], f"handler saw {seen}: offsets 2.. never delivered"


def test_at_most_once_stops_handing_out_a_released_partition() -> None:
    buffer = FetchBuffer(1 << 20, lambda p: None)
    buffer.assign(TP)
    buffer.seek(TP, 0)
    buffer.set_session_deadline(1e18)
    buffer.put(TP, [msg(i) for i in range(5)], 100)
    consumer, _ = consumer_with(buffer, "at_most_once")
    seen: list[int] = []

    def handler(m: Message) -> None:
        seen.append(m.offset)
        if m.offset == 0:  # a rebalance begins; done == handed, so it is released
            buffer.begin_revoke(TP)  # at once and the next owner starts at 5

    consumer._handle_at_most_once(handler, buffer.take(500, 0, advance=False))
    assert buffer.revocation_ready(TP)
    assert seen == [0], f"handed out {seen} after the partition was released"
