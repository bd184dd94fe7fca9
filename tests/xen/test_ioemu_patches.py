"""ioemu-patches: apply to Debian 12's qemu source with no fuzz, compile, and run.

QEMU is configured the light way (x86_64-softmmu, Xen on, every optional
feature off); the touched objects are checked one by one (the stub for
builds without Xen with the flags of its neighbours), then the whole
qemu-system-x86_64 is linked (about 5 minutes on 2 cores, cached per
series) and run under TCG, without Xen, to exercise the checkpoint
command.  What is not run is listed in ioemu-patches/README.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cmp_to_key
from pathlib import Path

import pytest
import xen_lab

pytestmark = pytest.mark.xen

PATCHES = xen_lab.REPO / "ioemu-patches"
CACHE = Path(os.environ.get("KEMARI_TEST_CACHE", "/var/cache/kemari-test")) / "qemu"
BUILD_DEPS = {
    "/usr/bin/meson": "meson",
    "/usr/bin/ninja": "ninja-build",
    "/usr/bin/pkg-config": "pkg-config",
    "/usr/bin/dpkg-source": "dpkg-dev",
    "/usr/bin/patch": "patch",
    "/usr/include/glib-2.0/glib.h": "libglib2.0-dev",
    "/usr/include/pixman-1/pixman.h": "libpixman-1-dev",
    "/usr/include/libfdt.h": "libfdt-dev",
    "/usr/include/xenctrl.h": "libxen-dev",
    "/usr/share/seabios/bios-256k.bin": "seabios",
}
CONFIGURE = [
    "--target-list=x86_64-softmmu",
    "--enable-xen",
    "--without-default-features",
    "--disable-docs",
    "--enable-werror",
]
# Debian's python3 and meson, not whatever interpreter is first on PATH.
BUILD_ENV = {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# Touched source file -> ninja object built from it in this configuration.
OBJECTS = {
    "migration/savevm.c": "libcommon.fa.p/migration_savevm.c.o",
    "hw/i386/xen/xen-hvm.c": "libqemu-x86_64-softmmu.fa.p/hw_i386_xen_xen-hvm.c.o",
}
# Compiled only when Xen is off (into libqemuutil): built with the flags of
# a libqemuutil stub that this configuration does compile.
STUBS = {"accel/stubs/xen-stub.c": "../stubs/"}


def series() -> list[str]:
    """Patch names in order."""
    lines = (PATCHES / "series").read_text().splitlines()
    return [n for n in (ln.strip() for ln in lines) if n and not n.startswith("#")]


def sh(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output if it fails."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def ensure_build_deps() -> None:
    """Install what configure and the touched files need, if missing."""
    need = sorted({pkg for path, pkg in BUILD_DEPS.items() if not Path(path).exists()})
    if need:
        sh(["apt-get", "update", "-qq"])
        sh(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


def apt_source_options() -> list[str]:
    """Private apt state whose deb-src entries mirror the machine's own deb entries."""
    apt = CACHE / "apt"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "sources").mkdir(exist_ok=True)
    stanzas = Path("/etc/apt/sources.list.d/debian.sources").read_text().split("\n\n")
    src = [re.sub(r"^Types:.*$", "Types: deb-src", s.strip(), flags=re.M) for s in stanzas]
    (apt / "sources" / "kemari-src.sources").write_text("\n\n".join(s for s in src if s) + "\n")
    return [
        "-o", "Dir::Etc::SourceList=/dev/null",
        "-o", f"Dir::Etc::SourceParts={apt / 'sources'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


@contextmanager
def cache_lock() -> Iterator[None]:
    """Test runs on one machine share the cache: one builds, the others wait."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def copy_tree(src: Path, dst: Path) -> None:
    """A hard-linked copy, or a full one where dst is on another mount (EXDEV)."""
    if subprocess.run(["cp", "-al", str(src), str(dst)], capture_output=True).returncode:
        shutil.rmtree(dst, ignore_errors=True)
        sh(["cp", "-a", str(src), str(dst)])


def pristine_source() -> Path:
    """Debian's qemu source (Debian patches applied), unpacked once into the cache."""
    with cache_lock():
        return _pristine_source()


def _pristine_source() -> Path:
    opts = apt_source_options()
    if not list((CACHE / "apt" / "lists").glob("*Sources*")):
        sh(["apt-get", *opts, "update", "-qq"])
    show = sh(["apt-cache", *opts, "showsrc", "--only-source", "qemu"]).stdout
    version = max(re.findall(r"^Version: (\S+)$", show, re.M), key=cmp_to_key(dpkg_compare))
    tree = CACHE / f"qemu-{version.replace(':', '_')}"
    if not (tree / ".complete").exists():
        dl = CACHE / "dl"
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir(parents=True)
        sh(["apt-get", *opts, "source", "--download-only", f"qemu={version}"], cwd=dl)
        shutil.rmtree(tree, ignore_errors=True)
        dsc = next(dl.glob("*.dsc"))
        sh(["dpkg-source", "--no-check", "-x", str(dsc), str(tree)])
        shutil.rmtree(dl)
        (tree / ".complete").write_text(version + "\n")
    return tree


def dpkg_compare(a: str, b: str) -> int:
    """Debian version order, from dpkg itself."""
    if a == b:
        return 0
    lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False)
    return -1 if lt.returncode == 0 else 1


