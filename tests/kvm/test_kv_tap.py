"""The kv guest on a TAP device, reached from a client in another network namespace."""

from __future__ import annotations

import pytest
from helpers import kv_config, start_kv
from kv_checks import check_all

from kemari_agent.kvclient import KvClient

pytestmark = pytest.mark.kvm


def test_client_namespace_reaches_guest_over_tap(netlab, kdirs):
    cfg = kv_config(kdirs, name="tap1", net=f"""[net]
tap = "{netlab.tap}"
bridge = "{netlab.bridge}"
address = "{netlab.guest_ip}/24"
mac = "52:54:00:aa:bb:50"
""")
    proc = start_kv(kdirs, cfg, netns=netlab.host_ns)
    try:
        ping = netlab.exec_client("ping", "-c", "3", "-i", "0.2", "-W", "2", netlab.guest_ip,
                                  check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "3 received" in ping.stdout
        neigh = netlab.exec_client("ip", "neigh", "show", netlab.guest_ip).stdout
        assert "52:54:00:aa:bb:50" in neigh            # the guest answered ARP itself
        with netlab.in_client(), KvClient((netlab.guest_ip, 7000)) as c:
            check_all(c)
        big = netlab.exec_client("ping", "-c", "1", "-s", "1400", "-W", "2", netlab.guest_ip,
                                 check=False)
        assert big.returncode == 0, big.stdout        # full-size frames both ways
    finally:
        assert proc.stop() == 0, proc.output()
