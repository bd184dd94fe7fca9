"""PAGES_PATCH: a cached page sent as the runs of bytes that changed against
the secondary's own copy (codec.page_patch, native/codec.c). The runs rebuild
the page exactly and are the ones the format defines; forged runs, a patch
against another base, and a session that did not negotiate them are refused
before anything reaches the image; C and Python write and read the same."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_replication_delta import _decode_mid_stream, checkpoint, record_types, touch
from test_replication_session import MEM, NPAGES, Pair, protected_pair

from kemari_agent.replication import native_codec, primary
from kemari_agent.replication.codec import (
    DEFAULT_CAPABILITIES,
    HEADER,
    PAGE_SIZE,
    Capability,
    Hello,
    PatchPages,
    RecordType,
    Role,
    apply_patch,
    crc32,
    encode,
    page_patch,
)
from kemari_agent.replication.errors import (
    DeltaMismatch,
    MalformedRecord,
    ProtocolError,
    UnexpectedRecord,
)
from kemari_agent.replication.events import Committed
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.secondary import Secondary

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def patches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(primary, "PATCHES_ENABLED", True)


def reference_runs(page: bytes, base: bytes) -> list[tuple[int, bytes]]:
    """The format's runs, the slow and obvious way: maximal spans of differing
    8-byte words, each trimmed to its first and last differing byte."""
    differs = [page[w * 8:w * 8 + 8] != base[w * 8:w * 8 + 8] for w in range(PAGE_SIZE // 8)]
    runs = []
    w = 0
    while w < len(differs):
        if not differs[w]:
            w += 1
            continue
        end = w
        while end < len(differs) and differs[end]:
            end += 1
        changed = [i for i in range(w * 8, end * 8) if page[i] != base[i]]
        runs.append((changed[0], page[changed[0]:changed[-1] + 1]))
        w = end
    return runs


def parse(patch: bytes) -> list[tuple[int, bytes]]:
    (count,), pos, runs = struct.unpack_from("<H", patch), 2, []
    for _ in range(count):
        offset, length = struct.unpack_from("<HH", patch, pos)
        runs.append((offset, patch[pos + 4:pos + 4 + length]))
        pos += 4 + length
    assert pos == len(patch)
    return runs


def c_patch(page: bytes, base: bytes) -> bytes:
    """The patch kcodec_checkpoint writes for `page` whose slot holds `base`."""
    memory = bytearray(base)
    index = native_codec.PageIndex(1, 1)
    write = dict(items=[], item_records=0, item_pages=0, seq=1, generation=1,
                 queued=(0, 0, 0, 0), lz4_worth=0.9, patch=True)
    native_codec.write_checkpoint(memory, [0], index, **write)      # into the slot
    memory[:] = page
    out = native_codec.write_checkpoint(memory, [0], index, **write)
    assert len(out) <= native_codec.lib.kcodec_checkpoint_bound(1, 0, 0, 0)
    kind, _, length = HEADER.unpack_from(out)
    assert kind == RecordType.PAGES_PATCH
    return bytes(out[HEADER.size + 16:HEADER.size + length])


@given(seed=st.integers(0, 2**32 - 1),
       changes=st.lists(st.tuples(st.integers(0, PAGE_SIZE - 1),
                                  st.binary(min_size=1, max_size=40)), min_size=1, max_size=12))
@settings(max_examples=200, deadline=None)
def test_a_patch_holds_the_formats_runs_and_rebuilds_the_page(seed: int, changes) -> None:
    base = random.Random(seed).randbytes(PAGE_SIZE)
    page = bytearray(base)
    for offset, data in changes:
        data = data[:PAGE_SIZE - offset]
        page[offset:offset + len(data)] = data
    patch = page_patch(page, base)
    assert parse(patch) == reference_runs(bytes(page), base)
    assert len(patch) <= 2 + 4 + PAGE_SIZE
    rebuilt = bytearray(base)
    apply_patch(patch, memoryview(rebuilt))
    assert rebuilt == page
    if page != base:                   # else the writer leaves the page out
        assert c_patch(bytes(page), base) == patch


def test_patch_sizes_at_the_edges() -> None:
    base = bytes(range(256)) * 16
    assert page_patch(base, base) == b"\x00\x00"
    whole = bytes(255 - b for b in base)       # every byte differs: one run of 4096
    assert parse(page_patch(whole, base)) == [(0, whole)]
    assert c_patch(whole, base) == page_patch(whole, base)     # the largest there is
    every_other_word = bytearray(base)
    for w in range(0, PAGE_SIZE // 8, 2):
        every_other_word[w * 8 + 3] ^= 1
    runs = parse(page_patch(every_other_word, base))
    assert len(runs) == 256 and all(len(data) == 1 for _, data in runs)
    assert c_patch(bytes(every_other_word), base) == page_patch(every_other_word, base)
    last = bytearray(base)
    last[PAGE_SIZE - 1] ^= 0x80
    assert parse(page_patch(last, base)) == [(PAGE_SIZE - 1, bytes(last[-1:]))]


def _record(count: int, pfns: list[int], tail: bytes, check: int = 0) -> bytes:
    body = struct.pack("<II", count, check) + struct.pack(f"<{len(pfns)}Q", *pfns) + tail
    return HEADER.pack(RecordType.PAGES_PATCH, 0, len(body)) + body + bytes(-len(body) % 8)


def _run(offset: int, data: bytes) -> bytes:
    return struct.pack("<HH", offset, len(data)) + data


def test_patch_pages_round_trip_and_forgeries() -> None:
    record = PatchPages((3, 9), (b"\x01\x00" + _run(10, b"ab"), b"\x00\x00"), 0x1234)
    (back,) = _decode_mid_stream(encode(record))
    assert back == record
    good = b"\x01\x00" + _run(10, b"ab")
    assert _decode_mid_stream(_record(1, [3], good)) == [PatchPages((3,), (good,), 0)]
    forged = {
        "no pages": _record(0, [], b""),
        "too many pages": _record(4097, [3], good),
        "pfn with flag bits": _record(1, [1 << 63], good),
        "page list cut": _record(2, [3], b""),
        "run count cut": _record(1, [3], b"\x01"),
        "run header cut": _record(1, [3], b"\x01\x00\x0a\x00"),
        "run bytes cut": _record(1, [3], b"\x01\x00" + _run(10, b"ab")[:-1]),
        "empty run": _record(1, [3], b"\x01\x00" + _run(10, b"")),
        "run past the page": _record(1, [3], b"\x01\x00" + _run(4095, b"ab")),
        "runs overlap": _record(1, [3], b"\x02\x00" + _run(10, b"ab") + _run(11, b"c")),
        "runs descend": _record(1, [3], b"\x02\x00" + _run(20, b"ab") + _run(10, b"c")),
        "bytes after the last patch": _record(1, [3], good + b"\x00\x00"),
    }
    for what, data in forged.items():
        with pytest.raises(MalformedRecord):
            _decode_mid_stream(data)
            pytest.fail(what)
    with pytest.raises(ValueError):
        PatchPages((3, 9), (b"\x00\x00",), 0)


@pytest.mark.parametrize("native", [True, False])
def test_pages_go_as_patches_and_the_image_mirrors_the_primary(
        monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Cached pages go as PAGES_PATCH (a few bytes a page), the others whole,
    rewritten pages as one run; the image stays exact through evictions."""
    monkeypatch.setattr(native_codec, "ENABLED", native)
    rng = random.Random(9)
    pair = protected_pair(delta_cache_pages=6)
    for step in range(40):
        pfns = sorted(rng.sample(range(10), 4))
        for pfn in pfns:
            if step % 7 == 0:
                pair.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
            else:
                touch(pair.mem, pfn, rng)
        events, _ = checkpoint(pair, pfns)
        assert isinstance(events[-1], Committed)
        pair.assert_mirrors_primary()
    stream = b"".join(pair.wire[1:])
    types = set(record_types(stream))
    assert RecordType.PAGES_PATCH in types and RecordType.PAGES_XOR not in types
    stats = pair.primary.delta_cache.stats
    assert stats["xor_pages"] > 60 and stats["plain_pages"] > 0
    # a seventh of them rewritten whole, the rest changed in 8 bytes
    assert stats["xor_bytes"] < stats["xor_pages"] * PAGE_SIZE // 4


