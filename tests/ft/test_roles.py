"""Switchover, re-protection and the peer-loss policies, with clients running."""

from __future__ import annotations

import time

import pytest
from ftlab import FtLab

from kemari_agent.kvclient import KvClient, NoReply
from kemari_agent.kvload import Clients, check_acked_puts, check_counter

pytestmark = pytest.mark.kvm


def wait_state(node, state: str, timeout: float = 5.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = node.status()
        if st.get("state") == state:
            return st
        time.sleep(0.05)
    raise AssertionError(f"node {node.letter} never {state}: {node.status()}")


@pytest.mark.parametrize("disk_mode", ["shared", "replicated"])
def test_switchover_loses_nothing_and_reprotects(tmp_path, disk_mode):
    lab = FtLab(tmp_path, disk_mode=disk_mode)
    clients = None
    try:
        lab.start_pair()
        clients = Clients(lab.addr).start()
        time.sleep(0.5)
        old, new = lab.primary, lab.secondary
        out = old.kemari("demote", lab.name)
        assert "secondary" in out.stdout
        acked = clients.snapshot()
        st = new.status()
        assert st["role"] == "secondary" and st["has_checkpoint"]
        new.kemari("promote", lab.name)
        lab.primary, lab.secondary = new, old
        assert not check_acked_puts(lab.addr, acked)
        assert not check_counter(lab.addr, clients.records)
        assert "after final checkpoint" in old.log()
        # the demoted node is now the secondary of the new primary, with no manual step
        lab.wait_synced()
        time.sleep(0.3)
        clients.stop()
        assert not [e for r in clients.records for e in r.errors]
        assert not check_counter(lab.addr, clients.records)
        assert new.status()["generation"] == old.status()["generation"] == 2
    finally:
        if clients is not None:
            clients.stop()
        lab.close()


def test_demote_without_peer_just_stops_the_guest(tmp_path):
    lab = FtLab(tmp_path)
    try:
        lab.primary.start("primary")
        with KvClient(lab.addr) as c:
            assert c.put("k", "v").kind == "OK"
        lab.primary.kemari("demote", lab.name)
        st = lab.primary.status()
        assert st["role"] == "secondary" and not st["has_checkpoint"]
        with KvClient(lab.addr, attempts=3) as c, pytest.raises(NoReply):
            c.get("k")                                # nobody serves the guest now
    finally:
        lab.close()


def test_peer_loss_continue_runs_unprotected_then_reprotects(tmp_path):
    lab = FtLab(tmp_path, on_peer_loss="continue")
    try:
        lab.start_pair()
        with KvClient(lab.addr, timeout=0.3, attempts=20) as c:
            assert c.put("a", "1").kind == "OK"
            lab.secondary.kill()
            t0 = time.monotonic()
            assert c.put("b", "2").kind == "OK"      # within the peer timeout + retries
            assert time.monotonic() - t0 < 5
            wait_state(lab.primary, "standalone")
            for i in range(20):
                assert c.incr("n").value == str(i + 1)
            lab.secondary.start("secondary")
            lab.wait_synced()
            assert c.get("b").value == "2"
        lab.primary.kill()
        lab.failover()
        with KvClient(lab.addr) as c:
            assert c.get("a").value == "1" and c.get("b").value == "2"
            assert c.get("n").value == "20"
    finally:
        lab.close()


def test_peer_loss_suspend_holds_the_guest_until_a_peer_is_back(tmp_path):
    lab = FtLab(tmp_path, on_peer_loss="suspend")
    try:
        lab.start_pair()
        with KvClient(lab.addr, timeout=0.3, attempts=3) as c:
            assert c.put("a", "1").kind == "OK"
            lab.secondary.kill()
            with pytest.raises(NoReply):
                c.put("b", "2", req_id="held-put")        # the guest is suspended
            wait_state(lab.primary, "suspended")
        lab.secondary.start("secondary")
        lab.wait_synced()
        with KvClient(lab.addr, timeout=0.3, attempts=20) as c:
            assert c.put("b", "2", req_id="held-put").kind == "OK"
            assert c.get("b").value == "2"
        lab.primary.kill()
        lab.failover()
        with KvClient(lab.addr) as c:
            assert c.get("b").value == "2"
    finally:
        lab.close()


def test_status_reports_replication(tmp_path):
    lab = FtLab(tmp_path)
    try:
        lab.start_pair()
        with KvClient(lab.addr) as c:
            for i in range(30):
                c.put(f"k{i}", "v")
        p, s = lab.primary.status(), lab.secondary.status()
        for key in ("name", "pid", "role", "state", "peer", "generation", "checkpoint_seq",
                    "last_checkpoint_age_ms", "checkpoints", "bytes_sent", "bytes_received",
                    "latency_us"):
            assert key in p and key in s, key
        assert (p["role"], p["state"], s["role"], s["state"]) == \
            ("primary", "synced", "secondary", "synced")
        assert p["checkpoints"] >= 30 and p["bytes_sent"] > 30 * 4096
        assert s["bytes_received"] >= p["bytes_sent"] * 0.9
        assert p["latency_us"]["p50"] > 0 and p["latency_us"]["p99"] >= p["latency_us"]["p50"]
        assert abs(s["checkpoint_seq"] - p["checkpoint_seq"]) <= 1
        assert p["generation"] == s["generation"] == 1
        assert p["cpu_latency"] is None and s["cpu_latency"] is None    # not asked for
    finally:
        lab.close()


def test_cpu_latency_request_is_held_while_the_daemons_run(tmp_path):
    from kemari_agent.ft.cpu_latency import current_limit_us

    before = current_limit_us()
    lab = FtLab(tmp_path, replication="cpu_latency_us = 9")
    try:
        lab.start_pair()
        for node in (lab.primary, lab.secondary):
            assert node.status()["cpu_latency"] == {"requested_us": 9, "held": True,
                                                    "error": None}
        assert current_limit_us() == min(before, 9)
        assert "cpu_latency: 9 us, held" in lab.primary.kemari("status", lab.name).stdout
        lab.primary.kemari("stop", lab.name)
        assert lab.secondary.status()["cpu_latency"]["held"]
        assert current_limit_us() == min(before, 9)       # the secondary still holds it
    finally:
        lab.close()
    assert current_limit_us() == before


def test_silent_primary_is_detected_and_never_replaced_by_itself(tmp_path):
    import signal
    lab = FtLab(tmp_path, peer_timeout_ms=800)
    try:
        lab.start_pair()
        primary = lab.primary.process()
        primary.signal(signal.SIGSTOP)               # a hung host: no FIN, no RST, nothing
        try:
            t0 = time.monotonic()
            st = wait_state(lab.secondary, "standalone", timeout=5)
            assert time.monotonic() - t0 < 3
            assert "silent" in (st["last_error"] or "")
            assert st["has_checkpoint"]
            time.sleep(1.5)                           # and it does not promote itself
            assert lab.secondary.status()["role"] == "secondary"
        finally:
            primary.signal(signal.SIGCONT)
    finally:
        lab.close()


def test_until_synced_shows_progress_and_returns(tmp_path):
    lab = FtLab(tmp_path, memory_mib=128, image="stress",
                extra="[stress]\npages = 512\nrate_hz = 100\nworking_set = 30000")
    try:
        lab.primary.start("primary")
        time.sleep(1.0)
        lab.secondary.start("secondary")
        r = lab.primary.kemari("status", lab.name, "--until-synced", timeout=120)
        assert r.returncode == 0
        assert r.stdout.rstrip().splitlines()[-1].split("\r")[-1].startswith(
            f"{lab.name}: primary, synced")
    finally:
        lab.close()


def test_start_without_replication_settings_fails_clearly(tmp_path):
    from helpers import KEMARI, REPO, kv_config
    cfg = kv_config(tmp_path, name="norepl", net='[net]\nforward = "127.0.0.1:7999"')
    env = {"KEMARI_RUN_DIR": str(tmp_path / "run"), "KEMARI_STATE_DIR": str(tmp_path / "st")}
    import os
    import subprocess
    r = subprocess.run(KEMARI + ["start", str(cfg)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    assert r.returncode == 1
    assert "replication.listen" in r.stderr and "replication.key_file" in r.stderr
    r = subprocess.run(KEMARI + ["promote", "norepl"], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=60)
    assert r.returncode == 1 and "no Kemari daemon" in r.stderr
