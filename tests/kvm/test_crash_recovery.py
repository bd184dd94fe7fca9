"""The kv guest's data survives a SIGKILLed VMM (restart from the disk alone)
and a full host disk (error replies, nothing acknowledged is lost)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
from helpers import free_udp_port, kv_config, start_kv

from kemari_agent.kvclient import KvClient, NoReply

pytestmark = pytest.mark.kvm


def load(addr, worker: int, stop: threading.Event, acked: dict, counter_acks: list) -> None:
    """PUT unique keys and INCR a shared counter until stopped; record what was acknowledged."""
    with KvClient(addr, timeout=0.2, attempts=3, prefix=f"w{worker}") as c:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if c.put(f"w{worker}-{i}", f"v{i}").kind == "OK":
                    acked[f"w{worker}-{i}"] = f"v{i}"
                r = c.incr("shared")
                if r.kind == "VAL":
                    counter_acks.append(int(r.value))
            except (NoReply, OSError):
                return          # the VMM is gone


def test_sigkill_mid_load_then_restart_from_disk(kdirs):
    port = free_udp_port()
    addr = ("127.0.0.1", port)
    cfg = kv_config(kdirs, name="crash1", net=f'[net]\nforward = "127.0.0.1:{port}"')
    proc = start_kv(kdirs, cfg)
    acked: dict[str, str] = {}
    counter_acks: list[int] = []
    stop = threading.Event()
    workers = [threading.Thread(target=load, args=(addr, w, stop, acked, counter_acks))
               for w in range(4)]
    try:
        for t in workers:
            t.start()
        time.sleep(1.5)
        proc.kill(signal.SIGKILL)            # mid-load: requests are in flight
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=10)
        proc.stop()
    assert len(acked) > 50 and counter_acks, "the load did not get going"

    again = start_kv(kdirs, cfg)
    try:
        assert "recovered" in again.output()
        with KvClient(addr, prefix="check") as c:
            missing = [k for k, v in acked.items() if c.get(k).value != v]
            assert not missing, f"{len(missing)} acknowledged PUTs lost, e.g. {missing[:5]}"
            assert int(c.get("shared").value) >= max(counter_acks)
            assert int(c.incr("shared").value) > max(counter_acks)   # never handed out twice
    finally:
        assert again.stop() == 0, again.output()


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_host_disk_gives_errors_and_loses_nothing(kdirs, tiny_fs):
    port = free_udp_port()
    addr = ("127.0.0.1", port)
    cfg = kv_config(kdirs, name="full1", disk_path=tiny_fs / "disk.img", disk_mib=16,
                    net=f'[net]\nforward = "127.0.0.1:{port}"')
    proc = start_kv(kdirs, cfg)
    acked = {}
    try:
        with KvClient(addr, prefix="fill") as c:
            errors = 0
            for i in range(3000):
                r = c.put(f"key{i}", "x" * 60)
                if r.kind == "OK":
                    acked[f"key{i}"] = "x" * 60
                else:
                    assert r.kind == "ERR" and "disk" in r.value, r
                    errors += 1
                    if errors >= 5:
                        break
            assert errors >= 5, "the disk never filled"
            assert acked, "nothing fitted at all"
            for k, v in acked.items():
                assert c.get(k).value == v
            assert c.get(f"key{i}").kind == "NONE"        # the refused PUT did not apply
    finally:
        assert proc.stop() == 0, proc.output()
    again = start_kv(kdirs, cfg)                           # and the disk is still consistent
    try:
        with KvClient(addr, prefix="check") as c:
            lost = [k for k, v in acked.items() if c.get(k).value != v]
            assert not lost, lost[:5]
    finally:
        again.stop()
