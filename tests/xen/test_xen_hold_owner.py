"""The hold is owned (Xen patch 5): several domains, a controller that dies, ADOPT.

Checked on the PV boot of test_xen_tap_boot.py (one boot per session, see
xen_lab.tap_boot), whose dom0 script runs dom0/owner-test.sh after the tap
checks: a second protected domU is started, one dispatcher serves both, then
the controller is SIGKILLed with a hold pending and a new one ADOPTs the tap;
that one is killed in turn while serving and a third adopts and disarms.

The documented outcome of a controller's death (xen-patches/README.md): the
tap stays armed and owned, a held domain stays paused with its notifications
held -- a running one is held at its next tapped notification, with nobody
told -- and nothing runs on until another controller ADOPTs it.
"""

from __future__ import annotations

import pytest
import xen_lab

pytestmark = pytest.mark.xen
passed = xen_lab.assert_passed


@pytest.fixture(scope="module")
def run() -> xen_lab.Boot:
    return xen_lab.tap_boot("pv")


def domids(run: xen_lab.Boot) -> list[str]:
    arms = [k for k in run.checks() if k.startswith("dispatch.arm.dom")]
    return [k.removeprefix("dispatch.arm.") for k in arms]


def test_second_protected_domain_runs(run: xen_lab.Boot) -> None:
    passed(run, "owner.domu2_started", "owner.domu2_io")


def test_one_dispatcher_serves_two_domains(run: xen_lab.Boot) -> None:
    """Each domain armed with a port of its own, each held and released 3 times."""
    doms = domids(run)
    assert len(doms) == 2, doms
    passed(run, "dispatch.ports_distinct", "dispatch.clean", "owner.dispatch_rc")
    for dom in doms:
        passed(run, f"dispatch.arm.{dom}", f"dispatch.holds.{dom}", f"dispatch.disarm.{dom}")


def test_each_domain_told_on_its_own_port(run: xen_lab.Boot) -> None:
    """No event on a port nobody armed; each domain's holds come on its port."""
    for dom in domids(run):
        passed(run, f"dispatch.told.{dom}")
    passed(run, "dispatch.clean")
    assert "stray_events=0" in run.checks()["dispatch.clean"][1]


def test_no_wakeup_lost_both_domains_progress(run: xen_lab.Boot) -> None:
    """GET_HELD is polled: no domain is left held while its I/O waits."""
    passed(run, "owner.dispatch_io.domu", "owner.dispatch_io.domu2")


def test_controller_killed_with_hold_pending_guest_stays_paused(run: xen_lab.Boot) -> None:
    """SIGKILL with a hold pending: no progress, even after `xl unpause`; no vCPU time."""
    passed(run, "hold.arm", "hold.held", "owner.doomed_held", "owner.dead_hold_stalls")
    passed(run, "adopt1.orphan_held", "adopt1.orphan_not_running")


def test_new_controller_adopts_and_the_held_io_completes(run: xen_lab.Boot) -> None:
    """A plain ARM is refused, ADOPT keeps the held ports, the dead token is refused."""
    passed(
        run,
        "adopt1.arm_refused",
        "adopt1.adopt",
        "adopt1.held_kept",
        "adopt1.dead_token_refused",
        "adopt1.release",
        "adopt1.serves_on",
        "owner.adopter_ready",
        "owner.adopted_io",
    )


def test_controller_killed_while_serving_next_hold_waits_for_adopt(run: xen_lab.Boot) -> None:
    """Its domain gets held with nobody told, stays paused, and a third controller adopts."""
    passed(
        run,
        "adopt2.held_unattended",
        "adopt2.orphan_held",
        "adopt2.orphan_not_running",
        "adopt2.adopt",
        "adopt2.held_kept",
        "adopt2.dead_token_refused",
        "adopt2.release",
        "adopt2.serves_on",
        "adopt2.disarm",
        "owner.adopt2_rc",
    )


def test_io_carries_on_with_no_failure(run: xen_lab.Boot) -> None:
    passed(
        run,
        "owner.io_continues.domu",
        "owner.io_continues.domu2",
        "owner.no_failed_io.domu",
        "owner.no_failed_io.domu2",
    )
    failed = {k: v for k, (ok, v) in run.checks().items() if not ok}
    assert not failed
