"""Shared test machinery: starting `kemari` processes and network namespaces.

Everything started here is stopped here, by PID or by the name we created,
even when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kemari_agent.devices.block import create_disk_image

REPO = Path(__file__).resolve().parent.parent
KEMARI = [sys.executable, "-m", "kemari_agent.cli"]
# generous: CI shares the machine with other work; a daemon stuck for this
# long has dumped its stacks (STOP_GRACE_S) and describe_stuck adds the kernel's view
STOP_TIMEOUT_S = 45.0
TESTGUEST = REPO / "build" / "testguest" / "testguest.bin"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class KemariProcess:
    """`kemari ARGS...` as a child process with its own run/state dirs."""

    def __init__(self, args: list[str], env_dirs: Path, netns: str | None = None,
                 name: str | None = None) -> None:
        self.env = dict(os.environ, KEMARI_RUN_DIR=str(env_dirs / "run"),
                        KEMARI_STATE_DIR=str(env_dirs / "state"), PYTHONUNBUFFERED="1")
        self.name = name
        self.log_path = env_dirs / f"kemari-{uuid.uuid4().hex[:6]}.log"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(prefix + KEMARI + args, env=self.env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"kemari exited ({self.proc.returncode}) before "
                                     f"printing {text!r}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"kemari did not print {text!r} in {timeout}s:\n{self.output()}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(KEMARI + list(args), env=self.env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kemari {' '.join(args)} failed: {result.stderr}")
        return result

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.log.write(describe_stuck(self.proc.pid, timeout).encode())
                self.kill()
        self.log.close()
        return self.proc.returncode


def describe_stuck(pid: int, waited: float) -> str:
    """Where each thread of a process that ignored SIGTERM sits in the kernel
    (the daemon dumps its Python stacks itself after STOP_GRACE_S)."""
    lines = [f"\n--- pid {pid} did not stop on SIGTERM within {waited:.0f} s; its threads:"]
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        def read(name: str, task: Path = task) -> str:
            try:
                return (task / name).read_text(errors="replace").strip()
            except OSError as exc:
                return f"({exc.strerror})"
        status = dict(ln.split(":\t", 1) for ln in read("status").splitlines() if ":\t" in ln)
        sig = " ".join(f"{k}={status.get(k, '?')}" for k in ("SigPnd", "ShdPnd", "SigBlk",
                                                             "SigCgt"))
        lines.append(f"{task.name} {read('comm')} {status.get('State', '?')} "
                     f"wchan={read('wchan')} {sig}")
        lines += ["    " + ln for ln in read("stack").splitlines()]
    return "\n".join(lines) + "\n"


class Watched:
    """A process this test did not fork (a detached daemon, reaped by init when it
    dies), held by a pidfd from the moment its pid is known: a signal can
    never hit another process that reused the pid, and a process already gone
    is reported, not an error."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def signal(self, sig: int) -> bool:
        """False when the process has already exited."""
        try:
            signal.pidfd_send_signal(self.fd, sig)
            return True
        except ProcessLookupError:
            return False

    def alive(self) -> bool:
        return not select.select([self.fd], [], [], 0)[0]

    def wait_gone(self, timeout: float = 10) -> None:
        """Until every thread has exited (its files, and disk locks, are released)."""
        if not select.select([self.fd], [], [], timeout)[0]:
            raise AssertionError(f"process {self.pid} did not die")

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_gone()

    def close(self) -> None:
        os.close(self.fd)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result


def _setns(fd: int) -> None:
    # os.setns arrives in Python 3.12; Debian 12 has 3.11.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


CLONE_NEWNET = 0x40000000


class NetLab:
    """A bridge in a 'host' namespace (where the VMM runs) and a client namespace
    joined to it by a veth: the client reaches the guest over the TAP."""

    def __init__(self, subnet: str = "10.213.0") -> None:
        tag = uuid.uuid4().hex[:6]
        self.host_ns, self.client_ns = f"kmh-{tag}", f"kmc-{tag}"
        self.bridge, self.tap = "br0", f"kt{tag}"
        self.client_ip = f"{subnet}.10"
        self.guest_ip = f"{subnet}.50"
        self.subnet = subnet
        try:
            sh("ip", "netns", "add", self.host_ns)
            sh("ip", "netns", "add", self.client_ns)
            self.exec_host("ip", "link", "set", "lo", "up")
            self.exec_client("ip", "link", "set", "lo", "up")
            self.exec_host("ip", "link", "add", self.bridge, "type", "bridge")
            self.exec_host("ip", "link", "set", self.bridge, "up")
            self.exec_host("ip", "link", "add", "vc", "type", "veth", "peer", "name", "vh")
            self.exec_host("ip", "link", "set", "vc", "netns", self.client_ns)
            self.exec_host("ip", "link", "set", "vh", "master", self.bridge)
            self.exec_host("ip", "link", "set", "vh", "up")
            self.exec_client("ip", "addr", "add", f"{self.client_ip}/24", "dev", "vc")
            self.exec_client("ip", "link", "set", "vc", "up")
        except BaseException:
            self.close()
            raise

    def exec_host(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.host_ns, *args, check=check)

    def exec_client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.client_ns, *args, check=check)

    @contextlib.contextmanager
    def in_client(self):
        """Run the body's sockets inside the client namespace (this thread only)."""
        fd = os.open(f"/var/run/netns/{self.client_ns}", os.O_RDONLY)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(fd)
            yield
        finally:
            _setns(own)
            os.close(fd)
            os.close(own)

    def close(self) -> None:
        for ns in (self.client_ns, self.host_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def kv_config(dirs: Path, name: str = "kv1", net: str = "", disk_mib: int = 16,
              memory_mib: int = 64, disk_path: Path | None = None) -> Path:
    disk_path = disk_path or dirs / f"{name}-disk.img"
    if not disk_path.exists():
        create_disk_image(disk_path, disk_mib)
    return write_config(dirs / f"{name}.toml", f"""
name = "{name}"
memory_mib = {memory_mib}
image = "kv"
[disk]
path = "{disk_path}"
size_mib = {disk_mib}
{net}
""")


def start_kv(dirs: Path, config: Path, netns: str | None = None,
             extra: list[str] | None = None) -> KemariProcess:
    proc = KemariProcess(["run", str(config), *(extra or [])], dirs, netns=netns)
    try:
        proc.wait_for_output("serving on")
    except BaseException:
        proc.stop()
        raise
    return proc
