"""The fence-peer handlers really write and remove the constraint in a CIB (a CIB
file through CIB_file; the cluster lab runs them against a live cluster), and
the engine's PeerFence runs real handler commands and keeps state by their
exit codes."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from agent_support import Cib, make_cib

from kemari_agent.ft.fence_peer import PeerFence

pytestmark = pytest.mark.cluster


def handler(inst, tool: str, cib, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([inst.tool(tool), *args], capture_output=True, text=True,
                          env=dict(os.environ, CIB_file=str(cib)), timeout=60)


def test_fence_and_unfence_the_constraint(inst, tmp_path):
    cib_path = make_cib(tmp_path / "cib.xml", "kv9")
    cib = Cib(cib_path)
    # the primitive's instance name (kv9:0 in a clone) finds its clone
    r = handler(inst, "kemari-fence-peer", cib_path, "--resource", "kv9:0", "--node", "node1")
    assert r.returncode == 0, r.stderr
    assert cib.fenced_for("kv9-clone") == "node1"
    loc = next(cib.root().iter("rsc_location"))
    assert loc.get("rsc") == "kv9-clone"
    rule = loc.find("rule")
    assert (rule.get("role"), rule.get("score")) == ("Promoted", "-INFINITY")
    expr = rule.find("expression")
    assert (expr.get("attribute"), expr.get("operation")) == ("#uname", "ne")
    # again (idempotent), then for the other node: still one constraint, updated
    for node in ("node1", "node2"):
        assert handler(inst, "kemari-fence-peer", cib_path, "--resource", "kv9",
                       "--node", node).returncode == 0
    assert cib.fenced_for("kv9-clone") == "node2"
    assert len(list(cib.root().iter("rsc_location"))) == 1
    # the CIB stays valid for Pacemaker's schema
    check = subprocess.run(["cibadmin", "--query"], capture_output=True, text=True,
                           env=dict(os.environ, CIB_file=str(cib_path)))
    assert check.returncode == 0
    for _ in range(2):   # unfencing an unfenced resource is fine too
        r = handler(inst, "kemari-unfence-peer", cib_path, "--resource", "kv9")
        assert r.returncode == 0, r.stderr
        assert cib.fenced_for("kv9-clone") is None


def test_a_handler_failure_is_reported(inst, tmp_path):
    missing = tmp_path / "no-cib.xml"
    r = handler(inst, "kemari-fence-peer", missing, "--resource", "kv9", "--node", "n1")
    assert r.returncode == 1 and "kemari-fence-peer: cibadmin" in r.stderr
    r = subprocess.run([inst.tool("kemari-fence-peer")], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items()
                            if k != "OCF_RESOURCE_INSTANCE"})
    assert r.returncode == 2 and "--resource is required" in r.stderr


def test_peer_fence_runs_the_handlers(tmp_path):
    marks = tmp_path / "calls"
    fence = f"sh -c 'echo fence $KEMARI_NAME $KEMARI_PEER >> {marks}'"
    unfence = f"sh -c 'echo unfence $KEMARI_NAME >> {marks}'"
    pf = PeerFence("vmA", fence, unfence)
    assert pf.fence("10.0.0.2:7100") and pf.fenced
    assert pf.fence("10.0.0.2:7100")          # already fenced: not run again
    pf.peer_in_sync("10.0.0.2:7100")
    end = time.monotonic() + 30
    while pf.fenced and time.monotonic() < end:
        time.sleep(0.05)
    assert not pf.fenced
    assert marks.read_text().splitlines() == ["fence vmA 10.0.0.2:7100", "unfence vmA"]


def test_peer_fence_failure_keeps_output_held(tmp_path):
    pf = PeerFence("vmA", "sh -c 'echo no cluster >&2; exit 3'", None)
    assert not pf.fence(None) and not pf.fenced
    assert "exited 3: no cluster" in pf.status()["error"]
    assert PeerFence("vmA", None, None).fence(None)   # no handler: nothing to do
