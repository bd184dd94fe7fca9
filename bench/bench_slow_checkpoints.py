"""What the slowest checkpoints waited for: the stage moments beside a scheduler trace.

A protected `stress` guest runs with each daemon pinned to its own CPU (as on
two hosts) while `perf record` traces the scheduler (sched_switch,
sched_waking, sched_wakeup) on every CPU with CLOCK_MONOTONIC, the clock of
the daemons' stage moments (KEMARI_STAGES=1). Each checkpoint of the slowest
SLOWEST is put down to the span of bench_checkpoint_stages.SLOW_SPANS that
exceeded its median the most, and that span to what the CPU that had to run
it did meanwhile:

- "CPU idle": the thread was woken but its CPU ran nothing: a wake-up of an
  idle CPU that took long to arrive (a deep idle state, or, on a VM, a vCPU
  its host had halted);
- "CPU taken by <comm>": another thread ran there (named);
- "the daemon's main thread on its CPU throughout": the thread that takes
  (primary) or receives (secondary) the checkpoint ran throughout, in a span
  that takes a few tens of microseconds: on a VM, the host did not run that
  vCPU (steal);
- "another thread of the daemon" (e.g. the secondary's prefault after its
  start, its control thread answering a status).

The trace costs something itself: read the causes' shares, not its latencies.

Run: python -m bench.bench_slow_checkpoints [--settings "split CPUs,..."]
Needs perf (Debian: linux-perf) and root.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.bench_checkpoint_stages import (
    ALL_SETTINGS,
    SLOW_SPANS,
    SPLIT_CPUS,
    _use,
    blame_slowest,
    span_moments,
    stress_pair,
    window_seqs,
)
from bench.common import report

SLOWEST = 0.02
EVENTS = ["sched:sched_switch", "sched:sched_waking", "sched:sched_wakeup"]
LINE = re.compile(r"\s*(.+?)\s+(\d+) \[(\d+)\] (\d+)\.(\d+): sched:(\w+): (.*)")
SWITCH = re.compile(r"prev_pid=(\d+) .*==> next_comm=(.+?) next_pid=(\d+)")


def traced(pages: int, seconds: float, setting: str, trace: Path) -> dict:
    """One pinned run under perf: the daemons' stage rows, threads and window."""
    replication = _use(setting)
    cpus = SPLIT_CPUS[setting]
    perf = subprocess.Popen(["perf", "record", "-a", "-q", "-k", "CLOCK_MONOTONIC",
                             *[a for e in EVENTS for a in ("-e", e)], "-o", str(trace)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with stress_pair(pages, replication=replication, cpus=cpus) as lab:
            tids = {side: {int(t) for t in os.listdir(f"/proc/{node.pid()}/task")}
                    for side, node in (("p", lab.primary), ("s", lab.secondary))}
            pids = {"p": lab.primary.pid(), "s": lab.secondary.pid()}
            window = (time.monotonic_ns(), time.monotonic_ns() + int(seconds * 1e9))
            time.sleep(seconds)
            rows = {"p": lab.primary.status()["stages"], "s": lab.secondary.status()["stages"]}
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=60)
        _use(None)
    if perf.returncode not in (0, -signal.SIGINT):
        raise SystemExit(f"perf record failed: {err.decode(errors='replace').strip()}")
    return {"rows": rows, "tids": tids, "pids": pids, "window": window,
            "cpu": {"p": cpus[0], "s": cpus[1]}}


def read_trace(trace: Path) -> tuple[dict[int, list], dict[int, str]]:
    """Per CPU, its switches (time, next tid) in order; and tid -> command."""
    out = subprocess.run(["perf", "script", "-i", str(trace), "--ns",
                          "-F", "comm,tid,cpu,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    switches: dict[int, list] = collections.defaultdict(list)
    comms: dict[int, str] = {0: "idle"}
    for line in out.splitlines():
        m = LINE.match(line)
        if not m or m[6] != "sched_switch":
            continue
        s = SWITCH.search(m[7])
        if s:
            switches[int(m[3])].append((int(m[4]) * 10**9 + int(m[5]), int(s[3])))
            comms.setdefault(int(s[3]), s[2])
    return switches, comms


def occupancy(switches: list, t0: int, t1: int) -> collections.Counter:
    """tid -> ns it had the CPU within [t0, t1]."""
    occ: collections.Counter = collections.Counter()
    current, since = None, t0
    for t, nxt in switches:
        if t <= t0:
            current = nxt
            continue
        if t >= t1:
            break
        occ[current] += t - since
        current, since = nxt, t
    occ[current] += t1 - since
    return occ


def classify(run: dict, switches: dict, comms: dict) -> list[dict]:
    prim = {r["seq"]: r for r in run["rows"]["p"]}
    sec = {r["seq"]: r for r in run["rows"]["s"]}
    spans = span_moments(prim, sec, window_seqs(prim, sec, run["window"]))
    median, blamed = blame_slowest(prim, spans, SLOWEST)
    found = []
    for seq, i in blamed:
        name, _start, end = SLOW_SPANS[i]
        t0, t1 = spans[seq][i]
        side = end.split(".")[0]        # the daemon whose CPU had to run the span's end
        occ = occupancy(switches.get(run["cpu"][side], []), t0, t1)
        tid, ns = occ.most_common(1)[0] if occ else (None, 0)
        if tid == 0:
            cause = "CPU idle (a slow wake-up)"
        elif tid == run["pids"][side]:      # the thread that checkpoints, or receives
            cause = "the daemon's main thread on its CPU throughout (host did not run it)"
        elif tid in run["tids"][side]:
            cause = "another thread of the daemon"
        else:
            cause = f"CPU taken by {comms.get(tid, '?')}"
        found.append({"seq": seq, "total_us": (prim[seq]["ack_decoded"] - prim[seq]["start"])
                      / 1e3, "span": name, "span_us": (t1 - t0) / 1e3,
                      "median_us": median[i] / 1e3, "cause": cause,
                      "cause_share": ns / max(1, t1 - t0)})
    return found


def main(settings: list[str], pages: int = 1, seconds: float = 4.0, runs: int = 2) -> dict:
    if shutil.which("perf") is None:
        raise SystemExit("bench_slow_checkpoints needs perf: apt-get install linux-perf")
    rows: list[tuple[str, object, str]] = []
    details = {}
    for setting in settings:
        found = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory(prefix="kemari-trace-") as d:
                trace = Path(d) / "sched.data"
                run = traced(pages, seconds, setting, trace)
                found += classify(run, *read_trace(trace))
        details[setting] = found
        causes = collections.Counter(f["cause"] for f in found)
        rows.append((f"[{setting}] slowest {SLOWEST:.0%} of checkpoints, {runs} runs",
                     len(found), "checkpoints"))
        for cause, n in causes.most_common():
            of = [f for f in found if f["cause"] == cause]
            rows.append((f"[{setting}]   {cause}", f"{n} ({100 * n / len(found):.0f}%), span "
                         f"p50 {statistics.median(f['span_us'] for f in of):.0f} us", ""))
        for f in sorted(found, key=lambda f: -f["total_us"])[:5]:
            rows.append((f"[{setting}]   e.g. {f['total_us']:.0f} us: {f['span']}",
                         f"{f['span_us']:.0f} us (p50 {f['median_us']:.0f}): {f['cause']}", ""))
    rows.append(("pages per event / rate / seconds per run", f"{pages} / 300 Hz / {seconds}", ""))
    rows.append(("load average (1 min)", f"{os.getloadavg()[0]:.2f}", ""))
    return report("slow_checkpoints", rows, {"checkpoints": details})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    pinned = [s for s in ALL_SETTINGS if s in SPLIT_CPUS]
    ap.add_argument("--settings", default="split CPUs,split CPUs + CPU latency 0",
                    help=f"pinned daemon settings, of: {', '.join(pinned)}")
    ap.add_argument("--pages", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    main(a.settings.split(","), a.pages, runs=a.runs)
