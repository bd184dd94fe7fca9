"""One lab node's life: its network namespace, its private directories, its
boot (corosync + pacemakerd in the foreground) and its power-off.

Standard library only, and run by Debian's /usr/bin/python3: the lab's fence
agent calls it from inside another node (`labnode.py --lab DIR start NODE`),
where nothing of the test's virtualenv exists.

A node is a network namespace plus private mount/UTS/IPC namespaces. There is
no PID namespace on purpose: a fence agent running inside one node must see,
and SIGKILL, the processes of another. The node's "disk" is its directory
under LAB/nodes/NAME (it survives a power-off); its RAM (/run, /dev/shm, every
process) does not.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PYTHON = "/usr/bin/python3"


class LabError(RuntimeError):
    """A node could not be started or stopped (an exception, not SystemExit: the
    tests call this module too, and pytest must see an ordinary failure)."""

SELF = Path(__file__).resolve()

# Directories every node has privately (bind-mounted from its disk). Those a
# deploy writes (/etc/kemari, /opt/kemari, the OCF provider dir) are here so a
# deploy to one node cannot be seen from another.
PRIVATE_DIRS = (
    "/etc/corosync", "/etc/kemari", "/var/lib/corosync", "/var/lib/pacemaker",
    "/var/lib/kemari", "/var/log", "/opt/kemari", "/usr/lib/ocf/resource.d/kemari",
    "/usr/local/sbin",
)
PACEMAKER_DIRS = ("cib", "pengine", "blackbox", "cores")


class Lab:
    """The lab's description, written once by the test side (lab.json)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.spec = json.loads((base / "lab.json").read_text())

    @property
    def nodes(self) -> list[dict]:
        return self.spec["nodes"]

    def node(self, name: str) -> dict:
        for n in self.nodes:
            if n["name"] == name:
                return n
        raise LabError(f"labnode: unknown node {name!r} (lab has "
                         f"{', '.join(n['name'] for n in self.nodes)})")

    def netns(self, name: str) -> str:
        return f"{self.spec['tag']}-{name}"

    def disk(self, name: str) -> Path:
        return self.base / "nodes" / name

    def extra_private(self) -> list[str]:
        return list(self.spec.get("extra_private", []))


def log(lab: Lab, text: str) -> None:
    with open(lab.base / "lab.log", "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {text}\n")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


# ---------------------------------------------------------------- processes

def netns_id(lab: Lab, name: str) -> str | None:
    """The node's current netns identity as /proc/PID/ns/net shows it."""
    with contextlib.suppress(FileNotFoundError):
        return (lab.disk(name) / "netid").read_text().strip() or None
    return None


def node_pids(lab: Lab, name: str) -> list[int]:
    """Every process living in the node's network namespace (host PID view)."""
    ident = netns_id(lab, name)
    if not ident:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/net") == ident:
                    pids.append(int(entry))
    return [p for p in pids if p != os.getpid()]


def power_off(lab: Lab, name: str, timeout: float = 20.0) -> int:
    """Pull the plug: stop every process of the node (so none can fork or send
    another packet), then SIGKILL them all. Returns how many processes died."""
    killed: set[int] = set()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = node_pids(lab, name)
        if not pids:
            return len(killed)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        killed.update(pids)
        time.sleep(0.02)
    raise LabError(f"labnode: node {name} still has processes {node_pids(lab, name)}")


# ---------------------------------------------------------------- network

def make_netns(lab: Lab, name: str) -> None:
    """A fresh network namespace for the node: eth0 (a veth into the lab
    bridge) enslaved to a local bridge br0 that carries the node's address, so a
    guest's TAP can join br0 and be reached on the lab network."""
    ns, node = lab.netns(name), lab.node(name)
    brns = lab.spec["bridge_ns"]
    run("ip", "netns", "del", ns, check=False)
    run("ip", "-n", brns, "link", "del", f"v-{name}", check=False)
    run("ip", "netns", "add", ns)
    run("ip", "-n", brns, "link", "add", f"v-{name}", "type", "veth",
        "peer", "name", "eth0", "netns", ns)
    run("ip", "-n", brns, "link", "set", f"v-{name}", "master", "br0", "up")
    for cmd in (("link", "set", "lo", "up"),
                ("link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0"),
                ("link", "set", "eth0", "master", "br0"),
                ("addr", "add", f"{node['addr']}/24", "dev", "br0"),
                ("link", "set", "eth0", "up"), ("link", "set", "br0", "up")):
        run("ip", "-n", ns, *cmd)
    ident = f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
    (lab.disk(name) / "netid").write_text(ident + "\n")


# ---------------------------------------------------------------- boot

