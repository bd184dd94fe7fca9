"""Replication benchmarks (issue 3), every ratio measured in the same run.

1. checkpoint round trip tap -> release (p50/p99) for 1, 8, 32, 256 dirty
   pages: the `stress` guest at 300 events/s, each event dirtying N pages
   (+ a few of its own: stack, ring, counters); and 1 page at 50 events/s;
2. kv ops/s protected / unprotected, same clients, same user-mode forward;
3. kv reply latency p50, event-tapped / epoch mode at 25 ms;
4. activation time (promote -> first reply) of a 256 MiB guest;
5. full-sync throughput of a 256 MiB guest whose memory is all in use, and
   the secondary's memory (RSS) / guest RAM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ftlab import MEM, FakePrimary, FtLab
from helpers import KemariProcess, free_udp_port, kv_config

from bench.common import percentile, pin, report
from kemari_agent.control import request
from kemari_agent.kvclient import KvClient
from kemari_agent.kvload import Clients


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kemari-bench-"))


def checkpoint_latency(pages: int, seconds: float, rate_hz: int = 300) -> dict:
    lab = FtLab(tmpdir(), image="stress",
                extra=f"[stress]\npages = {pages}\nrate_hz = {rate_hz}")
    try:
        lab.start_pair()
        time.sleep(seconds)
        st = lab.primary.status()
        per = st["bytes_sent"] / max(1, st["checkpoints"])
        return {"p50": st["latency_us"]["p50"], "p99": st["latency_us"]["p99"],
                "checkpoints": st["checkpoints"], "bytes_per_checkpoint": per}
    finally:
        lab.close()


def protocol_round_trip(pages: int, n: int = 400) -> dict:
    """The stream alone: an in-process primary (no VMM, no guest) against a real
    secondary daemon over TLS on loopback: what the VMM's own costs add to."""

    lab = FtLab(tmpdir(), memory_mib=MEM >> 20)
    try:
        lab.secondary.start("secondary")
        fake = FakePrimary(lab, bytearray(os.urandom(MEM)))
        fake.full_sync()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fake.checkpoint(list(range(pages)))
            times.append(time.perf_counter() - t0)
        fake.close()
        return {"p50": percentile(times, 50) * 1e6, "p99": percentile(times, 99) * 1e6}
    finally:
        lab.close()


def kv_throughput(addr, seconds: float) -> float:
    clients = Clients(addr, n=4).start()
    time.sleep(seconds)
    clients.stop()
    return sum(len(r.latencies) for r in clients.records) / seconds


@contextlib.contextmanager
def unprotected_kv(name: str = "bench-u", pinned_to: int | None = None
                   ) -> Iterator[tuple[tuple[str, int], Path]]:
    """A kv guest run by `kemari run` behind the user-mode forward: (its address,
    its control socket), stopped on leaving."""
    work = tmpdir()
    (work / "run").mkdir()
    (work / "state").mkdir()
    port = free_udp_port()
    cfg = kv_config(work, name=name, net=f'[net]\nforward = "127.0.0.1:{port}"')
    proc = KemariProcess(["run", str(cfg)], work)
    try:
        proc.wait_for_output("serving on")
        if pinned_to is not None:
            pin(proc.pid, pinned_to)
        yield ("127.0.0.1", port), work / "run" / f"{name}.sock"
    finally:
        proc.stop()


def unprotected_ops(seconds: float, cpu: int | None = None) -> float:
    """`cpu`: the daemon pinned there (default: placed by the scheduler)."""
    with unprotected_kv(pinned_to=cpu) as (addr, _sock):
        return kv_throughput(addr, seconds)


def reply_latency(addr, n: int = 400) -> list[float]:
    out = []
    with KvClient(addr, timeout=1.0, prefix=f"lat{time.monotonic_ns()}") as c:
        for i in range(n):
            t0 = time.perf_counter()
            c.put(f"lat{i % 32}", str(i))
            out.append(time.perf_counter() - t0)
    return out


def protected(mode: str, seconds: float, disk_mode: str = "shared", replication: str = "",
              cpus: tuple[int, int] | None = None) -> tuple[float, list[float]]:
    """`replication`: more [replication] settings for both nodes. `cpus`: the
    primary's and the secondary's CPU (default: placed by the scheduler)."""
    lab = FtLab(tmpdir(), mode=mode, disk_mode=disk_mode, replication=replication)
    try:
        lab.start_pair()
        if cpus is not None:
            pin(lab.primary.pid(), cpus[0])
            pin(lab.secondary.pid(), cpus[1])
        ops = kv_throughput(lab.addr, seconds) if mode == "tap" else 0.0
        return ops, reply_latency(lab.addr)
    finally:
        lab.close()


