"""ocf:kemari:vm as a promotable clone in a real Pacemaker cluster with real
fencing (issue 8's scenarios). Every scenario checks DESIGN.md section 7 from
the kv clients' own records: every acknowledged PUT readable, no INCR value
handed out twice, the counter never back."""

from __future__ import annotations

import re
import time

import pytest
from cluster.kemari_vm import (
    CLONE,
    GUEST,
    GUEST_IP,
    REPLICATION_PORT,
    RESOURCE,
    GarpListener,
    KemariVm,
)

from kemari_agent.kvclient import KvClient
from kemari_agent.kvload import check_acked_puts

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def vm(cluster):
    vm = KemariVm(cluster, policy="continue")
    vm.define_with_crm("node1")
    return vm


def other(cluster, node: str) -> str:
    return next(n for n in cluster.names if n != node)


def assert_one_promoted(vm) -> str:
    promoted = vm.promoted()
    assert len(promoted) == 1, vm.lab.crm_mon()
    return promoted[0]


def test_cold_start_one_promoted_with_sync_attributes(cluster, vm):
    vm.wait_protected()
    primary = assert_one_promoted(vm)
    status = cluster.exec(primary, "pcs", "status").stdout
    assert re.search(r"Promoted: \[ node\d \]", status), status
    assert re.search(r"Unpromoted: \[ node\d \]", status), status
    attrs = vm.attributes()
    assert "Node Attributes" in attrs and "synced" in attrs, attrs
    assert cluster.client("ping", "-c", "1", "-W", "3", GUEST_IP, check=False).returncode == 0
    with cluster.in_client(), KvClient(GUEST, attempts=50) as c:
        assert c.put("cold", "start").kind == "OK"


def test_power_off_of_the_promoted_node_under_load(cluster, vm, cluster_cycles):
    """Power the Promoted node off, fail over, let it come back and re-protect
    itself; again the other way; `--cluster-cycles` times."""
    with GarpListener(cluster) as garp:
        clients = vm.clients().start()
        try:
            for cycle in range(cluster_cycles):
                vm.wait_protected()
                clients.wait_progress()
                victim = assert_one_promoted(vm)
                survivor = other(cluster, victim)
                acked_before = clients.snapshot()
                since = time.time()
                cluster.power_off(victim)
                cluster.wait(lambda v=victim, s=since: cluster.fenced(v, s), 90, f"{victim} fenced")
                cluster.wait(lambda s=survivor: vm.promoted(on=s) == [s], 90,
                             f"cycle {cycle}: {survivor} promoted")
                clients.wait_progress()               # kv answers again at the same IP
                assert garp.announced_since(since), f"cycle {cycle}: no gratuitous ARP {garp.seen}"
                with cluster.in_client():
                    assert check_acked_puts(GUEST, acked_before) == [], f"cycle {cycle}"
            vm.wait_protected()
        finally:
            clients.stop()
        assert vm.check_invariants(clients, acked_before) == []


def test_planned_switchover_by_move_and_ban_loses_nothing(cluster, vm):
    clients = vm.clients().start()
    fences = cluster.fence_log().count("done action=")
    try:
        vm.wait_protected()
        clients.wait_progress()
        primary = assert_one_promoted(vm)
        target = other(cluster, primary)
        cluster.exec(primary, "pcs", "resource", "move", CLONE, target, "--promoted")
        cluster.wait(lambda: vm.promoted() == [target], 120, f"moved to {target}")
        cluster.exec(primary, "pcs", "resource", "clear", CLONE)
        vm.wait_protected()
        clients.wait_progress()
        cluster.exec(target, "pcs", "resource", "ban", CLONE, target, "--promoted")
        cluster.wait(lambda: vm.promoted() == [primary], 120, f"banned back to {primary}")
        cluster.exec(target, "pcs", "resource", "clear", CLONE)
        vm.wait_protected()
        clients.wait_progress()
    finally:
        clients.stop()
    assert cluster.fence_log().count("done action=") == fences, "a switchover never fences"
    assert vm.check_invariants(clients, clients.snapshot()) == []
    assert all(not r.errors for r in clients.records)


def _outdated_time(cluster, on: str, since: float) -> float | None:
    """When the CIB got the constraint or attribute that keeps the Unpromoted
    node from promotion (the CIB's own log, milliseconds)."""
    return cluster.log_time(on, "pacemaker/pacemaker.log",
                            r"cib_perform_op.*\+\+.*(rsc_location|outdated)", since)


