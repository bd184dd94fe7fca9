"""Running the installed OCF agent the way Pacemaker does, against a CIB file.

`make install` goes to a cache directory keyed by the sources (rebuilt when
they change): its agent's shebang names the venv made from Debian's
/usr/bin/python3, as on a cluster node. The agent and the handlers it sets
talk to the CIB through Pacemaker's tools; with CIB_file they read and write
a CIB file instead of a live cluster (the cluster lab runs the real thing).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from helpers import REPO

CACHE = Path("/var/cache/kemari-test/agent-install")
SOURCES = ("kemari_agent", "native", "ocf", "pyproject.toml", "setup.py", "Makefile")
OCF_ROOT = "/usr/lib/ocf"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_name(config: Path) -> str:
    """The VM's name: the first string of a config written by the vm_config fixture."""
    return config.read_text().split('"')[1]


class Install:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix = root / "opt"
        self.agent = root / "ocf" / "resource.d" / "kemari" / "vm"
        self.sbin = root / "sbin"

    def tool(self, name: str) -> str:
        return str(self.sbin / name)


def _source_hash() -> str:
    h = hashlib.sha256()
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                            *SOURCES], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    files += [str(p.relative_to(REPO)) for p in (REPO / "kemari_agent/images").glob("*.bin")]
    for name in sorted(set(files)):
        path = REPO / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def installed() -> Install:
    """`make install` into the cache (once per source state); 0755 all the way down so
    that ocf-tester's meta-data check as `nobody` can run it."""
    root = CACHE / _source_hash()
    inst = Install(root)
    if (root / ".done").exists():
        return inst
    if CACHE.exists():
        for old in CACHE.iterdir():           # keep the cache to the current install
            shutil.rmtree(old, ignore_errors=True)
    root.mkdir(parents=True, mode=0o755)
    for p in (root, *root.parents):
        if p == Path("/var/cache"):
            break
        p.chmod(0o755)
    subprocess.run(["make", "install", f"PREFIX={inst.prefix}",
                    f"OCF_ROOT={root / 'ocf'}", f"SBINDIR={inst.sbin}"],
                   cwd=REPO, check=True, capture_output=True, timeout=1200)
    (root / ".done").touch()
    return inst


def make_cib(path: Path, name: str, nodes: tuple[str, ...] = ("node1", "node2")) -> Path:
    """A CIB file with the nodes and VM `name` as a promotable clone `NAME-clone`."""
    env = dict(os.environ, CIB_file=str(path))
    path.write_text(subprocess.run(["cibadmin", "--empty"], capture_output=True, text=True,
                                   check=True).stdout)

    def create(scope: str, xml: str) -> None:
        subprocess.run(["cibadmin", "--create", "--scope", scope, "--xml-text", xml],
                       env=env, check=True, capture_output=True)
    for i, node in enumerate(nodes, 1):
        create("nodes", f'<node id="{i}" uname="{node}"/>')
        create("status", f'<node_state id="{i}" uname="{node}"><transient_attributes '
                         f'id="{i}"><instance_attributes id="status-{i}"/>'
                         f'</transient_attributes></node_state>')
    create("resources", f'<clone id="{name}-clone"><meta_attributes id="{name}-clone-meta">'
                        f'<nvpair id="{name}-promotable" name="promotable" value="true"/>'
                        f'<nvpair id="{name}-notify" name="notify" value="true"/>'
                        f'</meta_attributes><primitive id="{name}" class="ocf" '
                        f'provider="kemari" type="vm"/></clone>')
    return path


def cib_lock(cib: Path) -> Path:
    return cib.with_name(cib.name + ".lock")


def serialized_cib_tools(cib: Path) -> str:
    """A PATH entry whose cibadmin/crm_attribute take a lock around the real ones.

    A live CIB serializes its writers; a CIB file does not (each tool reads the
    file, changes it and writes it whole), so two nodes' agents and handlers
    writing at once could lose an update. The lock restores what a cluster does."""
    bindir = cib.parent / "cib-tools"
    bindir.mkdir(exist_ok=True)
    for tool in ("cibadmin", "crm_attribute"):
        wrapper = bindir / tool
        wrapper.write_text(f"#!/bin/sh\nexec flock {cib_lock(cib)} /usr/sbin/{tool} \"$@\"\n")
        wrapper.chmod(0o755)
    return str(bindir)


