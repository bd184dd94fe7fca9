"""The `ocf:kemari:vm` resource on the cluster lab: each node's own install,
the VM's config and key in each node's /etc/kemari, the resource defined the
way users do (crmsh or pcs), and kv clients in the lab's client namespace.
Used by the scenario tests and the failover benchmark."""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from cluster.lab import ClusterLab, LabError

from kemari_agent.kvload import Clients, check_acked_puts, check_counter

REPO = Path(__file__).resolve().parents[2]
RESOURCE, CLONE = "vm", "vm-clone"
GUEST_IP = "10.213.0.50"
GUEST_MAC = "52:54:00:00:00:50"
GUEST = (GUEST_IP, 7000)
REPLICATION_PORT = 7100
KEMARI = "/opt/kemari/bin/kemari"
CACHE = Path("/var/cache/kemari-test/cluster-install")
# what `make install` writes inside a node: copied from the first node to the others
INSTALLED = ("opt/kemari", "usr/lib/ocf/resource.d/kemari", "usr/local/sbin")


def vm_config(name: str, policy: str) -> str:
    """One config for every node: the agent resolves this node's and the peer's
    replication addresses from the corosync nodelist."""
    return f"""name = "{name}"
memory_mib = 64
image = "kv"

[disk]
path = "/var/lib/kemari/{name}/disk.img"
size_mib = 16
mode = "replicated"

[net]
tap = "kemari-{name}"
bridge = "br0"
address = "{GUEST_IP}/24"
mac = "{GUEST_MAC}"

[replication]
port = {REPLICATION_PORT}
key_file = "/etc/kemari/{name}.key"
heartbeat_ms = 100
peer_timeout_ms = 1000

[policy]
on_peer_loss = "{policy}"
"""


def source_digest() -> str:
    """What `make install` is built from: every tracked or new file that ships."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "kemari_agent", "native", "ocf",
         "setup.py", "pyproject.toml", "Makefile"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    h = hashlib.sha256()
    for f in sorted(files):
        path = REPO / f
        if path.is_file():
            h.update(f.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def staged_install() -> Path:
    """`make install DESTDIR=...` of this source, cached under /var/cache/kemari-test."""
    stage = CACHE / source_digest()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:       # one build at a time (tests, bench)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stage / "done").exists():
            _build_stage(stage)
    return stage


def _build_stage(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    r = subprocess.run(["make", "-C", str(REPO), "install", f"DESTDIR={stage}",
                        "SBINDIR=/usr/local/sbin"], capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise LabError(f"make install DESTDIR={stage}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    for old in CACHE.iterdir():                  # keep only the current version
        if old != stage and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    (stage / "done").touch()


class KemariVm:
    """The kv1 VM as a promotable clone on `lab`."""

    def __init__(self, lab: ClusterLab, name: str = "kv1", policy: str = "continue") -> None:
        self.lab, self.name = lab, name
        self.config_path = f"/etc/kemari/{name}.toml"
        self.install()
        self.write_config(policy)

    # ------------------------------------------------------------ setup

    def install(self) -> None:
        """Each node's own copy of one `make install` (the package deploy users do),
        staged once per source version under the test cache (a venv build takes
        minutes on a loaded machine)."""
        stage = staged_install()
        for node in self.lab.names:
            for rel in INSTALLED:
                # into the directory itself: a running node has it bind-mounted
                dst = self.lab.disk(node) / rel
                for old in dst.iterdir():
                    if old.is_dir() and not old.is_symlink():
                        shutil.rmtree(old)
                    else:
                        old.unlink()
                shutil.copytree(stage / rel, dst, symlinks=True, dirs_exist_ok=True)

    def write_config(self, policy: str) -> None:
        first = self.lab.names[0]
        key = self.lab.disk(first) / f"etc/kemari/{self.name}.key"
        if not key.exists():
            self.lab.exec(first, KEMARI, "keygen", f"/etc/kemari/{self.name}.key")
        for node in self.lab.names:
            etc = self.lab.disk(node) / "etc/kemari"
            if node != first:
                shutil.copy2(key, etc / key.name)
            (etc / f"{self.name}.toml").write_text(vm_config(self.name, policy))
            # each node's replicated disk: created explicitly, as an operator (or the
            # Ansible role) does; a daemon never creates a missing disk
            disk_dir = self.lab.disk(node) / f"var/lib/kemari/{self.name}"
            if not (disk_dir / "disk.img").exists():
                disk_dir.mkdir(parents=True, exist_ok=True)
                self.lab.exec(node, KEMARI, "create-disk", self.config_path)

    def define_with_crm(self, on: str) -> None:
        """One crm session, so the primitive never exists outside its clone."""
        script = f"""primitive {RESOURCE} ocf:kemari:vm params config={self.config_path} \\
    op monitor interval=3s role=Promoted timeout=30s \\
    op monitor interval=4s role=Unpromoted timeout=30s \\
    op start timeout=60s op stop timeout=60s op promote timeout=60s op demote timeout=60s
