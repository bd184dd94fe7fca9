"""Checkpoint pages and state blobs as deltas against what the secondary
already holds (PAGES_PATCH or PAGES_XOR, BLOB_XOR).

A page the guest dirties between two checkpoints mostly changes in a few
bytes: a counter, a ring index, a stack frame. The primary keeps the content
it last sent of recently sent pages (an LRU cache of
`replication.delta_cache_mib`) and sends such a page as the XOR of its new
and its cached content, LZ4-compressed: a few dozen bytes instead of 4096.
Where the secondary decodes it, the page goes as a patch instead: the runs
of bytes that changed, found by comparing it with its cached content word
by word (PAGES_PATCH). The same bytes, or fewer, for a fraction of the CPU
on both sides: LZ4 had to compress and decompress the whole XOR, mostly
zeros, 0.9 us a page here.
The secondary XORs the delta with its own copy (its last committed
checkpoint, which equals what the primary sent) and checks the result
against the CRC-32 the record carries. A vCPU's blob (4.6 KiB, mostly the
same from one checkpoint to the next) goes the same way against the last
blob of its kind, id and version (`BlobBases`).

The cache belongs to one session (one `Primary`): a torn or refused
checkpoint ends the session, and the next one starts with an empty cache.
Deltas are sent only between protected checkpoints, whose pages the
secondary stages and applies whole and in order.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

from . import native_codec
from .codec import (
    LZ4_WORTH,
    MAX_PAGES_PER_RECORD,
    MAX_XOR_BLOB,
    PAGE_SIZE,
    Buffer,
    Device,
    Vcpu,
    crc32,
    encode_parts,
    lz4_block,
    page_patch,
    pages_parts,
    patch_pages_parts,
    xor_blob_parts,
    xor_pages_parts,
)

# KEMARI_PAGE_PATCHES=0 in a primary's environment sends PAGES_XOR where the
# secondary would take PAGES_PATCH (benchmarks compare the two).
PATCHES_ENABLED = os.environ.get("KEMARI_PAGE_PATCHES", "1") != "0"


class PageCache:
    """The content last sent of up to `capacity` pages, least recently sent evicted first."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("a page cache needs at least one slot")
        self.capacity = capacity
        self.arena = bytearray(capacity * PAGE_SIZE)
        self._view = memoryview(self.arena)
        self._slots: OrderedDict[int, int] = OrderedDict()    # pfn -> slot, oldest first
        self._free = list(range(capacity - 1, -1, -1))
        # Scratch for one checkpoint's deltas and new content, kept: a fresh
        # megabyte per checkpoint costs page faults and zeroing (heap.py).
        self._delta = bytearray()
        self._new = bytearray()
        self.stats = {"xor_pages": 0, "xor_bytes": 0, "plain_pages": 0, "unchanged_pages": 0}

    def __len__(self) -> int:
        return len(self._slots)

    def encode(self, memory: Buffer, pfns: Sequence[int], *, patch: bool = False
               ) -> tuple[list[Buffer], int, list[int], int]:
        """Records for the pages of `pfns` the cache holds, and the pfns it does not.

        Returns (parts, record_count, misses, unchanged); the caller sends the
        misses whole; `unchanged` pages are not sent at all (drop_unchanged).
        Every page of `pfns` is cached with its content now (the guest is
        paused), so call this only for a checkpoint that will be sent. A
        batch LZ4 does not shrink goes as plain PAGES. With `patch` the hits go
        as PAGES_PATCH.
        """
        hits, slots, misses, unchanged = self.plan(memory, pfns)
        cached = misses[len(misses) - (len(slots) - len(hits)):]
        patches = self._patches(memory, hits, slots) if patch else None
        delta, new = self._update(memory, hits + cached, slots, len(hits))
        self.stats["plain_pages"] += len(misses)
        parts: list[Buffer] = []
        records = 0
        for start in range(0, len(hits), MAX_PAGES_PER_RECORD):
            if patches is not None:
                span = slice(start, start + MAX_PAGES_PER_RECORD)
                batch_patches = patches[span]
                parts += patch_pages_parts(
                    hits[span], batch_patches,
                    crc32(new[start * PAGE_SIZE:(start + MAX_PAGES_PER_RECORD) * PAGE_SIZE]))
                self.stats["xor_pages"] += len(batch_patches)
                self.stats["xor_bytes"] += sum(len(p) for p in batch_patches)
                records += 1
                continue
            span = slice(start * PAGE_SIZE, (start + MAX_PAGES_PER_RECORD) * PAGE_SIZE)
            batch = hits[start:start + MAX_PAGES_PER_RECORD]
            packed = lz4_block.compress(delta[span], store_size=False)
            if len(packed) <= LZ4_WORTH * len(batch) * PAGE_SIZE:
                parts += xor_pages_parts(batch, packed, crc32(new[span]))
                self.stats["xor_pages"] += len(batch)
                self.stats["xor_bytes"] += len(packed)
            else:
                parts += pages_parts(memory, batch)[0]
                self.stats["plain_pages"] += len(batch)
            records += 1
        return parts, records, misses, unchanged

    def plan(self, memory: Buffer, pfns: Sequence[int]
             ) -> tuple[list[int], list[int], list[int], int]:
        """Which of `pfns` the cache holds, and where each goes from now on.

        Returns (hits, slots, misses, unchanged): `slots` names the hits'
        slots, then those of the last misses (as many as the cache holds),
        which replace the least recently sent pages. The caller then sends the
        hits as deltas against their slots and the misses whole, and every
        slot takes its page, in that order: a hit may lose its slot to a miss
        after its delta. `unchanged` cached pages are left out of hits
        (drop_unchanged)."""
        hits: list[int] = []
        misses: list[int] = []
        slots: list[int] = []
        index = self._slots
        for pfn in pfns:
            slot = index.get(pfn)
            if slot is None:
                misses.append(pfn)
            else:
                index.move_to_end(pfn)
                hits.append(pfn)
                slots.append(slot)
        for pfn in misses[-self.capacity:]:
            if self._free:
                slot = self._free.pop()
            else:   # least recently sent
                _old, slot = index.popitem(last=False)
            index[pfn] = slot
            slots.append(slot)
        planned = len(hits)
        hits, slots = self.drop_unchanged(memory, hits, slots)
        return hits, slots, misses, planned - len(hits)

    def drop_unchanged(self, memory: Buffer, hits: list[int], slots: list[int]
                       ) -> tuple[list[int], list[int]]:
        """plan()'s hits and slots without the hits whose content is their slot's:
        the secondary holds them already, and their delta would be zeros. Pages
        the guest keeps writable (native/vmm.c, hot pages) are reported at every
        harvest, written or not."""
        if not hits:
            return hits, slots
        n = len(hits)
        if native_codec.ENABLED:
            same = native_codec.same_pages(memory, hits, slots[:n], self.arena)
        else:
            view = memoryview(memory)
            same = [view[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]
                    == self._view[slot * PAGE_SIZE:(slot + 1) * PAGE_SIZE]
                    for pfn, slot in zip(hits, slots, strict=False)]
        kept = [i for i in range(n) if not same[i]]
        self.stats["unchanged_pages"] += n - len(kept)
        return [hits[i] for i in kept], [slots[i] for i in kept] + slots[n:]

    def _patches(self, memory: Buffer, hits: list[int], slots: list[int]) -> list[bytes]:
        """Each hit's patch against its slot (before _update overwrites it)."""
        view = memoryview(memory)
        return [page_patch(view[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE],
                           self._view[slot * PAGE_SIZE:(slot + 1) * PAGE_SIZE])
                for pfn, slot in zip(hits, slots, strict=False)]

    def _update(self, memory: Buffer, pfns: list[int], slots: list[int],
                hits: int) -> tuple[memoryview, memoryview]:
        """(deltas, new content) of the first `hits` pages, as views of the
        scratch buffers; then every slot takes its page."""
        size = hits * PAGE_SIZE
        if len(self._delta) < size:
            self._delta, self._new = bytearray(size), bytearray(size)
        delta, new = memoryview(self._delta)[:size], memoryview(self._new)[:size]
        if native_codec.ENABLED:
            native_codec.cache_pages(memory, pfns, slots, hits, self.arena, self._delta,
                                     self._new)
            return delta, new
        view = memoryview(memory)
        if pfns and (min(pfns) < 0 or max(pfns) >= len(view) // PAGE_SIZE):
            raise ValueError("pfn outside guest memory")
        for i, (pfn, slot) in enumerate(zip(pfns, slots, strict=True)):
            page = view[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]
            cached = self._view[slot * PAGE_SIZE:(slot + 1) * PAGE_SIZE]
            if i < hits:
                delta[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = xor_bytes(page, cached)
                new[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = page
            cached[:] = page
        return delta, new


class BlobBases:
    """The VCPU and DEVICE blobs this session sent last, one per (kind, id, version)."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, int, int], bytes] = {}
        self.stats = {"xor_blobs": 0, "xor_bytes": 0}

    def encode(self, record: Vcpu | Device, *, delta: bool) -> list[Buffer]:
        """The record's parts: a BLOB_XOR if `delta` and a base of its size exists
        and LZ4 shrinks the XOR, else the record itself. Either way it becomes
        the base of the next one (the secondary applies every blob it gets)."""
        blob = record.blob
        base = self.base_for(record, delta=delta)
        if base is not None:
            diff = xor_buffers(blob, base)
            packed = lz4_block.compress(diff, store_size=False)
            if len(packed) <= LZ4_WORTH * len(blob):
                self.stats["xor_blobs"] += 1
                self.stats["xor_bytes"] += len(packed)
                return xor_blob_parts(int(record.TYPE), record.ident, record.version,
                                      len(blob), packed, crc32(blob))
        return encode_parts(record)

    def last(self, key: tuple[int, int, int]) -> bytes | None:
        """The last blob sent of (type, id, version)."""
        return self._last.get(key)

    def remember(self, key: tuple[int, int, int], blob: bytes) -> None:
        """`blob` of (type, id, version) was sent (by the driver's one-call path)."""
        self._last[key] = blob

    def base_for(self, record: Vcpu | Device, *, delta: bool) -> bytes | None:
        """The blob `record` may go as a delta against (`delta`: deltas are
        allowed now), or None; `record` becomes the base of the next one."""
        key = (int(record.TYPE), record.ident, record.version)
        blob = record.blob
        base = self._last.get(key)
        self._last[key] = bytes(blob)
        if delta and base is not None and len(base) == len(blob) and 0 < len(blob) <= MAX_XOR_BLOB:
            return base
        return None


def xor_buffers(a: Buffer, b: Buffer) -> Buffer:
    """a XOR b, equal lengths: in C where it is built."""
    return native_codec.xor(a, b) if native_codec.ENABLED else xor_bytes(a, b)


def xor_bytes(a: Buffer, b: Buffer) -> bytes:
    """a XOR b, equal lengths (the reference the C code is checked against)."""
    size = len(memoryview(a).cast("B"))
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(size, "little")


def apply_delta(memory: Buffer, pfns: Sequence[int], delta: bytearray) -> None:
    """delta ^= the pages `pfns` of `memory`, in place: the delta becomes the new pages."""
    if native_codec.ENABLED:
        native_codec.xor_apply(memory, pfns, delta)
        return
    view = memoryview(memory)
    limit = len(view) // PAGE_SIZE
    if pfns and (min(pfns) < 0 or max(pfns) >= limit):
        raise ValueError("pfn outside guest memory")
    for i, pfn in enumerate(pfns):
        span = slice(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)
        delta[span] = xor_bytes(delta[span], view[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE])