def compile_stub(build: Path, src: Path, rel: str, sibling_prefix: str) -> Path:
    """Compile a file this configuration leaves out, with a sibling's exact flags."""
    cmds = json.loads((build / "compile_commands.json").read_text())
    sib = next(c for c in cmds if c["file"].startswith(sibling_prefix))
    out = build / "kemari-check" / (rel.replace("/", "_") + ".o")
    out.parent.mkdir(exist_ok=True)
    argv, words = [], iter(shlex.split(sib["command"]))
    for word in words:
        if word in ("-MQ", "-MF", "-o"):
            next(words)  # the sibling's object / depfile
        elif word not in ("-MD", "-c", sib["file"]):
            argv.append(word)
    sh([*argv, "-o", str(out), "-c", str(src / rel)], cwd=build)
    assert out.stat().st_size > 0
    return out


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hard-linked copy of the pristine source with the series applied."""
    xen_lab.require_root()
    ensure_build_deps()
    pristine = pristine_source()
    work = tmp_path_factory.mktemp("qemu") / "src"
    copy_tree(pristine, work)
    for name in series():
        sh(["patch", "-p1", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(PATCHES / name)],
           cwd=work)  # fmt: skip
    return work


@pytest.fixture(scope="module")
def qemu_build() -> Path:
    """The patched tree, configured and fully built; cached per series and options."""
    xen_lab.require_root()
    ensure_build_deps()
    pristine = pristine_source()
    key = hashlib.sha256(
        "\n".join(
            [pristine.name, *CONFIGURE, *((PATCHES / n).read_text() for n in series())]
        ).encode()
    ).hexdigest()[:16]
    root = CACHE / f"build-{key}"
    with cache_lock():
        build_qemu(pristine, root, key)
    return root / "src"


def build_qemu(pristine: Path, root: Path, key: str) -> None:
    """Patch, configure and build into root (kept when complete)."""
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        sh(["cp", "-al", str(pristine), str(root / "src")])
        for name in series():
            sh(["patch", "-p1", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(PATCHES / name)],
               cwd=root / "src")  # fmt: skip
        build = root / "src" / "build"
        build.mkdir()
        sh(["nice", "-n", "10", "../configure", *CONFIGURE], cwd=build, env=BUILD_ENV)
        sh(["nice", "-n", "10", "ninja", "-j2", *OBJECTS.values()], cwd=build, env=BUILD_ENV)
        sh(["nice", "-n", "10", "ninja", "-j2", "qemu-system-x86_64"], cwd=build,
           env=BUILD_ENV, timeout=3600)  # fmt: skip
        (root / ".complete").write_text(key + "\n")


class Qmp:
    """A minimal QMP client that keeps the events it sees."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")
        self.events: list[str] = []
        self.greeting = self._read()
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            msg = json.loads(self.file.readline())
            if "event" not in msg:
                return msg
            self.events.append(msg["event"])

    def cmd(self, name: str, **args: object) -> dict:
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        return self._read()


def test_every_patch_is_described_and_signed() -> None:
    names = series()
    assert names, "empty series"
    assert sorted(names) == sorted(p.name for p in PATCHES.glob("*.patch"))
    for name in names:
        head, _, diff = (PATCHES / name).read_text().partition("\n---\n")
        assert re.search(r"^Subject: \[PATCH \d+/\d+\] \S.{10,}$", head, re.M), name
        assert "Signed-off-by: Kemari developers <kemari@localhost>" in head, name
        assert len(head.split("\n\n", 1)[1].split()) > 60, f"{name}: say why"
        assert re.search(r"^\+\+\+ b/", diff, re.M), name


def test_series_applies_without_fuzz(patched_tree: Path) -> None:
    # Applying happened in the fixture (patch --fuzz=0 fails on fuzz); the
    # pristine copy must be untouched (cp -al + patch writes new files).
    pristine = pristine_source()
    for rel in list(OBJECTS) + list(STUBS):
        assert (patched_tree / rel).read_bytes() != (pristine / rel).read_bytes(), rel
    assert (patched_tree / "include/hw/xen/xen-kemari.h").exists()
    assert not (pristine / "include/hw/xen/xen-kemari.h").exists()
    schema = (patched_tree / "qapi/migration.json").read_text()
    for command in ("xen-kemari-save-devices-state", "xen-kemari-share-dirty-bitmap"):
        assert f"{{ 'command': '{command}'" in schema


