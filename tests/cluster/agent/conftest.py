"""Fixtures for the OCF agent's tests: the installed agent, a VM config whose
[replication.nodes] names two loopback "nodes", a CIB file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from agent_support import AgentNode, Install, free_tcp_port, installed, make_cib, vm_name
from helpers import free_udp_port


@pytest.fixture(scope="session")
def inst() -> Install:
    return installed()


@pytest.fixture
def vm_config(tmp_path: Path, inst: Install) -> Path:
    """One config for both nodes: each node's address comes from [replication.nodes]."""
    name = f"ag{tmp_path.name[-6:].replace('_', '').replace('-', '')}"[:12]
    key = tmp_path / "vm.key"
    subprocess.run([inst.tool("kemari"), "keygen", str(key)], check=True, capture_output=True)
    config = tmp_path / "vm.toml"
    config.write_text(f"""name = "{name}"
memory_mib = 16
image = "kv"
[disk]
path = "{tmp_path / 'shared-disk.img'}"
size_mib = 16
[net]
forward = "127.0.0.1:{free_udp_port()}"
[replication]
key_file = "{key}"
heartbeat_ms = 100
peer_timeout_ms = 1000
[replication.nodes]
node1 = "127.0.0.1:{free_tcp_port()}"
node2 = "127.0.0.1:{free_tcp_port()}"
""")
    return config


@pytest.fixture
def cluster_nodes(tmp_path: Path, inst: Install, vm_config: Path):
    """(node1, node2, cib path) sharing one CIB file; every daemon killed at the end."""
    name = vm_name(vm_config)
    cib = make_cib(tmp_path / "cib.xml", name)
    nodes = [AgentNode(inst, tmp_path, n, vm_config, cib, name) for n in ("node1", "node2")]
    try:
        yield nodes[0], nodes[1], cib
    finally:
        for n in nodes:
            n.kill()
