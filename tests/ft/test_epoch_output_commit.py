"""Epoch mode (Remus-style) output commit for the disk: a guest's write reaches
neither a shared disk nor the guest's client before the checkpoint covering it
is acknowledged, and every write reaches a replicated secondary's disk."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
import uuid

import pytest
from ftlab import FtLab

from kemari_agent.kvclient import KvClient

pytestmark = pytest.mark.kvm

EPOCH_MS = 1500       # long epochs: a wide window in which the guest runs unacknowledged


def wait_until(what: str, done, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if done():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def stop_secondary_just_after_a_checkpoint(lab: FtLab) -> None:
    """SIGSTOP the secondary right after an epoch's checkpoint went out (and, on
    loopback, was acknowledged): the guest then runs a whole epoch on before
    the primary waits for the next ACK."""
    seen = lab.primary.status()["checkpoints"]
    wait_until("an epoch checkpoint", lambda: lab.primary.status()["checkpoints"] > seen,
               EPOCH_MS / 1000 * 3)
    time.sleep(0.1)
    os.kill(lab.secondary.pid(), signal.SIGSTOP)


def test_shared_disk_write_waits_for_the_epoch_ack(tmp_path):
    lab = FtLab(tmp_path, disk_mode="shared", mode="epoch", epoch_ms=EPOCH_MS,
                peer_timeout_ms=8000)
    value = f"held{uuid.uuid4().hex}"
    stopped = False
    try:
        lab.start_pair()
        with KvClient(lab.addr, timeout=0.5, attempts=30) as c:
            assert c.put("warm", "up").kind == "OK"
        stop_secondary_just_after_a_checkpoint(lab)
        stopped = True
        doorbells = lab.primary.status()["vm"]["doorbells"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(f"PUT held-1 key {value}".encode(), lab.addr)
            # the guest took the request and rang the disk's doorbell
            wait_until("the guest's disk write",
                       lambda: lab.primary.status()["vm"]["doorbells"] > doorbells, 1.0)
            time.sleep(0.3)
            assert value.encode() not in lab.primary.disk.read_bytes(), \
                "the write reached the shared disk before its checkpoint was acknowledged"
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(512)                          # and the guest's reply is held
            assert lab.primary.status()["state"] == "synced"
            os.kill(lab.secondary.pid(), signal.SIGCONT)
            stopped = False
            s.settimeout(EPOCH_MS / 1000 * 4)
            assert s.recv(512).decode().startswith("OK held-1")
        assert value.encode() in lab.primary.disk.read_bytes()
    finally:
        if stopped:
            os.kill(lab.secondary.pid(), signal.SIGCONT)
        lab.close()


def test_replicated_disk_gets_every_write_after_the_full_sync(tmp_path):
    lab = FtLab(tmp_path, disk_mode="replicated", mode="epoch", epoch_ms=25)
    values = [f"rep{i}{uuid.uuid4().hex}" for i in range(20)]
    try:
        lab.start_pair()
        with KvClient(lab.addr, timeout=0.5, attempts=30) as c:
            for i, v in enumerate(values):
                assert c.put(f"k{i}", v).kind == "OK"
        # each reply left after the checkpoint carrying its write was acknowledged,
        # and the secondary makes a checkpoint's writes durable before its ACK
        on_secondary = lab.secondary.disk.read_bytes()
        missing = [v for v in values if v.encode() not in on_secondary]
        assert not missing, f"{len(missing)} acknowledged writes missing on the secondary"
        wait_until("identical disks (idle pair)",
                   lambda: hashlib.sha256(lab.primary.disk.read_bytes()).digest()
                   == hashlib.sha256(lab.secondary.disk.read_bytes()).digest(), 5.0)
    finally:
        lab.close()


@pytest.mark.parametrize("policy", ["continue", "suspend"])
def test_peer_loss_releases_or_keeps_held_writes(tmp_path, policy):
    """continue: what was held goes out unprotected once the peer is declared dead;
    suspend: it stays held until a new secondary is in sync."""
    lab = FtLab(tmp_path, disk_mode="shared", mode="epoch", epoch_ms=EPOCH_MS,
                peer_timeout_ms=1000, on_peer_loss=policy)
    value = f"lost{uuid.uuid4().hex}"
    stopped = False
    try:
        lab.start_pair()
        with KvClient(lab.addr, timeout=0.5, attempts=30) as c:
            assert c.put("warm", "up").kind == "OK"
        stop_secondary_just_after_a_checkpoint(lab)
        stopped = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(f"PUT lost-1 key {value}".encode(), lab.addr)
            wait_until("the primary to declare its peer dead",
                       lambda: lab.primary.status()["state"] != "synced", 10.0)
            if policy == "continue":
                s.settimeout(10.0)
                assert s.recv(512).decode().startswith("OK lost-1")
                assert value.encode() in lab.primary.disk.read_bytes()
            else:
                time.sleep(0.5)
                assert value.encode() not in lab.primary.disk.read_bytes()
                s.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    s.recv(512)
                lab.secondary.kill()                 # a new secondary: full sync, then release
                stopped = False
                lab.secondary.start("secondary")
                s.settimeout(60.0)
                assert s.recv(512).decode().startswith("OK lost-1")
                assert value.encode() in lab.primary.disk.read_bytes()
                assert lab.primary.status()["state"] == "synced"
    finally:
        if stopped:
            os.kill(lab.secondary.pid(), signal.SIGCONT)
        lab.close()
