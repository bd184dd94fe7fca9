"""The lab itself, proven with Pacemaker's own ocf:pacemaker:Stateful
promotable clone: nodes are isolated, fencing really powers a node off and
boots it again, and the cluster fails over."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.cluster


def test_nodes_have_private_directories(cluster):
    cluster.exec("node1", "sh", "-c", "echo one > /etc/kemari/marker")
    seen = cluster.exec("node2", "sh", "-c", "cat /etc/kemari/marker || true").stdout
    assert "one" not in seen
    assert cluster.exec("node2", "hostname").stdout.strip() == "node2"
    hosts = cluster.exec("node1", "cat", "/etc/hosts").stdout
    assert "10.213.0.12 node2" in hosts
    assert (cluster.disk("node1") / "etc/kemari/marker").read_text() == "one\n"


def test_fence_agent_speaks_the_fence_agents_protocol(cluster):
    meta = cluster.exec("node1", "stonith_admin", "--metadata", "--agent",
                        "fence_kemari_lab").stdout
    assert '<resource-agent name="fence_kemari_lab"' in meta
    assert '<action name="reboot"/>' in meta
    opts = f"lab_dir={cluster.base}\n"
    listed = cluster.exec("node1", "fence_kemari_lab", input=opts + "action=list\n").stdout
    assert listed.split() == ["node1", "node2"]
    status = cluster.exec("node1", "fence_kemari_lab", check=False,
                          input=opts + "action=status\nplug=node2\n")
    assert status.returncode == 0
    bad = cluster.exec("node1", "fence_kemari_lab", check=False,
                       input=opts + "action=off\nplug=node9\n")
    assert bad.returncode != 0 and "unknown node 'node9'" in bad.stderr


def test_crm_defined_stateful_clone_has_one_promoted(cluster):
    cluster.exec("node1", "crm", "configure", "primitive", "st", "ocf:pacemaker:Stateful",
                 "op", "monitor", "interval=5s", "role=Promoted",
                 "op", "monitor", "interval=6s", "role=Unpromoted")
    cluster.exec("node1", "crm", "configure", "clone", "st-clone", "st",
                 "meta", "promotable=true", "promoted-max=1", "notify=true")
    cluster.wait(lambda: len(cluster.promoted("st")) == 1 and len(cluster.roles("st")) == 2,
                 60, "one Promoted and one Unpromoted st")
    status = cluster.exec("node1", "pcs", "status").stdout
    assert "Promoted: [ " in status and "Unpromoted: [ " in status, status


def test_power_off_of_the_promoted_node_fences_it_and_promotes_the_other(cluster):
    victim = cluster.promoted("st")[0]
    survivor = next(n for n in cluster.names if n != victim)
    since = time.time()
    old_init = cluster.init_pid(victim)
    killed = cluster.power_off(victim)
    assert killed >= 5 and not cluster.running(victim)         # corosync, pacemaker daemons
    cluster.wait(lambda: cluster.fenced(victim, since), 60, f"{victim} fenced")
    cluster.wait(lambda: cluster.promoted("st", on=survivor) == [survivor], 60,
                 f"st promoted on {survivor}")
    # the logs the failover benchmark splits its phases by tell the same story
    victim_id = cluster.names.index(victim) + 1
    detected = cluster.log_time(survivor, "corosync/corosync.log",
                                rf"A new membership .* left: {victim_id}\b", since)
    requested, off = cluster.fence_times(victim, since)
    promoted = cluster.log_time(survivor, "pacemaker/pacemaker.log",
                                rf"Result of promote operation for st\S* on {survivor}: ok", since)
    assert since < detected <= requested < off < promoted, (since, detected, requested, off,
                                                            promoted)
    history = cluster.exec(survivor, "stonith_admin", "--history", victim).stdout
    assert "reboot of " + victim in history and "successful" in history, history
    # the reboot booted the victim again, in fresh namespaces, and it rejoined
    cluster.wait_online(timeout=90, on=survivor)
    assert cluster.init_pid(victim) != old_init
    cluster.wait(lambda: len(cluster.roles("st")) == 2, 60, "st running on both nodes")
    assert cluster.promoted("st") == [survivor]


def test_the_disk_survives_a_power_off_and_ram_does_not(cluster):
    node = "node2"
    cluster.exec(node, "sh", "-c", "echo disk > /var/lib/kemari/kept; echo ram > /run/gone")
    since = time.time()
    cluster.exec("node1", "stonith_admin", "--reboot", node, "--timeout", "60")
    assert cluster.fenced(node, since)
    cluster.wait_online(timeout=90, on="node1")
    assert cluster.exec(node, "cat", "/var/lib/kemari/kept").stdout == "disk\n"
    assert cluster.exec(node, "test", "-e", "/run/gone", check=False).returncode != 0


def test_pcs_creates_a_promotable_clone_without_pcsd(cluster):
    """pcs against the running CIB (no pcsd), and `pcs -f` on a CIB file pushed
    with cibadmin --replace: the two offline ways the scenarios rely on."""
    cluster.exec("node1", "pcs", "resource", "create", "st2", "ocf:pacemaker:Stateful",
                 "promotable", "notify=true")
    cluster.wait(lambda: len(cluster.promoted("st2")) == 1, 60, "st2 promoted")
    cluster.exec("node1", "pcs", "resource", "delete", "st2")
    cluster.exec("node1", "sh", "-c", "cibadmin -Q > /run/cib-edit.xml")
    cluster.exec("node1", "pcs", "-f", "/run/cib-edit.xml", "resource", "create", "st3",
                 "ocf:pacemaker:Stateful", "promotable", "notify=true")
    cluster.exec("node1", "cibadmin", "--replace", "--xml-file", "/run/cib-edit.xml")
    cluster.wait(lambda: len(cluster.promoted("st3")) == 1, 60, "st3 promoted")
    cluster.exec("node1", "pcs", "resource", "delete", "st3")
    cluster.wait(lambda: not cluster.roles("st3"), 60, "st3 gone")
