"""`kemari demo`: the main job on one machine, with nothing to configure.

A protected `kv` guest: a primary and a local secondary (two daemons, two
state directories, replication over authenticated TLS on loopback), clients
doing PUT/GET/INCR through the user-mode forward, a SIGKILL of the primary at
a random moment, promotion of the secondary, and the invariants of DESIGN.md
section 7 checked from the clients' own records. Exits non-zero if any is
broken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .kvclient import KvClient
from .kvload import Clients, check_acked_puts, check_counter
from .progress import line

CLIENTS = 4


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoNode:
    def __init__(self, work: Path, letter: str, listen: int, peer: int, forward: int) -> None:
        self.letter = letter
        self.env = dict(os.environ, KEMARI_RUN_DIR=str(work / letter / "run"),
                        KEMARI_STATE_DIR=str(work / letter / "state"))
        self.config = work / f"node-{letter}.toml"
        self.config.write_text(f"""name = "kv-demo"
memory_mib = 64
image = "kv"
[disk]
path = "{work / 'shared-disk.img'}"
size_mib = 32
[net]
forward = "127.0.0.1:{forward}"
[replication]
listen = "127.0.0.1:{listen}"
peer = "127.0.0.1:{peer}"
key_file = "{work / 'kv-demo.key'}"
heartbeat_ms = 100
peer_timeout_ms = 1000
""")

    def kemari(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kemari_agent.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=120)

    def checked(self, *args: str) -> str:
        r = self.kemari(*args)
        if r.returncode != 0:
            raise SystemExit(f"demo: kemari {' '.join(args)} failed on node {self.letter}:\n"
                             f"{r.stderr}")
        return r.stdout

    def status(self) -> dict:
        return json.loads(self.kemari("status", "kv-demo", "--json").stdout)


def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="kemari-demo-"))
    forward = _free_port(socket.SOCK_DGRAM)
    pa, pb = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM)
    a = DemoNode(work, "a", pa, pb, forward)
    b = DemoNode(work, "b", pb, pa, forward)
    addr = ("127.0.0.1", forward)
    daemons: dict[str, int] = {}      # node letter -> pidfd of its daemon
    try:
        return _run(work, a, b, addr, daemons)
    finally:
        # pidfds: a daemon already reaped by init is no error, and its pid, reused
        # by another process, is never signalled
        for fd in daemons.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        if args.keep:
            print(f"  work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, a: DemoNode, b: DemoNode, addr, daemons: dict[str, int]) -> int:
    print(f"Kemari demo in {work}")
    a.checked("keygen", str(work / "kv-demo.key"))
    a.checked("create-disk", str(a.config))       # the disk both nodes share
    print("  node B: secondary (standby VM, waiting for checkpoints)")
    b.checked("start", str(b.config))
    daemons["b"] = os.pidfd_open(b.status()["pid"])
    print("  node A: primary (boots the kv guest, 64 MiB, then full sync to B)")
    a.checked("start", str(a.config), "--role", "primary")
    daemons["a"] = os.pidfd_open(a.status()["pid"])
    end = time.monotonic() + 60
    while (st := a.status())["state"] != "synced" and time.monotonic() < end:
        sys.stdout.write("\r  " + line(st))
        time.sleep(0.05)
    print("\r  " + line(st))
    if st["state"] != "synced":
        print("Demo FAILED: the pair never got in sync")
        return 1

    clients = Clients(addr, n=CLIENTS).start()
    run_for = random.uniform(2.0, 4.0)
    time.sleep(run_for)
    before = a.status()
    signal.pidfd_send_signal(daemons["a"], signal.SIGKILL)
    killed_at = time.monotonic()
    print(f"  {run_for:.1f} s of load from {CLIENTS} clients, then SIGKILL of the primary "
          f"(pid {before['pid']}) at checkpoint {before['checkpoint_seq']}")
    time.sleep(0.05)
    acked = clients.snapshot()
    b.checked("promote", "kv-demo")
    promoted_at = time.monotonic()
    with KvClient(addr, timeout=0.05, attempts=200, prefix="demo-probe") as c:
        c.get("demo-probe")
    first_reply = time.monotonic()
    after = b.status()
    print(f"  node B promoted: generation {after['generation']}, guest resumed from its last "
          f"checkpoint in {after.get('activation_ms')} ms")
    time.sleep(1.0)
    clients.stop()

    problems = check_acked_puts(addr, acked) + check_counter(addr, clients.records)
    problems += [e for r in clients.records for e in r.errors]
    lat = sorted(x for r in clients.records for x in r.latencies)
    ops = len(lat)
    pct = before.get("latency_us") or {}
    print("\nSummary")
    print(f"  checkpoints before the crash   {before['checkpoints']} "
          f"({before['bytes_sent'] / 2**20:.1f} MiB sent)")
    print(f"  checkpoint round trip          p50 {pct.get('p50')} us, p99 {pct.get('p99')} us")
    if lat:
        print(f"  client requests                {ops}, latency p50 "
              f"{lat[ops // 2] * 1e3:.2f} ms, p99 {lat[int(ops * 0.99)] * 1e3:.2f} ms")
    print(f"  failover (kill -> first reply) {(first_reply - killed_at) * 1e3:.0f} ms "
          f"(promote -> first reply {(first_reply - promoted_at) * 1e3:.0f} ms)")
    checked = sum(len(s) for s in acked)
    incrs = sum(len(r.incr_values) for r in clients.records)
    if problems:
        print("Invariants BROKEN:\n  " + "\n  ".join(problems[:20]))
        return 1
    print(f"  invariants OK: {checked} acknowledged PUTs readable after failover, "
          f"{incrs} INCR values all distinct, counter never went back")
    b.kemari("stop", "kv-demo")
    return 0
