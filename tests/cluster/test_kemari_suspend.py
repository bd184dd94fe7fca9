"""ocf:kemari:vm defined with `pcs resource create ... promotable notify=true`
and `on_peer_loss = "suspend"`: with the replication link cut (both nodes up,
corosync untouched) no answer leaves the primary; the pair heals when the link
returns and the held request is answered then (issue 8, scenario 5)."""

from __future__ import annotations

import pytest
from cluster.kemari_vm import GUEST, REPLICATION_PORT, KemariVm

from kemari_agent.kvclient import KvClient, NoReply

pytestmark = pytest.mark.cluster


def test_pcs_defined_resource_with_suspend_releases_nothing_unprotected(cluster):
    vm = KemariVm(cluster, policy="suspend")
    vm.define_with_pcs("node1")
    vm.wait_protected()
    [primary] = vm.promoted()
    with cluster.in_client(), KvClient(GUEST, attempts=50) as c:
        assert c.put("before-cut", "1").kind == "OK"
    cluster.cut_link(primary, REPLICATION_PORT)
    try:
        with cluster.in_client(), KvClient(GUEST, timeout=0.5, attempts=10) as c:
            with pytest.raises(NoReply):                     # 5 s: far past peer_timeout
                c.put("while-cut", "1", req_id="suspended-1")
            assert vm.promoted() == [primary]
            cluster.heal_link(primary)
            c.attempts = 200
            assert c.put("while-cut", "1", req_id="suspended-1").kind == "OK"
    finally:
        cluster.heal_link(primary)
    vm.wait_protected()
    with cluster.in_client(), KvClient(GUEST, attempts=50) as c:
        assert c.get("before-cut").value == "1"
        assert c.get("while-cut").value == "1"
