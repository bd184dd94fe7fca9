"""A real Pacemaker 2.1 + Corosync 3 cluster on this one machine, for the
`cluster` tests and the failover benchmark.

Each node is a network namespace (a veth into a lab bridge that lives in its
own namespace) plus private mount/UTS/IPC namespaces with its own
/etc/corosync, /var/lib/{pacemaker,corosync,kemari}, /var/log, /run, /dev/shm,
/etc/hosts, /etc/kemari, /opt/kemari and /usr/lib/ocf/resource.d/kemari
(labnode.py boots and powers off one node). Clients live in a namespace of
their own on the same lab network. Fencing is real: fence_kemari_lab powers
the victim off (every process SIGKILLed) and boots it again.

Everything started here (the anchor, every node process, the namespaces) is
ended here by PID or by the names this lab created, even when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from cluster import labnode

HERE = Path(__file__).resolve().parent
FENCE_AGENT = Path("/usr/sbin/fence_kemari_lab")   # where pacemaker-fenced looks for agents
SUBNET = "10.213.0"
CLIENT_ADDR = f"{SUBNET}.100"
CLONE_NEWNET = 0x40000000


class LabError(AssertionError):
    """The lab did not reach the state a test waits for (with what it saw)."""


def sh(*args: str, check: bool = True, timeout: float = 120,
       input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(args)} failed ({r.returncode}): "
                       f"{r.stderr.strip() or r.stdout.strip()}")
    return r


def corosync_conf(nodes: list[dict], token_ms: int) -> str:
    nodelist = "".join(f"""    node {{
        ring0_addr: {n['addr']}
        name: {n['name']}
        nodeid: {n['nodeid']}
    }}
