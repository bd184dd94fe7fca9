"""`kemari run` lifecycle: clean stop on SIGINT/SIGTERM, one daemon per VM, stress image."""

from __future__ import annotations

import json
import signal
import time

import pytest
from helpers import KemariProcess, free_udp_port, kv_config, start_kv, write_config

from kemari_agent.devices.block import create_disk_image

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly(kdirs, sig):
    port = free_udp_port()
    cfg = kv_config(kdirs, name="life1", net=f'[net]\nforward = "127.0.0.1:{port}"')
    proc = start_kv(kdirs, cfg)
    sock, pid = kdirs / "run" / "life1.sock", kdirs / "run" / "life1.pid"
    assert sock.exists() and pid.read_text().strip() == str(proc.pid)
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    t0 = time.monotonic()
    proc.kill(sig)
    assert proc.proc.returncode == 0, proc.output()
    assert time.monotonic() - t0 < 5
    assert not sock.exists() and not pid.exists()
    stopped = proc.cli("status", "life1", "--json", check=False)
    assert stopped.returncode == 3 and json.loads(stopped.stdout)["role"] == "stopped"


def test_second_daemon_for_same_vm_is_refused(kdirs):
    port = free_udp_port()
    cfg = kv_config(kdirs, name="life2", net=f'[net]\nforward = "127.0.0.1:{port}"')
    proc = start_kv(kdirs, cfg)
    try:
        other = KemariProcess(["run", str(cfg)], kdirs)
        assert other.proc.wait(timeout=30) == 1
        assert "already serving" in other.output() or "in use" in other.output()
        other.stop()
    finally:
        proc.stop()


def test_stop_verb(kdirs):
    port = free_udp_port()
    cfg = kv_config(kdirs, name="life3", net=f'[net]\nforward = "127.0.0.1:{port}"')
    proc = start_kv(kdirs, cfg)
    proc.cli("stop", "life3")
    assert proc.proc.wait(timeout=10) == 0


def test_stress_image_runs_at_its_rate(kdirs):
    cfg = write_config(kdirs / "stress.toml", f"""
name = "stress1"
memory_mib = 32
image = "stress"
[disk]
path = "{kdirs / 'stress.img'}"
size_mib = 4
[stress]
pages = 16
rate_hz = 200
""")
    create_disk_image(kdirs / "stress.img", 4)
    proc = KemariProcess(["run", str(cfg)], kdirs)
    try:
        time.sleep(1.0)
        first = json.loads(proc.cli("status", "stress1", "--json").stdout)["vm"]
        time.sleep(2.0)
        second = json.loads(proc.cli("status", "stress1", "--json").stdout)["vm"]
        rate = (second["doorbells"] - first["doorbells"]) / (second["uptime_s"] - first["uptime_s"])
        assert 120 < rate < 260, rate
        assert second["blk"]["writes"] > first["blk"]["writes"]
    finally:
        assert proc.stop() == 0, proc.output()