def test_replication_link_cut_with_continue_outdates_the_secondary_first(cluster, vm):
    vm.wait_protected()
    primary = assert_one_promoted(vm)
    secondary = other(cluster, primary)
    since = time.time()
    cluster.cut_link(primary, REPLICATION_PORT)
    try:
        with cluster.in_client(), KvClient(GUEST, timeout=0.3, attempts=100) as c:
            reply = c.put("during-cut", "1")
            answered = time.time()
        assert reply.kind == "OK"
        assert vm.promoted() == [primary]                   # never two Promoted
        outdated_at = _outdated_time(cluster, primary, since)
        assert outdated_at is not None, vm.attributes()
        assert outdated_at <= answered, (outdated_at, answered)
        crm = vm.attributes()
        assert secondary in crm
        # the primary runs on unprotected: its recurring monitor says degraded
        # (191), which Pacemaker takes as Promoted: no recovery, no failure
        cluster.wait(lambda: _promoted_monitor_rc(cluster, primary) == "191", 60,
                     "the primary's monitor reports degraded")
        assert vm.promoted() == [primary]
        # crm_mon shows it among the resource actions with the agent's reason
        shown = [line for line in cluster.crm_mon_xml(primary).splitlines()
                 if "<failure " in line and f'node="{primary}"' in line]
        assert any('exitstatus="promoted (degraded)"' in line
                   and "running unprotected" in line for line in shown), shown
        failcount = cluster.exec(primary, "crm_failcount", "--query", "-r", RESOURCE,
                                 "-N", primary).stdout
        assert "value=0" in failcount, failcount
    finally:
        cluster.heal_link(primary)
    vm.wait_protected()
    assert vm.promoted() == [primary]                       # never restarted nor moved
    with cluster.in_client(), KvClient(GUEST, attempts=50) as c:
        assert c.get("during-cut").value == "1"


def _promoted_monitor_rc(cluster, node: str) -> str | None:
    """rc-code of the last recurring monitor on `node` that did not return what
    Pacemaker expected (its *_last_failure_0 entry in the CIB), if any."""
    xpath = (f"//node_state[@uname='{node}']//lrm_resource[starts-with(@id, '{RESOURCE}')]"
             "/lrm_rsc_op[@operation='monitor' and contains(@id, 'last_failure')]")
    r = cluster.exec(node, "cibadmin", "--query", "--xpath", xpath, check=False)
    codes = re.findall(r'rc-code="(\d+)"', r.stdout)
    return codes[-1] if codes else None



def test_stale_node_is_never_promoted_ahead_of_the_current_one(cluster, vm):
    vm.wait_protected()
    current = assert_one_promoted(vm)
    stale = other(cluster, current)
    cluster.exec(current, "pcs", "stonith", "update", "lab-fence", "pcmk_reboot_action=off")
    clients = vm.clients().start()
    try:
        clients.wait_progress()
        since = time.time()
        cluster.power_off(stale)                            # stays off: fencing powers off
        cluster.wait(lambda: cluster.fenced(stale, since), 90, f"{stale} fenced")
        generation = vm.status(current)["generation"]
        clients.wait_progress(50)                           # the current node runs on
        # the stale node returns but cannot resync (its replication port is cut)
        cluster.cut_link(current, REPLICATION_PORT)
        cluster.power_on(stale)
        cluster.wait_online(timeout=120, on=current)
        cluster.wait(lambda: vm.lab.roles(RESOURCE).get(stale) in ("Unpromoted", "Slave"),
                     120, f"{stale} Unpromoted")
        acked_before = clients.snapshot()
        clients.stop()
        since = time.time()
        cluster.power_off(current)
        cluster.wait(lambda: cluster.fenced(current, since), 90, f"{current} fenced")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:                  # the cluster waits, never promotes
            assert vm.promoted(on=stale) == [], vm.attributes(stale)
            time.sleep(0.5)
        # it says why: the fence constraint the current node set before it ran on
        # unprotected, and the stale node's sync state and generation
        constraints = cluster.exec(stale, "pcs", "constraint", "location", "--full").stdout
        assert "kemari-fence-vm-clone" in constraints, constraints
        attrs = vm.attributes(stale)
        assert re.search(r"kemari-kv1-sync\s*:\s*(outdated|disconnected)", attrs), attrs
        assert vm.status(stale)["generation"] <= generation
        cluster.power_on(current)                           # fresh netns: link restored
        cluster.wait(lambda: vm.promoted(on=stale) == [current], 180, f"{current} promoted")
        vm.wait_protected()
    finally:
        cluster.exec(cluster.any_up(), "pcs", "stonith", "update", "lab-fence",
                     "pcmk_reboot_action=reboot", check=False)
    with cluster.in_client():
        assert check_acked_puts(GUEST, acked_before) == []
    assert vm.check_invariants(clients, acked_before) == []
