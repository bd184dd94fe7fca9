"""Where a checkpoint's time goes (issue 10), and the machine's floor, in one run.

1. the floor: the VMM's bare port-I/O exit round trip (testguest, one `out`
   per iteration, timed around Machine.run()), and a TLS 1.3 ping-pong on
   loopback between two processes (the replication transport's own ssl
   setup) carrying a 1-page checkpoint's bytes out and an ACK's bytes back;
2. the checkpoint round trip (tap -> release) of the `stress` guest at
   1, 8, 32, 256 dirty pages per event, with both daemons run with
   KEMARI_STAGES=1, each stage's median from the two daemons' timestamps
   (CLOCK_MONOTONIC, one host), joined by checkpoint seq;
3. the secondary's and the primary's CPU time per checkpoint (/proc/<pid>/stat;
   the primary's includes its guest's vCPU);
4. kv ops/s protected / unprotected with the same clients, protected with a
   shared disk (a write is output: two checkpoints per request) and with a
   replicated one (a write goes with the reply's checkpoint: one).

Only the checkpoints between the bench's own status calls count (a status
with its stage rows is a large JSON, made on the daemon's CPU). Of the
slowest 1%, the share put down to each span of SLOW_SPANS is reported too;
bench_slow_checkpoints.py traces the scheduler beside them.

Each daemon setting (ALL_SETTINGS below: the default, and the default with
one fast path switched off, e.g. the Python encoder, TLS records instead
of frames, or no hot pages) runs `--runs` times, interleaved, and the
medians of the runs are reported; kv is measured once per setting and run.
No CPU pinning but in the "split CPUs" setting: the scheduler places the
daemons on the machine's CPUs, and the CPU each daemon last ran on is
recorded per run. A write on a TCP socket wakes its reader on the writer's
CPU (a sync wake-up), so unpinned the two daemons mostly take turns on one
CPU. "split CPUs" pins the primary to CPU 0 and the secondary to CPU 1, as
two hosts would run them, and its floor's ping-pong and protected kv
likewise; its kv is also compared with the unprotected daemon pinned to
CPU 0, the primary's share of the machine.

Run: python -m bench.bench_checkpoint_stages [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

from bench.common import percentile, pin, report

# (stage, from moment, to moment, which daemon's clock pair)
STAGES = [
    ("exit -> tap hook (Python exit dispatch)", "p.exit", "p.start"),
    # The one-call checkpoint (ft/fast_checkpoint.py): the four steps below
    # together; C takes the moments inside it (KFAST_MOMENTS), "per step" its own.
    ("tap hook -> sent (harvest, state, encode, send)", "p.start", "p.sent"),
    ("  one call: tap hook -> C entered (Python: plan, buffers)", "p.start", "p.c_entered"),
    ("  one call: save vCPU state", "p.c_entered", "p.c_state"),
    ("  one call: harvest dirty log", "p.c_state", "p.c_harvested"),
    ("  one call: encode", "p.c_harvested", "p.c_encoded"),
    ("  one call: seal the frame", "p.c_encoded", "p.c_sealed"),
    ("  one call: write() (wakes the secondary)", "p.c_sealed", "p.c_written"),
    # Taken in the vCPU's run call (the default), the call returns after the write
    # and the exit's dispatch in Python comes before "sent"; "exit -> tap hook" and
    # "tap hook -> C entered" are then nothing (both moments are the call's start).
    ("  one call: write() returned -> Python has it (+ the exit's dispatch)",
     "p.c_written", "p.sent"),
    ("harvest dirty log", "p.start", "p.harvested"),
    ("vCPU + device state", "p.harvested", "p.state"),
    ("encode (pages, records, CRC, END)", "p.state", "p.encoded"),
    ("TLS send (encrypt + write)", "p.encoded", "p.sent"),
    ("wake-up of the secondary", "p.sent", "s.wake"),
    # The secondary's one-call read (ft/fast_receive.py) marks no moment inside
    # its call either: read, open, verify and the ACK's send all fall in this
    # row, and the next is empty ("read per step" splits them).
    ("TLS receive (read + decrypt)", "s.last_wake", "s.recv"),
    ("  one call: wake-up -> C entered (Python: select, plan)", "s.last_wake", "s.c_entered"),
    ("  one call: read()", "s.c_entered", "s.c_read"),
    ("  one call: open the frame", "s.c_read", "s.c_opened"),
    ("  one call: check and stage (kcodec_receive)", "s.c_opened", "s.recv"),
    # An early ACK (the default) leaves once the checkpoint is verified: "decode"
    # then ends there, "record" is empty, and both happen after it ("meanwhile").
    ("decode + verify (+ apply, unless the ACK left first)", "s.recv", "s.decoded"),
    ("  apply (scatter into guest RAM)", None, "s.apply"),
    ("record checkpoint (node state, unless the ACK left first)", "s.decoded", "s.handled"),
    # One row: the primary, woken by the ACK, often runs on the secondary's CPU
    # before the secondary's send returns, so no moment between them is honest.
    ("ACK send + wake-up of the primary (+ TLS receive)", "s.handled", "p.ack_recv"),
    # The two one calls' moments (native/fastreceive.h): the secondary's before its
    # ACK's write(), the primary's from the read() the ACK's wake-up let begin.
    ("  one call: seal the ACK (secondary)", "s.handled", "s.c_ack_sealed"),
    ("  ACK write() -> the primary's read() begins (wake-up of the primary)",
     "s.c_ack_sealed", "p.ack_c_woke"),
    ("  one call: the primary's read()", "p.ack_c_woke", "p.ack_c_read"),
    ("  one call: open the ACK's frame", "p.ack_c_read", "p.ack_c_opened"),
    ("  one call returned -> Python has the ACK", "p.ack_c_opened", "p.ack_recv"),
    ("  meanwhile: ACK ready -> applied + recorded", "s.decoded", "s.after_ack"),
    ("ACK decode (primary)", "p.ack_recv", "p.ack_decoded"),
]

# The slowest checkpoints, split into back-to-back spans from the exit to the
# decoded ACK (the one-call paths' moments): each slow checkpoint is put down
# to the span that exceeded its own median the most.
SLOW_SPANS = [
    ("the primary's call, exit -> write() returned", "p.start", "p.c_written"),
    ("wake-up of the secondary + its read()", "p.c_written", "s.c_read"),
    ("the secondary's open, check and stage", "s.c_read", "s.recv"),
    ("the secondary's ACK sealed", "s.recv", "s.c_ack_sealed"),
    ("the ACK's write() + wake-up of the primary", "s.c_ack_sealed", "p.ack_c_woke"),
    ("the primary's read and open, back in Python", "p.ack_c_woke", "p.ack_recv"),
    ("ACK decode (primary)", "p.ack_recv", "p.ack_decoded"),
]
SLOWEST = 0.01


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kemari-bench-"))


# ---- the floor ---------------------------------------------------------------------------
def exit_round_trip(n: int = 20000) -> dict:
    """One `out` to an unhandled port per guest iteration: Machine.run() round trips."""
    from helpers import TESTGUEST

    from kemari_agent.kvm.boot import BootInfo, boot
    from kemari_agent.kvm.machine import EXIT_IO, Machine

    times = []
    with Machine(32 << 20) as m:
        boot(m, TESTGUEST.read_bytes(), BootInfo(args=(1, n, 1)))
        clock = time.perf_counter_ns
        while True:
            t0 = clock()
            ex = m.run()
            times.append(clock() - t0)
            if ex.reason != EXIT_IO or ex.io_port != 0x600:
                break
    times = times[100:-1]
    return {"p50": percentile(times, 50) / 1e3, "p99": percentile(times, 99) / 1e3,
            "n": len(times)}


def _tls_server(key: str, port_q, nbytes: int, reply: int, n: int,
                cpu: int | None = None) -> None:
    from kemari_agent.replication import transport

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    with transport.listen(key) as lst:
        port_q.put(lst.address[1])
        ch = lst.accept(timeout=30)
        out = bytes(reply)
        for _ in range(n):
            got = 0
            while got < nbytes:
                got += len(ch.recv_some())
            ch.send_all(out)
        ch.close()


def tls_ping_pong(key: str, nbytes: int, reply: int = 24, n: int = 2000,
                  cpus: tuple[int, int] | None = None) -> dict:
    """The replication transport between two processes on loopback: nbytes out,
    `reply` bytes back, timed on the client. `cpus`: the client's and the
    server's CPU (default: unpinned)."""
    from kemari_agent.replication import native_frames, transport

    # the setting's frame cipher, as its daemons read it when they start
    native_frames.ENABLED = native_frames.enabled_by_environment()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    server = ctx.Process(target=_tls_server, daemon=True,
                         args=(key, q, nbytes, reply, n, cpus[1] if cpus else None))
    server.start()
    affinity = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, {cpus[0]})
    try:
        ch = transport.connect(key, "127.0.0.1", q.get(timeout=30))
        payload = os.urandom(nbytes)
        times = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            ch.send_all(payload)
            got = 0
            while got < reply:
                got += len(ch.recv_some())
            times.append(time.perf_counter_ns() - t0)
        ch.close()
        times = times[50:]
        return {"p50": percentile(times, 50) / 1e3, "p99": percentile(times, 99) / 1e3,
                "bytes": nbytes}
    finally:
        os.sched_setaffinity(0, affinity)
        server.join(10)
        if server.is_alive():
            server.kill()


