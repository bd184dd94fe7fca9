"""The `ocf:kemari:vm` resource on the cluster lab: each node's own install,
the VM's config and key in each node's /etc/kemari, the resource defined the
way users do (crmsh or pcs), and kv clients in the lab's client namespace.
Used by the scenario tests and the failover benchmark."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from cluster.lab import ClusterLab, LabError

from kemari_agent.kvload import Clients, check_acked_puts, check_counter

REPO = Path(__file__).resolve().parents[2]
RESOURCE, CLONE = "vm", "vm-clone"
GUEST_IP = "10.213.0.50"
GUEST = (GUEST_IP, 7000)
REPLICATION_PORT = 7100
KEMARI = "/opt/kemari/bin/kemari"
# what `make install` writes inside a node: copied from the first node to the others
INSTALLED = ("opt/kemari", "usr/lib/ocf/resource.d/kemari")


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
mac = "52:54:00:00:00:50"

[replication]
port = {REPLICATION_PORT}
key_file = "/etc/kemari/{name}.key"
heartbeat_ms = 100
peer_timeout_ms = 1000

[policy]
on_peer_loss = "{policy}"
"""


class KemariVm:
    """The kv1 VM as a promotable clone on `lab`."""

    def __init__(self, lab: ClusterLab, name: str = "kv1", policy: str = "continue") -> None:
        self.lab, self.name = lab, name
        self.config_path = f"/etc/kemari/{name}.toml"
        self.install()
        self.write_config(policy)

    # ------------------------------------------------------------ setup

    def install(self) -> None:
        """`make install` inside the first node (its private /opt/kemari and OCF
        provider dir), then the same files onto the others' disks, as a deploy
        of one package to every node would."""
        first, *others = self.lab.names
        r = self.lab.exec(first, "make", "-C", str(REPO), "install", check=False, timeout=900)
        if r.returncode != 0:
            raise LabError(f"make install on {first}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        for node in others:
            for rel in INSTALLED:
                dst = self.lab.disk(node) / rel
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(self.lab.disk(first) / rel, dst, symlinks=True)

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

    def define_with_crm(self, on: str) -> None:
        self.lab.exec(on, "crm", "configure", "primitive", RESOURCE, "ocf:kemari:vm",
                      "params", f"config={self.config_path}",
                      "op", "monitor", "interval=3s", "role=Promoted", "timeout=30s",
                      "op", "monitor", "interval=4s", "role=Unpromoted", "timeout=30s",
                      "op", "start", "timeout=60s", "op", "promote", "timeout=60s",
                      "op", "demote", "timeout=60s", "op", "stop", "timeout=60s")
        self.lab.exec(on, "crm", "configure", "clone", CLONE, RESOURCE, "meta",
                      "promotable=true", "promoted-max=1", "promoted-node-max=1",
                      "clone-max=2", "clone-node-max=1", "notify=true")

    def define_with_pcs(self, on: str) -> None:
        self.lab.exec(on, "pcs", "resource", "create", RESOURCE, "ocf:kemari:vm",
                      f"config={self.config_path}",
                      "op", "monitor", "interval=3s", "role=Promoted", "timeout=30s",
                      "op", "monitor", "interval=4s", "role=Unpromoted", "timeout=30s",
                      "op", "start", "timeout=60s", "op", "promote", "timeout=60s",
                      "op", "demote", "timeout=60s", "op", "stop", "timeout=60s",
                      "promotable", "promoted-max=1", "clone-max=2", "notify=true")

    def remove(self, on: str) -> None:
        """Stop and delete the resource (both nodes' daemons end)."""
        self.lab.exec(on, "crm_resource", "--resource", CLONE, "--set-parameter",
                      "target-role", "--meta", "--parameter-value", "Stopped")
        self.lab.wait(lambda: not self.lab.roles(RESOURCE), 90, "vm stopped everywhere")
        self.lab.exec(on, "cibadmin", "--delete", "--xml-text", f'<clone id="{CLONE}"/>')
        self.lab.exec(on, "crm_resource", "--cleanup", "--resource", RESOURCE, check=False)

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
        """One Promoted, one Unpromoted, the pair in sync."""
        roles = self.lab.roles(RESOURCE)
        if sorted(roles.values()) not in (["Promoted", "Unpromoted"], ["Master", "Slave"]):
            return False
        primary = next(n for n, r in roles.items() if r in ("Promoted", "Master"))
        return self.status(primary).get("state") == "synced"

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


class LabClients(Clients):
    """kvload's clients, each thread inside the lab's client namespace."""

    def __init__(self, lab: ClusterLab, n: int) -> None:
        super().__init__(GUEST, n)
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

