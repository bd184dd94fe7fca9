"""site.yml deploys Kemari onto the cluster lab's nodes over SSH (paramiko),
testinfra checks every node the way an operator would, a second run and a
--check --diff run change nothing, and the deployed cluster survives the
power-off of its Promoted node.

The tests of this module run in order on one deployment (module fixture).
"""

from __future__ import annotations

import hashlib
import re
import time

import pytest
import testinfra
from cluster.kemari_vm import CLONE, RESOURCE
from deployvars import CONFIG, VIP, DeployedVm

pytestmark = pytest.mark.ansible

PREFIX = "/opt/kemari"
AGENT = "/usr/lib/ocf/resource.d/kemari/vm"
KEY = "/etc/kemari/kv1.key"
DTD = "/usr/share/resource-agents/ra-api-1.dtd"


def hosts(deployment) -> dict[str, testinfra.host.Host]:
    """testinfra over paramiko to every node, connected from the lab's client side."""
    lab, ssh = deployment.lab, deployment.ssh
    out = {}
    with lab.in_client():
        for name in lab.names:
            host = testinfra.get_host(
                f"paramiko://root@{lab.node_addr(name)}",
                ssh_identity_file=str(ssh.client_key), strict_host_key_checking=False)
            host.run("true")   # opens the connection inside the client namespace
            out[name] = host
    return out


def test_first_run_deploys_every_node(deployment):
    t0 = time.monotonic()
    play = deployment.run("first")
    print(f"first run: {time.monotonic() - t0:.0f} s")
    assert play.rc == 0 and play.failed() == 0, play
    assert set(play.recap) == set(deployment.lab.names), play
    assert all(h["changed"] > 0 for h in play.recap.values()), play
    # the key went through no_log tasks: its PEM never shows in the output
    assert "PRIVATE KEY" not in play.output


def test_second_run_changes_nothing(deployment):
    play = deployment.run("second")
    assert play.rc == 0 and play.failed() == 0, play
    assert play.changed() == 0, play


def test_check_diff_on_the_deployed_cluster_reports_no_change(deployment):
    play = deployment.run("check", "--check", "--diff")
    assert play.rc == 0 and play.failed() == 0, play
    assert play.changed() == 0, play
    assert "PRIVATE KEY" not in play.output


def test_every_node_has_its_own_install(deployment):
    lab = deployment.lab
    for name, host in hosts(deployment).items():
        python = host.file(f"{PREFIX}/bin/python3")
        assert python.exists and python.linked_to == "/usr/bin/python3.11", name
        imported = host.run(f"{PREFIX}/bin/python3 -c 'import kemari_agent, "
                            "kemari_agent._native as n; print(n.__file__)'")
        assert imported.rc == 0 and imported.stdout.startswith(PREFIX), (name, imported.stderr)
        agent = host.file(AGENT)
        assert agent.is_file and agent.user == "root" and agent.mode & 0o111 == 0o111, name
        assert agent.content_string.splitlines()[0] == f"#!{PREFIX}/bin/python3", name
        assert host.file("/usr/local/sbin/kemari").linked_to == f"{PREFIX}/bin/kemari", name
        assert host.run("kemari --help").rc == 0, name
        # what the deploy wrote is on this node's own disk, nowhere else
        assert (lab.disk(name) / "opt/kemari/.kemari-source-sha1").is_file(), name
        assert (lab.disk(name) / "usr/lib/ocf/resource.d/kemari/vm").is_file(), name
        assert (lab.disk(name) / "usr/local/src/kemari.tar.gz").is_file(), name
        assert (lab.disk(name) / "usr/local/sbin/kemari").is_symlink(), name


def test_agent_metadata_validates_against_the_ra_api_dtd(deployment):
    for name, host in hosts(deployment).items():
        meta = host.run("crm_resource --show-metadata ocf:kemari:vm > /run/vm-meta.xml && "
                        f"xmllint --noout --dtdvalid {DTD} /run/vm-meta.xml")
        assert meta.rc == 0, (name, meta.stderr)
        assert '<resource-agent name="vm"' in host.file("/run/vm-meta.xml").content_string


def test_replication_key_is_private_and_identical_on_the_pair(deployment):
    digests = set()
    for name, host in hosts(deployment).items():
        key = host.file(KEY)
        assert key.is_file and key.mode == 0o600, (name, oct(key.mode))
        assert key.user == "root" and key.group == "root", name
        digests.add(hashlib.sha256(key.content).hexdigest())
    assert len(digests) == 1


def test_config_is_present_and_accepted_by_kemari(deployment):
    for name, host in hosts(deployment).items():
        config = host.file(CONFIG)
        assert config.is_file and config.mode == 0o644, name
        text = config.content_string
        assert 'node1 = "10.213.0.11"' in text and 'node2 = "10.213.0.12"' in text, text
        parsed = host.run(f"{PREFIX}/bin/python3 -c 'from kemari_agent.config import "
                          f"load_config; c = load_config(\"{CONFIG}\"); print(c.memory_mib, "
                          "c.disk.size_mib, c.replication.port)'")
        assert parsed.rc == 0 and parsed.stdout.split() == ["64", "16", "7100"], parsed.stderr


def test_resource_promoted_on_exactly_one_node(deployment):
    lab = deployment.lab
    vm = DeployedVm(lab)
    vm.wait_protected(timeout=240)
    assert len(vm.promoted()) == 1
    assert sorted(lab.roles(RESOURCE).values()) == ["Promoted", "Unpromoted"]
    cib = lab.exec(lab.names[0], "cibadmin", "--query", "--scope", "resources").stdout
    assert f'<clone id="{CLONE}"' in cib and 'name="promotable" value="true"' in cib
    lab.wait(lambda: vip_node(lab) == vm.promoted(), 60, "VIP beside the Promoted instance")
    assert f"inet {VIP}/24" in lab.exec(vm.promoted()[0], "ip", "-4", "addr", "show", "br0").stdout


def test_power_off_of_the_promoted_node_fails_over_the_deployed_vm(deployment):
    """Scenario 2 of the cluster tier against what Ansible deployed: under load,
    pull the Promoted node's plug; it is fenced, the other is promoted, the
    guest answers again at its address and nothing acknowledged is lost."""
    lab = deployment.lab
    vm = DeployedVm(lab)
    vm.wait_protected(timeout=240)
    victim = vm.promoted()[0]
    survivor = next(n for n in lab.names if n != victim)
    clients = vm.clients(3).start()
    try:
        clients.wait_progress(30)
        acked_before = clients.snapshot()
        since = time.time()
        lab.power_off(victim)
        lab.wait(lambda: lab.fenced(victim, since), 90, f"{victim} fenced")
        lab.wait(lambda: vm.promoted(on=survivor) == [survivor], 120,
                 f"{RESOURCE} promoted on {survivor}")
        clients.wait_progress(30, timeout=120)
    finally:
        clients.stop()
    assert vm.check_invariants(clients, acked_before) == []
    lab.wait(lambda: vip_node(lab, on=survivor) == [survivor], 60, "VIP moved to the survivor")


def vip_node(lab, on: str | None = None) -> list[str]:
    """Nodes where the VIP resource runs, from crm_mon's XML."""
    xml = lab.crm_mon_xml(on)
    return sorted(re.findall(rf'<resource id="{RESOURCE}-vip"[^>]*role="Started"[^>]*>\s*'
                             r'<node name="([^"]+)"', xml))

