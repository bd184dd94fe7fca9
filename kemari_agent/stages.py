"""Per-checkpoint stage timestamps, for bench/bench_checkpoint_stages.py.

Off unless the daemon runs with KEMARI_STAGES=1: then each checkpoint's
moments (CLOCK_MONOTONIC in ns, comparable between the two daemons of one
host) are kept for the last few hundred checkpoints and shown by
`kemari status --json` under "stages". When off, every hook is one test of
a module-level bool, so the fast path pays nothing measurable.
"""

from __future__ import annotations

import collections
import os
import time

ENABLED = os.environ.get("KEMARI_STAGES") == "1"
KEEP = 4000

now_ns = time.monotonic_ns


class StageLog:
    """Rows of {name: ns} keyed by checkpoint seq; a row is built up across calls."""

    def __init__(self) -> None:
        self.rows: collections.OrderedDict[int, dict[str, int]] = collections.OrderedDict()
        self.pending: dict[str, int] = {}     # moments taken before the seq is known

    def mark(self, name: str) -> None:
        self.pending[name] = now_ns()

    def note(self, name: str, value: int) -> None:
        self.pending[name] = value

    def close(self, seq: int) -> None:
        """The pending moments belong to checkpoint `seq`."""
        row = self.rows.setdefault(seq, {})
        row.update(self.pending)
        self.pending = {}
        while len(self.rows) > KEEP:
            self.rows.popitem(last=False)

    def export(self) -> list[dict[str, int]]:
        return [dict(row, seq=seq) for seq, row in list(self.rows.items())]
