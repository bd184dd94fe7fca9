"""resource-agents' own checker, ocf-tester, on the installed agent: every action
including promote/demote, with a real daemon and a real KVM guest."""

from __future__ import annotations

import subprocess

import pytest
from agent_support import OCF_ROOT, Cib, make_cib, serialized_cib_tools, vm_name

pytestmark = [pytest.mark.cluster, pytest.mark.kvm]


def test_ocf_tester_passes(inst, tmp_path, vm_config):
    name = vm_name(vm_config)
    cib = make_cib(tmp_path / "cib.xml", name)
    args = [f"config={vm_config}", f"state_dir={tmp_path / 'state'}",
            f"run_dir={tmp_path / 'run'}", "CRM_meta_notify=true", "CRM_meta_clone_max=2",
            "CRM_meta_promoted_max=1", "CRM_meta_on_node=node1"]
    env = {"PATH": f"{serialized_cib_tools(cib)}:/usr/sbin:/usr/bin:/sbin:/bin",
           "OCF_ROOT": OCF_ROOT,
           "CIB_file": str(cib)}
    try:
        r = subprocess.run(["ocf-tester", "-n", name, *[x for a in args for x in ("-o", a)],
                            str(inst.agent)], env=env, capture_output=True, text=True,
                           timeout=900)
    finally:
        pid_file = tmp_path / "run" / f"{name}.pid"
        if pid_file.exists():       # a failed run may leave the daemon behind
            subprocess.run([str(inst.tool("kemari")), "stop", name], capture_output=True,
                           env={"KEMARI_RUN_DIR": str(tmp_path / "run"), **env})
    log = tmp_path / "run" / f"{name}.log"
    detail = r.stdout + r.stderr + (log.read_text()[-3000:] if log.exists() else "")
    assert r.returncode == 0, detail
    assert f"{inst.agent} passed all tests" in r.stdout, detail
    # promote ran a cold boot whose first output fenced the (absent) peer in the CIB
    assert Cib(cib).fenced_for(f"{name}-clone") == "node1"
