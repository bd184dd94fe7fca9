"""Pages sent as deltas against the secondary's own copy (PAGES_XOR, delta.py):
the image still mirrors the primary through many checkpoints and evictions,
the stream shrinks, and a delta against the wrong base never reaches the image.

A primary sends PAGES_PATCH instead where the secondary takes it: here it
sends PAGES_XOR (the `xor_deltas` fixture) but where a test says otherwise;
the C writer's and reader's comparisons with the Python paths and the fuzz
test run both. test_replication_patch.py covers PAGES_PATCH itself."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_replication_session import (
    MEM,
    NPAGES,
    Pair,
    UndoingSink,
    assert_not_applied,
    feed_damaged,
    protected_pair,
)

from kemari_agent.replication import native_codec, primary
from kemari_agent.replication.codec import (
    DEFAULT_CAPABILITIES,
    HEADER,
    PAGE_SIZE,
    Buffer,
    Capability,
    Decoder,
    Device,
    DiskWrite,
    Hello,
    Pages,
    RecordType,
    Role,
    Vcpu,
    XorBlob,
    XorPages,
    crc32,
    encode,
    lz4_block,
)
from kemari_agent.replication.delta import PageCache, apply_delta, xor_bytes
from kemari_agent.replication.errors import (
    DeltaMismatch,
    MalformedRecord,
    ProtocolError,
    UnexpectedRecord,
)
from kemari_agent.replication.events import Committed, Discarded
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.secondary import Secondary

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def xor_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(primary, "PATCHES_ENABLED", False)


def delta_type(patch: bool) -> RecordType:
    return RecordType.PAGES_PATCH if patch else RecordType.PAGES_XOR


def touch(mem: bytearray, pfn: int, rng: random.Random) -> None:
    """Change a few bytes of a page, as a counter or a ring index would."""
    offset = pfn * PAGE_SIZE + rng.randrange(0, PAGE_SIZE - 8, 8)
    mem[offset:offset + 8] = rng.randbytes(8)


def dirty_some(pair: Pair, rng: random.Random, fewest: int, most: int) -> list[int]:
    """Random pages dirtied: most change a few bytes, a fifth is rewritten whole."""
    pfns = sorted(rng.sample(range(NPAGES), rng.randint(fewest, most)))
    for pfn in pfns:
        if rng.random() < 0.2:
            pair.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
        else:
            touch(pair.mem, pfn, rng)
    return pfns


def checkpoint(pair: Pair, pfns: list[int], records: tuple = ()) -> tuple[list, int]:
    """One checkpoint of `pfns` and `records`, delivered and acknowledged:
    (events, wire bytes)."""
    pair.primary.checkpoint(pair.mem, pfns, records, now=0.0)
    data = pair.primary.data_to_send()
    pair.wire.append(data)
    events = pair.secondary.receive_data(data, 0.0)
    pair.to_primary()
    return events, len(data)


def record_types(data: bytes) -> list[int]:
    decoder = Decoder()
    decoder.feed(encode(Hello("kv1", Role.PRIMARY, 1, 0, MEM)))
    return [HEADER.unpack_from(raw)[0] for _, raw in decoder.feed_raw(data)]


def test_xor_pages_round_trip_and_forgeries() -> None:
    delta = bytearray(2 * PAGE_SIZE)
    delta[10] = 0xFF
    record = XorPages((3, 9), delta, 0x1234)
    data = encode(record)
    assert len(data) < 200                       # two mostly-zero pages, compressed
    (back,) = _decode_mid_stream(data)
    assert back == record

    head = struct.pack("<II", 2, 0x1234) + struct.pack("<2Q", 3, 9)
    bad_block = HEADER.pack(RecordType.PAGES_XOR, 0, len(head) + 8) + head + b"\xff" * 8
    with pytest.raises(MalformedRecord, match="does not decompress"):
        _decode_mid_stream(bad_block)
    short = lz4_block.compress(bytes(PAGE_SIZE), store_size=False)   # 1 page for 2
    body = head + short
    body += bytes(-len(body) % 8)
    with pytest.raises(MalformedRecord):
        _decode_mid_stream(HEADER.pack(RecordType.PAGES_XOR, 0, len(head) + len(short))
                           + body)
    for count, pfn in ((0, 3), (4097, 3), (1, 1 << 63)):
        head = struct.pack("<IIQ", count, 0, pfn)
        with pytest.raises(MalformedRecord):
            _decode_mid_stream(HEADER.pack(RecordType.PAGES_XOR, 0, len(head) + 8)
                               + head + bytes(8))


def _decode_mid_stream(data: bytes) -> list:
    """Decode records as a session would after its HELLO."""
    decoder = Decoder()
    decoder.feed(encode(Hello("kv1", Role.PRIMARY, 1, 0, MEM)))
    return decoder.feed(data)


def test_pages_go_as_deltas_and_the_image_mirrors_the_primary() -> None:
    rng = random.Random(7)
    plain = protected_pair()
    delta = protected_pair(delta_cache_pages=16)
    assert delta.primary.delta_cache is not None
    for pair in (plain, delta):
        pair.mem[:] = plain.mem      # the same guest in both
        pair.sink.memory[:] = plain.mem
    sizes: dict[str, list[int]] = {"plain": [], "delta": []}
    for _ in range(30):
        pfns = sorted(rng.sample(range(12), 6))     # a hot set the cache holds
        seed = rng.random()
        for name, pair in (("plain", plain), ("delta", delta)):
            local = random.Random(seed)
            for pfn in pfns:
                touch(pair.mem, pfn, local)
            events, size = checkpoint(pair, pfns)
            assert isinstance(events[-1], Committed)
            pair.assert_mirrors_primary()
            sizes[name].append(size)
    stats = delta.primary.delta_cache.stats
    assert stats["xor_pages"] > 100                  # most pages were cached by then
    assert sum(sizes["delta"][10:]) < sum(sizes["plain"][10:]) / 5
    assert RecordType.PAGES_XOR not in record_types(b"".join(plain.wire[1:]))


def test_eviction_keeps_the_image_exact() -> None:
    """A 3-page cache over 64 pages: deltas, misses and evictions in every checkpoint."""
    rng = random.Random(3)
    pair = protected_pair(delta_cache_pages=3)
    for _ in range(60):
        checkpoint(pair, dirty_some(pair, rng, 1, 5))
        pair.assert_mirrors_primary()
    cache = pair.primary.delta_cache
    assert len(cache) == 3
    assert cache.stats["xor_pages"] > 0 and cache.stats["plain_pages"] > 0


def test_a_rewritten_page_goes_plain() -> None:
    pair = protected_pair(delta_cache_pages=8)
    checkpoint(pair, pair.dirty(5))
    pair.primary.checkpoint(pair.mem, pair.dirty(5), now=0.0)    # all 4096 bytes new
    data = pair.primary.data_to_send()
    assert RecordType.PAGES_XOR not in record_types(data)
    pair.secondary.receive_data(data, 0.0)
    pair.assert_mirrors_primary()


def test_a_delta_against_another_base_is_refused_and_discarded() -> None:
    pair = protected_pair(delta_cache_pages=8)
    rng = random.Random(1)
    touch(pair.mem, 4, rng)
    checkpoint(pair, [4])
    touch(pair.mem, 4, rng)
    touch(pair.mem, 6, rng)
    checkpoint(pair, [6])
    # The secondary's copy of page 4 differs from what the primary last sent.
    pair.sink.memory[4 * PAGE_SIZE + 100] ^= 0x01
    before = pair.snapshot()
    touch(pair.mem, 4, rng)
    touch(pair.mem, 6, rng)
    pair.primary.checkpoint(pair.mem, [4, 6], now=0.0)
    data = pair.primary.data_to_send()
    assert RecordType.PAGES_XOR in record_types(data)
    with pytest.raises(DeltaMismatch, match="differ"):
        pair.secondary.receive_data(data, 0.0)
    assert pair.snapshot() == before                  # page 6 was staged, not applied


def test_xor_pages_refused_where_not_allowed() -> None:
    # Not negotiated: a secondary without the capability.
    sink = ImageSink(MEM)
    caps = int(Capability.ZERO_PAGES | Capability.LZ4_PAGES)
    secondary = Secondary(sink, name="kv1", memory_size=MEM, generation=1, checkpoint_seq=5,
                          has_checkpoint=True, now=0.0, capabilities=caps)
    secondary.receive_data(encode(Hello("kv1", Role.PRIMARY, 1, 5, MEM, 0, caps)), 0.0)
    record = encode(XorPages((1,), bytearray(PAGE_SIZE), crc32(bytes(PAGE_SIZE))))
    with pytest.raises(UnexpectedRecord, match="did not negotiate"):
        secondary.receive_data(record, 0.0)
    # During a full sync there is no committed base.
    pair = Pair()
    pair.to_primary()
    pair.to_secondary()         # the primary's HELLO: a full sync begins
    with pytest.raises(UnexpectedRecord, match="syncing"):
        pair.secondary.receive_data(record, 0.0)


def test_a_forged_delta_is_caught_before_it_is_applied() -> None:
    pair = protected_pair(delta_cache_pages=8)
    before = pair.snapshot()
    delta = bytearray(PAGE_SIZE)
    delta[0] = 1
    forged = encode(XorPages((2,), delta, 0xDEADBEEF))
    with pytest.raises(DeltaMismatch):
        pair.secondary.receive_data(forged, 0.0)
    assert pair.snapshot() == before
    assert not any(isinstance(e, Discarded) for e in pair.secondary.connection_lost())
    assert pair.snapshot() == before


def test_a_huge_delta_counts_against_the_staging_limit() -> None:
    """A few bytes of LZ4 expand to 16 MiB: staged deltas count at their size."""
    sink = ImageSink(MEM)
    secondary = Secondary(sink, name="kv1", memory_size=MEM, generation=1, checkpoint_seq=5,
                          has_checkpoint=True, now=0.0)
    secondary.receive_data(encode(Hello("kv1", Role.PRIMARY, 1, 5, MEM, 0,
                                        int(Capability.DELTAS))), 0.0)
    secondary._staging_limit = 4 * PAGE_SIZE       # a small guest's limit, for speed
    record = encode(XorPages(tuple(range(8)), bytearray(8 * PAGE_SIZE), 0))
    assert len(record) < 300
    with pytest.raises(ProtocolError, match="exceeds"):
        secondary.receive_data(record, 0.0)


def test_native_xor_matches_the_python_reference() -> None:
    rng = random.Random(5)
    memory = bytearray(rng.randbytes(32 * PAGE_SIZE))
    pfns = rng.sample(range(32), 9)
    slots = rng.sample(range(16), 9)
    cache = bytearray(rng.randbytes(16 * PAGE_SIZE))
    old = bytes(cache)
    delta, new = bytearray(6 * PAGE_SIZE), bytearray(6 * PAGE_SIZE)
    native_codec.cache_pages(memory, pfns, slots, 6, cache, delta, new)

    def page(buf: Buffer, n: int) -> bytes:
        return bytes(buf[n * PAGE_SIZE:(n + 1) * PAGE_SIZE])

    assert bytes(delta) == b"".join(xor_bytes(page(memory, p), page(old, s))
                                    for p, s in zip(pfns[:6], slots[:6], strict=True))
    assert bytes(new) == b"".join(page(memory, p) for p in pfns[:6])
    for p, s in zip(pfns, slots, strict=True):      # all 9 slots took their pages
        assert page(cache, s) == page(memory, p)
    untouched = set(range(16)) - set(slots)
    assert all(page(cache, s) == page(old, s) for s in untouched)
    # The secondary's side: its old copy XOR the delta gives the new pages.
    base = bytearray(memory)
    for p, s in zip(pfns[:6], slots[:6], strict=True):
        base[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = page(old, s)
    rebuilt = bytearray(delta)
    native_codec.xor_apply(base, pfns[:6], rebuilt)
    assert bytes(rebuilt) == bytes(new)
    with pytest.raises(ValueError):
        native_codec.cache_pages(memory, [32], [0], 1, cache, delta, new)
    with pytest.raises(ValueError):
        native_codec.cache_pages(memory, [0], [16], 0, cache, delta, new)
    with pytest.raises(ValueError):
        native_codec.cache_pages(memory, pfns, slots, 7, cache, delta, new)   # 6 pages of room
    with pytest.raises(ValueError):
        native_codec.xor_apply(memory, [40], bytearray(PAGE_SIZE))


def test_python_path_gives_the_same_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """KEMARI_NATIVE_CODEC=0 (the Python delta path) writes the same bytes."""
    streams = []
    for native in (True, False):           # make test builds the C codec
        monkeypatch.setattr(native_codec, "ENABLED", native)
        rng = random.Random(11)
        pair = Pair(delta_cache_pages=4)
        pair.mem[:] = random.Random(2).randbytes(MEM)
        pair.full_sync()
        blob = bytearray(rng.randbytes(600))
        for _ in range(12):
            pfns = sorted(rng.sample(range(NPAGES), 3))
            for pfn in pfns:
                touch(pair.mem, pfn, rng)
            blob[rng.randrange(600)] ^= 0xFF
            checkpoint(pair, pfns, (Vcpu(0, 2, bytes(blob)),))
            pair.assert_mirrors_primary()
            assert pair.sink.vcpus[0] == (2, bytes(blob))
        assert pair.primary.blob_bases.stats["xor_blobs"] == 11
        streams.append(b"".join(pair.wire[1:]))
    assert streams[0] == streams[1]


@given(seed=st.integers(0, 2**32 - 1), cache=st.sampled_from([0, 1, 3, 16]),
       patch=st.booleans())
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_c_checkpoint_writer_gives_the_python_paths_bytes(monkeypatch: pytest.MonkeyPatch,
                                                         seed: int, cache: int,
                                                         patch: bool) -> None:
    """kcodec_checkpoint (one C call per checkpoint) against Primary's Python
    path over random sessions: cache hits, misses and evictions, pages LZ4
    cannot shrink (or patched: pages changed in a few bytes or rewritten),
    vCPU and device blobs (deltas, resized, other versions), disk writes and
    prebuilt pages, heartbeats counted into the next END."""
    assert native_codec._BOUND            # the modules export LZ4 and zng_crc32
    monkeypatch.setattr(native_codec, "CHECKPOINT_WRITER", True)
    monkeypatch.setattr(primary, "PATCHES_ENABLED", patch)
    streams = []
    for native in (True, False):
        monkeypatch.setattr(native_codec, "ENABLED", native)
        rng = random.Random(seed)
        pair = Pair(delta_cache_pages=cache)
        pair.mem[:] = random.Random(seed + 1).randbytes(MEM)
        pair.full_sync()
        vcpu = bytearray(rng.randbytes(700))
        for step in range(8):
            # and pages reported but not written (hot pages): sent only if changed
            pfns = sorted(set(dirty_some(pair, rng, 0, 12))
                          | set(rng.sample(range(NPAGES), rng.randint(0, 4))))
            if rng.random() < 0.15:
                vcpu += b"\x01"                            # a new size: sent whole
            vcpu[rng.randrange(len(vcpu))] ^= 0x5A
            records: list = [Vcpu(0, rng.choice([2, 2, 1]), bytes(vcpu))]
            if rng.random() < 0.5:
                records.append(Device(1, 1, b"ring%d" % rng.randrange(4) + bytes(300)))
            if rng.random() < 0.3:
                sectors = rng.randint(1, 4)
                records.append(DiskWrite(0, rng.randrange(60), rng.randbytes(512 * sectors)))
            if rng.random() < 0.2:
                pfn = rng.randrange(NPAGES)
                page = bytes(pair.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE])
                records.insert(rng.randrange(len(records) + 1), Pages((pfn,), page))
            if rng.random() < 0.3:
                pair.primary.poll(0.6 * (step + 1))        # a heartbeat for the next END
            checkpoint(pair, pfns, tuple(records))
            pair.assert_mirrors_primary()
        streams.append(b"".join(pair.wire[1:]))
    assert streams[0] == streams[1]
    if cache:
        assert delta_type(not patch) not in record_types(streams[0])


_C_RECEIVE = native_codec.receive


def _session_outcome(seed: int, damage: str, reader: bool, monkeypatch: pytest.MonkeyPatch,
                     ahead: bool = False, patch: bool = False) -> tuple[tuple, int]:
    """A protected session's secondary after 3 good checkpoints and a 4th one
    damaged by `damage`: (what it did, checkpoints the C reader took).
    `ahead`: before each checkpoint, disk writes sent ahead and a heartbeat, or
    either, or none, in a read of their own, to a secondary that writes ahead.
    `patch`: pages as PAGES_PATCH, not PAGES_XOR."""
    monkeypatch.setattr(native_codec, "CHECKPOINT_READER", reader)
    monkeypatch.setattr(primary, "PATCHES_ENABLED", patch)
    taken = []

    def counting(*args, **kw):
        got = _C_RECEIVE(*args, **kw)
        taken.append(got is not None)
        return got
    monkeypatch.setattr(native_codec, "receive", counting)
    rng = random.Random(seed)
    pair = Pair(delta_cache_pages=16, sink=UndoingSink() if ahead else None, disk_ahead=ahead)
    pair.mem[:] = random.Random(seed + 1).randbytes(MEM)
    pair.full_sync()
    vcpu = bytearray(rng.randbytes(500))
    wires = []
    before = []
    for _ in range(4):
        if ahead:
            if rng.random() < 0.6:
                pair.primary.send_ahead([DiskWrite(0, rng.randrange(60), rng.randbytes(512))],
                                        now=0.0)
            if rng.random() < 0.4:
                pair.primary.poll(0.6)
            before.append(bytes(pair.primary.data_to_send()))
        pfns = sorted(rng.sample(range(NPAGES), rng.randint(1, 8)))
        for pfn in pfns[: len(pfns) - rng.randint(0, 2)]:    # the rest unchanged
            touch(pair.mem, pfn, rng)
        vcpu[rng.randrange(len(vcpu))] ^= 0x21
        records = [Vcpu(0, 2, bytes(vcpu))]
        if rng.random() < 0.3:
            pfn = rng.randrange(NPAGES)
            records.append(Pages((pfn,), bytes(pair.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE])))
        if rng.random() < 0.3:
            pair.primary.poll(0.6)                     # a heartbeat inside the next one
        pair.primary.checkpoint(pair.mem, pfns, records, now=0.0)
        wires.append(bytes(pair.primary.data_to_send()))
        pair.primary.outstanding.clear()
    data = wires[3]
    if damage == "flip":
        i = rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    elif damage == "cut":
        data = data[:rng.randrange(len(data))]
    elif damage == "replay":
        data = wires[2] + data
    elif damage == "two at once":
        wires[2] += data
        data = b""
    what: list = []
    chunks = [wires[0], wires[1], wires[2], data]
    if ahead:
        chunks = [c for pair_ in zip(before, chunks, strict=True) for c in pair_ if c]
    for chunk in chunks:
        try:
            what.append(pair.secondary.receive_data(chunk, 0.0))
        except Exception as exc:          # noqa: BLE001 - the verdict is compared
            what.append((type(exc).__name__, str(exc)))
            break
    what.append(pair.secondary.data_to_send())
    return (tuple(map(repr, what)), pair.snapshot(), pair.secondary.state), sum(taken)


@given(seed=st.integers(0, 2**32 - 1),
       damage=st.sampled_from(["none", "flip", "flip", "cut", "replay", "two at once"]),
       patch=st.booleans())
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_c_checkpoint_reader_reaches_the_python_paths_verdict(
        monkeypatch: pytest.MonkeyPatch, seed: int, damage: str, patch: bool) -> None:
    """kcodec_receive (a whole checkpoint in one C call) against the record-by-
    record path, on good, flipped, cut, replayed and back-to-back checkpoints
    (of PAGES_XOR or PAGES_PATCH): the same events, errors, ACKs and image. It
    takes the good ones itself."""
    assert native_codec._BOUND            # the modules export LZ4 and zng_crc32
    with_c, taken = _session_outcome(seed, damage, True, monkeypatch, patch=patch)
    without_c, _ = _session_outcome(seed, damage, False, monkeypatch, patch=patch)
    assert with_c == without_c
    assert taken == 4 if damage in ("none", "two at once") else taken >= 3


@given(seed=st.integers(0, 2**32 - 1),
       damage=st.sampled_from(["none", "flip", "cut", "replay"]))
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_c_checkpoint_reader_counts_the_records_that_came_before(
        monkeypatch: pytest.MonkeyPatch, seed: int, damage: str) -> None:
    """The same, with disk writes sent ahead (written at once by the secondary)
    and heartbeats arriving in reads before their checkpoint: the C reader
    counts them into the END it checks, and takes every good checkpoint."""
    with_c, taken = _session_outcome(seed, damage, True, monkeypatch, ahead=True)
    without_c, _ = _session_outcome(seed, damage, False, monkeypatch, ahead=True)
    assert with_c == without_c
    assert taken == 4 if damage == "none" else taken >= 3


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("patch", [True, False])
def test_pages_the_secondary_holds_unchanged_are_not_sent(monkeypatch: pytest.MonkeyPatch,
                                                          native: bool, patch: bool) -> None:
    """Hot pages are reported at every harvest, written or not: a cached page
    that did not change since it was sent is left out, the others still go."""
    monkeypatch.setattr(native_codec, "ENABLED", native)
    monkeypatch.setattr(primary, "PATCHES_ENABLED", patch)
    rng = random.Random(5)
    pair = Pair(delta_cache_pages=16)
    pair.mem[:] = rng.randbytes(MEM)
    pair.full_sync()
    checkpoint(pair, [3, 4, 5, 6])                  # now cached
    touch(pair.mem, 4, rng)
    events, _ = checkpoint(pair, [3, 4, 5, 6, 9])   # 9: never sent, goes whole
    pair.assert_mirrors_primary()
    assert [(e.records, e.pages) for e in events if isinstance(e, Committed)] == [(2, 2)]
    assert record_types(pair.wire[-1]) == [delta_type(patch), RecordType.PAGES,
                                           RecordType.CHECKPOINT_END]
    assert pair.primary.delta_cache.stats["unchanged_pages"] == 3
    events, _ = checkpoint(pair, [3, 5])            # nothing changed: an END alone
    assert [(e.records, e.pages) for e in events if isinstance(e, Committed)] == [(0, 0)]
    pair.assert_mirrors_primary()


def test_page_cache_needs_a_slot_and_a_zero_delta_gives_the_base() -> None:
    with pytest.raises(ValueError):
        PageCache(0)
    memory = bytearray(os.urandom(4 * PAGE_SIZE))
    delta = bytearray(PAGE_SIZE)
    apply_delta(memory, [2], delta)
    assert delta == memory[2 * PAGE_SIZE:3 * PAGE_SIZE]


def test_vcpu_blobs_go_as_deltas_against_the_last_applied() -> None:
    rng = random.Random(9)
    pair = protected_pair(delta_cache_pages=8)
    blob = bytearray(rng.randbytes(4608))
    sizes = []
    for i in range(10):
        offset = rng.randrange(0, 4600)
        blob[offset:offset + 8] = rng.randbytes(8)
        version = 2 if i != 5 else 1                   # a full blob now and then
        pair.primary.checkpoint(pair.mem, [], [Vcpu(0, version, bytes(blob))], now=0.0)
        data = pair.primary.data_to_send()
        pair.wire.append(data)
        types = record_types(data)
        assert isinstance(pair.secondary.receive_data(data, 0.0)[-1], Committed)
        pair.to_primary()
        assert pair.sink.vcpus[0] == (version, bytes(blob))
        sizes.append(len(data))
        # the first of each version has no base; version 2 after the full one has
        assert (RecordType.BLOB_XOR in types) == (i not in (0, 5)), (i, types)
    assert max(sizes[1:5]) < 400 < min(sizes[0], sizes[5])
    assert pair.primary.blob_bases.stats["xor_blobs"] == 8


def test_a_blob_delta_without_its_base_is_refused() -> None:
    pair = protected_pair(delta_cache_pages=8)
    before = pair.snapshot()
    forged = encode(XorBlob(RecordType.VCPU, 3, 2, bytearray(64), 0))   # vCPU 3: never sent
    with pytest.raises(DeltaMismatch, match="received no such blob"):
        pair.secondary.receive_data(forged, 0.0)
    assert pair.snapshot() == before
    pair = protected_pair(delta_cache_pages=8)                  # vCPU 0 holds b"regs0"
    before = pair.snapshot()
    wrong = encode(XorBlob(RecordType.VCPU, 0, 1, bytearray(5), crc32(b"other")))
    with pytest.raises(DeltaMismatch, match="differ"):
        pair.secondary.receive_data(wrong, 0.0)
    assert pair.snapshot() == before


def test_xor_blob_forgeries() -> None:
    record = XorBlob(RecordType.DEVICE, 1, 7, bytearray(100), 5)
    assert _decode_mid_stream(encode(record)) == [record]
    with pytest.raises(ValueError):
        XorBlob(RecordType.PAGES, 1, 7, bytearray(100), 5)
    for kind, size, reserved in ((RecordType.PAGES, 8, 0), (RecordType.VCPU, 0, 0),
                                 (RecordType.VCPU, (1 << 20) + 1, 0), (RecordType.VCPU, 8, 1),
                                 (RecordType.VCPU, 4096, 0)):   # the last: block too short
        body = struct.pack("<IIIIII", kind, 0, 0, 0, size, reserved) + \
            lz4_block.compress(bytes(8), store_size=False)
        body += bytes(-len(body) % 8)
        with pytest.raises(MalformedRecord):
            _decode_mid_stream(HEADER.pack(RecordType.BLOB_XOR, 0, len(body)) + body)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_corrupted_delta_checkpoints_never_apply(monkeypatch: pytest.MonkeyPatch,
                                                      data: st.DataObject) -> None:
    """Bit flips and cuts in a checkpoint made of PAGES_XOR (or PAGES_PATCH) and
    BLOB_XOR: refused whole (checksum, LZ4, the patch's runs, the rebuilt
    pages' CRC), never applied in part."""
    patch = data.draw(st.booleans())
    monkeypatch.setattr(primary, "PATCHES_ENABLED", patch)
    rng = random.Random(data.draw(st.integers(0, 1 << 30)))
    pair = Pair(delta_cache_pages=16)
    pair.mem[:] = rng.randbytes(MEM)          # the same bytes each time hypothesis replays
    pair.full_sync()
    blob = bytearray(rng.randbytes(300))
    pfns = sorted(rng.sample(range(NPAGES), 4))
    for pfn in pfns:
        touch(pair.mem, pfn, rng)
    checkpoint(pair, pfns, (Vcpu(0, 1, bytes(blob)),))      # the bases
    good = pair.snapshot()
    for pfn in pfns:
        touch(pair.mem, pfn, rng)
    blob[rng.randrange(300)] ^= 0x5A
    seq = pair.primary.checkpoint(pair.mem, pfns, [Vcpu(0, 1, bytes(blob))], now=1.0)
    wire = pair.primary.data_to_send()
    assert {delta_type(patch), RecordType.BLOB_XOR} <= set(record_types(bytes(wire)))
    feed_damaged(pair, data, wire)
    assert_not_applied(pair, good, seq)


def test_a_secondary_without_the_capability_gets_whole_pages() -> None:
    sink = ImageSink(MEM)
    caps = int(DEFAULT_CAPABILITIES & ~Capability.DELTAS)
    pair = Pair(delta_cache_pages=16, sink=sink)
    pair.secondary = Secondary(sink, name="kv1", memory_size=MEM, generation=0,
                               checkpoint_seq=0, has_checkpoint=False, now=0.0,
                               capabilities=caps)
    pair.full_sync()
    assert pair.primary.delta_cache is None and pair.primary.blob_bases is None
    rng = random.Random(4)
    for _ in range(5):
        touch(pair.mem, 3, rng)
        checkpoint(pair, [3], (Vcpu(0, 1, b"regs"),))
        pair.assert_mirrors_primary()
    types = set(record_types(b"".join(pair.wire[1:])))
    assert RecordType.PAGES in types and RecordType.VCPU in types
    assert not types & {RecordType.PAGES_XOR, RecordType.BLOB_XOR}


def test_two_blobs_of_one_kind_in_a_checkpoint_chain_their_deltas() -> None:
    """The base of a BLOB_XOR is the stream's previous blob of its kind, id and
    version, even one staged earlier in the same checkpoint."""
    pair = protected_pair(delta_cache_pages=8)
    first, second = bytes(199) + b"\x01", b"\x02" + bytes(198) + b"\x01"

    checkpoint(pair, [], (Vcpu(7, 2, bytes(200)),))
    events, _ = checkpoint(pair, [], (Vcpu(7, 2, first), Vcpu(7, 2, second)))
    assert isinstance(events[-1], Committed)
    assert pair.primary.blob_bases.stats["xor_blobs"] == 2
    assert pair.sink.vcpus[7] == (2, second)


def test_the_c_reader_keeps_no_hold_on_the_image_it_reads() -> None:
    """A secondary's machine releases its memory view when it closes: a buffer
    export the reader kept between calls would make that fail."""
    pair = protected_pair(delta_cache_pages=8)
    taken = []
    for pfn in (1, 2, 1):
        pair.dirty(pfn)
        pair.primary.checkpoint(pair.mem, [pfn], [Vcpu(0, 2, bytes(64))], now=0.0)
        taken += pair.to_secondary()
        pair.to_primary()
    assert [type(e) for e in taken] == [Committed] * 3
    pair.assert_mirrors_primary()
    pair.sink.memory.release()           # BufferError if an export were still held


def test_the_c_page_index_plans_as_the_page_cache_does() -> None:
    """native_codec.PageIndex (kcodec_index_plan) against delta.PageCache.plan
    over many plans: the same hits, misses, slots and unchanged pages, and the
    same number of pages held; both caches fill their slots alike."""
    rng = random.Random(7)
    mem = bytearray(rng.randbytes(MEM))
    py, c = PageCache(5), native_codec.PageIndex(5, NPAGES)
    cmem = native_codec.ffi.from_buffer(mem)
    for _ in range(200):
        pfns = rng.sample(range(NPAGES), rng.randint(0, 9))
        for pfn in pfns:
            if rng.random() < 0.7:
                touch(mem, pfn, rng)
        hits, slots, misses, _unchanged = py.plan(mem, pfns)
        n_hits, n_misses, n_cached = c.plan(cmem, pfns)
        got_pfns = native_codec.ffi.unpack(c.pfns, n_hits + n_misses) if pfns else []
        got_slots = native_codec.ffi.unpack(c.slots, n_hits + n_cached) if pfns else []
        assert (got_pfns, got_slots) == (hits + misses, slots)
        assert (n_hits, n_misses, c.stats["unchanged_pages"]) == \
            (len(hits), len(misses), py.stats["unchanged_pages"])
        assert len(c) == len(py)
        cached = misses[len(misses) - (len(slots) - len(hits)):]
        for pfn, slot in zip(hits + cached, slots, strict=True):   # as the writer fills them
            for arena in (py.arena, c.arena):
                arena[slot * PAGE_SIZE:(slot + 1) * PAGE_SIZE] = \
                    mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]


