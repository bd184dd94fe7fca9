"""A guest that dirties memory faster than the full sync sends it is
throttled (auto-converge) until the sync converges, within the round limit,
and runs at full speed again once protected."""

from __future__ import annotations

import time

import pytest
from ftlab import FtLab

pytestmark = pytest.mark.kvm

# 2048 pages per event over all of a 64 MiB guest: every round finds all of
# memory dirty again; random contents, so LZ4 cannot make the pages cheaper
# to send than to dirty
FAST_DIRTIER = ('[stress]\npages = 2048\nrate_hz = 500\nworking_set = 1000000\n'
                'fill = "random"')
# The sync capped at 32 MiB/s (8,192 pages/s): the guest dirties several times
# that (one write fault per page under dirty logging is ~30 us here), however
# much CPU the daemons get. Uncapped, the two rates are close on these
# machines, and a quiet run could converge without throttling.
SYNC_CAP_MIB_S = 32


def whole_log(node) -> str:
    return (node.dir / "run" / f"{node.lab.name}.log").read_text(errors="replace")


def doorbells_per_s(node, seconds: float = 1.0) -> float:
    a = node.status()["vm"]
    time.sleep(seconds)
    b = node.status()["vm"]
    return (b["doorbells"] - a["doorbells"]) / max(1e-9, b["uptime_s"] - a["uptime_s"])


def capped(lab: FtLab, mib_s: int) -> None:
    cfg = lab.primary.config
    cfg.write_text(cfg.read_text().replace(
        "[replication]\n", f"[replication]\nsync_max_mib_s = {mib_s}\n", 1))


def test_a_guest_that_outruns_its_full_sync_is_throttled_until_it_converges(tmp_path):
    lab = FtLab(tmp_path, image="stress", extra=FAST_DIRTIER)
    capped(lab, SYNC_CAP_MIB_S)
    try:
        lab.primary.start("primary")
        time.sleep(1.0)                              # every page written at least once
        lab.secondary.start("secondary")
        status = lab.wait_synced(120)
        sync = status["last_sync"]
        log = whole_log(lab.primary)
        assert sync["kind"] == "full", sync
        # the cap held: the rounds took at least their bytes at 32 MiB/s
        assert sync["paced_s"] > 0, sync
        assert sync["throttle_max_percent"] >= 20, (sync, log)
        assert sync["throttle_held_s"] > 0, sync
        assert sync["rounds"] <= 30, sync            # the state machine's round limit
        assert "throttled to 20%" in log and "throttle lifted" in log, log
        assert status["sync"] is None or status["sync"].get("throttle_percent", 0) == 0
        # protected, and no longer held: the guest keeps running its events
        assert doorbells_per_s(lab.primary) > 0
        assert lab.primary.status()["state"] == "synced"
    finally:
        lab.close()


def test_without_auto_converge_the_guest_is_never_held(tmp_path):
    lab = FtLab(tmp_path, image="stress", extra=FAST_DIRTIER)
    cfg = lab.primary.config
    cfg.write_text(cfg.read_text().replace("[replication]\n",
                                           "[replication]\nauto_converge = false\n", 1))
    try:
        lab.primary.start("primary")
        time.sleep(1.0)
        lab.secondary.start("secondary")
        sync = lab.wait_synced(120)["last_sync"]
        assert sync["throttle_max_percent"] == 0 and sync["throttle_held_s"] == 0, sync
        assert "throttled" not in whole_log(lab.primary)
    finally:
        lab.close()