def _keygen() -> str:
    import subprocess

    from helpers import KEMARI, REPO
    key = tmpdir() / "bench.key"
    subprocess.run(KEMARI + ["keygen", str(key)], cwd=REPO, check=True, capture_output=True)
    return str(key)


# ---- the checkpoint, per stage --------------------------------------------------------
def _cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime in clock ticks, CPU last run on)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[36])


def _moment(row_p: dict, row_s: dict, key: str) -> int | None:
    side, name = key.split(".")
    return (row_p if side == "p" else row_s).get(name) or None


@contextlib.contextmanager
def stress_pair(pages: int, rate_hz: int = 300, replication: str = "",
                cpus: tuple[int, int] | None = None):
    """A protected `stress` guest dirtying `pages` per event, both daemons
    keeping stage moments (KEMARI_STAGES=1) and pinned to `cpus` (primary's,
    secondary's) if given; yields the FtLab once past the full sync."""
    from ftlab import FtLab

    os.environ["KEMARI_STAGES"] = "1"
    lab = FtLab(tmpdir(), image="stress", replication=replication,
                extra=f"[stress]\npages = {pages}\nrate_hz = {rate_hz}")
    try:
        lab.start_pair()
        if cpus:
            pin(lab.primary.pid(), cpus[0])
            pin(lab.secondary.pid(), cpus[1])
        time.sleep(0.5)                      # past the full sync's after-effects
        yield lab
    finally:
        lab.close()
        os.environ.pop("KEMARI_STAGES", None)


