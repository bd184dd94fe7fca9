"""The Xen patch series: described, applies exactly, builds into the hypervisor."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import xen_lab

pytestmark = pytest.mark.xen


def test_every_patch_is_described_and_signed() -> None:
    names = xen_lab.series()
    assert names, "empty series"
    for name in names:
        text = (xen_lab.PATCHES / name).read_text()
        head, _, diff = text.partition("\n---\n")
        assert re.search(r"^Subject: \[PATCH \d+/\d+\] \S.{10,}$", head, re.M), name
        assert "Signed-off-by: Kemari developers <kemari@localhost>" in head, name
        body = head.split("\n\n", 1)[1]
        assert len(body.split()) > 40, f"{name}: the description should say why"
        assert "\ndiff --git a/" in diff, name


def test_series_applies_without_fuzz(tmp_path: Path) -> None:
    xen_lab.require_root()
    src = tmp_path / "xen"
    res = xen_lab.run([str(xen_lab.LAB / "xen-source.sh"), str(src)], timeout=600)
    assert res.returncode == 0, res.stderr
    res = xen_lab.run([str(xen_lab.LAB / "apply-series.sh"), str(src)], timeout=120)
    assert res.returncode == 0, res.stderr
    applied = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("APPLIED ")]
    assert applied == xen_lab.series()
    assert (src / "xen/common/kemari.c").is_file()


def test_stale_patch_is_refused(tmp_path: Path) -> None:
    """A patch whose context no longer matches must fail, not apply with fuzz."""
    xen_lab.require_root()
    patches = tmp_path / "patches"
    shutil.copytree(xen_lab.PATCHES, patches)
    first = patches / xen_lab.series()[0]
    text = first.read_text()
    # Change the first context line of the event_channel.c hunk.
    marker = "+++ b/xen/common/event_channel.c\n"
    start = text.index(marker)
    ctx = re.compile(r"^ (\S.*)$", re.M).search(text, start)
    assert ctx
    first.write_text(text[: ctx.start(1)] + "XX" + text[ctx.start(1) :])
    src = tmp_path / "xen"
    res = xen_lab.run([str(xen_lab.LAB / "xen-source.sh"), str(src)], timeout=600)
    assert res.returncode == 0, res.stderr
    res = xen_lab.run([str(xen_lab.LAB / "apply-series.sh"), str(src), str(patches)], timeout=120)
    assert res.returncode != 0
    assert "does not apply" in res.stderr or "fuzz" in res.stderr


def test_build_cache_is_keyed_by_the_series(tmp_path: Path) -> None:
    xen_lab.require_root()
    tree = xen_lab.xen_build()
    start = time.monotonic()
    assert xen_lab.xen_build() == tree
    assert time.monotonic() - start < 30, "an unchanged series must reuse the build"

    def series_hash(patch_dir: Path) -> str:
        return subprocess.run(
            [
                "bash",
                "-c",
                f"KEMARI_XEN_PATCHES={patch_dir} && . {xen_lab.LAB}/common.sh && series_hash",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    patches = tmp_path / "patches"
    shutil.copytree(xen_lab.PATCHES, patches)
    assert tree.name == f"xen-build-{series_hash(patches)}"
    last = patches / xen_lab.series()[-1]
    text = last.read_text()
    changed = text.replace("\n---\n", "\nOne more line of description.\n---\n", 1)
    assert changed != text
    last.write_text(changed)
    assert series_hash(patches) != series_hash(xen_lab.PATCHES)


def test_hypervisor_contains_the_kemari_interface() -> None:
    xen_lab.require_root()
    tree = xen_lab.xen_build()
    xen = tree / "xen"
    config = (xen / ".config").read_text()
    assert "CONFIG_SHADOW_PAGING=y" in config
    assert "CONFIG_XSM_FLASK=y" in config
    syms = subprocess.run(
        ["nm", str(xen / "xen-syms")], capture_output=True, text=True, check=True
    ).stdout
    restore_side = (
        "evtchn_bind_virq_in",
        "evtchn_bind_ipi_in",
        "evtchn_fifo_init_control_in",
        "evtchn_fifo_relink_queues",
        "gnttab_shared_frame_gfn",
    )  # patch 6
    for sym in ("kemari_domctl", "kemari_tap_hold", "kemari_domain_destroy", *restore_side):
        assert re.search(rf" [Tt] {sym}$", syms, re.M), sym
    assert (xen / "xen").stat().st_size > 1_000_000
    domctl = (xen / "include/public/domctl.h").read_text()
    assert re.search(r"#define XEN_DOMCTL_kemari\s+87\b", domctl)
    assert re.search(r"#define XEN_DOMCTL_KEMARI_ALLOC_UNBOUND\s+4\b", domctl)
    assert re.search(r"#define XEN_DOMCTL_KEMARI_RESUME_VCPU\s+11\b", domctl)
    assert re.search(r"#define VIRQ_KEMARI\s+14\b", (xen / "include/public/xen.h").read_text())
    perms = (xen / "xsm/flask/include/av_permissions.h").read_text()
    assert "DOMAIN2__KEMARI" in perms
    # The built-in FLASK policy (compiled with checkpolicy) grants it to dom0.
    policy = (xen / "xsm/flask/policy.conf").read_text()
    assert re.search(r"allow dom0_t \S+:domain2 \{[^}]*\bkemari\b", policy)
