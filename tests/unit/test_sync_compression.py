"""LZ4-compressed full-sync rounds (PAGES_LZ4): negotiated, used only where it
pays, decoded to exactly the pages its entry list names, refused elsewhere;
and the secondary's SYNC_ACK of each applied round."""

from __future__ import annotations

import os
import struct

import lz4.block
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_replication_session import MEM, NPAGES, Pair

from kemari_agent.replication.codec import (
    DEFAULT_CAPABILITIES,
    ENTRY_ZERO,
    HEADER,
    PAGE_SIZE,
    Capability,
    CompressedPages,
    Decoder,
    Pages,
    RecordType,
    SyncAck,
    Vcpu,
    encode,
    pages_parts,
)
from kemari_agent.replication.errors import MalformedRecord, ProtocolError, UnexpectedRecord
from kemari_agent.replication.primary import PrimaryState
from kemari_agent.replication.secondary import Secondary, SecondaryState

pytestmark = pytest.mark.unit


def compressible(npages: int) -> bytearray:
    """Pages of repeated words with a random tail: LZ4 halves them, not more."""
    out = bytearray()
    for _ in range(npages):
        out += (b"kemari tapped checkpoint " * 200)[:PAGE_SIZE - 512] + os.urandom(512)
    return out


def record_types(wire: bytes) -> list[int]:
    types, offset = [], 0
    while offset < len(wire):
        rtype, _flags, length = HEADER.unpack_from(wire, offset)
        types.append(rtype)
        offset += HEADER.size + length + (-length & 7)
    return types


def sync(pair: Pair) -> bytes:
    """A full sync of every page in one round; returns the round's bytes."""
    pair.to_primary()
    pair.to_secondary()                                # the primary's HELLO
    pair.primary.sync_pages(pair.mem, range(NPAGES), now=0.0)
    round_bytes = pair.primary.data_to_send()
    events = pair.secondary.receive_data(round_bytes, 0.0)
    assert pair.secondary.state is SecondaryState.SYNCING, events
    pair.primary.end_sync_round(0, now=0.0)
    pair.primary.checkpoint(pair.mem, [], [Vcpu(0, 1, b"regs")], now=0.0)
    pair.to_secondary()
    pair.to_primary()
    assert pair.primary.state is PrimaryState.PROTECTED
    pair.assert_mirrors_primary()
    return round_bytes


def test_compressible_memory_syncs_as_pages_lz4_in_fewer_bytes() -> None:
    pair = Pair()
    pair.mem[:] = compressible(NPAGES)
    pair.mem[7 * PAGE_SIZE:9 * PAGE_SIZE] = bytes(2 * PAGE_SIZE)     # zero pages ride along
    wire = sync(pair)
    assert record_types(wire) == [RecordType.PAGES_LZ4]
    assert len(wire) < 0.6 * MEM


def test_incompressible_memory_goes_as_plain_pages() -> None:
    pair = Pair()                                  # random memory: LZ4 would not pay
    wire = sync(pair)
    assert record_types(wire) == [RecordType.PAGES]
    assert len(wire) > (NPAGES - 2) * PAGE_SIZE


@pytest.mark.parametrize("who", ["primary config", "secondary capabilities"])
def test_no_compression_unless_both_sides_want_it(who: str) -> None:
    if who == "primary config":
        pair = Pair(compress=False)
    else:
        pair = Pair()
        pair.secondary = Secondary(pair.sink, name="kv1", memory_size=MEM, generation=0,
                                   checkpoint_seq=0, has_checkpoint=False, now=0.0,
                                   capabilities=int(DEFAULT_CAPABILITIES)
                                   & ~Capability.LZ4_PAGES)
    pair.mem[:] = compressible(NPAGES)
    wire = sync(pair)
    assert record_types(wire) == [RecordType.PAGES]


def lz4_record(count_entries: list[int], block: bytes) -> bytes:
    body = struct.pack("<II", len(count_entries), 0) + struct.pack(
        f"<{len(count_entries)}Q", *count_entries) + block
    pad = -len(body) & 7
    return HEADER.pack(RecordType.PAGES_LZ4, 0, len(body)) + body + bytes(pad)


def decode_one(raw: bytes):
    decoder = Decoder()
    decoder._first = False             # noqa: SLF001 - a record outside a session
    return decoder.feed(raw)