def test_touched_files_compile(qemu_build: Path) -> None:
    patched_tree = qemu_build
    build = patched_tree / "build"
    target = (build / "x86_64-softmmu-config-target.h").read_text()
    assert "#define CONFIG_XEN 1" in target, "configure did not enable Xen"
    sh(["nice", "-n", "10", "ninja", "-j2", *OBJECTS.values()], cwd=build, env=BUILD_ENV)
    for obj in OBJECTS.values():
        assert (build / obj).stat().st_size > 0, obj
    stubs = [compile_stub(build, patched_tree, rel, sib) for rel, sib in STUBS.items()]
    # The new QMP handlers and the hook really are in the objects.
    nm = {obj: sh(["nm", str(build / obj)]).stdout for obj in OBJECTS.values()}
    savevm, xen_hvm = (nm[o] for o in OBJECTS.values())
    assert re.search(r" T qmp_xen_kemari_save_devices_state$", savevm, re.M)
    assert re.search(r" T xen_kemari_set_checkpoint_hook$", savevm, re.M)
    assert re.search(r" T qmp_xen_kemari_share_dirty_bitmap$", xen_hvm, re.M)
    assert re.search(r" U xen_kemari_set_checkpoint_hook$", xen_hvm, re.M)
    assert re.search(
        r" T qmp_xen_kemari_share_dirty_bitmap$", sh(["nm", str(stubs[0])]).stdout, re.M
    )
    # The generated QMP marshaller dispatches the new commands.
    marshal = (build / "qapi/qapi-commands-migration.c").read_text()
    for command in ("save_devices_state", "share_dirty_bitmap"):
        assert f"qmp_marshal_xen_kemari_{command}" in marshal


def test_a_patch_with_changed_context_is_refused(patched_tree: Path, tmp_path: Path) -> None:
    work = tmp_path / "src"
    copy_tree(pristine_source(), work)
    text = (PATCHES / series()[0]).read_text()
    hunk = text.index("\n@@ ")
    ctx = text.index("\n ", hunk + 4)
    bad = tmp_path / "bad.patch"
    bad.write_text(text[: ctx + 2] + "X" + text[ctx + 2 :])
    res = subprocess.run(
        ["patch", "-p1", "--fuzz=0", "--dry-run", "-i", str(bad)],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0, res.stdout
    assert "FAILED" in res.stdout


def test_patched_qemu_saves_device_state_without_stopping(qemu_build: Path, tmp_path: Path) -> None:
    """Run the linked binary (TCG, no Xen): the checkpoint command works and never stops the VM."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    sock = tmp_path / "qmp.sock"
    argv = [str(qemu_build / "build" / "qemu-system-x86_64"), "-M", "pc", "-accel", "tcg",
            "-m", "64", "-display", "none", "-nodefaults", "-serial", "null",
            "-L", "/usr/share/seabios", "-drive", f"if=ide,format=raw,file={disk}",
            "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        qmp = Qmp(sock)
        assert qmp.greeting["QMP"]["version"]["qemu"]["minor"] == 2
        time.sleep(1)
        for i in range(3):
            reply = qmp.cmd("xen-kemari-save-devices-state", filename=str(tmp_path / f"k{i}"))
            info = reply["return"]
            assert info["size"] == (tmp_path / f"k{i}").stat().st_size > 0
            assert 0 <= info["downtime-us"] < 1_000_000
            assert info["dirty-index"] == -1  # no bitmap shared
        assert qmp.cmd("query-status")["return"]["status"] == "running"
        assert "STOP" not in qmp.events, qmp.events
        # The stock command stops and restarts the VM around the same save.
        assert qmp.cmd("xen-save-devices-state", filename=str(tmp_path / "stock"))["return"] == {}
        assert "STOP" in qmp.events and "RESUME" in qmp.events, qmp.events
        ours, stock = (tmp_path / "k0").read_bytes(), (tmp_path / "stock").read_bytes()
        assert ours[:8] == stock[:8] == b"QEVM\0\0\0\x03" and len(ours) == len(stock)
        # Without Xen there is no guest RAM layout to cover: refused, not crashed.
        err = qmp.cmd("xen-kemari-share-dirty-bitmap", path=str(tmp_path / "bitmap"))
        assert err["error"]["desc"] == "guest RAM is not set up", err
        qmp.cmd("quit")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
