"""The C encoder for a checkpoint's pages (native/codec.c), when it is built.

KEMARI_NATIVE_CODEC=0 in a daemon's environment selects the Python encoder
(codec.pages_parts) instead, e.g. to compare the two in one benchmark run
(bench/bench_checkpoint_stages.py). Both write the same bytes; tests/unit
check that on random inputs. Without the native module (a source tree not
built) the Python encoder is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .codec import Buffer

try:
    from .._native import ffi, lib
except ImportError:  # pragma: no cover - depends on the build
    ffi = lib = None

ENABLED = lib is not None and os.environ.get("KEMARI_NATIVE_CODEC", "1") != "0"
# Checkpoints of fewer pages use the Python encoder: cffi's per-call cost
# (~3 us, bench/bench_checkpoint_stages.py) is more than it saves there.
MIN_PAGES = 8


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