""" for n in nodes)
    two_node = "    two_node: 1\n" if len(nodes) == 2 else ""
    return f"""totem {{
    version: 2
    cluster_name: kemarilab
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: {token_ms}
}}
nodelist {{
{nodelist}}}
quorum {{
    provider: corosync_votequorum
{two_node}}}
logging {{
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_syslog: no
    to_stderr: no
    timestamp: hires
}}
"""


class ClusterLab:
    """`with ClusterLab(...) as lab:` a booted cluster with fencing configured."""

    def __init__(self, nodes: int = 2, token_ms: int | None = None, dc_deadtime: str = "5s",
                 reboot_s: float = 20.0, extra_private: tuple[str, ...] = (),
                 bare: bool = False) -> None:
        """`bare`: nodes with the cluster packages but no cluster yet (no
        corosync.conf, no CIB): they boot and wait, as servers would before
        someone bootstraps a cluster on them; once a corosync.conf is on a
        node's disk, it starts Corosync and Pacemaker at boot (enabled units)."""
        self.bare = bare
        self.tag = f"kl{uuid.uuid4().hex[:6]}"
        self.token_ms = token_ms or int(os.environ.get("KEMARI_LAB_TOKEN_MS", "2000"))
        self.dc_deadtime = dc_deadtime
        # not under pytest's tmp_path: fence-agent metadata runs as hacluster and
        # must reach the lab's files
        self.base = Path(tempfile.mkdtemp(prefix=f"kemari-{self.tag}-"))
        os.chmod(self.base, 0o755)
        self.names = [f"node{i}" for i in range(1, nodes + 1)]
        self.spec = {
            "tag": self.tag, "bridge_ns": f"{self.tag}-br", "client_ns": f"{self.tag}-client",
            "token_ms": self.token_ms, "extra_private": list(extra_private),
            # a fenced node boots again this long after its power-off, as a real
            # server does: the survivor's failover is not disturbed by its return
            "reboot_s": reboot_s,
            "nodes": [{"name": n, "addr": f"{SUBNET}.{10 + i}", "nodeid": i}
                      for i, n in enumerate(self.names, 1)],
        }
        self.anchor: subprocess.Popen | None = None
        self.booted_at = 0.0

    # ------------------------------------------------------------ life cycle

    def __enter__(self) -> ClusterLab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        t0 = time.monotonic()
        (self.base / "lab.json").write_text(json.dumps(self.spec, indent=1))
        shutil.copy(HERE / "labnode.py", self.base / "labnode.py")
        fence_log = self.base / "fence.log"
        fence_log.touch()
        os.chmod(fence_log, 0o666)
        install_fence_agent()
        # root-namespace anchor: the fence agent (inside a node) enters the root
        # namespaces through it to boot a node (`nsenter -t 1` is denied here)
        self.anchor = subprocess.Popen(["sleep", "infinity"], start_new_session=True)
        (self.base / "anchor.pid").write_text(f"{self.anchor.pid}\n")
        self._net_up()
        for node in self.spec["nodes"]:
            self._write_disk(node)
        for name in self.names:
            self.power_on(name)
        if not self.bare:
            self.wait_online(timeout=180)
        self.booted_at = time.monotonic() - t0

    def down(self) -> None:
        lab = labnode.Lab(self.base) if (self.base / "lab.json").exists() else None
        if lab:
            # a fence agent's delayed reboot must not boot a node after this
            (self.base / "down").touch()
            for name in self.names:
                with contextlib.suppress(labnode.LabError, OSError):
                    labnode.power_off(lab, name)
            for name in self.names:
                sh("ip", "netns", "del", lab.netns(name), check=False)
        for ns in (self.spec["client_ns"], self.spec["bridge_ns"]):
            sh("ip", "netns", "del", ns, check=False)
        if self.anchor and self.anchor.poll() is None:
            self.anchor.kill()
            self.anchor.wait()
        if os.environ.get("KEMARI_LAB_KEEP"):
            print(f"cluster lab kept in {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    def _net_up(self) -> None:
        br, client = self.spec["bridge_ns"], self.spec["client_ns"]
        sh("ip", "netns", "add", br)
        sh("ip", "-n", br, "link", "set", "lo", "up")
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge",
           "forward_delay", "0", "stp_state", "0")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        sh("ip", "netns", "add", client)
        sh("ip", "-n", br, "link", "add", "v-client", "type", "veth",
           "peer", "name", "eth0", "netns", client)
        sh("ip", "-n", br, "link", "set", "v-client", "master", "br0", "up")
        sh("ip", "-n", client, "link", "set", "lo", "up")
        sh("ip", "-n", client, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0")
        sh("ip", "-n", client, "link", "set", "eth0", "up")

    def _write_disk(self, node: dict) -> None:
        """The node's disk: corosync.conf, /etc/hosts and a pre-seeded CIB
        (dc-deadtime short, fencing on, the lab fence device) so the cluster
        elects a DC and can fence within seconds of boot; only /etc/hosts and
        empty directories on a bare node."""
        disk = self.base / "nodes" / node["name"]
        root = disk / "root"
        for d in labnode.PRIVATE_DIRS:
            (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{n['addr']} {n['name']}\n" for n in self.spec["nodes"])
        (disk / "hosts").write_text(hosts)
        pcmk = root / "var/lib/pacemaker"
        for d in labnode.PACEMAKER_DIRS:
            (pcmk / d).mkdir(exist_ok=True)
        if not self.bare:       # a bare node gets its cluster from a bootstrap
            (root / "etc/corosync/corosync.conf").write_text(
                corosync_conf(self.spec["nodes"], self.token_ms))
            cib = pcmk / "cib/cib.xml"
            if node["nodeid"] == 1:
                self._seed_cib(cib)
            else:
                shutil.copy(self.base / "nodes" / self.names[0]
                            / "root/var/lib/pacemaker/cib/cib.xml", cib)
            os.chmod(cib, 0o600)
        sh("chown", "-R", "hacluster:haclient", str(pcmk))

    def _seed_cib(self, cib: Path) -> None:
        cib.write_text(sh("cibadmin", "--empty").stdout)
        env = dict(os.environ, CIB_file=str(cib))
        for name, value in (("dc-deadtime", self.dc_deadtime), ("stonith-enabled", "true"),
                            ("stonith-timeout", "60s"), ("cluster-recheck-interval", "1min")):
            subprocess.run(["crm_attribute", "-t", "crm_config", "-n", name, "-v", value],
                           env=env, check=True, capture_output=True)
        hosts = " ".join(self.names)
        fence = (f'<primitive id="lab-fence" class="stonith" type="fence_kemari_lab">'
                 f'<instance_attributes id="lab-fence-ia">'
                 f'<nvpair id="lab-fence-dir" name="lab_dir" value="{self.base}"/>'
                 f'<nvpair id="lab-fence-hosts" name="pcmk_host_list" value="{hosts}"/>'
                 f'</instance_attributes><operations>'
                 f'<op id="lab-fence-mon" name="monitor" interval="60s"/>'
                 f'</operations></primitive>')
        subprocess.run(["cibadmin", "--create", "-o", "resources", "-X", fence],
                       env=env, check=True, capture_output=True)

    # ------------------------------------------------------------ nodes

    def lab(self) -> labnode.Lab:
        return labnode.Lab(self.base)

    def power_on(self, name: str) -> int:
        return labnode.start(self.lab(), name)

    def power_off(self, name: str) -> int:
        """Pull the node's plug without telling the cluster."""
        return labnode.power_off(self.lab(), name)

    def running(self, name: str) -> bool:
        return bool(labnode.node_pids(self.lab(), name))

    def init_pid(self, name: str) -> int:
        try:
            return int((self.base / "nodes" / name / "init.pid").read_text())
        except (FileNotFoundError, ValueError):
            raise LabError(f"node {name} is booting (no init yet)") from None

    def disk(self, name: str) -> Path:
        return self.base / "nodes" / name / "root"

    def node_addr(self, name: str) -> str:
        return next(n["addr"] for n in self.spec["nodes"] if n["name"] == name)

    def exec(self, name: str, *args: str, check: bool = True, timeout: float = 120,
             input: str | None = None, net: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside node `name` (its net, mount, UTS and IPC namespaces;
        net=False keeps the host's network, e.g. for pip to reach its index)."""
        if not self.running(name):
            raise LabError(f"node {name} is powered off")
        # -r/-w: the node's own root and cwd, not its mount namespace's real root
        # (they differ when the whole lab runs in a chroot, e.g. a fresh-system check)
        ns = ["-n", "-m", "-u", "-i", "-r", "-w"] if net else ["-m", "-u", "-i", "-r", "-w"]
        return sh("nsenter", "-t", str(self.init_pid(name)), *ns, "--",
                  *args, check=check, timeout=timeout, input=input)

    def any_up(self) -> str:
        for name in self.names:
            if self.running(name):
                return name
        raise LabError("every node is powered off")

    def fence_log(self) -> str:
        return (self.base / "fence.log").read_text()

    def node_log(self, name: str, tail: int = 60) -> str:
        path = self.disk(name) / "var/log/pacemaker/pacemaker.log"
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])
        return ""

    # ------------------------------------------------------------ cluster state

    def crm_mon(self, on: str | None = None, *extra: str) -> str:
        return self.exec(on or self.any_up(), "crm_mon", "-1", *extra, check=False).stdout

    def crm_mon_xml(self, on: str | None = None) -> str:
        return self.exec(on or self.any_up(), "crm_mon", "--output-as=xml",
                         check=False).stdout

    def online(self, on: str | None = None) -> list[str]:
        xml = self.crm_mon_xml(on)
        return sorted(re.findall(r'<node name="([^"]+)"[^>]*online="true"', xml))

    def has_dc(self, on: str | None = None) -> bool:
        return 'with_quorum="true"' in self.crm_mon_xml(on) and \
            re.search(r'<current_dc present="true"', self.crm_mon_xml(on)) is not None

    def wait_online(self, names: list[str] | None = None, timeout: float = 120,
                    on: str | None = None) -> None:
        want = sorted(names or self.names)
        self.wait(lambda: self.online(on) == want and self.has_dc(on), timeout,
                  f"nodes {want} online with a DC")

    def roles(self, resource: str, on: str | None = None) -> dict[str, str]:
        """{node: role} of the instances of a clone, from crm_mon's XML."""
        xml = self.crm_mon_xml(on)
        out = {}
        for m in re.finditer(r'<resource id="([^"]+)"[^>]*role="(\w+)"[^>]*>\s*'
                             r'<node name="([^"]+)"', xml):
            if m.group(1).split(":")[0] == resource:
                out[m.group(3)] = m.group(2)
        return out

    def promoted(self, resource: str, on: str | None = None) -> list[str]:
        return sorted(n for n, r in self.roles(resource, on).items() if r in ("Promoted", "Master"))

    def wait(self, check, timeout: float, what: str, interval: float = 0.2) -> float:
        """Poll `check` until true; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(LabError, subprocess.TimeoutExpired):
                if check():
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                seen = ""
                with contextlib.suppress(LabError):
                    seen = self.crm_mon(None, "-A", "--fence-history=2")
                raise LabError(f"timed out after {timeout}s waiting for {what}\n{seen}")
            time.sleep(interval)

    def log_time(self, node: str, log: str, pattern: str, since: float) -> float | None:
        """Wall-clock time of the first line of a node's log (corosync or
        pacemaker, both with milliseconds) matching `pattern` at or after `since`."""
        path = self.disk(node) / "var/log" / log
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                stamp = parse_log_time(line)
                if stamp is not None and stamp >= since and re.search(pattern, line):
                    return stamp
        return None

    def fence_times(self, victim: str, since: float) -> tuple[float, float] | None:
        """(request, powered-off) wall-clock times of the first fence of `victim`."""
        start = off = None
        for line in self.fence_log().splitlines():
            stamp, _host, text = line.split(" ", 2)
            if float(stamp) < since or victim not in text:
                continue
            if start is None and text.startswith("action=") and "action=status" not in text:
                start = float(stamp)
            elif start is not None and text.startswith(f"off {victim}: rc=0"):
                off = float(stamp)
                return start, off
        return None

    def fenced(self, name: str, since: float) -> bool:
        """A completed fence of `name` logged after time.time() `since`."""
        for line in self.fence_log().splitlines():
            stamp, _host, *rest = line.split(" ", 2)
            if float(stamp) >= since and "done action=" in line and f"plug={name}" in line:
                return True
        return False

    # ------------------------------------------------------------ clients

    @contextlib.contextmanager
    def in_client(self) -> Iterator[None]:
        """Sockets opened in the body live in the client namespace (this thread)."""
        libc = ctypes.CDLL(None, use_errno=True)
        target = os.open(f"/run/netns/{self.spec['client_ns']}", os.O_RDONLY)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the client namespace")
            yield
        finally:
            libc.setns(own, CLONE_NEWNET)
            os.close(target)
            os.close(own)

    def client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.spec["client_ns"], *args, check=check)

    # ------------------------------------------------------------ faults

    def cut_link(self, name: str, port: int) -> None:
        """Drop TCP `port` traffic to and from node `name` (corosync stays up)."""
        drop = f"tcp dport {port} drop; tcp sport {port} drop;"
        rules = f"""table inet kemarilab {{
    chain input {{ type filter hook input priority 0; {drop} }}
    chain output {{ type filter hook output priority 0; {drop} }}
}}
"""
        self.exec(name, "nft", "-f", "-", input=rules)

    def heal_link(self, name: str) -> None:
        self.exec(name, "nft", "delete", "table", "inet", "kemarilab", check=False)


def parse_log_time(line: str) -> float | None:
    """'Nov 29 09:59:35.513 ...' (local time, no year) -> time.time() scale."""
    m = re.match(r"(\w{3} +\d+ \d\d:\d\d:\d\d)(\.\d+)", line)
    if not m:
        return None
    year = time.localtime().tm_year
    base = time.mktime(time.strptime(f"{year} {m.group(1)}", "%Y %b %d %H:%M:%S"))
    return base + float(m.group(2))


def install_fence_agent() -> None:
    """pacemaker-fenced finds agents in /usr/sbin only; the file is this repo's."""
    src = (HERE / "fence_kemari_lab").read_bytes()
    if not FENCE_AGENT.exists() or FENCE_AGENT.read_bytes() != src:
        tmp = FENCE_AGENT.with_suffix(".tmp")
        tmp.write_bytes(src)
        os.chmod(tmp, 0o755)
        os.replace(tmp, FENCE_AGENT)

