"""Full record framing: the broker's check on produce and the consumer's decoder agree.

A batch whose CRC is valid but whose records' fields do not fit their lengths
("poison") must be refused by ``check_batches``; a consumer that still meets one is
told the exact offset, gets every record before it, and can skip past it.
"""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidemq.errors import CorruptBatch
from tidemq.wire.batch import (
    CRC_START,
    HEADER_SIZE,
    RECORD_HEADER,
    build_batch,
    check_batches,
    decode_fetch,
    decode_records,
    patch_batch,
)


def reseal(batch: bytearray) -> bytes:
    """Recomputes the CRC, as a buggy or hostile producer would."""
    struct.pack_into(">I", batch, 17, zlib.crc32(memoryview(batch)[CRC_START:]))
    return bytes(batch)


def poison(batch: bytes, record: int, key_length: int) -> bytes:
    """Rewrites one record's key_length (length chain intact) and reseals the CRC."""
    data = bytearray(batch)
    cursor = HEADER_SIZE
    for _ in range(record):
        cursor += 4 + struct.unpack_from(">I", data, cursor)[0]
    struct.pack_into(">i", data, cursor + 8, key_length)
    return reseal(data)


def five(base_offset: int = 0) -> bytes:
    data = bytearray(build_batch([(b"k%d" % i, b"value-%d" % i) for i in range(5)], 1000))
    patch_batch(data, 0, base_offset, 0)
    return bytes(data)


def test_check_batches_refuses_fields_that_overrun_a_record() -> None:
    bad = poison(five(), 2, 40)  # the record's length still chains, its fields do not
    with pytest.raises(CorruptBatch, match="record 2"):
        check_batches(bad)


def test_check_batches_refuses_negative_lengths_and_bad_headers() -> None:
    with pytest.raises(CorruptBatch, match="record 0"):
        check_batches(poison(five(), 0, -7))
    batch = bytearray(build_batch([(b"k", b"v")], 1000, [[("h", b"x")]]))
    name_at = HEADER_SIZE + RECORD_HEADER.size + 2 + 2
    batch[name_at] = 0xFF  # header name no longer UTF-8
    with pytest.raises(CorruptBatch, match="UTF-8"):
        check_batches(reseal(batch))


def test_decode_fetch_stops_at_the_poison_record_with_its_offset() -> None:
    body = five(100) + poison(five(105), 2, 40) + five(110)
    fetched = decode_fetch(body, 100, "t", 3)
    assert [m.offset for m in fetched.messages] == [100, 101, 102, 103, 104, 105, 106]
    assert fetched.undecodable is not None
    assert fetched.undecodable.offset == 107
    assert fetched.undecodable.next_batch_offset == 110
    assert fetched.next_offset == 107
    with pytest.raises(CorruptBatch, match="offset 107"):
        decode_records(body, 100)


def test_decode_fetch_resumes_after_a_skipped_record() -> None:
    body = poison(five(105), 2, 40) + five(110)
    fetched = decode_fetch(body, 108, "t", 3)  # the application skipped 107
    assert fetched.undecodable is None
    assert [m.offset for m in fetched.messages] == [108, 109, 110, 111, 112, 113, 114]
    assert fetched.next_offset == 115


def test_crc_mismatch_reports_the_first_wanted_offset_of_the_batch() -> None:
    data = bytearray(five(20))
    data[-1] ^= 0xFF
    fetched = decode_fetch(bytes(data), 22)
    assert fetched.messages == []
    assert fetched.undecodable is not None and fetched.undecodable.offset == 22
    assert "CRC" in fetched.undecodable.reason


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.binary(max_size=20)),
            st.one_of(st.none(), st.binary(max_size=40)),
            st.lists(st.tuples(st.text(max_size=5), st.binary(max_size=8)), max_size=2),
        ),
        min_size=1,
        max_size=6,
    ),
    st.data(),
)
def test_what_check_batches_accepts_decodes_and_vice_versa(
    records: list, data: st.DataObject
) -> None:
    batch = build_batch([(k, v) for k, v, _ in records], 1000, [h or None for _, _, h in records])
    check_batches(batch)
    assert [(m.key, m.value) for m in decode_records(batch)] == [(k, v) for k, v, _ in records]
    position = data.draw(st.integers(HEADER_SIZE, len(batch) - 1))
    damaged = bytearray(batch)
    damaged[position] ^= data.draw(st.integers(1, 255))
    resealed = reseal(damaged)
    try:
        check_batches(resealed)
    except CorruptBatch:
        refused = True
    else:
        refused = False
    assert refused == (decode_fetch(resealed).undecodable is not None)
