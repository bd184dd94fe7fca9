"""With more nodes than instances the peer is not known at start: the agent learns
it from the clone's notifications, and a primary then dials it at once
(re-protection when a new Unpromoted instance appears)."""

from __future__ import annotations

import pytest
from agent_support import AgentNode, Cib, free_tcp_port, make_cib, vm_name, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.kvm]


def test_notify_teaches_the_primary_its_peer(tmp_path, inst, vm_config):
    vm_config.write_text(vm_config.read_text()
                         + f'node3 = "127.0.0.1:{free_tcp_port()}"\n')
    name = vm_name(vm_config)
    cib_path = make_cib(tmp_path / "cib.xml", name, ("node1", "node2", "node3"))
    node1, node2 = (AgentNode(inst, tmp_path, n, vm_config, cib_path, name)
                    for n in ("node1", "node2"))
    try:
        for n in (node1, node2):
            assert n.run("start").returncode == 0
        assert node1.status(name)["replication_peer"] is None   # three candidates
        assert node1.run("promote").returncode == 0
        # a notification the cluster does not act on changes nothing
        r = node1.run("notify", OCF_RESKEY_CRM_meta_notify_type="pre",
                      OCF_RESKEY_CRM_meta_notify_operation="start")
        assert r.returncode == 0 and node1.status(name)["replication_peer"] is None
        # post-start of node2's instance, as Pacemaker 2.1 names the lists
        r = node1.run("notify", OCF_RESKEY_CRM_meta_notify_type="post",
                      OCF_RESKEY_CRM_meta_notify_operation="start",
                      OCF_RESKEY_CRM_meta_notify_start_uname="node2 ",
                      OCF_RESKEY_CRM_meta_notify_active_uname="node1",
                      OCF_RESKEY_CRM_meta_notify_promoted_uname="node1",
                      OCF_RESKEY_CRM_meta_notify_stop_uname="")
        assert r.returncode == 0, r.stderr
        node2_addr = vm_config.read_text().split('node2 = "')[1].split('"')[0]
        assert node1.status(name)["replication_peer"] == node2_addr
        wait_for("node2 in sync", lambda: node2.status(name)["state"] == "synced",
                 detail=node1.log)
        wait_for("the fence lifted", lambda: not node1.status(name)["peer_fence"]["fenced"],
                 detail=node1.log)
        assert Cib(cib_path).fenced_for(f"{name}-clone") is None
    finally:
        for n in (node1, node2):
            n.kill()
