"""The full sync's rate cap: it sleeps exactly as long as the bytes sent
are ahead of the cap, and not at all without one."""

from __future__ import annotations

import time

import pytest

from kemari_agent.ft.sync_pace import MIB, SyncPace

pytestmark = pytest.mark.unit


def test_no_cap_never_sleeps():
    pace = SyncPace(0, 0)
    t0 = time.monotonic()
    pace.wait(1 << 40)
    assert time.monotonic() - t0 < 0.05 and pace.slept_s == 0


def test_bytes_ahead_of_the_cap_are_waited_for():
    pace = SyncPace(4, 1000)                 # 4 MiB/s, counted from byte 1000
    t0 = time.monotonic()
    pace.wait(1000 + MIB)                    # 1 MiB sent at once: due at 0.25 s
    took = time.monotonic() - t0
    assert 0.2 <= took < 1.0 and 0.2 <= pace.slept_s <= took
    pace.wait(1000 + MIB)                    # nothing new: no further wait
    assert time.monotonic() - t0 < took + 0.05


def test_a_slow_sender_is_not_held():
    pace = SyncPace(1024, 0)
    time.sleep(0.05)
    pace.wait(MIB)                           # 1 MiB in 50 ms: under 1 GiB/s
    assert pace.slept_s == 0


def test_a_long_wait_keeps_ticking():
    """The link is serviced between slices (heartbeats) while the cap holds it."""
    ticks = []
    pace = SyncPace(1, 0)                    # 1 MiB/s
    pace.wait(MIB // 2, tick=lambda: ticks.append(time.monotonic()), slice_s=0.05)
    assert 0.4 <= pace.slept_s < 1.0
    assert len(ticks) >= 8                   # ~0.5 s in slices of 50 ms