def checkpoint_stages(pages: int, seconds: float, rate_hz: int = 300,
                      replication: str = "", cpus: tuple[int, int] | None = None) -> dict:
    with stress_pair(pages, rate_hz, replication, cpus) as lab:
        spid = lab.secondary.pid()
        ppid = lab.primary.pid()
        c0 = lab.secondary.status()["checkpoints"]
        p0 = lab.primary.status()
        t0, _ = _cpu_ticks(spid)
        pt0, _ = _cpu_ticks(ppid)
        # Only the checkpoints between the status calls count: a status with
        # its stage rows is a large JSON, made on the daemon's CPU.
        window = (time.monotonic_ns(), time.monotonic_ns() + int(seconds * 1e9))
        time.sleep(seconds)
        t1, scpu = _cpu_ticks(spid)
        pt1, pcpu = _cpu_ticks(ppid)
        sst = lab.secondary.status()
        pst = lab.primary.status()
        ncp = sst["checkpoints"] - c0
    prim = {r["seq"]: r for r in pst.get("stages", [])}
    sec = {r["seq"]: r for r in sec_rows(sst)}
    seqs = window_seqs(prim, sec, window)
    total = [(prim[s]["ack_decoded"] - prim[s]["start"]) / 1e3 for s in seqs]
    stages = {}
    for name, a, b in STAGES:
        vals = []
        for s in seqs:
            if a is None:
                vals.append(sec[s].get(b.split(".")[1], 0) / 1e3)
                continue
            x, y = _moment(prim[s], sec[s], a), _moment(prim[s], sec[s], b)
            if x and y:
                vals.append((y - x) / 1e3)
        stages[name] = {"p50": percentile(vals, 50), "p99": percentile(vals, 99),
                        "share": len(vals) / max(1, len(seqs))}
    hz = os.sysconf("SC_CLK_TCK")
    # The primary woken by an early ACK that got the CPU only after the
    # secondary's apply (both on one CPU: docs/benchmarks.md, session 21).
    early = [s for s in seqs if sec[s].get("after_ack")]
    after_apply = sum(prim[s]["ack_recv"] > sec[s]["after_ack"] for s in early)
    return {"p50": percentile(total, 50), "p99": percentile(total, 99),
            "slowest": slowest_spans(prim, sec, seqs),
            "ack_after_apply": after_apply / max(1, len(early)),
            "daemon_p50": pst["latency_us"]["p50"], "daemon_p99": pst["latency_us"]["p99"],
            "n": len(seqs), "stages": stages,
            "secondary_cpu_us_per_checkpoint": (t1 - t0) / hz * 1e6 / max(1, ncp),
            # the daemon's threads and the guest's vCPU alike (KVM_RUN is its time)
            "primary_cpu_us_per_checkpoint": (pt1 - pt0) / hz * 1e6 / max(1, ncp),
            "placement": f"{'pinned' if cpus else 'unpinned'}; last on CPU primary {pcpu}, "
                         f"secondary {scpu}",
            "pages_harvested_p50": percentile([prim[s].get("pages", 0) for s in seqs], 50),
            "bytes_per_checkpoint": (pst["bytes_sent"] - p0["bytes_sent"])
            / max(1, pst["checkpoints"] - p0["checkpoints"])}