def test_the_c_page_index_refuses_bad_pages_and_changes_nothing() -> None:
    mem = bytearray(MEM)
    cmem = native_codec.ffi.from_buffer(mem)
    index = native_codec.PageIndex(4, NPAGES)
    assert index.plan(cmem, [1, 2]) == (0, 2, 2)
    for bad in ([3, NPAGES], [3, 4, 3], [-1]):
        with pytest.raises((ValueError, OverflowError)):
            index.plan(cmem, bad)
        assert len(index) == 2
    assert index.plan(cmem, [2, 3]) == (0, 1, 1)       # 2 unchanged: left out, 3 a miss
    assert index.stats["unchanged_pages"] == 1
    with pytest.raises(ValueError):
        native_codec.PageIndex(0, NPAGES)


def test_the_c_index_checkpoint_checks_room_before_it_plans() -> None:
    """kcodec_index_checkpoint: buffers too small for some plan of the pages,
    or a bad page, refuse the call before the index changes; then the same
    pages go through PageIndex.write as the plan and the writer would."""
    ffi, lib = native_codec.ffi, native_codec.lib
    mem = bytearray(random.Random(6).randbytes(MEM))
    index = native_codec.PageIndex(4, NPAGES)
    c = ffi.new("struct kcodec_ckpt *")
    pfns = ffi.new("uint64_t[]", [1, 2])
    plan_pfns, plan_slots = ffi.new("uint64_t[]", 2), ffi.new("uint32_t[]", 2)
    need = lib.kcodec_checkpoint_bound(2, 2, 0, 0)
    for out_size, scratch_size, error in ((need - 1, 3 * 2 * PAGE_SIZE, -2),
                                          (need, 2 * PAGE_SIZE, -4)):
        out, scratch = ffi.new("uint8_t[]", out_size), ffi.new("uint8_t[]", scratch_size)
        got = lib.kcodec_index_checkpoint(index.native, c, ffi.from_buffer(mem), MEM,
                                          index.arena_ptr, pfns, 2, plan_pfns, plan_slots,
                                          scratch, scratch_size, ffi.NULL, 0, out, out_size)
        assert got == error and len(index) == 0
    with pytest.raises(ValueError, match="outside guest memory"):
        index.write(mem, [1, NPAGES], [], 0, 0, seq=1, generation=1, queued=(0, 0, 0, 0),
                    lz4_worth=0.9, patch=False)
    assert len(index) == 0
    data = index.write(mem, [1, 2], [], 0, 0, seq=1, generation=1, queued=(0, 0, 0, 0),
                       lz4_worth=0.9, patch=False)
    assert len(index) == 2 and record_types(data) == [RecordType.PAGES,
                                                      RecordType.CHECKPOINT_END]


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.lists(st.tuples(st.integers(1, 12), st.binary(min_size=1, max_size=40)),
                               max_size=12), min_size=1, max_size=8))
def test_the_c_readers_blob_bases_follow_the_dict_however_it_changes(
        steps: list[list[tuple[int, bytes]]]) -> None:
    """receive() keeps its array of bases between calls and rewrites only what
    changed: after any sequence of dicts (keys added, dropped, reordered,
    blobs replaced, more than its room), the array holds the latest one."""
    table = native_codec._BaseTable()
    for step in steps:
        bases = {(9, ident, 2): blob for ident, blob in step}
        array = table.update(bases)
        got = [((int(e.type), int(e.ident), int(e.version)),
                native_codec.ffi.buffer(e.data, e.len)[:])
               for e in (array[i] for i in range(len(bases)))] if bases else []
        assert got == list(bases.items())
