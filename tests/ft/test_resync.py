"""Re-protection after a link cut is a resync, not a full copy; a secondary that
is inconsistent or outdated is never promoted silently; two nodes whose
configs disagree are refused at HELLO, naming the field."""

from __future__ import annotations

import time

import pytest
from ftlab import MEM, FakePrimary, FtLab
from linkrelay import LinkRelay

from kemari_agent.kvload import Clients, check_acked_puts, check_counter

pytestmark = pytest.mark.kvm

PROMISE_KEYS = ("has_checkpoint", "consistent", "outdated", "promotable", "promote_blocker")


def listen_port(node) -> int:
    return int(node.config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])


def through_relay(lab: FtLab) -> LinkRelay:
    """Point the primary's replication link at a relay the test can cut."""
    relay = LinkRelay(("127.0.0.1", listen_port(lab.secondary)))
    cfg = lab.primary.config
    cfg.write_text(cfg.read_text().replace(f'peer = "127.0.0.1:{listen_port(lab.secondary)}"',
                                           f'peer = "127.0.0.1:{relay.port}"'))
    return relay


def wait_for(what, timeout: float = 60.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := what():
            return result
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def test_link_cut_under_load_resyncs_and_failover_keeps_every_promise(tmp_path):
    lab = FtLab(tmp_path, disk_mode="replicated", on_peer_loss="suspend")
    relay = through_relay(lab)
    clients = None
    try:
        lab.start_pair()
        full = lab.primary.status()["last_sync"]
        assert full["kind"] == "full", full
        clients = Clients(lab.addr).start()
        time.sleep(1.0)
        seq_before = lab.primary.status()["checkpoint_seq"]
        relay.cut()
        samples, cut_end = [], time.monotonic() + 2.0
        while time.monotonic() < cut_end:
            samples.append(lab.secondary.status())
            time.sleep(0.05)
        relay.restore()

        def resynced():
            st = lab.primary.status()
            samples.append(lab.secondary.status())
            return st if st["state"] == "synced" and st["last_sync"]["kind"] == "resync" \
                else None
        st = wait_for(resynced)
        resync = st["last_sync"]
        assert resync["bytes"] < full["bytes"] / 4, (resync, full)
        assert resync["from_checkpoint"] >= seq_before - 1
        assert any(s["state"] == "standalone" for s in samples), "the cut was never seen"
        for s in samples:        # the secondary's checkpoint stayed usable throughout
            assert all(k in s for k in PROMISE_KEYS), s
            assert s["promotable"] and s["consistent"] and not s["outdated"], s
            assert s["has_checkpoint"] and s["promote_blocker"] is None, s
        time.sleep(0.5)          # more checkpoints on top of the resync
        resumed_at = lab.secondary.status()["checkpoint_seq"]
        lab.primary.kill()
        time.sleep(0.05)
        acked = clients.snapshot()
        lab.failover()
        lost = check_acked_puts(lab.addr, acked)
        assert not lost, lost[:5]
        problems = check_counter(lab.addr, clients.records)
        assert not problems, problems
        # checkpoint_seq keeps counting across a promotion (docs/stream-format.md)
        assert lab.primary.status()["checkpoint_seq"] >= resumed_at > 0
    finally:
        if clients is not None:
            clients.stop()
        lab.close()
        relay.close()


def promote(node, *flags: str):
    return node.kemari("promote", node.lab.name, *flags, check=False)


def test_promote_refuses_an_inconsistent_or_outdated_secondary_unless_forced(tmp_path):
    lab = FtLab(tmp_path, disk_mode="replicated", memory_mib=MEM >> 20)
    node = lab.secondary
    memory = bytearray(MEM)
    try:
        node.start("secondary")
        st = node.status()
        assert st["consistent"] and not st["outdated"] and st["promotable"], st
        # a full sync that never completes: RAM and disk hold a mix
        fake = FakePrimary(lab, memory)
        fake.sm.sync_pages(memory, list(range(64)), now=time.monotonic())
        fake.send()
        st = wait_for(lambda: (s := node.status())["state"] == "syncing" and s)
        assert not st["consistent"] and not st["promotable"], st
        assert st["promote_blocker"].startswith("inconsistent"), st
        r = promote(node)
        assert r.returncode != 0 and "refusing to promote" in r.stderr, r
        assert "inconsistent" in r.stderr and "--force" in r.stderr, r.stderr
        assert node.status()["role"] == "secondary"
        # the replicated disk stays inconsistent across a crash and restart
        fake.close()
        node.kill()
        node.start("secondary")
        st = node.status()
        assert not st["consistent"] and not st["promotable"] and not st["has_checkpoint"], st
        assert promote(node).returncode != 0
        # a completed full sync makes it consistent; a primary that ran on
        # unprotected past its checkpoint makes it outdated
        fake = FakePrimary(lab, memory)
        seq = fake.full_sync()
        assert wait_for(lambda: node.status()["promotable"])
        fake.close()
        wait_for(lambda: node.status()["state"] == "standalone")
        fake = FakePrimary(lab, memory, seq=seq, resync_from=[seq], unprotected=True)
        st = wait_for(lambda: (s := node.status())["outdated"] and s)
        assert st["consistent"] and not st["promotable"], st
        assert st["promote_blocker"].startswith("outdated"), st
        fake.close()
        node.kill()
        node.start("secondary")
        assert node.status()["outdated"]                     # persisted
        r = promote(node)
        assert r.returncode != 0 and "outdated" in r.stderr, r
        r = promote(node, "--force")
        assert r.returncode == 0, r.stderr
        assert "FORCED" in r.stdout and "cold boot" in r.stdout, r.stdout
        st = node.status()
        assert st["role"] == "primary" and st["promotable"] and not st["outdated"], st
        assert st["activation"].startswith("FORCED"), st
    finally:
        lab.close()


def test_a_consistent_replicated_disk_cold_boots_and_says_so(tmp_path):
    lab = FtLab(tmp_path, disk_mode="replicated", memory_mib=MEM >> 20)
    node = lab.secondary
    memory = bytearray(MEM)
    try:
        node.start("secondary")
        fake = FakePrimary(lab, memory)
        fake.full_sync()
        fake.checkpoint([1, 2])
        fake.close()
        node.kill()                                  # the checkpoint in RAM is gone
        node.start("secondary")
        st = node.status()
        assert st["consistent"] and st["promotable"] and not st["has_checkpoint"], st
        r = promote(node)
        assert r.returncode == 0, r.stderr
        assert "cold boot" in r.stdout and "replicated disk is consistent" in r.stdout, r.stdout
        assert "cold boot" in node.status()["activation"]
    finally:
        lab.close()


def test_a_config_mismatch_is_refused_at_hello_naming_the_field(tmp_path):
    lab = FtLab(tmp_path, disk_mode="replicated")
    cfg = lab.secondary.config
    cfg.write_text(cfg.read_text().replace("size_mib = 16", "size_mib = 32"))
    try:
        lab.secondary.start("secondary")
        lab.primary.start("primary")

        def refused():
            errors = lab.secondary.status().get("recent_errors", [])
            return [e for e in errors if "config mismatch in disk_size_mib" in e]
        assert wait_for(refused, timeout=30)
        assert "config mismatch in disk_size_mib" in lab.primary.log()
        st = lab.primary.status()
        assert st["state"] != "synced" and "disk_size_mib" in (st["last_error"] or ""), st
        assert not lab.secondary.status()["has_checkpoint"]
    finally:
        lab.close()