def window_seqs(prim: dict, sec: dict, window: tuple[int, int]) -> list[int]:
    """The checkpoints both daemons marked, begun and acknowledged within `window`."""
    return [q for q in sorted(set(prim) & set(sec))
            if window[0] <= prim[q]["start"] and prim[q]["ack_decoded"] <= window[1]]


def span_moments(prim: dict, sec: dict, seqs: list[int]) -> dict[int, list[tuple[int, int]]]:
    """seq -> each span of SLOW_SPANS as (start, end) ns, for the checkpoints
    that have all their moments (those the one-call paths took)."""
    spans = {}
    for seq in seqs:
        moments = [_moment(prim[seq], sec[seq], k) for _, a, b in SLOW_SPANS for k in (a, b)]
        if all(moments):
            spans[seq] = list(zip(moments[::2], moments[1::2], strict=True))
    return spans


def blame_slowest(prim: dict, spans: dict, fraction: float
                  ) -> tuple[list[float], list[tuple[int, int]]]:
    """The spans' medians (ns), and for the slowest `fraction` of the checkpoints,
    slowest first, (seq, index of the span that exceeded its median the most)."""
    median = [statistics.median(v[i][1] - v[i][0] for v in spans.values())
              for i in range(len(SLOW_SPANS))]
    by_total = sorted(spans, key=lambda q: prim[q]["ack_decoded"] - prim[q]["start"])
    slow = reversed(by_total[-max(1, round(len(by_total) * fraction)):])
    return median, [(q, max(range(len(SLOW_SPANS)),
                            key=lambda i: spans[q][i][1] - spans[q][i][0] - median[i]))
                    for q in slow]


def slowest_spans(prim: dict, sec: dict, seqs: list[int]) -> dict:
    """For the slowest SLOWEST of the checkpoints: the share put down to each
    span of SLOW_SPANS, and that span's median (us) among them and among all."""
    spans = span_moments(prim, sec, seqs)
    if not spans:
        return {}
    median, blamed = blame_slowest(prim, spans, SLOWEST)
    took = {i: [(spans[q][i][1] - spans[q][i][0]) / 1e3 for q, _ in blamed]
            for i in range(len(SLOW_SPANS))}
    return {name: {"share": sum(b == i for _, b in blamed) / len(blamed),
                   "median_all": median[i] / 1e3, "median_slow": statistics.median(took[i])}
            for i, (name, _a, _b) in enumerate(SLOW_SPANS)}


def sec_rows(status: dict) -> list[dict]:
    return status.get("stages", [])


def kv_ratio(seconds: float, replication: str = "", cpus: tuple[int, int] | None = None
             ) -> dict:
    """Unprotected and protected kv with the same clients. `cpus`: the primary's
    and the secondary's CPU; then the unprotected daemon is also measured on
    the primary's CPU (`ratio_same_cpu`), besides unpinned (`ratio`)."""
    from bench.bench_replication import protected, unprotected_ops

    unprot = unprotected_ops(seconds)
    prot, lat = protected("tap", seconds, replication=replication, cpus=cpus)
    repl, repl_lat = protected("tap", seconds, disk_mode="replicated", replication=replication,
                               cpus=cpus)
    same_cpu = {}
    if cpus is not None:
        pinned = unprotected_ops(seconds, cpu=cpus[0])
        same_cpu = {"unprotected_same_cpu": pinned, "ratio_same_cpu": prot / pinned,
                    "ratio_replicated_same_cpu": repl / pinned}
    return {**same_cpu, "unprotected": unprot, "protected": prot, "ratio": prot / unprot,
            "reply_p50_us": percentile(lat, 50) * 1e6, "reply_p99_us": percentile(lat, 99) * 1e6,
            "protected_replicated": repl, "ratio_replicated": repl / unprot,
            "replicated_reply_p50_us": percentile(repl_lat, 50) * 1e6,
            "replicated_reply_p99_us": percentile(repl_lat, 99) * 1e6}