@pytest.mark.parametrize("reader", [True, False])
def test_a_patch_against_another_base_is_refused_and_discarded(
        monkeypatch: pytest.MonkeyPatch, reader: bool) -> None:
    monkeypatch.setattr(native_codec, "CHECKPOINT_READER", reader)
    pair = protected_pair(delta_cache_pages=8)
    rng = random.Random(1)
    touch(pair.mem, 4, rng)
    touch(pair.mem, 6, rng)
    checkpoint(pair, [4, 6])
    # The secondary's copy of page 4 differs, far from the bytes that change.
    pair.sink.memory[4 * PAGE_SIZE + 4000] ^= 0x01
    before = pair.snapshot()
    pair.mem[4 * PAGE_SIZE + 8] ^= 0xFF
    pair.mem[6 * PAGE_SIZE + 8] ^= 0xFF
    pair.primary.checkpoint(pair.mem, [4, 6], now=0.0)
    data = pair.primary.data_to_send()
    assert RecordType.PAGES_PATCH in record_types(data)
    with pytest.raises(DeltaMismatch, match="PAGES_PATCH have CRC-32"):
        pair.secondary.receive_data(data, 0.0)
    assert pair.snapshot() == before                  # page 6 was staged, not applied


def test_patches_refused_where_not_negotiated(monkeypatch: pytest.MonkeyPatch) -> None:
    # A secondary that takes PAGES_XOR but not PAGES_PATCH gets PAGES_XOR.
    sink = ImageSink(MEM)
    caps = int(DEFAULT_CAPABILITIES & ~Capability.PATCHES)
    pair = Pair(delta_cache_pages=16, sink=sink)
    pair.secondary = Secondary(sink, name="kv1", memory_size=MEM, generation=0,
                               checkpoint_seq=0, has_checkpoint=False, now=0.0,
                               capabilities=caps)
    pair.full_sync()
    assert not pair.primary.page_patches
    rng = random.Random(2)
    for _ in range(3):
        touch(pair.mem, 3, rng)
        checkpoint(pair, [3])
        pair.assert_mirrors_primary()
    types = set(record_types(b"".join(pair.wire[2:])))
    assert RecordType.PAGES_XOR in types and RecordType.PAGES_PATCH not in types
    # ... and refuses one all the same.
    patch = encode(PatchPages((3,), (b"\x00\x00",), crc32(sink.memory[3 * PAGE_SIZE:
                                                                     4 * PAGE_SIZE])))
    with pytest.raises(UnexpectedRecord, match="did not negotiate"):
        pair.secondary.receive_data(patch, 0.0)
    # During a full sync there is no committed base.
    syncing = Pair()
    syncing.to_primary()
    syncing.to_secondary()
    with pytest.raises(UnexpectedRecord, match="syncing"):
        syncing.secondary.receive_data(patch, 0.0)
    # A primary that does not send them (KEMARI_PAGE_PATCHES=0) sends PAGES_XOR.
    other = Pair(delta_cache_pages=16)
    monkeypatch.setattr(primary, "PATCHES_ENABLED", False)
    other.full_sync()
    assert not other.primary.page_patches