class Cib:
    def __init__(self, path: Path) -> None:
        self.path = path

    def root(self) -> ET.Element:
        with open(cib_lock(self.path), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return ET.fromstring(self.path.read_text())

    def node_attr(self, node: str, name: str, transient: bool = True) -> str | None:
        root = self.root()
        if transient:
            for state in root.iter("node_state"):
                if state.get("uname") == node:
                    for nv in state.iter("nvpair"):
                        if nv.get("name") == name:
                            return nv.get("value")
            return None
        for n in root.iter("node"):
            if n.get("uname") == node:
                for nv in n.iter("nvpair"):
                    if nv.get("name") == name:
                        return nv.get("value")
        return None

    def score(self, node: str, resource: str) -> int | None:
        value = self.node_attr(node, f"master-{resource}")
        return int(value) if value is not None else None

    def fenced_for(self, clone: str) -> str | None:
        for loc in self.root().iter("rsc_location"):
            if loc.get("id") == f"kemari-fence-{clone}":
                return loc.find("rule/expression").get("value")
        return None


class AgentNode:
    """One cluster node's view: the agent run with its own state/run dirs and name."""

    def __init__(self, inst: Install, base: Path, node: str, config: Path, cib: Path,
                 resource: str, meta: dict[str, str] | None = None) -> None:
        self.inst, self.node, self.config, self.resource = inst, node, config, resource
        self.state_dir, self.run_dir = base / node / "state", base / node / "run"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, OCF_ROOT=OCF_ROOT, OCF_RESOURCE_INSTANCE=resource,
                        CIB_file=str(cib), OCF_RESKEY_config=str(config),
                        OCF_RESKEY_state_dir=str(self.state_dir),
                        OCF_RESKEY_run_dir=str(self.run_dir),
                        OCF_RESKEY_CRM_meta_on_node=node,
                        KEMARI_STATE_DIR=str(self.state_dir), KEMARI_RUN_DIR=str(self.run_dir))
        self.env["PATH"] = serialized_cib_tools(cib) + ":" + self.env.get("PATH", "/usr/bin")
        self.env.update({f"OCF_RESKEY_CRM_meta_{k}": v for k, v in
                         (meta if meta is not None else {"notify": "true", "clone_max": "2",
                                                         "promoted_max": "1"}).items()})
        self.pids: set[int] = set()

    def run(self, action: str, timeout: float = 200, **extra: str) -> subprocess.CompletedProcess:
        if action == "monitor":     # a recurring monitor unless the test asks for a probe
            extra.setdefault("OCF_RESKEY_CRM_meta_interval", "10000")
        env = dict(self.env, **extra)
        r = subprocess.run([str(self.inst.agent), action], env=env, capture_output=True,
                           text=True, timeout=timeout)
        pid = self.pid()
        if pid:
            self.pids.add(pid)
        return r

    def kemari(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([self.inst.tool("kemari"), *args], env=self.env,
                           capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"{self.node}: kemari {' '.join(args)}: {r.stderr}")
        return r

    def status(self, name: str) -> dict:
        return json.loads(self.kemari("status", name, "--json", check=False).stdout)

    def pid(self) -> int | None:
        for pid_file in self.run_dir.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                return int(pid_file.read_text().strip())
        return None

    def log(self) -> str:
        logs = list(self.run_dir.glob("*.log"))
        return logs[0].read_text(errors="replace")[-4000:] if logs else "(no log)"

    def kill(self) -> None:
        """Every daemon this node started, SIGKILLed by pid (a power-off)."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        for leftover in (*self.run_dir.glob("*.sock"), *self.run_dir.glob("*.pid")):
            leftover.unlink(missing_ok=True)


def wait_for(what: str, check, timeout: float = 90.0, interval: float = 0.3, detail=None):
    """Poll check() until true; on timeout the error carries detail() (e.g. a log)."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f"\n{detail()}" if detail else ""))
        time.sleep(interval)
