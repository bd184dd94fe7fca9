"""Whether a full-sync batch goes LZ4-compressed: whichever moved pages faster.

LZ4 pays when the link, or the secondary behind it, is slower than
compressing: on a 1 Gb/s link nearly always; on loopback only for memory
that compresses very well (docs/benchmarks.md: words compress 1.5x at
0.35 GB/s, slower than sending them). So the primary measures instead of
guessing: each batch's encode + send time per page, for each choice, in a
moving average, and takes the cheaper one, trying the other after
PROBE_EVERY batches so a change in memory contents or link is noticed.
A try that saved nothing (random pages) rules compression out until the
next probe. Each probe that loses doubles the wait for the next one, up
to MAX_PROBE_EVERY: a probe costs a whole batch at the slower choice (LZ4
over words runs at a third of loopback's speed), and one in 8 batches
took 1.04 GiB/s down to 0.82 (docs/benchmarks.md).
"""

from __future__ import annotations

import math

PROBE_EVERY = 8
MAX_PROBE_EVERY = 64
WEIGHT = 0.3          # of the newest batch in the moving average


class CompressionChooser:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.cost: dict[bool, float | None] = {True: None, False: None}   # seconds per page
        self.batches = 0
        self.compressed_batches = 0
        self.probe_every = PROBE_EVERY
        self._next_probe = PROBE_EVERY
        self._probing = False

    def _best(self) -> bool:
        return min(self.cost, key=lambda option: self.cost[option] or 0.0)

    def choose(self) -> bool:
        """True: compress the next batch."""
        self.batches += 1
        if not self.enabled:
            return False
        untried = [option for option, cost in self.cost.items() if cost is None]
        if untried:
            choice = untried[0]
        else:
            self._probing = self.batches >= self._next_probe
            choice = self._best() != self._probing
        self.compressed_batches += choice
        return choice

    def record(self, compressed: bool, pages: int, seconds: float, shrank: bool = True) -> None:
        """A batch of `pages` took `seconds` to encode and send. `shrank`: a
        compressed try saved bytes (else its pages went plain, and the try was
        pure cost: compression stays off until the next probe)."""
        if compressed and not shrank:
            self.cost[True] = math.inf
        else:
            per_page = seconds / max(1, pages)
            old = self.cost[compressed]
            # a probe's measure replaces the one from batches ago
            fresh = old is None or math.isinf(old) or self._probing
            self.cost[compressed] = per_page if fresh else (1 - WEIGHT) * old + WEIGHT * per_page
        if self._probing:
            won = self._best() == compressed
            self.probe_every = PROBE_EVERY if won else min(2 * self.probe_every,
                                                           MAX_PROBE_EVERY)
            self._next_probe = self.batches + self.probe_every
            self._probing = False
