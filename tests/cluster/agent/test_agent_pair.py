"""The agent driving two real daemons (real KVM guests) the way Pacemaker would,
against one CIB file: monitor codes per state, promotion scores, node
attributes, fence/unfence constraints, and a failover to an outdated-aware pair.

node1 and node2 share one config; each one's replication address comes from
its [replication.nodes] entry (the agent passes `--node`)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from agent_support import Cib, vm_name, wait_for
from prometheus_client.parser import text_string_to_metric_families

from kemari_agent.kvclient import KvClient

pytestmark = [pytest.mark.cluster, pytest.mark.kvm]

OCF_SUCCESS, OCF_NOT_RUNNING, OCF_RUNNING_PROMOTED = 0, 7, 8
OCF_DEGRADED, OCF_DEGRADED_PROMOTED = 190, 191
PROMOTED = {OCF_RUNNING_PROMOTED, OCF_DEGRADED_PROMOTED}    # protected or not yet


def ok(result, code: int | set[int] = 0) -> None:
    codes = code if isinstance(code, set) else {code}
    assert result.returncode in codes, (result.returncode, result.stderr[-2000:])


def test_pair_scores_fencing_failover(cluster_nodes, vm_config):
    node1, node2, cib_path = cluster_nodes
    cib, name = Cib(cib_path), vm_name(vm_config)
    clone = f"{name}-clone"

    # probes on nodes that never ran it, and on a node without the config at all
    ok(node1.run("monitor", OCF_RESKEY_CRM_meta_interval="0"), OCF_NOT_RUNNING)
    ok(node1.run("monitor", OCF_RESKEY_CRM_meta_interval="0",
                 OCF_RESKEY_config="/nonexistent/vm.toml"), OCF_NOT_RUNNING)

    # cold cluster: both secondaries with no state -> low but promotable
    for n in (node1, node2):
        ok(n.run("start"))
        ok(n.run("monitor"), OCF_SUCCESS)
        assert cib.score(n.node, name) == 5
        assert cib.node_attr(n.node, f"kemari-{name}-sync") == "disconnected"

    # promote node1: cold boot; its peer (node2, from [replication.nodes]) syncs.
    # node2 is held stopped until the guest's first output (formatting its blank
    # disk) has left: node1 must fence node2 before that output, and a fast sync
    # would otherwise win the race and leave nothing unprotected to fence for.
    pid2 = node2.pid()
    os.kill(pid2, signal.SIGSTOP)
    try:
        ok(node1.run("promote"))
        wait_for("node1 fences node2", lambda: "peer fenced" in node1.log(), detail=node1.log)
    finally:
        os.kill(pid2, signal.SIGCONT)
    ok(node1.run("monitor"), PROMOTED)
    assert cib.score("node1", name) == 10000
    assert cib.node_attr("node1", f"kemari-{name}-last-generation", transient=False) == "1"
    wait_for("node2 in sync", lambda: node2.status(name)["state"] == "synced"
             and node2.status(name).get("has_checkpoint"))
    ok(node2.run("monitor"), OCF_SUCCESS)
    assert cib.score("node2", name) == 1000
    assert cib.node_attr("node2", f"kemari-{name}-sync") == "synced"
    assert cib.node_attr("node2", f"kemari-{name}-generation") == "1"
    # node2 in sync again: node1 lifts the fence
    wait_for("node1 lifts the fence", lambda: not node1.status(name)["peer_fence"]["fenced"],
             detail=node1.log)
    assert cib.fenced_for(clone) is None
    ok(node1.run("monitor"), OCF_RUNNING_PROMOTED)
    assert cib.node_attr("node1", f"kemari-{name}-sync") == "synced"

    # client writes, each acknowledged only after node2 holds it
    forward = vm_config.read_text().split('forward = "')[1].split('"')[0].rpartition(":")
    kv = KvClient((forward[0], int(forward[2])), timeout=0.5, attempts=60)
    for i in range(20):
        assert kv.put(f"k{i}", f"v{i}").kind == "OK"

    # metrics of a protected primary parse as Prometheus text
    text = node1.kemari("metrics", name).stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["kemari_role"].samples[0].labels == {"vm": name, "role": "primary"}
    hist = families["kemari_checkpoint_latency_seconds"]
    assert hist.type == "histogram"
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert count > 0
    out = node1.run("monitor", OCF_RESKEY_metrics_textfile=str(cib_path.parent / "m.prom"))
    ok(out, OCF_RUNNING_PROMOTED)
    assert "kemari_up" in (cib_path.parent / "m.prom").read_text()

    # a hung daemon: monitor fails with a reason instead of hanging
    pid2 = node2.pid()
    os.kill(pid2, signal.SIGSTOP)
    try:
        hung = node2.run("monitor")
    finally:
        os.kill(pid2, signal.SIGCONT)
    assert hung.returncode == 1 and "ocf-exit-reason:" in hung.stderr

    # power off node1: node2 holds a consistent checkpoint -> promotable, lower score
    wait_for("node2 in sync again", lambda: node2.status(name)["state"] == "synced")
    node1.kill()
    ok(node1.run("monitor"), OCF_NOT_RUNNING)
    wait_for("node2 notices", lambda: node2.status(name)["state"] == "standalone", timeout=30)
    ok(node2.run("monitor"), OCF_SUCCESS)
    assert cib.score("node2", name) == 100
    ok(node2.run("promote"))
    unprotected = node2.run("monitor")            # node1 is dead: degraded, with the reason
    ok(unprotected, OCF_DEGRADED_PROMOTED)
    assert "unprotected" in unprotected.stderr
    assert node2.status(name)["generation"] == 2
    assert [kv.get(f"k{i}").value for i in range(20)] == [f"v{i}" for i in range(20)]
    assert kv.put("after", "failover").kind == "OK"
    # node2 runs unprotected: node1 (outdated) may never be promoted
    wait_for("node1 fenced", lambda: node2.status(name)["peer_fence"]["fenced"], timeout=30,
             detail=node2.log)
    assert cib.fenced_for(clone) == "node2"

    # node1 returns while the primary cannot reach it (stopped): older generation,
    # nothing synced -> no score, and its monitor says degraded with the reason
    os.kill(node2.pid(), signal.SIGSTOP)
    try:
        ok(node1.run("start"))
        outdated = node1.run("monitor")
    finally:
        os.kill(node2.pid(), signal.SIGCONT)
    ok(outdated, OCF_DEGRADED)
    assert "cannot take over" in outdated.stderr
    assert cib.score("node1", name) is None
    ok(node1.run("monitor", OCF_RESKEY_CRM_meta_interval="0"), OCF_SUCCESS)   # a probe: plain
    # node1 returns: older generation -> no score until it is in sync again
    first = node1.status(name)
    if first["state"] != "synced":
        assert cib.score("node1", name) is None
    wait_for("node1 re-protected", lambda: node1.status(name)["state"] == "synced"
             and node1.status(name)["generation"] == 2, timeout=120, detail=node1.log)
    # (a CIB file has no locking: let node2's unfence handler finish before writing to it)
    wait_for("node2 lifts the fence", lambda: not node2.status(name)["peer_fence"]["fenced"],
             detail=node2.log)
    assert cib.fenced_for(clone) is None
    ok(node1.run("monitor"), OCF_SUCCESS)
    assert cib.score("node1", name) == 1000

    # switchover: demote node2 (hand-over), node1 resumes with nothing lost
    ok(node2.run("demote"))
    ok(node2.run("monitor"), OCF_SUCCESS)
    ok(node1.run("promote"))
    ok(node1.run("monitor"), PROMOTED)
    assert node1.status(name)["generation"] == 3
    assert kv.get("after").value == "failover" and kv.get("k19").value == "v19"
    kv.close()

    # stop: scores and transient attributes go, the generation stays
    for n in (node1, node2):
        ok(n.run("stop"))
        ok(n.run("monitor"), OCF_NOT_RUNNING)
        assert cib.score(n.node, name) is None
        assert cib.node_attr(n.node, f"kemari-{name}-sync") is None
    assert cib.node_attr("node1", f"kemari-{name}-last-generation", transient=False) == "3"


def test_a_node_behind_the_cluster_is_never_promoted(cluster_nodes, vm_config):
    """Stale node: the cluster has seen generation 7 elsewhere; this node has none."""
    node1, _node2, cib_path = cluster_nodes
    cib, name = Cib(cib_path), vm_name(vm_config)
    node1.run("start")
    assert cib.score("node1", name) == 5
    subprocess.run(["crm_attribute", "--node", "node2", "--lifetime", "forever", "--name",
                    f"kemari-{name}-last-generation", "--update", "7"],
                   env=node1.env, check=True, capture_output=True)
    ok(node1.run("monitor"), OCF_DEGRADED)         # running, but it could not take over
    assert cib.score("node1", name) is None
    assert cib.node_attr("node1", f"kemari-{name}-sync") == "outdated"
    refused = node1.run("promote")
    assert refused.returncode == 1
    assert "generation 0 is older than generation 7" in refused.stderr
    assert node1.status(name)["role"] == "secondary"
