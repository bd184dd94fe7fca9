"""Fixtures of the ansible tier: the cluster lab with sshd in every node,
deployed once per module by ansible-playbook over SSH (paramiko)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from cluster.lab import ClusterLab
from deployvars import EXTRA_PRIVATE, LAB_VARS, fill_wheelhouse
from sshlab import Play, SshLab


class Deployment:
    """The lab, its SSH side, and the three runs of site.yml the tests look at."""

    def __init__(self, lab: ClusterLab, ssh: SshLab) -> None:
        self.lab, self.ssh = lab, ssh
        self.inventory = ssh.inventory(group_vars=LAB_VARS)
        self.runs: dict[str, Play] = {}

    def run(self, label: str, *args: str) -> Play:
        self.runs[label] = self.ssh.playbook(self.inventory, *args)
        return self.runs[label]


@pytest.fixture(scope="module")
def deployment():
    if os.geteuid() != 0:
        pytest.fail("the ansible tier needs root (the cluster lab's namespaces, mounts)")
    fill_wheelhouse()
    with ClusterLab(nodes=2, extra_private=EXTRA_PRIVATE) as lab, \
            tempfile.TemporaryDirectory(prefix="kemari-ansible-") as tmp:
        ssh = SshLab(lab, Path(tmp) / "ssh")
        try:
            ssh.setup()
            yield Deployment(lab, ssh)
        finally:
            ssh.stop()
