"""`kemari demo`: the main job on one machine, with nothing to configure.

Boots the `kv` guest under Kemari's VMM with a user-mode forward on
loopback, drives a short session of concurrent clients against it, checks
every reply against the protocol's promises, and prints a summary. (With
replication in place, the same demo protects the guest and kills its
primary half-way.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .kvclient import KvClient, NoReply

CLIENTS = 4
OPS_PER_CLIENT = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"demo: the VM did not come up:\n{log.read_text(errors='replace')}")


class Session:
    """One client's work and what it observed."""

    def __init__(self, addr: tuple[str, int], n: int) -> None:
        self.addr, self.n = addr, n
        self.latencies: list[float] = []
        self.incr_values: list[int] = []
        self.puts: dict[str, str] = {}
        self.problems: list[str] = []

    def run(self) -> None:
        with KvClient(self.addr, prefix=f"demo{self.n}") as c:
            for i in range(OPS_PER_CLIENT):
                key, value = f"c{self.n}-k{i % 20}", f"v{i}"
                try:
                    t0 = time.perf_counter()
                    r = c.put(key, value)
                    self.latencies.append(time.perf_counter() - t0)
                    if r.kind != "OK":
                        self.problems.append(f"PUT {key}: {r}")
                    self.puts[key] = value
                    r = c.incr("demo-counter")
                    self.incr_values.append(int(r.value))
                    if c.get(key).value != value:
                        self.problems.append(f"GET {key} did not return {value}")
                except NoReply as exc:
                    self.problems.append(str(exc))
                    return


def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="kemari-demo-"))
    port = _free_port()
    config = work / "kv-demo.toml"
    config.write_text(f"""name = "kv-demo"
memory_mib = 64
image = "kv"
[disk]
path = "{work / 'disk.img'}"
size_mib = 32
[net]
forward = "127.0.0.1:{port}"
""")
    env = dict(os.environ, KEMARI_RUN_DIR=str(work / "run"), KEMARI_STATE_DIR=str(work / "state"))
    log = work / "vm.log"
    print(f"Kemari demo: booting the kv guest (64 MiB, 32 MiB disk) in {work}")
    with open(log, "wb") as out:
        vm = subprocess.Popen([sys.executable, "-m", "kemari_agent.cli", "run", str(config)],
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(log, "serving on", vm)
        print(f"  guest is up, reachable at udp://127.0.0.1:{port} (user-mode forward)")
        sessions = [Session(("127.0.0.1", port), n) for n in range(CLIENTS)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=s.run) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        problems = _check(sessions, ("127.0.0.1", port))
    finally:
        if vm.poll() is None:
            vm.send_signal(signal.SIGTERM)
            vm.wait(timeout=30)
    lat = sorted(x for s in sessions for x in s.latencies)
    ops = sum(len(s.latencies) for s in sessions) * 3
    print(f"  {CLIENTS} clients, {ops} requests in {elapsed:.2f} s ({ops / elapsed:.0f} ops/s)")
    if lat:
        print(f"  PUT latency (durable on disk): p50 {lat[len(lat) // 2] * 1e3:.2f} ms, "
              f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
    print("  guest console:\n    " + "\n    ".join(
        line.split("] ", 1)[-1] for line in log.read_text().splitlines() if "] kv:" in line))
    if problems:
        print("Demo FAILED:\n  " + "\n  ".join(problems[:20]))
    else:
        print("Demo OK: every reply kept the protocol's promises "
              "(acknowledged PUTs readable, INCR values unique, retried ids replayed).")
    if args.keep:
        print(f"  work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


def _check(sessions: list[Session], addr: tuple[str, int]) -> list[str]:
    problems = [p for s in sessions for p in s.problems]
    values = [v for s in sessions for v in s.incr_values]
    if len(values) != len(set(values)):
        problems.append("an INCR value was handed out twice")
    with KvClient(addr, prefix="demo-check") as c:
        for s in sessions:
            for key, value in s.puts.items():
                if c.get(key).value != value:
                    problems.append(f"acknowledged PUT {key}={value} not readable")
        if values and int(c.get("demo-counter").value) != max(values):
            problems.append("the counter does not match the INCRs acknowledged")
        first = c.incr("demo-replay", req_id="replayed-id")
        if c.incr("demo-replay", req_id="replayed-id") != first:
            problems.append("a retried request id was executed twice")
    return problems