clone {CLONE} {RESOURCE} meta promotable=true promoted-max=1 promoted-node-max=1 \\
    clone-max=2 clone-node-max=1 notify=true
commit
"""
        self.lab.exec(on, "crm", "-w", "configure", input=script)

    def define_with_pcs(self, on: str) -> None:
        self.lab.exec(on, "pcs", "resource", "create", RESOURCE, "ocf:kemari:vm",
                      f"config={self.config_path}",
                      "op", "monitor", "interval=3s", "role=Promoted", "timeout=30s",
                      "op", "monitor", "interval=4s", "role=Unpromoted", "timeout=30s",
                      "op", "start", "timeout=60s", "op", "promote", "timeout=60s",
                      "op", "demote", "timeout=60s", "op", "stop", "timeout=60s",
                      "promotable", "promoted-max=1", "clone-max=2", "notify=true")

    # ------------------------------------------------------------ state

    def status(self, node: str) -> dict:
        r = self.lab.exec(node, KEMARI, "status", self.name, "--json", check=False)
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return {"role": "unknown", "error": r.stderr.strip()}

    def promoted(self, on: str | None = None) -> list[str]:
        return self.lab.promoted(RESOURCE, on)

    def protected(self) -> bool:
        """One Promoted, one Unpromoted, the pair in sync, and the Unpromoted node
        promotable again: after a resync the primary lifts its fence-peer
        constraint in the background, and a primary lost before that leaves
        the cluster nothing it may promote (docs/cluster.md)."""
        roles = self.lab.roles(RESOURCE)
        if sorted(roles.values()) not in (["Promoted", "Unpromoted"], ["Master", "Slave"]):
            return False
        primary = next(n for n, r in roles.items() if r in ("Promoted", "Master"))
        status = self.status(primary)
        return status.get("state") == "synced" and \
            not (status.get("peer_fence") or {}).get("fenced")

    def wait_protected(self, timeout: float = 180) -> float:
        return self.lab.wait(self.protected, timeout, "vm Promoted + Unpromoted, in sync")

    def attributes(self, on: str | None = None) -> str:
        return self.lab.crm_mon(on, "-A")

    def answers(self) -> bool:
        with self.lab.in_client():
            from kemari_agent.kvclient import KvClient, NoReply
            with KvClient(GUEST, timeout=0.3, attempts=3) as c:
                try:
                    return c.get("probe").kind in ("VAL", "NONE")
                except NoReply:
                    return False

    def promotion_history(self, node: str) -> list[str]:
        log = self.lab.node_log(node, tail=4000)
        return re.findall(r"Result of promote operation for " + RESOURCE + r"\S* on (\S+): ok",
                          log)

    # ------------------------------------------------------------ clients

    def clients(self, n: int = 3) -> LabClients:
        return LabClients(self.lab, n)

    def check_invariants(self, clients: LabClients, acked_before: list[dict]) -> list[str]:
        """DESIGN.md section 7 from the clients' own records."""
        problems = [e for r in clients.records for e in r.errors]
        with self.lab.in_client():
            problems += check_acked_puts(GUEST, acked_before)
            problems += check_acked_puts(GUEST, clients.snapshot())
            problems += check_counter(GUEST, clients.records)
        return problems


class GarpListener:
    """Records, from the client namespace, ARP announcements of the guest's IP
    (the gratuitous ARP a promoted node sends): [(sender MAC, time.time())]."""

    def __init__(self, lab: ClusterLab) -> None:
        self.lab, self.seen = lab, []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)

    def __enter__(self) -> GarpListener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=5)

    def announced_since(self, since: float) -> bool:
        return any(when >= since and mac == GUEST_MAC for mac, when in self.seen)

    def _listen(self) -> None:
        with self.lab.in_client():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
        s.settimeout(0.1)
        guest = socket.inet_aton(GUEST_IP)
        with s:
            while not self.stop_flag.is_set():
                try:
                    frame = s.recv(128)
                except TimeoutError:
                    continue
                _op, sha, spa, _tha, tpa = struct.unpack_from("!6xH6s4s6s4s", frame, 14)
                if spa == guest and tpa == guest:
                    self.seen.append((sha.hex(":"), time.time()))


class LabClients(Clients):
    """kvload's clients, each thread inside the lab's client namespace."""

    def __init__(self, lab: ClusterLab, n: int) -> None:
        super().__init__(GUEST, n, patience_s=120)    # fencing + promotion on a loaded box
        self.lab = lab

    def _run(self, n: int) -> None:
        with self.lab.in_client():
            super()._run(n)

    def acked_count(self) -> int:
        with self.lock:
            return sum(len(r.incr_values) for r in self.records)

    def wait_progress(self, more: int = 20, timeout: float = 90) -> None:
        """Until the clients got `more` answers than now (the guest answers)."""
        start, end = self.acked_count(), time.monotonic() + timeout
        while self.acked_count() < start + more:
            if time.monotonic() > end:
                errors = [e for r in self.records for e in r.errors]
                raise LabError(f"clients made no progress in {timeout}s: {errors[-3:]}")
            time.sleep(0.1)

