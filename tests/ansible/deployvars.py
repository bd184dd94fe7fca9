"""What the ansible tier deploys onto the cluster lab (inventory variables)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from cluster.kemari_vm import KemariVm

REPO = Path(__file__).resolve().parents[2]
# The lab's nodes reach no package registry: `make install` inside them takes
# its Python packages from this wheelhouse (filled once from the registry).
WHEELHOUSE = Path("/var/cache/kemari-test/wheels")

# Directories a deploy writes besides those the lab already keeps per node:
# the shipped and unpacked source and the links on the PATH (SBINDIR), so nothing a deploy
# writes on one node is visible on another or on the test host. /root too: an SSH
# session's bash reads root's ~/.bashrc, and this host's (pyenv init) can wait a
# minute on a lock other users of the machine hold.
EXTRA_PRIVATE = ("/usr/local/src", "/usr/local/sbin", "/root")
GUEST_IP = "10.213.0.50"
CONFIG = "/etc/kemari/kv1.toml"
VIP = "10.213.0.60"


def lab_vm(**overrides) -> dict:
    """The VM the tier deploys: kv on the lab bridge, replicated disk, a VIP.
    Its resource id is the one the cluster scenarios' helpers drive (vm / vm-clone)."""
    vm = {
        "name": "kv1",
        "resource": "vm",
        "nodes": ["node1", "node2"],
        "memory": "64MiB",
        "image": "kv",
        "disk": {"path": "/var/lib/kemari/kv1/disk.img", "size": "16MiB", "mode": "replicated"},
        "net": {"tap": "kemari-kv1", "bridge": "br0", "address": f"{GUEST_IP}/24",
                "mac": "52:54:00:00:00:50"},
        "replication": {"port": 7100, "heartbeat_ms": 100, "peer_timeout_ms": 1000},
        "policy": {"on_peer_loss": "continue"},
        "vip": {"ip": VIP, "cidr_netmask": 24, "nic": "br0"},
    }
    vm.update(overrides)
    return vm


LAB_VARS = {
    "kemari_vms": [lab_vm()],
    "kemari_install_environment": {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE)},
    "kemari_sbindir": "/usr/local/sbin",
    "kemari_resource_monitor_promoted": "3s",
    "kemari_resource_monitor_unpromoted": "4s",
}


def fill_wheelhouse() -> Path:
    """Wheels of what `make install` pip-installs: its tools and the package's
    dependencies (for Debian's python3, which the nodes' venv is made from)."""
    stamp = WHEELHOUSE / ".complete"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = "\n".join(["pip", "setuptools", "wheel", "cffi", *deps])
    # the stamp names what was downloaded: a new dependency fills it again
    if not stamp.exists() or stamp.read_text() != wanted:
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE),
                        *wanted.split("\n")], check=True)
        stamp.write_text(wanted)
    return WHEELHOUSE


class DeployedVm(KemariVm):
    """The cluster tier's kv1 helpers, on the VM Ansible installed and defined
    (no install or config of their own)."""

    def __init__(self, lab) -> None:
        self.lab, self.name, self.config_path = lab, "kv1", CONFIG
