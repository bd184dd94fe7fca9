"""Fault injection for the failover torture tests: die at a chosen point of the
checkpoint cycle, the way a host dies (SIGKILL: no cleanup, no goodbye).

KEMARI_FAULT="POINT:PROBABILITY" in a daemon's environment, POINT one of
  mid-send   half of a checkpoint's bytes are on the wire
  after-ack  the ACK is in, the held I/O is not yet performed
and one that only delays (a loaded host), for the race tests:
  slow-apply the secondary's wait took a checkpoint (its ACK may have left
             in that call); the pass that applies it runs SLOW_APPLY_S later
Unset (the normal case), every check is one attribute test.
"""

from __future__ import annotations

import os
import random
import signal
import time

POINTS = ("mid-send", "after-ack", "slow-apply")
SLOW_APPLY_S = 0.5


class Faults:
    def __init__(self, spec: str | None = None) -> None:
        spec = spec if spec is not None else os.environ.get("KEMARI_FAULT", "")
        self.point, self.probability = None, 0.0
        if spec:
            point, _, prob = spec.partition(":")
            if point not in POINTS:
                raise ValueError(f"KEMARI_FAULT: unknown point {point!r}")
            self.point, self.probability = point, float(prob or "1")

    def due(self, point: str) -> bool:
        return self.point == point and random.random() < self.probability

    @staticmethod
    def stall() -> None:
        time.sleep(SLOW_APPLY_S)

    @staticmethod
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)
