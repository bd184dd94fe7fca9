"""Disks: a missing one is an error naming it, never a blank disk made in its
place (creating one is `kemari create-disk`); a full disk on the secondary
ends the session and keeps the last good checkpoint, never the daemon."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest
from ftlab import MEM, VCPU, FakePrimary, FtLab
from helpers import KEMARI, REPO, write_config

from kemari_agent.control import request
from kemari_agent.devices.block import create_disk_image
from kemari_agent.replication.codec import Device, DiskWrite
from kemari_agent.replication.errors import PeerError

pytestmark = pytest.mark.kvm


def kemari(kdirs, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KEMARI_RUN_DIR=str(kdirs / "run"), KEMARI_STATE_DIR=str(kdirs / "state"))
    return subprocess.run(KEMARI + list(args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_run_refuses_a_missing_disk_and_create_disk_is_explicit(kdirs):
    disk = kdirs / "nonexistent" / "dir" / "d.img"
    cfg = write_config(kdirs / "vm.toml", f"""
name = "nodisk"
memory_mib = 16
image = "kv"
[disk]
path = "{disk}"
size_mib = 8
""")
    r = kemari(kdirs, "run", str(cfg))
    assert r.returncode == 1 and f"disk {disk} does not exist" in r.stderr, r.stderr
    assert "create-disk" in r.stderr
    assert not (kdirs / "nonexistent").exists()
    r = kemari(kdirs, "create-disk", str(cfg))      # never creates directories either
    assert r.returncode == 1 and str(disk) in r.stderr and "cannot create" in r.stderr
    disk.parent.mkdir(parents=True)
    disk.touch()
    r = kemari(kdirs, "run", str(cfg))
    assert r.returncode == 1 and f"disk {disk} is empty" in r.stderr, r.stderr
    disk.unlink()
    assert kemari(kdirs, "create-disk", str(cfg)).returncode == 0
    st = disk.stat()
    assert st.st_size == 8 << 20 and st.st_mode & 0o777 == 0o600
    with open(disk, "r+b") as f:
        f.write(b"data")
    r = kemari(kdirs, "create-disk", str(cfg))
    assert r.returncode == 1 and "already exists" in r.stderr
    assert disk.read_bytes()[:4] == b"data"


def test_daemons_refuse_a_missing_disk(tmp_path):
    lab = FtLab(tmp_path, disk_mode="replicated")
    try:
        lab.secondary.disk.unlink()
        r = lab.secondary.kemari("start", str(lab.secondary.config), check=False)
        assert r.returncode == 1 and f"disk {lab.secondary.disk} does not exist" in r.stderr
        assert not lab.secondary.disk.exists()
    finally:
        lab.close()
    shared = FtLab(tmp_path / "shared", disk_mode="shared")
    try:
        shared.secondary.start("secondary")
        shared.secondary.disk.unlink()                 # storage not mounted at failover
        r = shared.secondary.kemari("promote", shared.name, check=False)
        assert r.returncode == 1 and str(shared.secondary.disk) in r.stderr, r.stderr
        assert not shared.secondary.disk.exists()
        assert shared.secondary.status()["role"] == "secondary"     # alive, unchanged
    finally:
        shared.close()


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def send_checkpoint(fake: FakePrimary, pfns, writes) -> int:
    seq = fake.sm.checkpoint(fake.memory, pfns, [VCPU, Device(0, 1, b"{}"), *writes],
                             now=time.monotonic())
    fake.send()
    fake.pump(lambda: fake.sm.is_acked(seq))
    return seq


def test_full_disk_on_the_secondary_ends_the_session_and_keeps_the_checkpoint(tmp_path,
                                                                              tiny_fs):
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    create_disk_image(tiny_fs / "disk.img", 16)
    (lab_dir / "disk-b.img").symlink_to(tiny_fs / "disk.img")   # the secondary's disk
    lab = FtLab(lab_dir, disk_mode="replicated", memory_mib=MEM >> 20)
    sock = lab.secondary.dir / "run" / f"{lab.name}.sock"
    try:
        lab.secondary.start("secondary")
        pid = lab.secondary.pid()
        memory = bytearray(os.urandom(MEM))
        fake = FakePrimary(lab, memory)
        fake.full_sync()
        memory[0:4] = b"good"
        good = send_checkpoint(fake, [0], [DiskWrite(0, 0, b"G" * 4096)])
        assert fake.sm.is_acked(good)
        kept = hashlib.sha256(memory).hexdigest()

        memory[0:4] = b"lost"                           # checkpoint 3 does not fit
        big = [DiskWrite(0, 2048 + i * 128, bytes([i + 1]) * 65536) for i in range(16)]
        with pytest.raises(PeerError, match="No space left on device"):   # told why
            send_checkpoint(fake, [0], big)
        assert not fake.sm.is_acked(good + 1)
        fake.close()

        st = lab.secondary.status()
        assert st["pid"] == pid and st["role"] == "secondary"       # the daemon lives
        errors = " | ".join(st["recent_errors"])
        assert "No space left on device" in errors and str(lab.secondary.disk) in errors
        assert f"keeping checkpoint {good}" in errors
        digest = request(sock, "checkpoint-digest")
        assert (digest["seq"], digest["sha256"]) == (good, kept)
        with open(tiny_fs / "disk.img", "rb") as f:
            assert f.read(4096) == b"G" * 4096
            f.seek(2048 * 512)
            assert f.read(16 * 65536) == bytes(16 * 65536)          # undone

        memory[0:4] = b"good"           # the session resumes (a write in an allocated block)
        again = FakePrimary(lab, memory, seq=good, full=False)
        assert send_checkpoint(again, [1], [DiskWrite(0, 1, b"H" * 512)]) == good + 1
        assert again.sm.is_acked(good + 1), lab.secondary.log()
        again.close()
    finally:
        lab.close()


def sectors(lab: FtLab, sector: int, count: int) -> bytes:
    """What the secondary's disk holds there."""
    with open(lab.secondary.disk, "rb") as f:
        f.seek(sector * 512)
        return f.read(count * 512)


