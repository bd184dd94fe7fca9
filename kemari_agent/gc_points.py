"""Python's cycle collector at moments the daemon picks, not inside a checkpoint.

CPython collects its youngest generation after every ~700 net allocations of
container objects, wherever the program happens to be. In the daemons that
was once every 15-50 checkpoints, and there a young collection took 150-350
us and a middle one 1.1-1.9 ms (docs/benchmarks.md, session 18): the
checkpoint it landed in waited for it, which set the round trip's p99.

`take_over()`, once when the daemon starts, freezes what start-up made (it
is never traversed again) and raises CPython's own threshold to a backstop.
The loops then call `collect_if_due()` where nothing waits on them: the VMM
loop once an exit is handled (a doorbell's output has gone out), the
secondary's loop once a pass is done (its ACK has gone). The generation
collected follows CPython's rule (the middle one every OLDER young
collections, the oldest every OLDER middle ones), so the same garbage goes,
at the same rate. The backstop still collects if a loop stops calling (a
thread that allocates while the guest computes without exits).

KEMARI_GC_POINTS=0 in a daemon's environment leaves CPython's collector as it is.
"""

from __future__ import annotations

import gc
import os

ENABLED = os.environ.get("KEMARI_GC_POINTS", "1") != "0"
YOUNG = 700          # CPython's default threshold0: net allocations per young collection
OLDER = 10           # its threshold1 and threshold2
BACKSTOP = 50_000    # CPython collects on its own past this many

_taken = False


def take_over() -> bool:
    """From now on the young generation waits for collect_if_due(); returns
    whether it does (KEMARI_GC_POINTS)."""
    global _taken
    if ENABLED and not _taken:
        gc.freeze()
        gc.set_threshold(BACKSTOP, OLDER, OLDER)
        _taken = True
    return _taken


def collect_if_due() -> int | None:
    """Collect if CPython would have by now: the generation collected, or None."""
    if not _taken:
        return None
    young, middle, old = gc.get_count()
    if young < YOUNG:
        return None
    generation = 2 if old >= OLDER else 1 if middle >= OLDER else 0
    gc.collect(generation)
    return generation
