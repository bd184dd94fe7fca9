"""A cap on a full sync's pre-copy rate (`replication.sync_max_mib_s`), as
QEMU's migration max-bandwidth or DRBD's resync rate: the rounds share the
replication link (and the secondary's disk) with whatever else uses them.

Paced on the bytes that leave (after LZ4), measured from the sync's start:
a batch that went out early is followed by a sleep until the average is
back under the cap. The closing checkpoint is not paced: the guest is
paused for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MIB = 1 << 20


class SyncPace:
    def __init__(self, max_mib_s: int, bytes_at_start: int) -> None:
        self.rate = max_mib_s * MIB          # bytes/s; 0: no cap
        self.base = bytes_at_start
        self.started = time.monotonic()
        self.slept_s = 0.0

    def wait(self, bytes_now: int, tick: Callable[[], None] | None = None,
             slice_s: float = 0.1) -> None:
        """Sleep until `bytes_now - bytes_at_start` is within the cap, in slices
        of at most `slice_s` with `tick()` between them: a low cap must not
        hold back the link's heartbeats (the peer would think us dead)."""
        if not self.rate:
            return
        due = self.started + (bytes_now - self.base) / self.rate
        while (ahead := due - time.monotonic()) > 0:
            nap = min(ahead, slice_s)
            time.sleep(nap)
            self.slept_s += nap
            if tick is not None:
                tick()
