"""The consumer's bounded hand-off buffer and fetch decoding."""

from __future__ import annotations

import threading

import pytest

from tidemq.client.consumer import decode_messages
from tidemq.client.fetch_buffer import FetchBuffer, Message
from tidemq.errors import CorruptRecord, InternalError
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
    assert buffer.positions() == {TP: 5}  # handed out, not done: nothing to commit yet
    buffer.mark_done()  # the application polls again
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
    buffer.begin_revoke(TP)
    assert not buffer.owns(TP)
    assert not buffer.revocation_ready(TP)  # offsets 0 and 1 are in the application's hands
    assert buffer.take(10, 0.01) == []  # nothing more of a revoking partition
    buffer.mark_done()
    assert buffer.revocation_ready(TP)
    assert buffer.remove(TP) == 2
    assert buffer.put(TP, messages(5, 1), 10) is False  # late fetch of a revoked partition
    assert buffer.take(10, 0.01) == []


def test_subscribe_mode_advances_only_processed_positions() -> None:
    buffer = FetchBuffer(1000, lambda _: None)
    buffer.assign(TP)
    buffer.seek(TP, 0)
    buffer.put(TP, messages(0, 3), 30)
    taken = buffer.take(3, 0, advance=False)
    assert buffer.position(TP) == 0
    assert buffer.hand_out(taken[0])
    assert not buffer.hand_out(taken[2])  # only the next offset
    assert buffer.position(TP) == 1 and buffer.positions() == {TP: 0}
    buffer.processed(TP, taken[0].offset + 1)
    assert buffer.positions() == {TP: 1}


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


def test_a_handler_error_rewinds_to_the_first_record_not_done() -> None:
    buffer = FetchBuffer(1000, lambda _: None)
    buffer.assign(TP)
    buffer.seek(TP, 0)
    buffer.put(TP, messages(0, 3), 30)
    buffer.put(TP, messages(3, 3), 30)
    taken = buffer.take(10, 0, advance=False)
    assert buffer.hand_out(taken[0])
    buffer.processed(TP, 1)
    assert buffer.hand_out(taken[1])  # the handler raises on offset 1
    assert buffer.rewind({TP}) == {TP: 1}  # fetch again from 1: it is delivered again
    assert buffer.position(TP) == 1 and buffer.positions() == {TP: 1}
    assert not buffer.hand_out(taken[2])  # the rest of the stale chunk is never handed out


def test_revocation_waits_for_the_handler_in_flight() -> None:
    signals: list[int] = []
    buffer = FetchBuffer(1000, lambda _: None, lambda: signals.append(1))
    buffer.assign(TP)
    buffer.seek(TP, 0)
    buffer.put(TP, messages(0, 3), 30)
    taken = buffer.take(10, 0, advance=False)
    assert buffer.hand_out(taken[0])
    buffer.begin_revoke(TP)
    assert not buffer.revocation_ready(TP)
    assert not buffer.hand_out(taken[1])
    buffer.processed(TP, 1)
    assert signals == [1] and buffer.revocation_ready(TP)
    assert buffer.remove(TP) == 1


def test_poison_marker_hands_out_what_is_before_it_then_raises_until_seek() -> None:
    buffer = FetchBuffer(1000, lambda _: None)
    buffer.assign(TP)
    buffer.assign(("t", 1))
    buffer.seek(TP, 0)
    buffer.put(TP, messages(0, 2), 20)
    error = CorruptRecord("bad", topic="t", partition=0, offset=2, next_batch_offset=5)
    buffer.put_error(TP, error)
    assert [m.offset for m in buffer.take(10, 0)] == [0, 1]
    for _ in range(2):
        with pytest.raises(CorruptRecord) as raised:
            buffer.take(10, 0)
        assert (raised.value.topic, raised.value.partition, raised.value.offset) == ("t", 0, 2)
    assert buffer.seek(TP, 3)  # skip it
    buffer.put(TP, messages(3, 1), 10)
    assert [m.offset for m in buffer.take(10, 0)] == [3]


def test_nothing_is_handed_out_once_the_session_deadline_passed() -> None:
    now = [100.0]
    buffer = FetchBuffer(1000, lambda _: None, clock=lambda: now[0])
    buffer.assign(TP)
    buffer.seek(TP, 0)
    buffer.put(TP, messages(0, 4), 40)
    buffer.set_session_deadline(101.0)
    assert [m.offset for m in buffer.take(1, 0)] == [0]
    taken = buffer.take(1, 0, advance=False)
    now[0] = 101.0
    assert buffer.take(10, 0) == []
    assert not buffer.hand_out(taken[0])
    buffer.set_session_deadline(105.0)  # a heartbeat got through
    assert [m.offset for m in buffer.take(10, 0)] == [2, 3]


def test_a_background_failure_is_raised_by_take() -> None:
    buffer = FetchBuffer(1000, lambda _: None)
    result: list[BaseException] = []

    def waiter() -> None:
        try:
            buffer.take(1, 30)
        except InternalError as error:
            result.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    buffer.fail(InternalError("fetcher died"))
    thread.join(5)
    assert [str(e) for e in result] == ["fetcher died"]
    with pytest.raises(InternalError):
        buffer.take(1, 0)
