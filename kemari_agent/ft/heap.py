"""Keep a daemon's large buffers in its heap instead of mapping each one fresh.

glibc serves an allocation of 128 KiB or more (the threshold grows as such
chunks are freed) with its own mmap() and unmaps it on free(), so every
megabyte a full sync joins, compresses or receives is page-faulted in again.
On these PVM-backed machines a page fault costs several microseconds: a 2 MiB
buffer took 1.6 ms to fill the first time and 0.3 ms once reused, which made
LZ4 run at 0.4 instead of 2.5 GiB/s (docs/benchmarks.md). Raising the mmap
threshold to glibc's maximum and trimming the heap only past a bound keeps
those buffers mapped between batches, at the price of up to TRIM bytes of
free heap held after a sync.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("kemari.heap")

M_TRIM_THRESHOLD = -1          # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP = 32 << 20                # glibc's largest accepted mmap threshold on 64-bit
TRIM = 16 << 20                # a sync's few live buffers fit; more goes back


def keep_large_buffers() -> bool:
    """Returns whether glibc accepted both settings (False elsewhere, harmless)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM) == 1
    if not ok:
        log.warning("mallopt refused the heap settings: large buffers stay mmap()ed")
    return ok
