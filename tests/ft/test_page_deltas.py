"""Checkpoint pages as deltas (PAGES_XOR) between two real daemons: the kv
guest's checkpoints shrink several times over, and what the secondary
rebuilt from the deltas is a guest that carries on after a failover with
every reply its clients got."""

from __future__ import annotations

import uuid

import pytest
from ftlab import FtLab

from kemari_agent.kvclient import KvClient

pytestmark = pytest.mark.kvm

PUTS = 150


def put_load(lab: FtLab) -> tuple[float, list[int]]:
    """PUTs and INCRs, one client; returns (bytes per checkpoint, INCR values got)."""
    before = lab.primary.status()
    counted = []
    with KvClient(lab.addr, timeout=1.0, prefix=f"d{uuid.uuid4().hex[:6]}") as c:
        for i in range(PUTS):
            assert c.put(f"k{i}", f"v{i}").kind == "OK"
            counted.append(int(c.incr("n").value))
    after = lab.primary.status()
    per = (after["bytes_sent"] - before["bytes_sent"]) / (after["checkpoints"]
                                                        - before["checkpoints"])
    return per, counted


def test_deltas_shrink_checkpoints_and_failover_keeps_every_reply(tmp_path):
    whole = FtLab(tmp_path / "whole", replication="delta_cache_mib = 0")
    try:
        whole.start_pair()
        whole_per, _ = put_load(whole)
        assert whole.primary.status()["page_deltas"] is None
    finally:
        whole.close()

    lab = FtLab(tmp_path / "delta")
    try:
        lab.start_pair()
        delta_per, counted = put_load(lab)
        deltas = lab.primary.status()["page_deltas"]
        assert deltas["delta_pages"] > 2 * PUTS, deltas          # the hot pages, every time
        # most in one C call (ft/fast_checkpoint.py); the rest carry a full vCPU
        # blob or a device's state
        assert deltas["one_call_checkpoints"] >= PUTS, deltas
        # and of them, most in the vCPU's run call at the guest's exit (kfast_run)
        assert deltas["one_call_checkpoints_at_exit"] >= PUTS // 2, deltas
        assert deltas["delta_bytes"] < deltas["delta_pages"] * 512, deltas
        # hot pages are reported at every harvest; those unchanged are not sent
        assert deltas["unchanged_pages"] > PUTS, deltas
        assert delta_per * 3 < whole_per, (delta_per, whole_per)
        assert counted == list(range(1, PUTS + 1))
        # ACKs left before the secondary applied their checkpoint (early: most, not
        # those of a checkpoint split across reads), and the failover below still
        # finds every reply
        secondary = lab.secondary.status()
        early = secondary["early_acks"]
        assert early >= PUTS // 2, (early, secondary["checkpoints"])
        # most read, checked and acknowledged in one C call (ft/fast_receive.py)
        assert secondary["one_call_reads"] >= PUTS // 2, secondary
        lab.failover()
        with KvClient(lab.addr, timeout=1.0, attempts=50, prefix="chk") as c:
            lost = [i for i in range(PUTS) if (r := c.get(f"k{i}")).kind != "VAL"
                    or r.value != f"v{i}"]
            assert not lost, lost
            assert int(c.incr("n").value) == counted[-1] + 1
    finally:
        lab.close()
