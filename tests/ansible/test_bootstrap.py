"""site.yml with kemari_cluster_bootstrap on nodes that have no cluster yet
(the lab's bare nodes: the cluster packages, no corosync.conf, no CIB, no
daemon running): the kemari_cluster role forms the cluster (authkey,
corosync.conf, Corosync and Pacemaker started, properties, a fence device),
then the other roles deploy the VM onto it. A second run changes nothing.

The tests of this module run in order on one deployment (module fixture).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
from pathlib import Path

import pytest
from cluster.kemari_vm import RESOURCE
from cluster.lab import ClusterLab
from deployvars import EXTRA_PRIVATE, LAB_VARS, DeployedVm, fill_wheelhouse
from sshlab import SshLab

pytestmark = pytest.mark.ansible

# The role's `command` start method, as the lab's nodes have no systemd:
# Corosync in the background, Pacemaker once Corosync answers.
START = ("setsid -f sh -c 'corosync -f & until corosync-cfgtool -s >/dev/null 2>&1; "
         "do sleep 0.2; done; exec env PCMK_logfacility=none pacemakerd' "
         "</dev/null >/dev/null 2>&1")


def bootstrap_vars(lab: ClusterLab) -> dict:
    return {
        **LAB_VARS,
        "kemari_cluster_bootstrap": True,
        "kemari_cluster_service_method": "command",
        "kemari_cluster_start_command": START,
        "kemari_cluster_token_ms": lab.token_ms,
        # The lab's nodes reach no mirror: what apt installs must be there already
        # (`make test` installs these). The fence agent is the lab's, not fence-agents'.
        "kemari_cluster_packages": ["pacemaker", "pacemaker-cli-utils", "corosync", "pcs",
                                    "resource-agents"],
        "kemari_cluster_properties": {"stonith-enabled": "true", "stonith-timeout": "60s",
                                      "dc-deadtime": "5s"},
        "kemari_cluster_stonith": [{
            "name": "lab-fence", "agent": "fence_kemari_lab",
            "options": {"lab_dir": str(lab.base), "pcmk_host_list": " ".join(lab.names)},
        }],
    }


@pytest.fixture(scope="module")
def bare():
    if os.geteuid() != 0:
        pytest.fail("the ansible tier needs root (the cluster lab's namespaces, mounts)")
    fill_wheelhouse()
    with ClusterLab(nodes=2, extra_private=EXTRA_PRIVATE, bare=True) as lab, \
            tempfile.TemporaryDirectory(prefix="kemari-bootstrap-") as tmp:
        ssh = SshLab(lab, Path(tmp) / "ssh")
        try:
            ssh.setup()
            inventory = ssh.inventory(group_vars=bootstrap_vars(lab))
            yield lab, ssh, inventory
        finally:
            ssh.stop()


def test_nodes_start_without_a_cluster(bare):
    lab, _ssh, _inv = bare
    for name in lab.names:
        assert not (lab.disk(name) / "etc/corosync/corosync.conf").exists(), name
        assert lab.exec(name, "corosync-cfgtool", "-s", check=False).returncode != 0, name


def test_bootstrap_run_forms_the_cluster(bare):
    lab, ssh, inventory = bare
    play = ssh.playbook(inventory)
    assert play.rc == 0 and play.failed() == 0, play
    assert "TASK [kemari_cluster : Start Corosync and Pacemaker (kemari_cluster_start_command)]" \
        in play.output, play
    lab.wait_online(timeout=120)
    for name in lab.names:
        assert lab.online(name) == sorted(lab.names) and lab.has_dc(name), name
    # one Corosync key, private, on every node; knet with encryption, both rings
    keys = set()
    for name in lab.names:
        key = lab.disk(name) / "etc/corosync/authkey"
        assert key.stat().st_mode & 0o777 == 0o400 and key.stat().st_uid == 0, name
        keys.add(hashlib.sha256(key.read_bytes()).hexdigest())
        assert base64.b64encode(key.read_bytes()).decode() not in play.output   # no_log
        conf = (lab.disk(name) / "etc/corosync/corosync.conf").read_text()
        assert "crypto_cipher: aes256" in conf and "two_node: 1" in conf, conf
        for other in lab.names:
            assert f"ring0_addr: {lab.node_addr(other)}" in conf, conf
    assert len(keys) == 1
    # the properties and the fence device the role was given
    node = lab.names[0]
    for prop, value in bootstrap_vars(lab)["kemari_cluster_properties"].items():
        got = lab.exec(node, "crm_attribute", "--type", "crm_config", "--name", prop,
                       "--query", "--quiet").stdout.strip()
        assert got == value, (prop, got)
    lab.wait(lambda: re.search(r'<resource id="lab-fence"[^>]*role="Started"',
                               lab.crm_mon_xml()) is not None, 60, "lab-fence started")


def test_second_run_changes_nothing(bare):
    _lab, ssh, inventory = bare
    play = ssh.playbook(inventory)
    assert play.rc == 0 and play.failed() == 0, play
    assert play.changed() == 0, play


def test_vm_promoted_on_the_bootstrapped_cluster(bare):
    lab, _ssh, _inv = bare
    vm = DeployedVm(lab)
    vm.wait_protected(timeout=240)
    assert sorted(lab.roles(RESOURCE).values()) == ["Promoted", "Unpromoted"]