# ---- the run ------------------------------------------------------------------------------
def _median(runs: list[dict], *path: str) -> float:
    vals = []
    for r in runs:
        for p in path:
            r = r[p]
        vals.append(r)
    return statistics.median(vals)


# Daemon settings compared in one invocation: the environment both daemons get,
# and lines added to their [replication] table.
# Both spins, the secondary's outlasting the gap between two checkpoints (~3.3 ms
# at the stress guest's 300 events/s): its CPU never idles.
SPINS_THROUGH_THE_GAP = "ack_poll_us = 500\nreceive_poll_us = 10000"
ALL_SETTINGS: dict[str, tuple[dict[str, str], str]] = {
    "native": ({"KEMARI_NATIVE_CODEC": "1"}, ""),
    "no delta": ({"KEMARI_NATIVE_CODEC": "1"}, "delta_cache_mib = 0"),
    # "native" sending cached pages as PAGES_XOR (their XOR, LZ4-compressed)
    # instead of PAGES_PATCH (the runs that changed)
    "PAGES_XOR": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_PAGE_PATCHES": "0"}, ""),
    # The Python encoder against the C one ("no delta"): the delta path's XOR
    # has a Python reference too, but far too slow to be a setting anyone runs.
    "Python": ({"KEMARI_NATIVE_CODEC": "0"}, "delta_cache_mib = 0"),
    # "native" sealing and opening frames with cryptography's AESGCM in Python
    # instead of the C cipher (native/frames.c)
    "Python frames": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_NATIVE_FRAMES": "0"}, ""),
    # "native" with both directions in TLS records instead of frames
    "TLS records": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_FRAMES": "0"}, ""),
    # "native" with only the primary's bytes in frames, the ACKs in TLS records
    # (kemari-frames/1: the secondary's read goes step by step, as below)
    "ACKs in TLS": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_FRAMES": "1"}, ""),
    # "native" with the secondary's read one wrapped C call per step (read and
    # open the frame, check the checkpoint, seal and send the ACK), and the
    # primary's wait for the ACK in Python
    "read per step": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_FAST_RECEIVE": "0"}, ""),
    # "native" with the secondary's wait for its stream in Python (select), not
    # in the one call that reads it
    "wait in Python": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_FAST_RECEIVE": "1"}, ""),
    # "native" with the primary's checkpoint one wrapped C call per step (save
    # the vCPU, harvest, encode, seal, send) instead of one call for them all
    "per step": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_FAST_CHECKPOINT": "0"}, ""),
    # "native" with the one call taken from the tap hook (Python, after the
    # exit's dispatch), not in the vCPU's run call at the exit
    "tap in Python": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_FAST_CHECKPOINT": "1"}, ""),
    # "native" writing and reading a checkpoint record by record (C for pages and
    # XOR only), not in one C call on each side
    "per record": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_CHECKPOINT_WRITER": "0",
                    "KEMARI_CHECKPOINT_READER": "0"}, ""),
    # "native" reading the vCPU's registers and TSC by ioctl, not from kvm_run (and
    # completing each doorbell's `out` with a KVM_RUN first)
    "vCPU ioctls": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_VCPU_IOCTLS": "1"}, ""),
    # "native" re-protecting every dirty page at every harvest (no hot pages)
    "no hot pages": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_HOT_PAGES": "0"}, ""),
    # "native" with a replicated disk's writes waiting for their checkpoint instead
    # of going to the secondary before the primary's own fdatasync (kv only)
    "disk writes wait": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_DISK_AHEAD": "0"}, ""),
    # "native" with the secondary's ACK waiting until it has applied and recorded
    # the checkpoint, instead of leaving as soon as the checkpoint is verified
    "ACK after apply": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_EARLY_ACK": "0"}, ""),
    # the default with the primary spinning for each ACK (in C, yielding) before it sleeps
    "ACK polling": ({"KEMARI_NATIVE_CODEC": "1"}, "ack_poll_us = 500"),
    # "native" with each daemon pinned to its own CPU (SPLIT_CPUS), as on two hosts
    "split CPUs": ({"KEMARI_NATIVE_CODEC": "1"}, ""),
    # "split CPUs" with the primary spinning for each ACK before it sleeps
    "split CPUs + ACK polling": ({"KEMARI_NATIVE_CODEC": "1"}, "ack_poll_us = 500"),
    # ... and the secondary spinning for its stream after each checkpoint too
    "split CPUs + both polling": ({"KEMARI_NATIVE_CODEC": "1"},
                                  "ack_poll_us = 500\nreceive_poll_us = 1000"),
    # ... the secondary's spin outlasting the gap between two checkpoints (300/s):
    # its CPU never idles, as under "CPU latency 0", but no other CPU is asked to
    "split CPUs + both polling through the gap": ({"KEMARI_NATIVE_CODEC": "1"},
                                                  SPINS_THROUGH_THE_GAP),
    # the same spins unpinned, where the secondary's spin shares the machine
    "both polling through the gap": ({"KEMARI_NATIVE_CODEC": "1"}, SPINS_THROUGH_THE_GAP),
    # "native" with both daemons asking the kernel for CPU wake-ups within 0 us
    # (PM QoS: idle CPUs poll instead of halting); the floor is measured under
    # the same request
    "CPU latency 0": ({"KEMARI_NATIVE_CODEC": "1"}, "cpu_latency_us = 0"),
    # "split CPUs" with that request
    "split CPUs + CPU latency 0": ({"KEMARI_NATIVE_CODEC": "1"}, "cpu_latency_us = 0"),
    # ... and the primary spinning for each ACK
    "split CPUs + CPU latency 0 + ACK polling": ({"KEMARI_NATIVE_CODEC": "1"},
                                                 "cpu_latency_us = 0\nack_poll_us = 500"),
    # "split CPUs" with the wait of "wait in Python"
    "split CPUs + wait in Python": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_FAST_RECEIVE": "1"}, ""),
    # "split CPUs" with the primary's one call from the tap hook ("tap in Python")
    "split CPUs + tap in Python": ({"KEMARI_NATIVE_CODEC": "1", "KEMARI_FAST_CHECKPOINT": "1"}, ""),
}
# Settings that pin the primary's and the secondary's side to these CPUs.
SPLIT_CPUS: dict[str, tuple[int, int]] = {"split CPUs": (0, 1), "split CPUs + ACK polling": (0, 1),
                                          "split CPUs + both polling": (0, 1),
                                          "split CPUs + both polling through the gap": (0, 1),
                                          "split CPUs + CPU latency 0": (0, 1),
                                          "split CPUs + CPU latency 0 + ACK polling": (0, 1),
                                          "split CPUs + wait in Python": (0, 1),
                                          "split CPUs + tap in Python": (0, 1)}
