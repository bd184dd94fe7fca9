"""Boot the patched Xen and tap a real domU's disk and network notifications.

One boot per variant: a PV and a PVH domU under the default (dummy) XSM
policy, and a PV domU with FLASK enforcing the built-in policy.  The PVH
variant is told of holds by VIRQ_KEMARI, the others on a notification port
of the controller's own.  Each test below asserts one property of a run,
from the markers dom0/tap-test.sh and dom0/kemari-tap-test print.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import xen_lab

pytestmark = pytest.mark.xen


VARIANTS = xen_lab.TAP_VARIANTS
# The largest port either event-channel ABI can use (EVTCHN_FIFO_NR_CHANNELS).
ABI_PORTS = 1 << 17


@dataclass
class Run:
    variant: str
    boot: xen_lab.Boot


@pytest.fixture(scope="module", params=list(VARIANTS))
def lab(request: pytest.FixtureRequest) -> Run:
    # One boot per variant and session: test_xen_hold_owner.py checks the
    # owner phase of the PV boot.
    return Run(request.param, xen_lab.tap_boot(request.param))


@pytest.fixture
def run(lab: Run) -> xen_lab.Boot:
    return lab.boot


passed = xen_lab.assert_passed


def cycles(run: xen_lab.Boot) -> list[int]:
    found = {int(m[1]) for m in re.finditer(r"^KEMARI-CHECK cycle(\d+)\.", run.log, re.M)}
    return sorted(found)


def test_dom0_toolstack_and_domu_with_disk_and_vif(run: xen_lab.Boot) -> None:
    assert "MARKER-DOM0-TOOLSTACK" in run.log, run.stdout[-3000:]
    passed(run, "domu_started", "domu_io_before", "frontend_ports")


def test_tap_armed_by_dom0_only_for_the_guest(run: xen_lab.Boot) -> None:
    passed(run, "open", "virq_bind", "refuse_dom0", "arm")


def test_virq_raised_and_guest_paused_on_each_hold(run: xen_lab.Boot) -> None:
    assert cycles(run), "no hold/release cycle ran"
    for n in cycles(run):
        passed(run, f"cycle{n}.virq", f"cycle{n}.paused_flag", f"cycle{n}.domain_paused")


def test_held_port_is_the_frontends_event_channel(run: xen_lab.Boot) -> None:
    [ports_line] = run.lines("KEMARI-PORTS ")
    ports = dict(kv.split("=") for kv in ports_line.split()[1:])
    frontend = {"vbd": ports["vbd"], "vif-tx": ports["vif_tx"], "vif-rx": ports["vif_rx"]}
    held = [dict(kv.split("=") for kv in ln.split()[1:]) for ln in run.lines("KEMARI-HELD ")]
    assert held, "no port was ever held"
    for h in held:
        assert frontend[h["name"]] == h["port"], (h, ports)
        assert h["port"] != ports["console"]
    kinds = {h["name"].split("-")[0] for h in held}
    assert kinds == {"vbd", "vif"}, f"held only {kinds}"
    passed(run, "held_kind.vbd", "held_kind.vif")
    for n in cycles(run):
        passed(run, f"cycle{n}.held_ports")


def test_guest_makes_no_progress_while_held(run: xen_lab.Boot) -> None:
    """Not even after `xl unpause`: the tap's pause is its own."""
    for n in cycles(run):
        passed(run, f"cycle{n}.guest_stalled", f"cycle{n}.no_cpu_while_held")
    # xl exits 0 whatever the hypercall answered: the vCPU time tells.
    tried = run.lines("while-held ")
    assert len(tried) == len(cycles(run)), tried
    assert all(" xl_unpause_rc=" in line for line in tried), tried


def test_only_the_owner_ends_a_hold(run: xen_lab.Boot) -> None:
    """While held, a wrong token can neither release, disarm nor re-arm."""
    passed(run, "owner.release_refused", "owner.disarm_refused", "owner.arm_refused")


