"""Bad inventory variables stop site.yml at its first task, before any node is
touched, with a message naming the VM and the key.

The inventory points at a loopback port where nothing listens: had a check
let the play go on, the next task would fail as unreachable instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deployvars import lab_vm
from sshlab import PLAYBOOK_DIR, Play

pytestmark = pytest.mark.ansible

VENV_BIN = Path(sys.executable).parent


def play_with(tmp_path: Path, group_vars: dict) -> Play:
    hosts = {n: {"ansible_host": "127.0.0.1", "ansible_port": 9} for n in ("node1", "node2")}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"children": {"kemari_nodes": {
        "hosts": hosts, "vars": {"ansible_connection": "paramiko", **group_vars}}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(PLAYBOOK_DIR / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"))
    r = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory),
                        str(PLAYBOOK_DIR / "site.yml")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=PLAYBOOK_DIR)
    return Play(r.returncode, r.stdout + r.stderr)


def broken(name: str, **fault) -> dict:
    return lab_vm(name=name, **fault)


# one VM per fault: a single run must report every one of them
BROKEN_VMS = [
    (broken("one-node", nodes=["node1"]),
     "VM 'one-node': 'nodes' must list exactly two different inventory hosts"),
    (broken("same-node", nodes=["node1", "node1"]),
     "VM 'same-node': 'nodes' must list exactly two different inventory hosts"),
    (broken("stranger", nodes=["node1", "node7"]),
     "VM 'stranger': 'nodes' names ['node7'], not hosts of this play"),
    (broken("windows", image="windows"), "VM 'windows': unknown image 'windows'"),
    (broken("lots", memory="lots"), "VM 'lots': 'memory' 'lots' is not a size"),
    (broken("odd", memory="63MiB"), "VM 'odd': 'memory' must be an even number of MiB"),
    (broken("parsecs", disk={"path": "/var/lib/kemari/p/disk.img", "size": "12 parsecs"}),
     "VM 'parsecs': 'disk.size' '12 parsecs' is not a size"),
    (broken("policy", policy={"on_peer_loss": "pray"}),
     "VM 'policy': 'policy.on_peer_loss' must be one of continue, suspend, not 'pray'"),
    (broken("kv 1"), "kemari_vms[8].name must be"),
    (broken("one-node"), "VM 'one-node' is defined more than once"),
]


def assert_stopped_by_the_checks(play: Play) -> None:
    assert play.rc != 0, play
    assert "TASK [kemari : Check kemari_vms (names, pairs, images, sizes)]" in play.output
    failed = play.output.split("fatal: [", 1)[1].split("\n", 1)[0]
    assert "]: FAILED!" in failed, play
    assert "UNREACHABLE" not in play.output, play
    assert all(h["changed"] == 0 and h["unreachable"] == 0 for h in play.recap.values()), play


def test_missing_vms_stop_the_play_at_the_first_task(tmp_path):
    play = play_with(tmp_path, {})
    assert_stopped_by_the_checks(play)
    assert "kemari_vms is missing or empty" in play.output, play


def test_every_bad_vm_is_named_before_any_node_is_touched(tmp_path):
    play = play_with(tmp_path, {"kemari_vms": [vm for vm, _ in BROKEN_VMS]})
    assert_stopped_by_the_checks(play)
    missing = [message for _, message in BROKEN_VMS if message not in play.output]
    assert missing == [], play


def test_a_good_inventory_gets_past_the_checks(tmp_path):
    """The control case: valid variables pass every check and the play goes on
    to the nodes (here unreachable), so the checks above are what stopped it."""
    play = play_with(tmp_path, {"kemari_vms": [lab_vm()]})
    assert play.rc != 0
    assert "UNREACHABLE" in play.output, play
    assert "kemari_vms is missing" not in play.output


def test_cluster_bootstrap_checks_its_variables_first(tmp_path):
    play = play_with(tmp_path, {"kemari_vms": [lab_vm()], "kemari_cluster_bootstrap": True,
                                "kemari_cluster_service_method": "upstart"})
    assert play.rc != 0, play
    assert "TASK [kemari_cluster : Check the cluster variables]" in play.output, play
    assert "service method must be systemd or command" in play.output, play
    assert "UNREACHABLE" not in play.output, play
