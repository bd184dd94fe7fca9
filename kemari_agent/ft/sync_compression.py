"""Whether a full-sync batch goes LZ4-compressed: whichever moves pages cheaper.

LZ4 pays when the link, or the secondary behind it, is slower than
compressing: on a 1 Gb/s link nearly always; on loopback only for memory
that compresses very well (docs/benchmarks.md: words compress 1.5x at
0.35 GB/s, slower than sending them). So the primary measures instead of
guessing. A choice's cost per page is its encoding time per page plus the
bytes per page it sends times the price of sending a byte. Encoding time
and bytes are measured per choice, in moving averages; the price of a byte
(send time per byte: encryption, the socket, and waiting for the link or
the secondary) is one average over both choices' batches, because which
batch happens to find the socket full is chance: timed per choice, the
blocking steered the choice at random (a sync of words once went 149 of
175 batches compressed, at a third of the speed).

The other choice is tried after PROBE_EVERY batches, so a change in memory
contents or link is noticed. A try that saved nothing (random pages) rules
compression out until the next probe. Each probe that loses doubles the
wait for the next one, up to MAX_PROBE_EVERY: a probe costs a whole batch
at the slower choice, and one in 8 batches took 1.04 GiB/s down to 0.82.
"""

from __future__ import annotations

import math

PROBE_EVERY = 8
MAX_PROBE_EVERY = 64
WEIGHT = 0.3          # of the newest batch in the moving averages


def _average(old: float | None, new: float, fresh: bool = False) -> float:
    return new if old is None or fresh else (1 - WEIGHT) * old + WEIGHT * new


class CompressionChooser:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.encode_s: dict[bool, float | None] = {True: None, False: None}  # per page
        self.sent_bytes: dict[bool, float | None] = {True: None, False: None}  # per page
        self.send_s_per_byte: float | None = None
        self.ruled_out = False         # compression saved nothing at its last try
        self.batches = 0
        self.compressed_batches = 0
        self.probe_every = PROBE_EVERY
        self._next_probe = PROBE_EVERY
        self._probing = False

    def cost(self, compressed: bool) -> float | None:
        """Seconds per page (None: not tried yet)."""
        if compressed and self.ruled_out:
            return math.inf
        encode, sent = self.encode_s[compressed], self.sent_bytes[compressed]
        if encode is None or sent is None:
            return None
        return encode + sent * (self.send_s_per_byte or 0.0)

    def _best(self) -> bool:
        return min((True, False), key=lambda option: self.cost(option) or 0.0)

    def choose(self) -> bool:
        """True: compress the next batch."""
        self.batches += 1
        if not self.enabled:
            return False
        untried = [option for option in (True, False) if self.cost(option) is None]
        if untried:
            choice = untried[0]
        else:
            self._probing = self.batches >= self._next_probe
            choice = self._best() != self._probing
        self.compressed_batches += choice
        return choice

    def record(self, compressed: bool, pages: int, encode_s: float, sent: int, send_s: float,
               shrank: bool = True) -> None:
        """A batch of `pages` took `encode_s` to encode, then `send_s` to send its
        `sent` bytes. `shrank`: a compressed try saved bytes (else its pages went
        plain, and the try was pure cost: compression stays off until the next
        probe)."""
        pages = max(1, pages)
        if sent:
            self.send_s_per_byte = _average(self.send_s_per_byte, send_s / sent)
        if compressed and not shrank:
            self.ruled_out = True
        else:
            if compressed:
                self.ruled_out = False
            # a probe's measures replace those from batches ago
            self.encode_s[compressed] = _average(self.encode_s[compressed], encode_s / pages,
                                                 fresh=self._probing)
            self.sent_bytes[compressed] = _average(self.sent_bytes[compressed], sent / pages,
                                                   fresh=self._probing)
        if self._probing:
            won = self._best() == compressed
            self.probe_every = PROBE_EVERY if won else min(2 * self.probe_every,
                                                           MAX_PROBE_EVERY)
            self._next_probe = self.batches + self.probe_every
            self._probing = False
