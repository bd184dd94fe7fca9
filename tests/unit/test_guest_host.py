"""The guest images' pure parts (parser, store, id table, disk log, net stack),
compiled for the host and run there: fast, and with sanitizers on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

GUEST_DIR = Path(__file__).resolve().parents[2] / "native" / "guest"


@pytest.fixture(scope="module")
def host_tests(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """Build the host test driver once and run it."""
    out = tmp_path_factory.mktemp("guest-host")
    subprocess.run(["make", "-s", "-C", str(GUEST_DIR), "host-tests", f"OUT={out}"],
                   check=True, capture_output=True, text=True)
    return subprocess.run([str(out / "guest_host_tests")], capture_output=True, text=True,
                          timeout=120)


def test_every_check_passes(host_tests: subprocess.CompletedProcess[str]) -> None:
    assert "FAIL" not in host_tests.stdout, host_tests.stdout + host_tests.stderr
    assert host_tests.returncode == 0, host_tests.stdout + host_tests.stderr
    summary = re.search(r"host-tests: checks=(\d+) failures=(\d+)", host_tests.stdout)
    assert summary, host_tests.stdout
    # the driver really ran its checks (a silently skipped section would lower this)
    assert int(summary.group(1)) >= 500
    assert int(summary.group(2)) == 0


def test_crash_model_exercised_power_loss(host_tests: subprocess.CompletedProcess[str]) -> None:
    """The random power-loss run must have crashed often and acknowledged a lot."""
    m = re.search(r"crash-model: (\d+) rounds, (\d+) power losses, (\d+) requests, (\d+) acked, "
                  r"gen (\d+)", host_tests.stdout)
    assert m, host_tests.stdout
    rounds, losses, _requests, acked, gen = (int(g) for g in m.groups())
    assert losses > rounds // 2
    assert acked > 1000
    assert gen > 10         # many compactions (superblock switches) happened under crashes


def test_guest_images_build(tmp_path: Path) -> None:
    """Both images link into flat binaries within the ABI's 4 MiB limit, entry first."""
    subprocess.run(["make", "-s", "-C", str(GUEST_DIR), f"OUT={tmp_path}"], check=True,
                   capture_output=True, text=True)
    for name in ("kv", "stress"):
        image = (tmp_path / f"{name}.bin").read_bytes()
        assert 0 < len(image) <= 0x400000
        # start.S: and $-16,%rsp ; xor %ebp,%ebp ; call guest_main
        assert image[:4] == bytes.fromhex("4883e4f0")