def wait_until(lab: FtLab, what, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, lab.secondary.log()
        time.sleep(0.02)


def test_disk_writes_sent_ahead_reach_the_disk_at_once_and_are_undone_if_torn(tmp_path):
    """A replicated disk's writes may come ahead of their checkpoint (the primary
    sends them before its own fdatasync): the secondary writes them at once, and
    when the connection drops before that checkpoint's END it puts the disk back
    as the last checkpoint left it."""
    lab = FtLab(tmp_path, disk_mode="replicated", memory_mib=MEM >> 20)
    sock = lab.secondary.dir / "run" / f"{lab.name}.sock"
    try:
        lab.secondary.start("secondary")
        memory = bytearray(os.urandom(MEM))
        fake = FakePrimary(lab, memory)
        fake.full_sync()
        before = sectors(lab, 64, 8)
        fake.sm.send_ahead([DiskWrite(0, 64, b"A" * 4096)], now=time.monotonic())
        fake.send()
        wait_until(lab, lambda: sectors(lab, 64, 8) == b"A" * 4096)    # no END sent yet
        memory[0:4] = b"good"
        good = send_checkpoint(fake, [0], [])
        kept = hashlib.sha256(memory).hexdigest()

        fake.sm.send_ahead([DiskWrite(0, 64, b"B" * 4096), DiskWrite(0, 200, b"C" * 512)],
                           now=time.monotonic())
        fake.send()
        wait_until(lab, lambda: sectors(lab, 200, 1) == b"C" * 512)
        fake.close()                                              # ... and its END never comes
        wait_until(lab, lambda: any("discarded a checkpoint" in e
                                    for e in lab.secondary.status()["recent_errors"]))
        assert sectors(lab, 64, 8) == b"A" * 4096                           # undone
        assert sectors(lab, 200, 1) == bytes(512)
        assert before != b"A" * 4096
        digest = request(sock, "checkpoint-digest")
        assert (digest["seq"], digest["sha256"]) == (good, kept)
    finally:
        lab.close()


def test_writes_sent_ahead_by_a_session_that_ends_are_undone_before_anything_else(tmp_path):
    """A session replaced by a newer one, or a daemon stopped, mid-checkpoint: its
    disk writes sent ahead are undone first; the newer session's go on top."""
    lab = FtLab(tmp_path, disk_mode="replicated", memory_mib=MEM >> 20)
    try:
        lab.secondary.start("secondary")
        memory = bytearray(os.urandom(MEM))
        old = FakePrimary(lab, memory)
        old.full_sync()
        good = send_checkpoint(old, [0], [DiskWrite(0, 64, b"G" * 512)])
        old.sm.send_ahead([DiskWrite(0, 64, b"X" * 512), DiskWrite(0, 300, b"X" * 512)],
                          now=time.monotonic())
        old.send()
        wait_until(lab, lambda: sectors(lab, 300, 1) == b"X" * 512)
        # the same primary, reconnected: its new session replaces the old one, whose
        # connection stays open, its checkpoint unfinished
        new = FakePrimary(lab, memory, seq=good, full=False)
        wait_until(lab, lambda: sectors(lab, 300, 1) == bytes(512))        # undone
        assert sectors(lab, 64, 1) == b"G" * 512
        new.sm.send_ahead([DiskWrite(0, 300, b"N" * 512)], now=time.monotonic())
        new.send()
        assert send_checkpoint(new, [1], []) == good + 1
        assert sectors(lab, 300, 1) == b"N" * 512

        new.sm.send_ahead([DiskWrite(0, 64, b"Y" * 512)], now=time.monotonic())
        new.send()
        wait_until(lab, lambda: sectors(lab, 64, 1) == b"Y" * 512)
        lab.secondary.kemari("stop", lab.name)          # a checkpoint still unfinished
        wait_until(lab, lambda: sectors(lab, 64, 1) == b"G" * 512)
        assert sectors(lab, 300, 1) == b"N" * 512
        old.close()
        new.close()
    finally:
        lab.close()