def test_release_delivers_and_the_io_completes(run: xen_lab.Boot) -> None:
    for n in cycles(run):
        passed(run, f"cycle{n}.release", f"cycle{n}.resumed")
    passed(run, "disarm", "held_io_completed", "io_continues", "no_failed_io")


def test_restored_domain_gets_the_guests_port_numbers(run: xen_lab.Boot) -> None:
    """Into a built-but-never-run domain: the domU's ports, bound by dom0."""
    passed(
        run,
        "restore_target_created",
        "alloc_unbound",
        "alloc_unbound.status",
        "alloc_unbound.busy",
        "alloc_unbound.bind",
        "alloc_unbound.interdomain",
        "restore.evtchn.vif-tx",
        "restore.evtchn.vif-rx",
    )
    [ports_line] = run.lines("KEMARI-PORTS ")
    vbd = dict(kv.split("=") for kv in ports_line.split()[1:])["vbd"]
    assert f"port={vbd} " in run.checks()["alloc_unbound"][1] + " "


def test_ring_grants_saved_and_restored(run: xen_lab.Boot) -> None:
    """Grant entries of the frontends' rings: read from the domU, written into the copy."""
    passed(
        run,
        "grant.vbd",
        "grant.vif-tx",
        "grant.vif-rx",
        "restore.grant.vbd",
        "restore.grant.vif-tx",
        "restore.grant.vif-rx",
    )


def test_release_reports_what_it_did(run: xen_lab.Boot) -> None:
    """RELEASE of a hold answers 0; with nothing held, -ENOENT."""
    for n in cycles(run):
        passed(run, f"cycle{n}.release")
    passed(run, "idle.arm", "idle.release_nothing_held", "idle.disarm")


def test_bitmaps_bounded_by_the_event_channel_abi(run: xen_lab.Boot) -> None:
    """A domain with max_event_channels = 2^31-1 gets bitmaps of 2^17 ports."""
    passed(run, "idle.bitmap_bounded")
    assert f"nr_ports={ABI_PORTS}" in run.checks()["idle.bitmap_bounded"][1]


def test_holds_told_on_the_chosen_channel(lab: Run) -> None:
    """Port or VIRQ as armed; GET_HELD is polled too, but most holds are told."""
    passed(lab.boot, "notified")
    want = VARIANTS[lab.variant].notify
    assert f"notify={want}" in lab.boot.checks()["arm"][1]
    assert f"via={want}" in lab.boot.checks()["notified"][1]


def test_whole_run_passed_without_hypervisor_errors(run: xen_lab.Boot) -> None:
    failed = {k: v for k, (ok, v) in run.checks().items() if not ok}
    assert not failed
    assert "KEMARI-RESULT PASS" in run.log
    assert re.search(r"^MARKER-RUN-EXIT rc=0 ", run.log, re.M)
    assert run.rc == 0, run.stdout[-3000:]
    assert not re.search(r"\(XEN\).*(Panic|FATAL|Assertion)", run.log)


def test_booted_our_patched_build(run: xen_lab.Boot) -> None:
    """The banner carries the compile date of the hypervisor we built."""
    compile_h = (xen_lab.xen_build() / "xen/include/xen/compile.h").read_text()
    date = re.search(r'#define XEN_COMPILE_DATE\s+"([^"]+)"', compile_h)
    assert date
    assert re.search(rf"\(XEN\) Xen version 4\.17\.5 .*{re.escape(date[1])}", run.log)


def test_flask_policy_decides(lab: Run) -> None:
    """Under FLASK, dom0 may tap a domU (domain2:kemari) but not itself."""
    denials = re.findall(r"avc:  denied  \{ kemari \} .* tcontext=(\S+)", lab.boot.log)
    if lab.variant != "pv-flask":
        assert not denials
        assert "Flask:  Starting in enforcing mode" not in lab.boot.log
        return
    assert re.search(r"\(XEN\) Flask:.*[Ee]nforcing", lab.boot.log), "FLASK not enforcing"
    assert denials and all(":dom0_t" in ctx for ctx in denials), denials
    assert "rc=-13" in lab.boot.checks()["refuse_dom0"][1]
    passed(lab.boot, "arm", "cycle1.release")