SETTINGS = dict(ALL_SETTINGS)


def _use(setting: str | None) -> str:
    """Set `setting`'s environment; returns its [replication] lines."""
    for name in {name for env, _ in ALL_SETTINGS.values() for name in env}:
        os.environ.pop(name, None)
    if setting is None:
        return ""
    env, replication = SETTINGS[setting]
    os.environ.update(env)
    return replication


def cpu_latency_request(setting: str) -> contextlib.AbstractContextManager:
    """The setting's replication.cpu_latency_us held by this process too, for
    its floor and its unprotected kv: the machine its daemons ran on."""
    from kemari_agent.ft.cpu_latency import CpuLatencyRequest

    latency = tomllib.loads(SETTINGS[setting][1]).get("cpu_latency_us")
    if latency is None:
        return contextlib.nullcontext()
    return contextlib.closing(CpuLatencyRequest(latency))


def main(quick: bool = False, runs: int = 3, sizes: tuple[int, ...] = (1, 8, 32, 256),
         link_mbit: int = 0) -> dict:
    """`link_mbit`: the process runs in a network namespace whose loopback
    `in_shaped_namespace` limited to this rate (0: plain loopback)."""
    secs = 2.0 if quick else 4.0
    key = _keygen()
    load_before = os.getloadavg()
    results: dict[str, dict[int, list[dict]]] = {c: {p: [] for p in sizes} for c in SETTINGS}
    kv_settings = list(SETTINGS)
    kv: dict[str, list[dict]] = {c: [] for c in kv_settings}
    floors = []
    for _ in range(runs):
        for pages in sizes:
            for setting in SETTINGS:
                replication = _use(setting)
                results[setting][pages].append(checkpoint_stages(
                    pages, secs, replication=replication, cpus=SPLIT_CPUS.get(setting)))
        _use(None)
        # The TLS part of the floor carries what a setting's smallest checkpoint
        # put on the wire (deltas make it smaller, and so its floor), over the
        # setting's transport (frames or TLS records).
        tls, exits = {}, {}
        for setting in SETTINGS:
            _use(setting)
            with cpu_latency_request(setting):
                tls[setting] = tls_ping_pong(key, int(statistics.median(
                    r["bytes_per_checkpoint"] for r in results[setting][sizes[0]])),
                    cpus=SPLIT_CPUS.get(setting))
                exits[setting] = exit_round_trip()
        _use(None)
        floors.append({"exit": exits, "tls": tls})
        for setting in kv_settings:
            replication = _use(setting)
            with cpu_latency_request(setting):      # the unprotected daemon's too
                kv[setting].append(kv_ratio(secs, replication, cpus=SPLIT_CPUS.get(setting)))
    _use(None)
    load_after = os.getloadavg()

    rows: list[tuple[str, object, str]] = []
    for setting in SETTINGS:
        exit_p50 = _median(floors, "exit", setting, "p50")
        tls_p50 = _median(floors, "tls", setting, "p50")
        floor = exit_p50 + tls_p50
        rows += [
            (f"[{setting}] floor: port-I/O exit round trip p50 (Machine.run)", exit_p50, "us"),
            (f"[{setting}] bytes per checkpoint, 1 / 32 dirty pages",
             " / ".join(f"{_median(results[setting][p], 'bytes_per_checkpoint'):.0f}"
                        for p in (1, 32) if p in sizes), "B"),
            (f"[{setting}] floor: TLS ping-pong p50, {sizes[0]}-page checkpoint bytes out, "
             "ACK back", tls_p50, "us"),
            (f"[{setting}] floor: exit + TLS ping-pong", floor, "us"),
            (f"[{setting}] floor: TLS ping-pong p99 / p50",
             _median(floors, "tls", setting, "p99") / tls_p50, ""),
        ]
        for pages in sizes:
            rs = results[setting][pages]
            p50, p99 = _median(rs, "p50"), _median(rs, "p99")
            rows.append((f"[{setting}] checkpoint p50 / p99, {pages} dirty pages",
                         f"{p50:.0f} / {p99:.0f}", "us"))
            rows.append((f"[{setting}]   p50 / floor ({pages} pages; goal <= 1.5 up to 32)",
                         p50 / floor, ""))
            rows.append((f"[{setting}]   p99 / p50 (goal <= 3)", p99 / p50, ""))
            rows.append((f"[{setting}]   early ACK reached the primary after the "
                         "secondary's apply", 100 * _median(rs, "ack_after_apply"), "%"))
            rows.append((f"[{setting}]   secondary CPU per checkpoint",
                         _median(rs, "secondary_cpu_us_per_checkpoint"), "us"))
            rows.append((f"[{setting}]   primary CPU per checkpoint (guest included)",
                         _median(rs, "primary_cpu_us_per_checkpoint"), "us"))
    for setting in SETTINGS:
        for pages in (p for p in sizes if p in (1, 32)):
            rs = results[setting][pages]
            for name, _a, _b in STAGES:
                # a stage most checkpoints do not mark (the steps inside the
                # one-call checkpoint; only the few that go step by step do)
                if statistics.median(r["stages"][name]["share"] for r in rs) < 0.5:
                    continue
                rows.append((f"[{setting}, {pages} p] {name}",
                             statistics.median(r["stages"][name]["p50"] for r in rs), "us p50"))
            for name, _a, _b in SLOW_SPANS:
                slow = [r["slowest"][name] for r in rs if r["slowest"]]
                if slow:
                    rows.append((
                        f"[{setting}, {pages} p] slowest {SLOWEST:.0%}: {name}",
                        f"{100 * statistics.median(x['share'] for x in slow):.0f}% "
                        f"({statistics.median(x['median_slow'] for x in slow):.0f} against "
                        f"{statistics.median(x['median_all'] for x in slow):.0f})",
                        "of them (us there, p50)"))
    for setting in kv_settings:
        rows += [
            (f"[{setting}] kv ops/s unprotected / protected (4 clients)",
             f"{_median(kv[setting], 'unprotected'):.0f} / "
             f"{_median(kv[setting], 'protected'):.0f}", "ops/s"),
            (f"[{setting}] kv ratio protected / unprotected (goal >= 0.5)",
             _median(kv[setting], "ratio"), ""),
            (f"[{setting}] kv reply latency p50 / p99, protected",
             f"{_median(kv[setting], 'reply_p50_us'):.0f} / "
             f"{_median(kv[setting], 'reply_p99_us'):.0f}", "us"),
            (f"[{setting}] kv ops/s protected, replicated disk (same clients)",
             _median(kv[setting], "protected_replicated"), "ops/s"),
            (f"[{setting}] kv ratio, replicated disk / unprotected (goal >= 0.5)",
             _median(kv[setting], "ratio_replicated"), ""),
            (f"[{setting}] kv reply latency p50 / p99, replicated disk",
             f"{_median(kv[setting], 'replicated_reply_p50_us'):.0f} / "
             f"{_median(kv[setting], 'replicated_reply_p99_us'):.0f}", "us"),
        ]
        if setting in SPLIT_CPUS:
            rows += [
                (f"[{setting}] kv ops/s unprotected, daemon on the primary's CPU",
                 _median(kv[setting], "unprotected_same_cpu"), "ops/s"),
                (f"[{setting}] kv ratio, shared / replicated disk, against that",
                 f"{_median(kv[setting], 'ratio_same_cpu'):.2f} / "
                 f"{_median(kv[setting], 'ratio_replicated_same_cpu'):.2f}", ""),
            ]
    rows += [
        ("replication link", f"loopback shaped to {link_mbit} Mbit/s, MTU 1500"
         if link_mbit else "loopback, MTU 65536", ""),
        ("load average before / after (1 min)",
         f"{load_before[0]:.2f} / {load_after[0]:.2f}", ""),
        ("placement", "unpinned (2 CPUs), but \"split CPUs\": primary on CPU 0, secondary "
                      "on CPU 1 (checkpoints, the TLS floor and protected kv; the kv "
                      "clients unpinned)", ""),
    ]
    name = f"checkpoint_stages_{link_mbit}mbit" if link_mbit else "checkpoint_stages"
    return report(name, rows, {"link_mbit": link_mbit,
        "runs": runs, "seconds_per_run": secs, "floors": floors, "kv": kv,
        "settings": SETTINGS, "load_before": load_before, "load_after": load_after,
        "checkpoints": {c: {str(p): v for p, v in d.items()} for c, d in results.items()}})