def start(lab: Lab, name: str, timeout: float = 10.0) -> int:
    """Power the node on (from the root namespaces): fresh namespaces, then the
    node's init. Returns the init's PID; a running node is left alone."""
    if (lab.base / "down").exists():
        raise LabError(f"labnode: the lab is being torn down, {name} stays off")
    pid_file = lab.disk(name) / "init.pid"
    if node_pids(lab, name):
        return int(pid_file.read_text())
    pid_file.unlink(missing_ok=True)
    make_netns(lab, name)
    with open(lab.disk(name) / "init.log", "ab") as out:
        subprocess.Popen(
            ["ip", "netns", "exec", lab.netns(name), "unshare", "--mount", "--uts", "--ipc",
             "--propagation", "private", PYTHON, str(SELF), "--lab", str(lab.base), "init", name],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(pid_file.read_text())
        time.sleep(0.02)
    init_log = lab.disk(name) / "init.log"
    tail = init_log.read_text(errors="replace")[-2000:] if init_log.exists() else "(none)"
    raise LabError(f"labnode: node {name} did not start; {init_log} ends:\n{tail}")


def make_mountpoint(path: Path, disk: Path) -> None:
    """Create PATH to bind a private directory on. Where a parent is read-only
    (a fresh machine may have /opt mounted read-only), that parent gets a
    writable overlay inside this node's mount namespace: same contents, and
    what the node adds stays in the node's RAM."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        return
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    scratch = disk / "overlays" / parent.as_posix().strip("/").replace("/", "_")
    scratch.mkdir(parents=True, exist_ok=True)
    # upper and work on a tmpfs: overlayfs refuses some filesystems as upper
    run("mount", "-t", "tmpfs", "-o", "mode=755", "lab-overlay", str(scratch))
    (scratch / "upper").mkdir()
    (scratch / "work").mkdir()
    run("mount", "-t", "overlay", "lab-overlay", "-o",
        f"lowerdir={parent},upperdir={scratch}/upper,workdir={scratch}/work", str(parent))
    path.mkdir(parents=True, exist_ok=True)


def mount_private(lab: Lab, name: str) -> None:
    disk = lab.disk(name)
    for path in (*PRIVATE_DIRS, *lab.extra_private()):
        src = disk / "root" / path.lstrip("/")
        src.mkdir(parents=True, exist_ok=True)
        make_mountpoint(Path(path), disk)
        run("mount", "--bind", str(src), path)
    run("mount", "--bind", str(disk / "hosts"), "/etc/hosts")
    # RAM: gone at every power-off
    run("mount", "-t", "tmpfs", "-o", "mode=755", f"run-{name}", "/run")
    run("mount", "-t", "tmpfs", "-o", "mode=1777,size=256m", f"shm-{name}", "/dev/shm")
    for d in ("lock", "crm", "pacemaker", "resource-agents", "kemari", "sshd"):
        Path("/run", d).mkdir(exist_ok=True)
    os.chmod("/run/lock", 0o1777)
    os.symlink("/dev/shm", "/run/shm")
    for d in ("pacemaker/bundles", "corosync", "cluster", "crmsh", "kemari"):
        Path("/var/log", d).mkdir(parents=True, exist_ok=True)
    run("chown", "-R", "hacluster:haclient", "/var/log/pacemaker", "/var/lib/pacemaker")


def init(lab: Lab, name: str) -> int:
    """PID 'one' of the node (inside its namespaces): mounts, then corosync and
    pacemakerd in the foreground until pacemakerd ends."""
    mount_private(lab, name)
    run("hostname", name)
    env = dict(os.environ, PCMK_logfile="/var/log/pacemaker/pacemaker.log",
               PCMK_logfacility="none", HA_LOGFACILITY="none", HA_logfacility="none",
               PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    (lab.disk(name) / "init.pid").write_text(f"{os.getpid()}\n")
    log(lab, f"{name}: booting (init {os.getpid()})")
    if not Path("/etc/corosync/corosync.conf").exists():
        # no cluster on this node yet: it runs what is started in it (sshd,
        # a bootstrap's corosync and pacemakerd) until it is powered off
        log(lab, f"{name}: no corosync.conf, no cluster stack at boot")
        while True:
            time.sleep(3600)
    corosync = subprocess.Popen(["corosync", "-f"], env=env)
    end = time.monotonic() + 30
    while run("corosync-cfgtool", "-s", check=False).returncode != 0:
        if corosync.poll() is not None or time.monotonic() > end:
            log(lab, f"{name}: corosync did not start (rc {corosync.poll()})")
            return 1
        time.sleep(0.05)
    pacemakerd = subprocess.Popen(["pacemakerd"], env=env)
    rc = pacemakerd.wait()
    log(lab, f"{name}: pacemakerd exited rc={rc}")
    run("corosync-cfgtool", "-H", check=False)
    corosync.wait()
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", required=True, type=Path, help="the lab's directory")
    p.add_argument("action", choices=("start", "off", "init", "pids"))
    p.add_argument("node")
    p.add_argument("--after", type=float, default=0.0,
                   help="start: seconds to wait first (a real machine's reboot takes a while)")
    args = p.parse_args(argv)
    lab = Lab(args.lab)
    lab.node(args.node)
    if args.action == "start":
        time.sleep(args.after)
        print(start(lab, args.node))
    elif args.action == "off":
        print(power_off(lab, args.node))
    elif args.action == "pids":
        print(" ".join(map(str, node_pids(lab, args.node))))
    else:
        return init(lab, args.node)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LabError as exc:
        sys.exit(str(exc))
