"""Drive the Xen lab scripts (tests/xen/lab) from pytest.

The heavy lifting (fetching, building, booting) lives in the bash scripts so
that it can be run by hand too; this module only runs them and parses the
markers they print.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LAB = HERE / "lab"
DOM0 = HERE / "dom0"
REPO = HERE.parent.parent
PATCHES = REPO / "xen-patches"

CACHE = Path(os.environ.get("KEMARI_XEN_CACHE", "/var/cache/kemari-test/xen"))
CHECK_RE = re.compile(r"^KEMARI-CHECK (\S+) (PASS|FAIL) ?(.*)$", re.M)


def require_root() -> None:
    """The lab installs packages, debootstraps and writes /var/cache: root only."""
    if os.geteuid() != 0:
        pytest.fail("the Xen lab needs root")


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    """Run a lab command, capturing its output (shown by pytest on failure)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def series() -> list[str]:
    """The patch file names, in order."""
    lines = (PATCHES / "series").read_text().splitlines()
    return [name for name in (line.strip() for line in lines) if name and not name.startswith("#")]


def xen_build() -> Path:
    """Build (or reuse from the cache) the patched hypervisor; its tree."""
    res = run([str(LAB / "build-xen.sh")], timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(res.stdout.strip().splitlines()[-1])


def build_tap_test(xen_tree: Path, out: Path) -> Path:
    """Compile the dom0 test programs against the patched public headers."""
    res = run([str(LAB / "deps.sh")], timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run(["make", "-s", "-C", str(DOM0), f"XEN_SRC={xen_tree}", f"OUT={out}"], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out / "kemari-tap-test"


@dataclass
class Boot:
    """What one boot of the lab produced."""

    rc: int
    stdout: str
    log: str

    def checks(self) -> dict[str, tuple[bool, str]]:
        """KEMARI-CHECK name -> (passed, detail), from the serial log."""
        return {m[1]: (m[2] == "PASS", m[3]) for m in CHECK_RE.finditer(self.log)}

    def lines(self, prefix: str) -> list[str]:
        return [ln for ln in self.log.splitlines() if ln.startswith(prefix)]


def assert_passed(boot_: Boot, *names: str) -> None:
    """Each named KEMARI-CHECK was reported, and passed."""
    checks = boot_.checks()
    for name in names:
        assert name in checks, f"{name} never reported:\n{boot_.stdout[-3000:]}"
        assert checks[name][0], f"{name} failed: {checks[name][1]}"


def log_path(name: str) -> Path:
    """Serial logs go to the cache (kept after pytest's temp dirs are gone)."""
    (CACHE / "logs").mkdir(parents=True, exist_ok=True)
    return CACHE / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def boot(
    run_script: Path,
    files: Path,
    log: Path,
    env: dict[str, str],
    xen_cmdline: str = "",
    timeout: int = 1800,  # a loaded 2-core host can take 15 min for one boot
) -> Boot:
    """Boot Xen + dom0 under QEMU, run run_script in dom0; never raises on failure."""
    cmd = [
        str(LAB / "boot.sh"),
        "--run",
        str(run_script),
        "--files",
        str(files),
        "--log",
        str(log),
        "--timeout",
        str(timeout),
    ]
    if xen_cmdline:
        cmd += ["--cmdline", xen_cmdline]
    for key, value in env.items():
        cmd += ["--env", f"{key}={value}"]
    res = run(cmd, timeout=timeout + 1800)
    text = log.read_text(errors="replace") if log.exists() else ""
    # The serial console ends lines with CR LF.
    return Boot(res.returncode, res.stdout + res.stderr, text.replace("\r", ""))


@dataclass(frozen=True)
class TapVariant:
    """One boot of dom0/tap-test.sh."""

    domu_type: str
    xen_cmdline: str = ""
    notify: str = "port"  # how holds are told: the controller's own port, or virq
    owner_phase: bool = False  # also run dom0/owner-test.sh (patch 5) in this boot


TAP_VARIANTS = {
    "pv": TapVariant("pv", owner_phase=True),
    "pvh": TapVariant("pvh", notify="virq"),
    "pv-flask": TapVariant("pv", "xsm=flask flask=enforcing"),
}


@cache
def tap_boot(name: str) -> Boot:
    """Boot one variant of the tap test, once per session (several modules check it)."""
    require_root()
    variant = TAP_VARIANTS[name]
    env = {"KEMARI_DOMU_TYPE": variant.domu_type, "KEMARI_NOTIFY": variant.notify}
    if variant.owner_phase:
        env["KEMARI_OWNER_PHASE"] = "1"
    with tempfile.TemporaryDirectory(prefix=f"kemari-xen-tap-{name}-") as tmp:
        files = Path(tmp) / "files"
        build_tap_test(xen_build(), files)
        return boot(
            DOM0 / "tap-test.sh",
            files,
            log_path(f"tap-{name}"),
            env=env,
            xen_cmdline=variant.xen_cmdline,
        )
