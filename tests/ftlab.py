"""Two Kemari nodes on one machine (a primary and its secondary), for the
failover tests: separate run/state directories, loopback replication ports,
one shared user-mode forward address for the guest. Every daemon started is
stopped (SIGKILL by PID) at close, even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from helpers import KEMARI, REPO, Watched, free_udp_port

from kemari_agent.devices.block import create_disk_image
from kemari_agent.kvclient import KvClient
from kemari_agent.replication import transport
from kemari_agent.replication.codec import Device, Vcpu
from kemari_agent.replication.primary import Primary, PrimaryState


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, lab: FtLab, letter: str, listen: int, peer: int) -> None:
        self.lab, self.letter = lab, letter
        self.dir = lab.base / letter
        self.env = dict(os.environ, KEMARI_RUN_DIR=str(self.dir / "run"),
                        KEMARI_STATE_DIR=str(self.dir / "state"))
        self.env.pop("KEMARI_FAULT", None)
        self.disk = disk = lab.base / ("shared-disk.img" if lab.disk_mode == "shared"
                                       else f"disk-{letter}.img")
        if not disk.exists():
            create_disk_image(disk, 16)
        self.config = lab.base / f"{letter}.toml"
        self.config.write_text(f"""name = "{lab.name}"
memory_mib = {lab.memory_mib}
image = "{lab.image}"
{lab.extra}
[disk]
path = "{disk}"
size_mib = 16
mode = "{lab.disk_mode}"
{lab.net_section}
[replication]
listen = "127.0.0.1:{listen}"
peer = "127.0.0.1:{peer}"
key_file = "{lab.key}"
mode = "{lab.mode}"
epoch_ms = {lab.epoch_ms}
heartbeat_ms = 100
peer_timeout_ms = {lab.peer_timeout_ms}
{lab.replication}
[policy]
on_peer_loss = "{lab.on_peer_loss}"
""")

    def kemari(self, *args: str, check: bool = True, fault: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(self.env, KEMARI_FAULT=fault) if fault else self.env
        prefix = ["ip", "netns", "exec", self.lab.netns] if self.lab.netns else []
        r = subprocess.run(prefix + KEMARI + list(args), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"node {self.letter}: kemari {' '.join(args)}: "
                                 f"{r.stderr}\n--- log ---\n{self.log()}")
        return r

    def start(self, role: str = "secondary", fault: str | None = None) -> None:
        self.kemari("start", str(self.config), "--role", role, fault=fault)
        self.lab.watch(self.pid())

    def status(self) -> dict:
        r = self.kemari("status", self.lab.name, "--json", check=False)
        return json.loads(r.stdout)

    def pid(self) -> int | None:
        try:
            return int((self.dir / "run" / f"{self.lab.name}.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def process(self) -> Watched:
        pid = self.pid()
        assert pid is not None, f"node {self.letter} is not running"
        return self.lab.watch(pid)

    def kill(self) -> None:
        self.process().kill()

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.dir / "run" / f"{self.lab.name}.log").read_text(errors="replace")[-4000:]
        return ""


class FtLab:
    def __init__(self, base: Path, disk_mode: str = "shared", mode: str = "tap",
                 on_peer_loss: str = "continue", epoch_ms: int = 25,
                 peer_timeout_ms: int = 1000, memory_mib: int = 64, image: str = "kv",
                 extra: str = "", net: str | None = None, netns: str | None = None,
                 replication: str = "") -> None:
        """`net`: a [net] section replacing the default user-mode forward; `netns`:
        run the daemons in that network namespace (TAP tests); `replication`: more
        lines for both nodes' [replication] table."""
        self.image, self.extra, self.netns = image, extra, netns
        self.replication = replication
        self.base, self.name = base, "ftvm"
        self.disk_mode, self.mode, self.on_peer_loss = disk_mode, mode, on_peer_loss
        self.epoch_ms, self.peer_timeout_ms, self.memory_mib = epoch_ms, peer_timeout_ms, memory_mib
        self.key = base / "ftvm.key"
        self.forward_port = free_udp_port()
        self.addr = ("127.0.0.1", self.forward_port)
        self.net_section = net or f'[net]\nforward = "127.0.0.1:{self.forward_port}"'
        self.processes: dict[int, Watched] = {}
        pa, pb = free_tcp_port(), free_tcp_port()
        subprocess.run(KEMARI + ["keygen", str(self.key)], cwd=REPO, check=True,
                       capture_output=True)
        self.nodes = [Node(self, "a", pa, pb), Node(self, "b", pb, pa)]
        self.generation = 1          # of the current primary
        self.primary, self.secondary = self.nodes

    def start_pair(self) -> None:
        self.secondary.start("secondary")
        self.primary.start("primary")
        self.wait_synced()

    def wait_synced(self, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.primary.status()
            if st.get("role") == "primary" and st.get("state") == "synced":
                assert st.get("last_sync") is not None, st     # published together
                return st
            time.sleep(0.05)
        raise AssertionError(f"pair never in sync: {self.primary.status()}\n"
                             f"{self.primary.log()}\n{self.secondary.log()}")

    def wait_protected(self, timeout: float = 60) -> None:
        """Until the secondary holds a checkpoint of the current primary's generation
        (the primary may already have died at an armed fault point)."""
        end = time.monotonic() + timeout
        gen = self.generation
        while time.monotonic() < end:
            st = self.secondary.status()
            if st.get("has_checkpoint") and st.get("generation") == gen and \
                    st.get("state") != "syncing":
                return
            time.sleep(0.02)
        raise AssertionError(f"secondary never in sync: {self.secondary.status()}\n"
                             f"{self.primary.log()}\n{self.secondary.log()}")

    def failover(self) -> float:
        """Kill the primary (if still alive), promote the secondary; returns seconds
        from the promote command to the first reply from the guest."""
        if self.primary.pid() is not None:
            self.primary.kill()
        t0 = time.monotonic()
        out = self.secondary.kemari("promote", self.name).stdout
        self.generation = int(out.rsplit("generation ", 1)[1].rstrip(")\n "))
        with KvClient(self.addr, timeout=0.2, attempts=50, prefix=f"pr{uuid.uuid4().hex[:8]}") as c:
            c.get("probe")
        elapsed = time.monotonic() - t0
        self.primary, self.secondary = self.secondary, self.primary
        return elapsed

    def watch(self, pid: int) -> Watched:
        """The daemon of `pid`, held by a pidfd (see helpers.Watched)."""
        if pid not in self.processes:
            self.processes[pid] = Watched(pid)
        return self.processes[pid]

    def close(self) -> None:
        for node in self.nodes:
            pid = node.pid()
            if pid and pid not in self.processes:
                with contextlib.suppress(ProcessLookupError):
                    self.watch(pid)
        for proc in self.processes.values():
            proc.signal(signal.SIGKILL)
            with contextlib.suppress(AssertionError):
                proc.wait_gone()
            proc.close()
        self.processes.clear()


MEM = 16 << 20                     # the fake primary's guest memory
VCPU = Vcpu(0, 1, b"not a real vcpu blob, never run")


class FakePrimary:
    """Speaks the stream over a real authenticated channel, with a fake guest memory."""

    def __init__(self, lab: FtLab, memory: bytearray, seq: int = 0, full: bool = True,
                 generation: int = 7, **primary_kw) -> None:
        port = int(lab.secondary.config.read_text().split('listen = "127.0.0.1:')[1][:5]
                   .rstrip('"\n'))
        self.ch = transport.connect(str(lab.key), "127.0.0.1", port)
        self.sm = Primary(name=lab.name, memory_size=MEM, generation=generation,
                          checkpoint_seq=seq, now=time.monotonic(), force_full_sync=full,
                          **primary_kw)
        self.memory = memory
        self.pump(lambda: self.sm.state is not PrimaryState.HANDSHAKE)

    def send(self, data: bytes | None = None) -> None:
        self.ch.send_all(self.sm.data_to_send() if data is None else data)

    def pump(self, done, timeout: float = 5.0) -> list:
        self.send()
        events, end = [], time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            self.ch.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.ch.recv_some()
            except Exception:
                break
            if not data:
                break
            events += self.sm.receive_data(data, time.monotonic())
            self.send()
        return events

    def full_sync(self) -> int:
        self.sm.sync_pages(self.memory, list(range(MEM // 4096)), now=time.monotonic())
        self.sm.end_sync_round(0, now=time.monotonic())
        return self.checkpoint([])

    def build(self, pfns) -> tuple[int, bytes]:
        seq = self.sm.checkpoint(self.memory, pfns, [VCPU, Device(0, 1, b"{}")],
                                 now=time.monotonic())
        return seq, self.sm.data_to_send()

    def checkpoint(self, pfns) -> int:
        seq, data = self.build(pfns)
        self.send(data)
        self.pump(lambda: self.sm.is_acked(seq))
        assert self.sm.is_acked(seq), "secondary did not acknowledge a good checkpoint"
        return seq

    def close(self) -> None:
        self.ch.close()