@pytest.mark.parametrize("pages_in_block, entries, match", [
    (1, [1, 2], "does not decompress to its 2 pages|holds 4096 bytes"),   # block too short
    (3, [1, 2], "does not decompress"),                                   # block too long
    (0, [1 | ENTRY_ZERO], "without compressed pages"),                   # nothing to decompress
])
def test_forged_blocks_are_refused(pages_in_block: int, entries: list[int], match: str) -> None:
    block = lz4.block.compress(bytes(compressible(pages_in_block)), store_size=False) \
        if pages_in_block else b""
    with pytest.raises(MalformedRecord, match=match):
        decode_one(lz4_record(entries, block))


def test_garbage_block_is_refused() -> None:
    with pytest.raises(MalformedRecord, match="does not decompress"):
        decode_one(lz4_record([3], b"\xff" * 64))


def test_pages_lz4_is_refused_outside_a_full_sync() -> None:
    pair = Pair()
    sync(pair)
    record = encode(CompressedPages([3], bytes(compressible(1))))
    with pytest.raises(UnexpectedRecord, match="outside a full sync"):
        pair.secondary.receive_data(record, 1.0)
    assert pair.secondary.checkpoint_seq == 1          # the last checkpoint stays


def test_pages_lz4_is_refused_when_not_negotiated() -> None:
    pair = Pair(compress=False)
    pair.secondary = Secondary(pair.sink, name="kv1", memory_size=MEM, generation=0,
                               checkpoint_seq=0, has_checkpoint=False, now=0.0,
                               capabilities=int(DEFAULT_CAPABILITIES) & ~Capability.LZ4_PAGES)
    pair.to_primary()
    pair.secondary.receive_data(pair.primary.data_to_send(), 0.0)      # HELLO: full sync
    record = encode(CompressedPages([3], bytes(compressible(1))))
    with pytest.raises(UnexpectedRecord, match="did not negotiate"):
        pair.secondary.receive_data(record, 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.sampled_from(["zero", "text", "random"])),
                min_size=1, max_size=40))
def test_compressed_and_plain_encodings_decode_to_the_same_pages(pages) -> None:
    memory = bytearray(16 * PAGE_SIZE)
    for pfn, kind in pages:
        memory[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = (
            bytes(PAGE_SIZE) if kind == "zero" else
            bytes(compressible(1)) if kind == "text" else os.urandom(PAGE_SIZE))
    pfns = [pfn for pfn, _ in pages]
    plain, _, _ = pages_parts(memory, pfns, detect_zero=True)
    packed, _, _ = pages_parts(memory, pfns, detect_zero=True, compress=True)
    [a] = decode_one(b"".join(plain))
    [b] = decode_one(b"".join(packed))
    assert isinstance(a, Pages) and isinstance(b, Pages)
    assert (a.pfns, a.zero_pfns, bytes(a.data)) == (b.pfns, b.zero_pfns, bytes(b.data))


def test_secondary_acknowledges_each_applied_round() -> None:
    pair = Pair()
    pair.to_primary()
    pair.to_secondary()
    assert pair.primary.sync_acks
    for rnd in range(2):
        pair.primary.sync_pages(pair.mem, range(NPAGES), now=0.0)
        pair.primary.end_sync_round(NPAGES, now=0.0)
        pair.to_secondary()
        assert pair.primary.sync_round_acked == rnd - 1         # not before it arrives
        pair.to_primary()
        assert pair.primary.sync_round_acked == rnd


def test_without_the_capability_no_round_is_acknowledged() -> None:
    pair = Pair(capabilities=int(DEFAULT_CAPABILITIES) & ~Capability.SYNC_ACKS)
    pair.to_primary()
    pair.to_secondary()
    pair.primary.sync_pages(pair.mem, range(NPAGES), now=0.0)
    pair.primary.end_sync_round(0, now=0.0)
    pair.to_secondary()
    assert not pair.primary.sync_acks and pair.secondary.data_to_send() == b""


@pytest.mark.parametrize("rnd", [0, 5])       # a round not ended yet; a repeated one
def test_primary_refuses_a_sync_ack_for_a_round_it_did_not_end(rnd: int) -> None:
    pair = Pair()
    pair.to_primary()
    pair.to_secondary()
    pair.primary.sync_pages(pair.mem, range(NPAGES), now=0.0)
    if rnd == 5:
        pair.primary.end_sync_round(NPAGES, now=0.0)
        pair.to_secondary()
        pair.to_primary()                       # round 0 acknowledged
        rnd = 0
    with pytest.raises(ProtocolError, match="SYNC_ACK for round 0"):
        pair.primary.receive_data(encode(SyncAck(rnd)), 0.0)


def test_sync_ack_outside_a_full_sync_is_refused() -> None:
    pair = Pair()
    sync(pair)
    with pytest.raises(UnexpectedRecord, match="SYNC_ACK outside a full sync"):
        pair.primary.receive_data(encode(SyncAck(0)), 1.0)
