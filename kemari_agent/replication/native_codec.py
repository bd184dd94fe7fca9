"""The C encoder for a checkpoint's pages, or for a whole protected checkpoint
(native/codec.c), when it is built.

KEMARI_NATIVE_CODEC=0 in a daemon's environment selects the Python encoder
(codec.pages_parts) instead, e.g. to compare the two in one benchmark run
(bench/bench_checkpoint_stages.py). Both write the same bytes; tests/unit
check that on random inputs. Without the native module (a source tree not
built) the Python encoder is used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from .codec import MAX_PAGES_PER_RECORD, PAGE_SIZE, Buffer

try:
    from .._native import ffi, lib
except ImportError:  # pragma: no cover - depends on the build
    ffi = lib = None

ENABLED = lib is not None and os.environ.get("KEMARI_NATIVE_CODEC", "1") != "0"
# Checkpoints of fewer pages use the Python encoder: cffi's per-call cost
# (~3 us, bench/bench_checkpoint_stages.py) is more than it saves there.
MIN_PAGES = 8


def _bind() -> bool:
    """Hand the C checkpoint writer the LZ4 block compressor and the CRC-32 that
    lz4.block and zlib_ng call: their modules link those libraries in and
    export their C API. Called as lz4.block.compress calls it (a fresh stream,
    LZ4_compress_fast_continue), LZ4 writes the same block. False where a
    module does not export them (then checkpoints are encoded in Python)."""
    if lib is None:
        return False
    try:
        import cffi
        from lz4.block import _block
        from zlib_ng import zlib_ng
        abi = cffi.FFI()
        abi.cdef("void *LZ4_initStream(void *, size_t);"
                 "int LZ4_compress_fast_continue(void *, const char *, char *, int, int, int);"
                 "int LZ4_sizeofState(void);"
                 "int LZ4_decompress_safe(const char *, char *, int, int);"
                 "uint32_t zng_crc32(uint32_t, const uint8_t *, uint32_t);")
        lz4_lib, zng_lib = abi.dlopen(_block.__file__), abi.dlopen(zlib_ng.__file__)
        init, compress, decompress, crc = (
            ffi.cast("void *", int(abi.cast("uintptr_t", fn)))
            for fn in (lz4_lib.LZ4_initStream, lz4_lib.LZ4_compress_fast_continue,
                       lz4_lib.LZ4_decompress_safe, zng_lib.zng_crc32))
        state_size = lz4_lib.LZ4_sizeofState()
    except (ImportError, OSError, AttributeError):
        return False
    _LIBRARIES.extend((lz4_lib, zng_lib))          # never closed
    lib.kcodec_bind_decompress(decompress)
    return lib.kcodec_bind(init, compress, state_size, crc) == 0 and bool(lib.kcodec_bound())


_LIBRARIES: list = []
# The C checkpoint writer and reader can run (kcodec_checkpoint, kcodec_receive):
# with ENABLED, Primary.checkpoint writes each checkpoint in one C call and
# Secondary.receive_data takes a whole one in one C call. KEMARI_CHECKPOINT_WRITER=0
# and KEMARI_CHECKPOINT_READER=0 keep the record-by-record paths, to compare.
_BOUND = _bind()
CHECKPOINT_WRITER = os.environ.get("KEMARI_CHECKPOINT_WRITER", "1") != "0" and _BOUND
CHECKPOINT_READER = os.environ.get("KEMARI_CHECKPOINT_READER", "1") != "0" and _BOUND


# Memory for the encoder's output, of which only what it wrote is used: not
# zeroed first (a full sync's 2 MiB batch paid a memset per batch for nothing).
_unzeroed = ffi.new_allocator(should_clear_after_alloc=False) if ffi is not None else None


def scratch(size: int) -> memoryview:
    """`size` writable bytes of unspecified content, freed with the last view."""
    return memoryview(ffi.buffer(_unzeroed("uint8_t[]", size)))


def pages_size(count: int) -> int:
    """Bytes of the PAGES records of `count` pages (no zero-page detection)."""
    return int(lib.kcodec_pages_size(count))


def write_pages(memory: Buffer, pfns: Sequence[int], out: bytearray) -> int:
    """PAGES records of guest pages `pfns` of `memory` at the start of `out`;
    the same bytes as codec.pages_parts(memory, pfns) joined. Returns the length."""
    mem = ffi.from_buffer(memory)
    n = len(pfns)
    if n and min(pfns) < 0:
        raise ValueError("pfn outside guest memory")
    arr = ffi.new("uint64_t[]", pfns) if n else ffi.NULL
    written = lib.kcodec_pages(mem, len(mem), arr, n, ffi.from_buffer(out), len(out))
    if written == -1:
        raise ValueError("pfn outside guest memory")
    if written < 0:
        raise ValueError("output buffer too small for the pages")
    return int(written)


def write_pages_detect_zero(memory: Buffer, pfns: Sequence[int], out: Buffer) -> tuple[int, int]:
    """write_pages with all-zero pages sent as ZERO entries: the same bytes as
    codec.pages_parts(memory, pfns, detect_zero=True) joined. `out` holds
    pages_size(len(pfns)). Returns (length written, pages with data)."""
    mem = ffi.from_buffer(memory)
    n = len(pfns)
    if n and min(pfns) < 0:
        raise ValueError("pfn outside guest memory")
    arr = ffi.new("uint64_t[]", pfns if isinstance(pfns, list | tuple) else list(pfns)) \
        if n else ffi.NULL
    data_pages = ffi.new("uint32_t *")
    written = lib.kcodec_pages_z(mem, len(mem), arr, n, ffi.from_buffer(out), len(out),
                                 data_pages)
    if written == -1:
        raise ValueError("pfn outside guest memory")
    if written < 0:
        raise ValueError("output buffer too small for the pages")
    return int(written), int(data_pages[0])


def same_pages(memory: Buffer, pfns: Sequence[int], slots: Sequence[int],
               cache: bytearray) -> list[bool]:
    """For each page of `pfns`: is it byte for byte its cache slot?"""
    same = ffi.new("uint8_t[]", len(pfns))
    mem = ffi.from_buffer(memory)
    if lib.kcodec_same_pages(mem, len(mem), ffi.new("uint64_t[]", pfns),
                             ffi.new("uint32_t[]", slots), len(pfns),
                             ffi.from_buffer(cache), len(cache) // 4096, same) < 0:
        raise ValueError("pfn outside guest memory or slot outside the cache")
    return [bool(b) for b in ffi.unpack(same, len(pfns))]


def cache_pages(memory: Buffer, pfns: Sequence[int], slots: Sequence[int], hits: int,
                cache: bytearray, delta: bytearray, new: bytearray) -> None:
    """delta.PageCache's update: into `delta` and `new` (at least 4096 x `hits`
    bytes each) the first `hits` pages' deltas against their slots and their
    new content; then every slot takes its page."""
    if min(len(delta), len(new)) < hits * 4096:
        raise ValueError("delta buffers too small")
    mem = ffi.from_buffer(memory)
    if lib.kcodec_cache_pages(mem, len(mem), ffi.new("uint64_t[]", pfns),
                              ffi.new("uint32_t[]", slots), hits, len(pfns),
                              ffi.from_buffer(cache), len(cache) // 4096,
                              ffi.from_buffer(delta), ffi.from_buffer(new)) < 0:
        raise ValueError("pfn outside guest memory or slot outside the cache")


def xor_apply(memory: Buffer, pfns: Sequence[int], delta: bytearray) -> None:
    """delta ^= the pages `pfns` of `memory`, in place."""
    if len(delta) != len(pfns) * 4096:
        raise ValueError("the delta must hold 4096 bytes per pfn")
    mem = ffi.from_buffer(memory)
    if pfns and min(pfns) < 0:
        raise ValueError("pfn outside guest memory")
    if lib.kcodec_xor_apply(mem, len(mem), ffi.new("uint64_t[]", list(pfns)), len(pfns),
                            ffi.from_buffer(delta)) < 0:
        raise ValueError("pfn outside guest memory")


def xor(a: Buffer, b: Buffer) -> bytearray:
    """a XOR b (equal lengths)."""
    if len(a) != len(b):
        raise ValueError("XOR of buffers of different lengths")
    out = bytearray(len(a))
    lib.kcodec_xor(ffi.from_buffer(out), ffi.from_buffer(a), ffi.from_buffer(b), len(a))
    return out


# kcodec_checkpoint's items: what follows a checkpoint's pages.
RAW = 0


class PageIndex:
    """delta.PageCache for the C checkpoint writer: the same slots, order and
    content, with plan() and drop_unchanged() done in C (kcodec_index_plan)
    so that planning costs no Python per page. `arena` holds the pages' content
    as last sent, as PageCache's does."""

    def __init__(self, capacity: int, guest_pages: int) -> None:
        if capacity <= 0:
            raise ValueError("a page cache needs at least one slot")
        index = lib.kcodec_index_new(capacity, guest_pages)
        if index == ffi.NULL:
            raise MemoryError(f"no memory for a page index of {capacity} slots")
        self._index = ffi.gc(index, lib.kcodec_index_free)
        self.capacity = capacity
        self.arena = bytearray(capacity * PAGE_SIZE)
        self.arena_ptr = ffi.from_buffer(self.arena)     # the arena never changes size
        self.stats = {"xor_pages": 0, "xor_bytes": 0, "plain_pages": 0, "unchanged_pages": 0}
        self.pfns = self.slots = ffi.NULL                 # plan()'s output, reused
        self._in = ffi.NULL                               # its input, ditto
        self._room = 0
        self._counts = ffi.new("uint32_t[4]")
        # write()'s, kept between checkpoints
        self._ckpt = ffi.new("struct kcodec_ckpt *")
        self._items = ffi.NULL
        self._items_room = 0
        self._work = self._out = None

    @property
    def native(self):
        """The C index (a cdata `struct kcodec_index *`, for native/fastpath.c)."""
        return self._index

    def __len__(self) -> int:
        return int(lib.kcodec_index_len(self._index))

    def plan(self, mem, pfns: Sequence[int]) -> tuple[int, int, int]:
        """Plans a checkpoint of the distinct pages `pfns` of `mem` (a cffi
        buffer): self.pfns and self.slots as kcodec_checkpoint takes them.
        Returns (hits, misses, misses cached)."""
        n = self._take(pfns)
        counts = self._counts
        if lib.kcodec_index_plan(self._index, mem, len(mem), self.arena_ptr, self._in, n,
                                 self.pfns, self.slots, counts) < 0:
            raise ValueError("pfn outside guest memory or named twice")
        self.stats["unchanged_pages"] += counts[3]
        return counts[0], counts[1], counts[2]

    def _take(self, pfns: Sequence[int]) -> int:
        """`pfns` into the index's input array (and room for their plan)."""
        n = len(pfns)
        if n > self._room:
            self._room = max(n, 64)
            self._in = ffi.new("uint64_t[]", self._room)
            self.pfns = ffi.new("uint64_t[]", self._room)
            self.slots = ffi.new("uint32_t[]", self._room)
        self._in[0:n] = pfns
        return n

    def write(self, memory: Buffer, pfns: Sequence[int],
              items: Sequence[tuple[int, int, int, Buffer, Buffer | None]],
              item_records: int, item_pages: int, *, seq: int, generation: int,
              queued: tuple[int, int, int, int], lz4_worth: float, patch: bool,
              blob_stats: dict[str, int] | None = None) -> bytearray:
        """write_checkpoint(memory, pfns, self, ...) with the plan and the
        checkpoint in one C call (kcodec_index_checkpoint), and what the call
        needs kept here from one checkpoint to the next: the same bytes."""
        n = self._take(pfns)
        mem = ffi.from_buffer(memory)
        c = self._ckpt
        citems, keep, blob_bytes, raw_bytes, widest = self._items_for(items)
        need = max(0 if patch else min(n, MAX_PAGES_PER_RECORD) * PAGE_SIZE, widest)
        scratch_ = _scratch(2 * need + need // 255 + 16, "_work", self)
        size = int(lib.kcodec_checkpoint_bound(n, n, len(items), blob_bytes)) + raw_bytes
        out = _scratch(size, "_out", self)
        c.seq, c.generation, c.lz4_worth, c.patch = seq, generation, lz4_worth, patch
        c.records, c.pages, c.bytes, c.crc = queued
        c.item_records, c.item_pages = item_records, item_pages
        written = lib.kcodec_index_checkpoint(
            self._index, c, mem, len(mem), self.arena_ptr, self._in, n, self.pfns, self.slots,
            scratch_, len(scratch_), citems, len(items), out, size)
        del keep                             # the buffers C read, alive until here
        if written == -1:
            raise ValueError("pfn outside guest memory or named twice")
        if written < 0:
            raise RuntimeError(f"kcodec_index_checkpoint failed ({written})")
        add_stats(c, self.stats, blob_stats)
        self.stats["unchanged_pages"] += c.unchanged_pages
        return bytearray(ffi.buffer(out, written))

    def _items_for(self, items):
        """items as kcodec_checkpoint's array (kept, grown as needed), the cffi
        buffers that must live through the call, and the items' sizes."""
        if len(items) > self._items_room:
            self._items_room = max(len(items), 8)
            self._items = ffi.new("struct kcodec_item[]", self._items_room)
        return _fill_items(self._items, items)


def _fill_items(citems, items):
    """Fill `citems` from items (type, id, version, data, base); returns
    (citems, cffi buffers to keep alive, blob bytes, raw bytes, widest based blob)."""
    keep = []
    blob_bytes = raw_bytes = widest = 0
    for i, (type_, ident, version, data, base) in enumerate(items):
        item = citems[i]
        item.data = data_ptr = ffi.from_buffer(data)
        keep.append(data_ptr)
        item.len, item.type, item.ident, item.version = len(data), type_, ident, version
        if base is not None:
            item.base = base_ptr = ffi.from_buffer(base)
            keep.append(base_ptr)
            widest = max(widest, len(data))
        else:
            item.base = ffi.NULL
        if type_ == RAW:
            raw_bytes += len(data)
        else:
            blob_bytes += len(data)
    return citems if items else ffi.NULL, keep, blob_bytes, raw_bytes, widest


def add_stats(c, page_stats: dict[str, int] | None, blob_stats: dict[str, int] | None) -> None:
    """A kcodec_checkpoint call's statistics, added to the cache's and the blobs'."""
    if page_stats is not None:
        page_stats["xor_pages"] += c.xor_pages
        page_stats["xor_bytes"] += c.xor_bytes
        page_stats["plain_pages"] += c.plain_pages
    if blob_stats is not None:
        blob_stats["xor_blobs"] += c.xor_blobs
        blob_stats["xor_bytes"] += c.xor_blob_bytes


def write_checkpoint(memory: Buffer, pfns: Sequence[int], cache: PageIndex | None,
                     items: Sequence[tuple[int, int, int, Buffer, Buffer | None]],
                     item_records: int, item_pages: int, *, seq: int, generation: int,
                     queued: tuple[int, int, int, int], lz4_worth: float,
                     patch: bool = False,
                     blob_stats: dict[str, int] | None = None) -> bytearray:
    """A whole protected checkpoint, as Primary.checkpoint's Python path writes
    it (native/codec.h, kcodec_checkpoint). With a `cache`, the pages it holds
    go as PAGES_XOR (PAGES_PATCH with `patch`) against their slots and the
    rest whole, the last of them into slots (PageIndex.write); without one,
    all whole. `items` are (type, id, version, data, base): a VCPU or DEVICE
    blob with the base of its delta (or None), or RAW records, of which there
    are `item_records` holding `item_pages` pages. `queued`: records, pages,
    bytes and CRC-32 already queued for this checkpoint. The statistics go to
    the cache's and to `blob_stats`."""
    if cache is not None:
        return cache.write(memory, pfns, items, item_records, item_pages, seq=seq,
                           generation=generation, queued=queued, lz4_worth=lz4_worth,
                           patch=patch, blob_stats=blob_stats)
    mem = ffi.from_buffer(memory)
    if pfns and min(pfns) < 0:
        raise ValueError("pfn outside guest memory")
    parr = ffi.new("uint64_t[]", pfns) if pfns else ffi.NULL
    citems, keep, blob_bytes, raw_bytes, widest = _fill_items(
        ffi.new("struct kcodec_item[]", len(items)) if items else ffi.NULL, items)
    scratch_ = _scratch(2 * widest + widest // 255 + 16, "work")     # a blob's XOR, its LZ4
    size = int(lib.kcodec_checkpoint_bound(0, len(pfns), len(items), blob_bytes)) + raw_bytes
    out = _scratch(size, "out")
    c = getattr(_work, "ckpt", None)         # its statistics are reset by each call
    if c is None:
        c = _work.ckpt = ffi.new("struct kcodec_ckpt *")
    c.seq, c.generation, c.lz4_worth, c.patch = seq, generation, lz4_worth, patch
    c.records, c.pages, c.bytes, c.crc = queued
    c.item_records, c.item_pages = item_records, item_pages
    written = lib.kcodec_checkpoint(
        c, mem, len(mem), parr, ffi.NULL, 0, len(pfns), 0, ffi.NULL, 0,
        scratch_, len(scratch_), citems, len(items), out, size)
    del keep                                 # the buffers C read, alive until here
    if written == -1:
        raise ValueError("pfn outside guest memory or slot outside the cache")
    if written < 0:
        raise RuntimeError(f"kcodec_checkpoint failed ({written})")
    add_stats(c, None, blob_stats)
    return bytearray(ffi.buffer(out, written))


_work = threading.local()


# Buffers kept between checkpoints at most: a rare large one (a resync) gets its own.
KEEP_SCRATCH = 4 << 20


def _scratch(size: int, name: str, holder=None):
    """kcodec_checkpoint's buffer `name`, kept between calls on `holder` (by
    default per thread) and grown as needed: a fresh one per checkpoint would
    be faulted in each time."""
    holder = _work if holder is None else holder
    buffer = getattr(holder, name, None)
    if buffer is None or len(buffer) < size:
        buffer = _unzeroed("uint8_t[]", size)
        if size <= KEEP_SCRATCH:
            setattr(holder, name, buffer)
    return buffer


class ReceivedCheckpoint:
    """What kcodec_receive staged: valid until the thread's next receive(). Only
    seq and consumed are read at once; the rest when asked for, after the ACK
    may have left (Secondary._ack_early)."""

    def __init__(self, rx, consumed: int) -> None:
        self._rx = rx
        self.consumed = consumed
        self.seq = int(rx.seq)

    def counts(self) -> tuple[int, int, int]:
        """The checkpoint's records, pages and bytes."""
        rx = self._rx
        return int(rx.records), int(rx.pages), int(rx.bytes)

    @property
    def pfns(self) -> list[int]:
        rx = self._rx
        return ffi.unpack(rx.pfns, rx.n_pfns) if rx.n_pfns else []

    @property
    def data(self):
        rx = self._rx
        return ffi.buffer(rx.data, rx.n_pfns * 4096) if rx.n_pfns else b""

    @property
    def blobs(self) -> list[tuple[int, int, int, bytes]]:
        rx = self._rx
        return [(int(b.type), int(b.ident), int(b.version), ffi.buffer(b.data, b.len)[:])
                for b in (rx.blobs[i] for i in range(rx.n_blobs))]


def receive(data: Buffer, committed: Buffer, bases: dict[tuple[int, int, int], bytes], *,
            expected_seq: int, generation: int, staging_limit: int,
            queued: tuple[int, int, int] = (0, 0, 0),
            patches: bool = False) -> ReceivedCheckpoint | None:
    """One whole protected checkpoint at the start of `data`, checked and staged
    in C (native/codec.h, kcodec_receive), or None: then nothing happened, and
    the caller decodes `data` itself. `committed`: the image's memory (PAGES_XOR
    bases); `bases`: the last blob of each (type, id, version); `queued`: the
    records, bytes and CRC-32 of what the caller already took of this checkpoint
    (it staged none of it); `patches`: the session negotiated PAGES_PATCH."""
    rx, table, n_bases = receive_inputs(committed, bases, expected_seq=expected_seq,
                                        generation=generation, staging_limit=staging_limit,
                                        queued=queued, patches=patches)
    consumed = lib.kcodec_receive(rx, ffi.from_buffer(data), len(data),
                                  ffi.from_buffer(committed), table, n_bases)
    return ReceivedCheckpoint(rx, int(consumed)) if consumed > 0 else None


def receive_inputs(committed: Buffer, bases: dict[tuple[int, int, int], bytes], *,
                   expected_seq: int, generation: int, staging_limit: int,
                   queued: tuple[int, int, int], patches: bool) -> tuple[object, object, int]:
    """This thread's `struct kcodec_rx *` with receive()'s inputs filled, and
    the blob bases as kcodec_receive's array and count."""
    rx = getattr(_work, "rx", None)        # read out before the next call
    if rx is None:
        rx = _work.rx = ffi.new("struct kcodec_rx *")
    rx.expected_seq, rx.generation = expected_seq, generation
    rx.queued_records, rx.queued_bytes, rx.queued_crc = queued
    rx.npages, rx.staging_limit = len(committed) // 4096, staging_limit
    rx.patches = patches
    table = getattr(_work, "bases", None)
    if table is None:
        table = _work.bases = _BaseTable()
    return rx, table.update(bases), len(bases)


class _BaseTable:
    """receive()'s blob bases as kcodec_receive's array, kept between calls:
    from one checkpoint to the next usually one blob changes (the vCPU's), so
    only the entries whose key or blob object changed are written again."""

    def __init__(self) -> None:
        self._array = ffi.NULL
        self._room = 0
        self._held: list[tuple[tuple[int, int, int], bytes, object]] = []   # key, blob, pointer

    def update(self, bases: dict[tuple[int, int, int], bytes]):
        if len(bases) > self._room:
            self._room = max(len(bases), 8)
            self._array = ffi.new("struct kcodec_base[]", self._room)
            self._held = []
        held = self._held
        del held[len(bases):]
        for i, (key, blob) in enumerate(bases.items()):
            if i < len(held) and held[i][0] == key and held[i][1] is blob:
                continue
            entry = self._array[i]
            entry.data = pointer = ffi.from_buffer(blob)
            entry.len, (entry.type, entry.ident, entry.version) = len(blob), key
            if i < len(held):
                held[i] = (key, blob, pointer)
            else:
                held.append((key, blob, pointer))
        return self._array if bases else ffi.NULL
