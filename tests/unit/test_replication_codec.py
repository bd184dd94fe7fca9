"""Replication stream codec: every record round-trips, any chunking decodes the
same, and malformed input of any kind raises StreamError and nothing else."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari_agent.replication.codec import (
    HEADER,
    MAX_PAGES_PER_RECORD,
    PAGE_SIZE,
    PFN_MASK,
    VERSION,
    Ack,
    CheckpointEnd,
    Decoder,
    Device,
    DiskWrite,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    HelloFlag,
    Pages,
    RecordFlag,
    RecordType,
    Role,
    SyncProgress,
    Unknown,
    Vcpu,
    encode,
    encode_ack,
    encode_error,
    pages_parts,
)
from kemari_agent.replication.errors import (
    MalformedRecord,
    NotAKemariStream,
    RecordTooLarge,
    StreamError,
    TruncatedStream,
    UnknownRecordType,
    UnsupportedVersion,
)

pytestmark = pytest.mark.unit

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
pfn = st.integers(0, PFN_MASK)
blob = st.binary(max_size=300)


@st.composite
def pages(draw: st.DrawFn) -> Pages:
    pfns = draw(st.lists(pfn, max_size=6))
    zeros = draw(st.lists(pfn, max_size=6))
    data = b"".join(draw(st.binary(min_size=1, max_size=8)).ljust(PAGE_SIZE, b"\x5a")
                    for _ in pfns)
    return Pages(pfns, data, zeros)


hellos = st.builds(
    Hello,
    name=st.text(min_size=1, max_size=60).filter(lambda s: 0 < len(s.encode()) <= 255),
    role=st.sampled_from(Role),
    generation=u64,
    checkpoint_seq=u64,
    memory_size=u64,
    flags=st.sampled_from([HelloFlag(0), HelloFlag.FULL_SYNC, HelloFlag.HAVE_CHECKPOINT]),
    capabilities=u64,
)
records = st.one_of(
    hellos,
    pages(),
    st.builds(Vcpu, u32, u32, blob),
    st.builds(Device, u32, u32, blob),
    st.builds(DiskWrite, u32, u64, st.integers(1, 3).map(lambda n: os.urandom(512 * n))),
    st.builds(CheckpointEnd, u64, u64, u32, u32, u64, u32),
    st.builds(Ack, u64, u64),
    st.builds(Heartbeat, u64, u64),
    st.builds(SyncProgress, u32, u64, u64),
    st.builds(Error, u32, st.text(max_size=100)),
    st.builds(Goodbye, u32, u64),
    st.builds(Unknown, st.integers(100, 65535), st.just(int(RecordFlag.SKIPPABLE)), blob),
)

HELLO = Hello("kv1", Role.PRIMARY, 1, 0, 1 << 20)


def stream(*recs: object) -> bytes:
    return encode(HELLO) + b"".join(encode(r) for r in recs)  # type: ignore[arg-type]


@given(records)
def test_every_record_round_trips_and_is_8_byte_aligned(record: object) -> None:
    wire = encode(record)  # type: ignore[arg-type]
    assert len(wire) % 8 == 0
    got = Decoder().feed(encode(HELLO) + wire)
    assert got == [HELLO, record]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=8), st.data())
def test_any_chunking_decodes_the_same_records(recs: list, data: st.DataObject) -> None:
    wire = stream(*recs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    decoder = Decoder()
    out = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed(wire[prev:cut])
        prev = cut
    assert out == [HELLO, *recs]
    assert decoder.buffered == 0
    decoder.eof()


def test_pages_decode_as_views_into_the_received_chunk() -> None:
    wire = stream(Pages([3, 4], os.urandom(2 * PAGE_SIZE)))
    hello, rec = Decoder().feed(wire)
    assert isinstance(rec.data, memoryview)
    assert rec.data.obj is wire  # no copy of the payload


def test_pages_parts_matches_pages_record_and_coalesces_runs() -> None:
    mem = bytearray(os.urandom(64 * PAGE_SIZE))
    mem[5 * PAGE_SIZE:6 * PAGE_SIZE] = bytes(PAGE_SIZE)
    pfns = [1, 2, 3, 9, 5, 10]
    parts, nrec, npages = pages_parts(mem, pfns)
    assert (nrec, npages) == (1, 6)
    assert len(parts) == 1 + 4  # header + runs [1-3], [9], [5], [10]
    data = b"".join(mem[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] for p in pfns)
    assert b"".join(parts) == encode(Pages(pfns, data))
    zparts, _, _ = pages_parts(mem, pfns, detect_zero=True)
    nonzero = [p for p in pfns if p != 5]
    zdata = b"".join(mem[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] for p in nonzero)
    assert b"".join(zparts) == encode(Pages(nonzero, zdata, [5]))


def test_pages_parts_splits_large_batches() -> None:
    mem = bytearray(PAGE_SIZE * (MAX_PAGES_PER_RECORD + 10))
    parts, nrec, npages = pages_parts(mem, range(MAX_PAGES_PER_RECORD + 10), detect_zero=True)
    assert (nrec, npages) == (2, MAX_PAGES_PER_RECORD + 10)
    recs = Decoder().feed(encode(HELLO) + b"".join(parts))[1:]
    assert [len(r.zero_pfns) for r in recs] == [MAX_PAGES_PER_RECORD, 10]
    with pytest.raises(ValueError, match="outside guest memory"):
        pages_parts(mem, [MAX_PAGES_PER_RECORD + 10])


def test_wrong_version_hello_is_refused_clearly() -> None:
    wire = bytearray(encode(HELLO))
    struct.pack_into("<H", wire, 16, VERSION + 1)
    with pytest.raises(UnsupportedVersion, match="version 3, this node speaks 1 to 2"):
        Decoder().feed(bytes(wire))
    with pytest.raises(UnsupportedVersion):
        Decoder().feed(encode(Hello("kv1", Role.PRIMARY, 1, 0, 1, version=7)))


def test_garbage_is_not_a_kemari_stream() -> None:
    with pytest.raises(NotAKemariStream):
        Decoder().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(NotAKemariStream, match="not HELLO"):
        Decoder().feed(encode(Ack(1, 1)))
    bad_magic = bytearray(encode(HELLO))
    bad_magic[8] ^= 1
    with pytest.raises(NotAKemariStream, match="magic"):
        Decoder().feed(bytes(bad_magic))


def test_oversized_length_fails_before_the_body_arrives() -> None:
    header = HEADER.pack(RecordType.PAGES, 0, 0xFFFFFFF0)
    with pytest.raises(RecordTooLarge):
        Decoder().feed(encode(HELLO) + header)


def test_unknown_records_skipped_only_when_flagged() -> None:
    skippable = HEADER.pack(999, RecordFlag.SKIPPABLE, 3) + b"abc" + bytes(5)
    assert Decoder().feed(encode(HELLO) + skippable)[1] == Unknown(999, 1, b"abc")
    with pytest.raises(UnknownRecordType, match="999"):
        Decoder().feed(encode(HELLO) + HEADER.pack(999, 0, 0))
    with pytest.raises(MalformedRecord, match="flags"):
        Decoder().feed(encode(HELLO) + HEADER.pack(RecordType.ACK, 4, 16) + bytes(16))


def test_nonzero_padding_and_reserved_fields_are_malformed() -> None:
    wire = bytearray(stream(Vcpu(0, 1, b"abc")))
    wire[-1] = 1
    with pytest.raises(MalformedRecord, match="padding"):
        Decoder().feed(bytes(wire))
    wire = bytearray(stream(Pages([1], bytes(PAGE_SIZE))))
    struct.pack_into("<Q", wire, len(encode(HELLO)) + 16, 1 << 55)
    with pytest.raises(MalformedRecord, match="reserved"):
        Decoder().feed(bytes(wire))


def test_hello_with_unknown_flags_or_page_size_is_malformed() -> None:
    wire = bytearray(encode(HELLO))
    wire[8 + 11] |= 0x80
    with pytest.raises(MalformedRecord, match="unknown flags"):
        Decoder().feed(bytes(wire))
    wire = bytearray(encode(HELLO))
    struct.pack_into("<I", wire, 8 + 12, 8192)
    with pytest.raises(MalformedRecord, match="page size"):
        Decoder().feed(bytes(wire))


def test_truncated_stream_reported_at_eof() -> None:
    wire = stream(Pages([1], bytes(PAGE_SIZE)))
    decoder = Decoder()
    assert decoder.feed(wire[:-100]) == [HELLO]
    with pytest.raises(TruncatedStream, match="inside a record"):
        decoder.eof()


def test_decoder_stays_failed_after_an_error() -> None:
    decoder = Decoder()
    with pytest.raises(NotAKemariStream):
        decoder.feed(b"\xff" * 16)
    with pytest.raises(NotAKemariStream):
        decoder.feed(encode(HELLO))


def test_error_record_carries_the_exception_code() -> None:
    wire = encode_error(UnsupportedVersion("peer speaks 2"))
    (err,) = Decoder().feed(wire)  # ERROR may open a stream: refusals before HELLO
    assert err.code == UnsupportedVersion.code
    assert "UnsupportedVersion: peer speaks 2" in err.message


def _decode_all(data: bytes) -> None:
    decoder = Decoder()
    try:
        decoder.feed(data)
        decoder.eof()
    except StreamError:
        pass


@settings(max_examples=400)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_raise_only_stream_errors(data: bytes) -> None:
    _decode_all(data)
    _decode_all(encode(HELLO) + data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, min_size=1, max_size=4), st.data())
def test_fuzz_bit_flips_and_truncation_raise_only_stream_errors(
        recs: list, data: st.DataObject) -> None:
    wire = bytearray(stream(*recs))
    for _ in range(data.draw(st.integers(1, 4))):
        bit = data.draw(st.integers(0, len(wire) * 8 - 1))
        wire[bit // 8] ^= 1 << (bit % 8)
    cut = data.draw(st.integers(0, len(wire)))
    _decode_all(bytes(wire[:cut]))
    _decode_all(bytes(wire))


@given(u64, u64)
def test_the_secondarys_ack_shortcut_gives_the_records_bytes(seq: int, generation: int) -> None:
    assert encode_ack(seq, generation) == encode(Ack(seq, generation))


def test_a_lone_ack_is_taken_only_when_it_is_exactly_one_ack_after_the_hello() -> None:
    """Decoder.lone_ack, the primary's shortcut: the same Ack as the general path
    for exactly one ACK record; None whenever the general path must decide."""
    ack = encode(Ack(7, 3))
    d = Decoder()
    assert d.lone_ack(ack) is None                        # a stream must open with HELLO
    assert d.feed(encode(HELLO)) == [HELLO]
    assert d.lone_ack(ack) == Ack(7, 3) == d.feed(ack)[0]
    assert d.lone_ack(ack + ack) is None                  # two records
    assert d.lone_ack(encode(Heartbeat(1, 2))) is None    # as long as an ACK, not one
    assert d.lone_ack(ack[:2] + b"\x01\x00" + ack[4:]) is None        # flags set
    assert d.feed(ack[:5]) == []
    assert d.lone_ack(ack) is None                        # a record begun before it
    assert d.feed(ack[5:]) == [Ack(7, 3)]
    broken = Decoder()
    broken.feed(encode(HELLO))
    with pytest.raises(StreamError):
        broken.feed(b"\xff" * 8 + bytes(16))
    assert broken.lone_ack(ack) is None                   # a failed decoder stays failed