def in_shaped_namespace(mbit: int, argv: list[str]) -> int:
    """Run this bench again in a new network namespace whose loopback is an
    Ethernet-sized link of `mbit` Mbit/s (MTU 1500, a token bucket of 3
    frames), the namespace removed after: what a checkpoint's bytes cost on
    a real replication link, beside plain loopback's memory copies."""
    import subprocess
    import sys

    ns = f"kemari-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "mtu", "1500", "up"], check=True)
        subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
                        f"{mbit}mbit", "burst", "4500", "latency", "50ms"], check=True)
        return subprocess.call(["ip", "netns", "exec", ns, sys.executable, "-m",
                                "bench.bench_checkpoint_stages", *argv, "--shaped", str(mbit)])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="1,8,32,256")
    ap.add_argument("--settings", default=",".join(ALL_SETTINGS),
                    help=f"daemon settings to compare, of: {', '.join(ALL_SETTINGS)}")
    ap.add_argument("--link-mbit", type=int, default=0,
                    help="replicate over a loopback shaped to this rate (root: a netns + tc)")
    ap.add_argument("--shaped", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.link_mbit:
        raise SystemExit(in_shaped_namespace(a.link_mbit, [
            "--runs", str(a.runs), "--sizes", a.sizes, "--settings", a.settings,
            *(["--quick"] if a.quick else [])]))
    SETTINGS = {name: ALL_SETTINGS[name] for name in a.settings.split(",")}
    socket.setdefaulttimeout(None)
    main(a.quick, a.runs, tuple(int(x) for x in a.sizes.split(",")), a.shaped)
