"""The C page encoder (native/codec.c) writes exactly what the Python one does."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kemari_agent._native import ffi, lib

from kemari_agent.replication import native_codec
from kemari_agent.replication.codec import (
    PAGE_SIZE,
    Ack,
    Decoder,
    Pages,
    Vcpu,
    encode,
    encode_ack,
    pages_parts,
)
from kemari_agent.replication.primary import Primary, PrimaryState

pytestmark = pytest.mark.unit

MEM_PAGES = 64
MEMORY = bytearray(os.urandom(MEM_PAGES * PAGE_SIZE))


def native_bytes(memory, pfns) -> bytes:
    out = bytearray(native_codec.pages_size(len(pfns)))
    assert native_codec.write_pages(memory, pfns, out) == len(out)
    return bytes(out)


@given(st.lists(st.integers(0, MEM_PAGES - 1), max_size=80))
@settings(max_examples=200, deadline=None)
def test_pages_same_bytes_as_python(pfns):
    expected = b"".join(bytes(p) for p in pages_parts(MEMORY, pfns)[0])
    assert native_bytes(MEMORY, pfns) == expected


def test_pages_split_into_records_of_4096():
    memory = bytearray(os.urandom(4100 * PAGE_SIZE))
    pfns = list(range(4099, -1, -1))
    got = native_bytes(memory, pfns)
    assert got == b"".join(bytes(p) for p in pages_parts(memory, pfns)[0])
    records = Decoder().feed(encode(_hello()) + got)[1:]
    assert [r.page_count for r in records] == [4096, 4]
    assert isinstance(records[1], Pages) and list(records[1].pfns) == [3, 2, 1, 0]


@pytest.mark.parametrize("pfn", [MEM_PAGES, -1, 1 << 60])
def test_pfn_outside_memory_is_refused(pfn):
    with pytest.raises((ValueError, OverflowError)):
        native_bytes(MEMORY, [0, pfn])


def _hello():
    from kemari_agent.replication.codec import Hello, Role
    return Hello("vm", Role.PRIMARY, 1, 0, len(MEMORY))


def _checkpoint(native: bool, pfns, blob: bytes) -> bytes:
    old = native_codec.ENABLED
    native_codec.ENABLED = native
    try:
        p = Primary(name="vm", memory_size=len(MEMORY), generation=3, checkpoint_seq=0, now=0.0)
        p.data_to_send()
        p.state = PrimaryState.PROTECTED
        p.checkpoint(MEMORY, pfns, [Vcpu(0, 2, blob)], now=0.0)
        return p.data_to_send()
    finally:
        native_codec.ENABLED = old


@given(st.lists(st.integers(0, MEM_PAGES - 1), min_size=native_codec.MIN_PAGES, max_size=64),
       st.binary(max_size=300))
@settings(max_examples=100, deadline=None)
def test_checkpoint_same_bytes_native_or_python(pfns, blob):
    assert _checkpoint(True, pfns, blob) == _checkpoint(False, pfns, blob)


ZEROY = bytearray(MEMORY)
for _pfn in range(0, MEM_PAGES, 3):                       # every third page all zero
    ZEROY[_pfn * PAGE_SIZE:(_pfn + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
ZEROY[6 * PAGE_SIZE:7 * PAGE_SIZE] = bytes(PAGE_SIZE - 1) + b"\x01"   # zero but its last byte


@given(st.lists(st.integers(0, MEM_PAGES - 1), max_size=80))
@settings(max_examples=200, deadline=None)
def test_zero_detecting_pages_same_bytes_as_python(pfns):
    expected = b"".join(bytes(p) for p in pages_parts(ZEROY, pfns, detect_zero=True)[0])
    # Primary.sync_pages hands it memory that is not zeroed (native_codec.scratch):
    # every byte it returns must be one it wrote
    out = native_codec.scratch(native_codec.pages_size(len(pfns)))
    out[:] = b"\xa5" * len(out)
    written, data_pages = native_codec.write_pages_detect_zero(ZEROY, pfns, out)
    assert bytes(out[:written]) == expected
    assert data_pages == sum(any(ZEROY[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]) for p in pfns)


def test_zero_detecting_split_into_records_of_4096():
    memory = bytearray(4100 * PAGE_SIZE)
    for pfn in range(0, 4100, 2):
        memory[pfn * PAGE_SIZE + 100] = 7
    pfns = list(range(4099, -1, -1))
    out = bytearray(native_codec.pages_size(len(pfns)))
    written, data_pages = native_codec.write_pages_detect_zero(memory, pfns, out)
    assert data_pages == 2050
    assert bytes(out[:written]) == b"".join(
        bytes(p) for p in pages_parts(memory, pfns, detect_zero=True)[0])


@given(seq=st.integers(0, 2**64 - 1), generation=st.integers(0, 2**64 - 1))
def test_the_c_ack_is_the_python_one(seq: int, generation: int) -> None:
    """kcodec_ack (sent by the secondary's one-call read) against encode_ack."""
    out = ffi.new("uint8_t[]", lib.KCODEC_ACK_SIZE)
    lib.kcodec_ack(out, seq, generation)
    assert bytes(out) == encode_ack(seq, generation) == encode(Ack(seq, generation))


def python_lone_ack(data: bytes) -> Ack | None:
    """Decoder.lone_ack on a decoder past its HELLO, as the primary's is."""
    decoder = Decoder()
    assert decoder.feed(encode(_hello())) and decoder.takes_lone_ack()
    return decoder.lone_ack(data)


@given(seq=st.integers(0, 2**64 - 1), generation=st.integers(0, 2**64 - 1),
       at=st.integers(0, 40), flip=st.integers(0, 255), cut=st.integers(-3, 3))
def test_the_c_lone_ack_reads_what_the_decoder_does(seq: int, generation: int, at: int,
                                                    flip: int, cut: int) -> None:
    """kcodec_lone_ack (the primary's one-call ACK wait) against
    Decoder.lone_ack: the same ACK out of the same bytes, and None for the
    same others: one byte changed, the record cut or lengthened."""
    data = bytearray(encode_ack(seq, generation))
    if at < len(data):
        data[at] ^= flip
    data = data[:len(data) + cut] if cut < 0 else data + bytes(cut)
    got_seq, got_generation = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    taken = lib.kcodec_lone_ack(ffi.from_buffer(bytes(data)), len(data), got_seq, got_generation)
    want = python_lone_ack(bytes(data))
    assert bool(taken) == (want is not None)
    if want is not None:
        assert Ack(got_seq[0], got_generation[0]) == want
    if at >= len(data) and cut == 0:          # unchanged: both take it
        assert want == Ack(seq, generation)