def test_a_patched_checkpoint_counts_its_pages_against_the_staging_limit() -> None:
    """A few bytes of runs stand for 4096 bytes a page: they count at that size."""
    sink = ImageSink(MEM)
    secondary = Secondary(sink, name="kv1", memory_size=MEM, generation=1, checkpoint_seq=5,
                          has_checkpoint=True, now=0.0)
    secondary.receive_data(encode(Hello("kv1", Role.PRIMARY, 1, 5, MEM, 0,
                                        int(Capability.DELTAS | Capability.PATCHES))), 0.0)
    secondary._staging_limit = 4 * PAGE_SIZE
    record = encode(PatchPages(tuple(range(8)), (b"\x00\x00",) * 8, 0))
    assert len(record) < 150
    with pytest.raises(ProtocolError, match="exceeds"):
        secondary.receive_data(record, 0.0)


def test_the_c_writer_patches_only_the_bytes_that_changed() -> None:
    """kcodec_checkpoint's slots take the runs: after many patches they still
    hold exactly the pages as sent, and the C reader rebuilds every one."""
    assert native_codec._BOUND
    rng = random.Random(4)
    pair = protected_pair(delta_cache_pages=NPAGES)
    for _ in range(30):
        pfns = sorted(rng.sample(range(NPAGES), 6))
        for pfn in pfns:
            for _ in range(rng.randint(1, 5)):
                offset = pfn * PAGE_SIZE + rng.randrange(PAGE_SIZE - 3)
                pair.mem[offset:offset + 3] = rng.randbytes(3)
        checkpoint(pair, pfns)
        pair.assert_mirrors_primary()
    index = pair.primary.delta_cache
    assert isinstance(index, native_codec.PageIndex)
    mem = native_codec.ffi.from_buffer(pair.mem)
    held = 0
    for pfn in range(NPAGES):
        # A cached page equal to its slot is planned as unchanged: no hit.
        hits, misses, _ = index.plan(mem, [pfn])
        assert hits == 0
        held += misses == 0
    assert held > 20
