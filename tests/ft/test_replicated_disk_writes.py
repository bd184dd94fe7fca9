"""Tapped mode with a replicated disk: the disk is the guest's own state, so a
write is done locally at once and sent to the secondary ahead of the next
checkpoint, which counts it (durable there before that checkpoint's memory); only output that
leaves the pair waits for a checkpoint. Every reply a client got must still
hold after a failover, and an idle guest's writes reach the secondary anyway."""

from __future__ import annotations

import time
import uuid

import pytest
from ftlab import FtLab

from kemari_agent.kvclient import KvClient

pytestmark = pytest.mark.kvm

PUTS = 60


def test_a_put_takes_one_checkpoint_and_survives_failover(tmp_path):
    """One checkpoint per reply, not one more per log write: the write went with
    the reply's checkpoint, so the promoted secondary reads every acknowledged PUT."""
    lab = FtLab(tmp_path, disk_mode="replicated")
    try:
        lab.start_pair()
        with KvClient(lab.addr, timeout=1.0, prefix=f"w{uuid.uuid4().hex[:6]}") as c:
            assert c.put("warm", "0").kind == "OK"
            before = lab.primary.status()["checkpoints"]
            for i in range(PUTS):
                assert c.put(f"k{i}", str(i)).kind == "OK"
            took = lab.primary.status()["checkpoints"] - before
            # ... and each log write went to the secondary before the primary's own
            # fdatasync, ahead of the reply's checkpoint
            assert lab.primary.status()["disk_writes_ahead"] >= PUTS
            # the secondary acknowledged checkpoints before applying them (not those
            # that arrived in one read with their writes: those are staged)
            early = lab.secondary.status()["early_acks"]
            assert early >= PUTS // 4, early
        # each reply left after a checkpoint of its own; the log writes took none
        # (with one per write as well, it would be 2 x PUTS or more)
        assert PUTS <= took <= PUTS * 1.3, took
        lab.failover()
        with KvClient(lab.addr, timeout=1.0, attempts=50, prefix="chk") as c:
            got = {i: c.get(f"k{i}") for i in range(PUTS)}
        lost = {i: r for i, r in got.items() if (r.kind, r.value) != ("VAL", str(i))}
        assert not lost, lost
    finally:
        lab.close()


def test_an_idle_guests_writes_reach_the_secondary_without_output(tmp_path):
    """The stress guest writes one sector at each event and sends nothing: its
    writes go in the checkpoints taken while it idles, so when the primary dies
    the secondary's disk lacks at most the writes of the last moments."""
    lab = FtLab(tmp_path, disk_mode="replicated", image="stress",
                extra="[stress]\npages = 1\nrate_hz = 2")
    try:
        lab.start_pair()
        synced = lab.secondary.status()["checkpoints"]
        time.sleep(4.0)                          # ~8 writes, no output at all
        assert lab.secondary.status()["checkpoints"] - synced >= 5
        lab.primary.kill()
        ours, theirs = lab.primary.disk.read_bytes(), lab.secondary.disk.read_bytes()
        differ = sum(ours[i:i + 512] != theirs[i:i + 512] for i in range(0, len(ours), 512))
        assert differ <= 1, f"{differ} sectors the secondary never received"
    finally:
        lab.close()
