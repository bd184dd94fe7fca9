"""The agent's meta-data: valid OCF (ra-api-1.dtd), readable as `nobody`, and
what crm and pcs show users (`crm ra list/info`, `pcs resource describe`), with
the installed agent bind-mounted where Pacemaker looks for it."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from agent_support import OCF_ROOT

pytestmark = pytest.mark.cluster

DTD = "/usr/share/resource-agents/ra-api-1.dtd"


def meta_data(inst) -> str:
    r = subprocess.run([str(inst.agent), "meta-data"], capture_output=True, text=True,
                       env={"OCF_ROOT": OCF_ROOT}, timeout=60, check=True)
    return r.stdout


def test_meta_data_is_valid_ocf(inst, tmp_path):
    xml = tmp_path / "vm.xml"
    xml.write_text(meta_data(inst))
    r = subprocess.run(["xmllint", "--noout", "--dtdvalid", DTD, str(xml)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    root = ET.parse(xml).getroot()
    assert root.get("name") == "vm" and root.findtext("version") == "1.1"
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert params["config"].get("required") == "1"
    for p in params.values():
        assert len(p.findtext("longdesc").strip()) > 40, p.get("name")
    assert params["fence_peer"].find("content").get("default") == "true"
    monitors = {a.get("role"): a.get("interval") for a in root.iter("action")
                if a.get("name") == "monitor"}
    assert set(monitors) == {"Promoted", "Unpromoted"}
    assert monitors["Promoted"] != monitors["Unpromoted"]
    actions = {a.get("name") for a in root.iter("action")}
    assert {"start", "stop", "promote", "demote", "notify", "validate-all",
            "meta-data"} <= actions
    # no reloadable parameter, so no reload-agent action (and the DTD has none)
    assert "reload-agent" not in actions


def test_meta_data_runs_as_nobody(inst):
    r = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c",
                        f"OCF_ROOT={OCF_ROOT} {inst.agent} meta-data"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "<resource-agent" in r.stdout, r.stderr


def in_ocf_tree(inst, tmp_path: Path, command: str) -> subprocess.CompletedProcess:
    """Run `command` in a private mount namespace where /usr/lib/ocf/resource.d holds
    Debian's agents plus ours, as `make install` lays them out on a node."""
    tree = tmp_path / "resource.d"
    tree.mkdir()
    for entry in os.listdir(f"{OCF_ROOT}/resource.d"):
        if entry != "kemari":
            (tree / entry).symlink_to(f"{OCF_ROOT}/resource.d/{entry}")
    (tree / "kemari").symlink_to(inst.agent.parent)
    script = f"mount --bind {tree} {OCF_ROOT}/resource.d && {command}"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, timeout=120)


def test_crm_lists_and_describes_the_agent(inst, tmp_path):
    r = in_ocf_tree(inst, tmp_path, "crm ra list ocf kemari && crm ra info ocf:kemari:vm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vm" in r.stdout.split()
    assert "Kemari fault-tolerant VM" in r.stdout and "config*" in r.stdout


def test_pcs_describes_the_agent(inst, tmp_path):
    r = in_ocf_tree(inst, tmp_path, "pcs resource describe ocf:kemari:vm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Kemari fault-tolerant VM" in r.stdout and "fence_peer" in r.stdout
