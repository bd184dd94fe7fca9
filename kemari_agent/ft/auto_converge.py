"""Auto-converge: slow down a guest that dirties memory faster than a full
sync can send it, so that the sync ends in a bounded number of rounds.

The rule is QEMU's cpu-throttle: when the pages dirtied during a pre-copy
round exceed half the pages that round sent, twice in a row, the guest is
throttled. It starts at 20% and rises by 10 points at each further pair of
such rounds, up to 99%. Throttled at p, the vCPU is stopped for p / (1 - p)
of every 10 ms it runs. The throttle ends with the sync's last round,
before the closing checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vmm import Vmm

log = logging.getLogger(__name__)

SLICE_S = 0.010           # the guest runs this long between two stops
DIRTY_RATIO = 0.5         # dirtied / sent above this is a round that does not converge
HIGH_ROUNDS = 2           # that many such rounds in a row raise the throttle
INITIAL, STEP, MAXIMUM = 0.20, 0.10, 0.99


def throttle_step(fraction: float, high_rounds: int, sent: int,
                  dirtied: int) -> tuple[float, int]:
    """The rule: (new fraction, high rounds in a row) after a round that sent
    `sent` pages while the guest dirtied `dirtied`."""
    if sent == 0 or dirtied <= DIRTY_RATIO * sent:
        return fraction, 0
    if high_rounds + 1 < HIGH_ROUNDS:
        return fraction, high_rounds + 1
    return (INITIAL if fraction == 0 else min(MAXIMUM, fraction + STEP)), 0


class AutoConverge:
    """One full sync's throttle: call after_round() after every pre-copy
    round, stop() when the rounds are over (also on failure)."""

    def __init__(self, vmm: Vmm, name: str, enabled: bool = True) -> None:
        self.vmm, self.name, self.enabled = vmm, name, enabled
        self.fraction = 0.0            # share of the time the vCPU is stopped
        self.max_fraction = 0.0
        self.stopped_s = 0.0           # total time the guest was held
        self._high_rounds = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def percent(self) -> int:
        return round(self.fraction * 100)

    def after_round(self, sent: int, dirtied: int) -> None:
        """A round sent `sent` pages while the guest dirtied `dirtied`."""
        if not self.enabled:
            return
        before = self.fraction
        self.fraction, self._high_rounds = throttle_step(self.fraction, self._high_rounds,
                                                         sent, dirtied)
        if self.fraction == before:
            return
        self.max_fraction = max(self.max_fraction, self.fraction)
        log.warning("%s: the guest dirties memory faster than the full sync sends it "
                    "(%d pages dirtied while %d were sent): throttled to %d%%",
                    self.name, dirtied, sent, self.percent)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="auto-converge",
                                            daemon=True)
            self._thread.start()

    def can_still_help(self) -> bool:
        """Whether another round is worth it although the rounds stopped
        converging: the throttle is on and can rise further."""
        return self.enabled and 0 < self.fraction < MAXIMUM

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.max_fraction:
            log.info("%s: throttle lifted (at most %d%%, guest held %.2f s in all)",
                     self.name, round(self.max_fraction * 100), self.stopped_s)
        self.fraction = 0.0

    def _run(self) -> None:
        while not self._done.wait(SLICE_S):
            pause = SLICE_S * self.fraction / (1 - self.fraction)
            try:
                held = self.vmm.call_in_loop(lambda p=pause: self._hold(p), timeout=30)
            except Exception:       # the VM is stopping: nothing left to slow down
                return
            self.stopped_s += held

    def _hold(self, seconds: float) -> float:
        """Loop thread, vCPU stopped: stay stopped `seconds` (less if the sync ends)."""
        started = time.monotonic()
        self._done.wait(seconds)
        return time.monotonic() - started
