"""Files holding guest memory or steering a daemon are private and never written
through a planted symlink; directories and key files of other users are refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kemari_agent import snapshot
from kemari_agent.errors import KemariError
from kemari_agent.replication import keys
from kemari_agent.safefiles import open_private_append, private_dir
from kemari_agent.standalone import write_pid_file

pytestmark = pytest.mark.unit

NOBODY = 65534


@pytest.fixture
def open_umask():
    """Nothing here may depend on a careful umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_snapshot_is_private_and_replaces_a_planted_symlink(tmp_path, open_umask):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "vm.snap"
    target.symlink_to(victim)
    snap = snapshot.Snapshot(meta={"name": "x", "page_count": 1, "vcpu_len": 1}, vcpu=b"v",
                             pfns=[1], pages=b"p" * 4096)
    snapshot.write(snap, target)
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and mode(target) == 0o600
    assert snapshot.read(target).pages == snap.pages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim", "vm.snap"]   # no temp left


def test_pid_file_is_private_and_never_followed(tmp_path, monkeypatch, open_umask):
    run = tmp_path / "run"
    monkeypatch.setenv("KEMARI_RUN_DIR", str(run))
    path = write_pid_file("vm1")
    assert mode(run) == 0o700 and mode(path) == 0o600
    assert path.read_text() == f"{os.getpid()}\n"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path.unlink()
    path.symlink_to(victim)
    write_pid_file("vm1")
    assert victim.read_text() == "precious" and not path.is_symlink()


def test_run_dir_writable_by_others_is_refused(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    monkeypatch.setenv("KEMARI_RUN_DIR", str(run))
    with pytest.raises(KemariError, match=r"run has mode 0777"):
        write_pid_file("vm1")
    os.chmod(run, 0o1777)         # sticky does not make it private
    with pytest.raises(KemariError, match="mode 1777"):
        private_dir(run)
    assert list(run.iterdir()) == []


def test_run_dir_of_another_user_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)
    with pytest.raises(KemariError, match=f"owned by uid {NOBODY}"):
        private_dir(run)
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(KemariError, match="not a directory"):
        private_dir(plain)


def test_log_is_private_appended_and_never_a_symlink(tmp_path, open_umask):
    log = tmp_path / "vm.log"
    log.write_text("old line\n")
    os.chmod(log, 0o644)
    with open(open_private_append(log), "ab") as f:
        f.write(b"new line\n")
    assert log.read_text() == "old line\nnew line\n" and mode(log) == 0o600
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "evil.log"
    link.symlink_to(victim)
    with pytest.raises(KemariError, match="symlink"):
        open_private_append(link)
    foreign = tmp_path / "foreign.log"
    foreign.write_text("")
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(KemariError, match="not a regular file owned by this user"):
        open_private_append(foreign)
    assert victim.read_text() == "precious"


def test_key_file_of_another_user_is_refused(tmp_path):
    path = tmp_path / "vm.key"
    keys.keygen(path)
    keys.check_key_file(path)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(keys.KeyFileError, match=f"owned by uid {NOBODY}"):
        keys.check_key_file(path)
