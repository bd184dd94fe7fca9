"""Save a running guest, kill its VMM, restore it in a new process: it carries on."""

from __future__ import annotations

import signal

import pytest
from helpers import KemariProcess, free_udp_port, kv_config, start_kv

from kemari_agent import snapshot
from kemari_agent.errors import SnapshotError
from kemari_agent.kvclient import KvClient

pytestmark = pytest.mark.kvm


def test_save_kill_restore_continues_with_identical_state(kdirs):
    port = free_udp_port()
    cfg = kv_config(kdirs, name="snap1", net=f'[net]\nforward = "127.0.0.1:{port}"')
    snap_file = kdirs / "snap1.kms"
    proc = start_kv(kdirs, cfg)
    try:
        with KvClient(("127.0.0.1", port), prefix="before") as c:
            for i in range(20):
                assert c.put(f"key{i}", f"value{i}").kind == "OK"
            counts = [c.incr("counter").value for _ in range(7)]
            assert counts == [str(n) for n in range(1, 8)]
            replies_before = {rid: c.incr("counter", req_id=rid) for rid in ("a1", "a2")}
        out = proc.cli("save", "snap1", str(snap_file))
        assert "saved" in out.stdout
        # the guest keeps running after a save: more work that the snapshot does not have
        with KvClient(("127.0.0.1", port), prefix="after") as c:
            assert c.put("late", "write").kind == "OK"
        proc.kill(signal.SIGKILL)
    finally:
        proc.stop()

    # Restored, the guest is the one of the snapshot: it never made the late write.
    restored = KemariProcess(["run", str(cfg), "--restore", str(snap_file)], kdirs)
    try:
        restored.wait_for_output("restored from")
        with KvClient(("127.0.0.1", port), prefix="restored") as c:
            # a retried id gets exactly the reply it got before the snapshot
            for rid, reply in replies_before.items():
                assert c.incr("counter", req_id=rid) == reply
            assert c.incr("counter").value == "10"           # the counter continues
            for i in range(20):
                assert c.get(f"key{i}").value == f"value{i}"
            assert c.put("key0", "retry?", req_id="before-1") == \
                c.put("key0", "again?", req_id="before-1")   # ids from before: remembered
            assert c.get("key0").value == "value0"
            assert c.put("new", "after-restore").kind == "OK"
            assert c.get("new").value == "after-restore"
    finally:
        assert restored.stop() == 0, restored.output()


def test_corrupt_snapshot_is_refused_clearly(kdirs):
    port = free_udp_port()
    cfg = kv_config(kdirs, name="snap2", net=f'[net]\nforward = "127.0.0.1:{port}"')
    snap_file = kdirs / "snap2.kms"
    proc = start_kv(kdirs, cfg)
    try:
        proc.cli("save", "snap2", str(snap_file))
    finally:
        proc.stop()
    snapshot.read(snap_file)                                   # intact: reads fine
    data = bytearray(snap_file.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = kdirs / "bad.kms"
    bad.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        snapshot.read(bad)
    truncated = kdirs / "short.kms"
    truncated.write_bytes(snap_file.read_bytes()[:5000])
    result = KemariProcess(["run", str(cfg), "--restore", str(truncated)], kdirs)
    assert result.proc.wait(timeout=30) == 1
    assert "checksum mismatch" in result.output() or "not a Kemari" in result.output()
    result.stop()
    other = kv_config(kdirs, name="snap2", memory_mib=32,
                      net=f'[net]\nforward = "127.0.0.1:{port}"')
    wrong = KemariProcess(["run", str(other), "--restore", str(snap_file)], kdirs)
    assert wrong.proc.wait(timeout=30) == 1
    assert "64 MiB guest" in wrong.output()
    wrong.stop()
