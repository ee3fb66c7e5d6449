"""The consumer's bounded hand-off buffer and fetch decoding."""

from __future__ import annotations

import threading

from tidemq.client.consumer import decode_messages
from tidemq.client.fetch_buffer import FetchBuffer, Message
from tidemq.wire.batch import build_batch, patch_batch

TP = ("t", 0)


def messages(start: int, count: int) -> list[Message]:
    return [Message("t", 0, start + i, None, b"v%d" % (start + i), 0, []) for i in range(count)]


def test_take_returns_in_order_and_advances_positions() -> None:
    freed: list[list[tuple[str, int]]] = []
    buffer = FetchBuffer(1000, freed.append)
    buffer.assign(TP)
    buffer.seek(TP, 5)
    assert buffer.positions() == {TP: 5}
    buffer.put(TP, messages(5, 3), 100)
    buffer.put(TP, messages(8, 3), 100)
    first = buffer.take(4, 0)
    assert [m.offset for m in first] == [5, 6, 7, 8]
    assert buffer.position(*[TP]) == 9
    assert [m.offset for m in buffer.take(10, 0)] == [9, 10]
    assert buffer.positions() == {TP: 11}
    assert buffer.take(10, 0.01) == []


def test_buffer_bound_and_space_callback() -> None:
    freed: list[list[tuple[str, int]]] = []
    buffer = FetchBuffer(150, freed.append)
    buffer.assign(TP)
    buffer.put(TP, messages(0, 2), 100)
    assert buffer.has_space(TP)
    buffer.put(TP, messages(2, 2), 100)
    assert not buffer.has_space(TP)  # the fetcher pauses here
    buffer.take(2, 0)
    assert freed == [[TP]] and buffer.has_space(TP)
    buffer.take(2, 0)
    assert freed == [[TP]]  # only crossing the bound calls back


def test_revoke_drops_buffered_records_and_returns_final_position() -> None:
    buffer = FetchBuffer(1000, lambda _: None)
    buffer.assign(TP)
    buffer.assign(("t", 1))
    buffer.seek(TP, 0)
    buffer.put(TP, messages(0, 5), 50)
    buffer.take(2, 0)
    assert buffer.revoke(TP) == 2
    assert not buffer.owns(TP)
    assert buffer.put(TP, messages(5, 1), 10) is False  # late fetch of a revoked partition
    assert buffer.take(10, 0.01) == []


def test_subscribe_mode_advances_only_processed_positions() -> None:
    buffer = FetchBuffer(1000, lambda _: None)
    buffer.assign(TP)
    buffer.seek(TP, 0)
    buffer.put(TP, messages(0, 3), 30)
    taken = buffer.take(3, 0, advance=False)
    assert buffer.position(TP) == 0
    assert buffer.advance(TP, taken[0].offset + 1)
    assert buffer.position(TP) == 1


def test_close_and_wakeup_release_a_waiting_take() -> None:
    buffer = FetchBuffer(1000, lambda _: None)
    result: list[list[Message]] = []
    thread = threading.Thread(target=lambda: result.append(buffer.take(1, 30)))
    thread.start()
    buffer.wakeup()
    thread.join(5)
    assert result == [[]]
    buffer.close()
    assert buffer.take(1, 30) == []


def test_decode_messages_skips_below_offset_and_finds_next_offset() -> None:
    batch = bytearray(build_batch([(b"k", b"a"), (None, b"b"), (b"k", b"c")], 1_000))
    patch_batch(batch, 0, 10, 1)
    decoded, next_offset = decode_messages("t", 0, bytes(batch), 11)
    assert [(m.offset, m.key, m.value) for m in decoded] == [(11, None, b"b"), (12, b"k", b"c")]
    assert next_offset == 13
    assert decode_messages("t", 0, b"", 7) == ([], 7)
