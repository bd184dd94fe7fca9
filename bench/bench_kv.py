"""Unprotected `kv`: the denominators of the replication benchmarks.

ops/s and reply latency (p50/p99) for clients in another network namespace
reaching the guest over a TAP on a bridge; the VMM's exits per second under
that load; and the cost of one exit round trip through the Python run loop.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

from helpers import KemariProcess, NetLab, kv_config

from bench.common import REPO, percentile, report
from kemari_agent.kvclient import KvClient, NoReply
from kemari_agent.kvm.boot import BootInfo, boot
from kemari_agent.kvm.machine import Machine

DURATION_S = 5.0
CLIENTS = 8


def exit_cost(iters: int = 200_000) -> tuple[float, float]:
    """µs per exit handled in Python, and in the C core alone (no exits)."""
    image = (REPO / "build" / "testguest" / "testguest.bin").read_bytes()

    def timed(every: int) -> float:
        with Machine(32 << 20) as m:
            boot(m, image, BootInfo(args=(1, iters, every)))
            t0 = time.perf_counter()
            while True:
                ex = m.run()
                if ex.io_port == 0x604:
                    return time.perf_counter() - t0
    with_exits, without = timed(1), timed(0)
    return (with_exits - without) / iters * 1e6, without / iters * 1e9


def client_load(lab: NetLab, stop: threading.Event, lat: list[float], n: int) -> None:
    with lab.in_client(), KvClient((lab.guest_ip, 7000), timeout=0.5, attempts=4,
                                   prefix=f"b{n}") as c:
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.perf_counter()
            try:
                if i % 3 == 0:
                    c.get(f"k{n}-{i % 50}")
                elif i % 3 == 1:
                    c.put(f"k{n}-{i % 50}", f"v{i}")
                else:
                    c.incr(f"n{n}")
            except NoReply:
                continue
            lat.append(time.perf_counter() - t0)


def main() -> dict:
    per_exit_us, per_iter_ns = exit_cost()
    lab = NetLab()
    work = Path(tempfile.mkdtemp(prefix="kemari-bench-"))
    (work / "run").mkdir()
    (work / "state").mkdir()
    cfg = kv_config(work, name="bench", disk_mib=64, net=f"""[net]
tap = "{lab.tap}"
bridge = "{lab.bridge}"
address = "{lab.guest_ip}/24"
""")
    proc = KemariProcess(["run", str(cfg)], work, netns=lab.host_ns)
    try:
        proc.wait_for_output("serving on")
        before = json.loads(proc.cli("status", "bench", "--json").stdout)["vm"]
        stop = threading.Event()
        lats: list[list[float]] = [[] for _ in range(CLIENTS)]
        threads = [threading.Thread(target=client_load, args=(lab, stop, lats[n], n))
                   for n in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(DURATION_S)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        after = json.loads(proc.cli("status", "bench", "--json").stdout)["vm"]
    finally:
        proc.stop()
        lab.close()
    lat = [x for chunk in lats for x in chunk]
    exits = after["exits"] - before["exits"]
    doorbells = after["doorbells"] - before["doorbells"]
    rows = [
        ("kv ops/s (TAP, 8 clients)", len(lat) / elapsed, "ops/s"),
        ("kv reply latency p50", percentile(lat, 50) * 1e6, "us"),
        ("kv reply latency p99", percentile(lat, 99) * 1e6, "us"),
        ("VMM exits/s under load", exits / elapsed, "exits/s"),
        ("doorbells (tappable events)/s", doorbells / elapsed, "events/s"),
        ("exits per request", exits / max(1, len(lat)), ""),
        ("cost per port-I/O exit (Python loop)", per_exit_us, "us"),
        ("guest compute step without exits", per_iter_ns, "ns"),
    ]
    return report("kv_unprotected", rows, {"duration_s": elapsed, "clients": CLIENTS})


if __name__ == "__main__":
    main()