def fill_memory_then_sync(memory_mib: int) -> dict:
    """Primary alone first, its guest dirtying all its memory; then the secondary
    joins and the full sync is timed."""
    pages = memory_mib * 256
    lab = FtLab(tmpdir(), image="stress", memory_mib=memory_mib,
                extra=f"[stress]\npages = 2048\nrate_hz = 50\nworking_set = {pages - 1024}")
    try:
        lab.primary.start("primary")
        time.sleep(pages / 2048 / 50 + 1.5)       # every page of the working set written
        lab.secondary.start("secondary")
        st = lab.wait_synced(timeout=120)
        sec = lab.secondary.status()
        rss = _rss_kib(sec["pid"]) * 1024
        # activation: promote -> first reply, through the control socket (no CLI start-up)
        lab.primary.kill()
        t0 = time.perf_counter()
        request(lab.secondary.dir / "run" / f"{lab.name}.sock", "promote", timeout=60)
        promoted = time.perf_counter() - t0
        after = lab.secondary.status()
        return {"sync": st["last_sync"], "secondary_rss": rss, "promote_s": promoted,
                "activation_ms": after.get("activation_ms")}
    finally:
        lab.close()


def secondary_rss_ratio(memory_mib: int) -> float:
    """Resident memory of an in-sync secondary of an idle kv guest / guest RAM."""
    lab = FtLab(tmpdir(), memory_mib=memory_mib)
    try:
        lab.start_pair()
        with KvClient(lab.addr) as c:
            for i in range(200):
                c.put(f"k{i}", "v")
        return _rss_kib(lab.secondary.pid()) * 1024 / (memory_mib << 20)
    finally:
        lab.close()


def kv_activation(memory_mib: int) -> tuple[float, float, dict]:
    """promote -> first kv reply for a kv guest of memory_mib, via the control socket;
    also the full sync of that (mostly idle, mostly zero) guest."""
    lab = FtLab(tmpdir(), memory_mib=memory_mib)
    try:
        lab.start_pair()
        sync = lab.primary.status()["last_sync"]
        with KvClient(lab.addr) as c:
            c.put("before", "failover")
        lab.primary.kill()
        sock = lab.secondary.dir / "run" / f"{lab.name}.sock"
        t0 = time.perf_counter()
        request(sock, "promote", timeout=60)
        with KvClient(lab.addr, timeout=0.01, attempts=1000, prefix="act") as c:
            assert c.get("before").value == "failover"
        first = time.perf_counter() - t0
        return first, lab.secondary.status().get("activation_ms"), sync
    finally:
        lab.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(quick: bool = False) -> dict:
    secs = 2.0 if quick else 4.0
    rows = []
    lat = {}
    for pages in (1, 8, 32, 256):
        lat[pages] = checkpoint_latency(pages, secs)
        rows.append((f"checkpoint tap->release p50, {pages} dirty pages", lat[pages]["p50"], "us"))
        rows.append((f"checkpoint tap->release p99, {pages} dirty pages", lat[pages]["p99"], "us"))
        proto = protocol_round_trip(pages)
        rows.append((f"  stream alone (no VMM) p50, {pages} pages", proto["p50"], "us"))
    slow = checkpoint_latency(1, secs, rate_hz=50)
    rows.append(("checkpoint tap->release p50, 1 dirty page, 50 events/s (vs 300/s above)",
                 slow["p50"], "us"))
    unprot = unprotected_ops(secs)
    prot, tap_lat = protected("tap", secs)
    _none, epoch_lat = protected("epoch", secs)
    rows += [
        ("kv ops/s unprotected (4 clients, forward)", unprot, "ops/s"),
        ("kv ops/s protected, event-tapped", prot, "ops/s"),
        ("ratio protected / unprotected (goal >= 0.5)", prot / unprot, ""),
        ("kv reply latency p50, event-tapped", percentile(tap_lat, 50) * 1e6, "us"),
        ("kv reply latency p50, epoch 25 ms", percentile(epoch_lat, 50) * 1e6, "us"),
        ("ratio tapped / epoch (goal <= 0.1)",
         percentile(tap_lat, 50) / percentile(epoch_lat, 50), ""),
    ]
    first_reply, activation_ms, idle_sync = kv_activation(256)
    rows += [("activation 256 MiB kv: promote -> first reply (goal <= 50)", first_reply * 1e3,
              "ms"),
             ("activation 256 MiB kv: inside the daemon", activation_ms, "ms"),
             ("full sync 256 MiB idle kv guest (zero pages as 8 bytes): time",
              idle_sync["seconds"], "s"),
             ("full sync idle kv guest, guest memory / time", idle_sync["memory_bytes"]
              / idle_sync["seconds"] / 2**30, "GiB/s")]
    sync = fill_memory_then_sync(256)
    s = sync["sync"]
    rows += [
        ("full sync 256 MiB (all pages in use): time", s["seconds"], "s"),
        ("full sync throughput, guest memory / time (goal >= 1)",
         s["memory_bytes"] / s["seconds"] / 2**30, "GiB/s"),
        ("full sync pages sent / rounds", f"{s['pages']} / {s['rounds']}", ""),
        ("secondary RSS / guest RAM (goal <= 1.1)", sync["secondary_rss"] / s["memory_bytes"],
         ""),
        ("secondary RSS / guest RAM, 1 GiB kv guest", secondary_rss_ratio(1024), ""),
    ]
    return report("replication", rows, {"checkpoint_latency": lat, "at_50_events_s": slow,
                                        "sync": sync, "raw": {"tap_lat_n": len(tap_lat)}})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    print(json.dumps(main(ap.parse_args().quick)["metrics"], indent=1)[:0])
