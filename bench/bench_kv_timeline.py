"""Where a kv request batch's time goes (issue 10): the VMM loop's timeline.

With KEMARI_STAGES=1 the loop notes its moments (each exit and why, each
tap released, each doorbell answered, frames delivered: `Vmm.timeline`).
This bench runs the kv guest under the same 4 clients unprotected, then
protected with a shared disk and with a replicated one (and, with
`--settings`, under other daemon settings), takes the primary's last few
thousand moments while the clients still run, and reports the median of
each step between two moments: the guest running between exits, the
checkpoints, the disk write, the replies' sends. One cycle is one batch of
requests, from one reply doorbell to the next.

Run: python -m bench.bench_kv_timeline [--seconds S] [--settings "native,no hot pages"]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

from ftlab import FtLab

from bench.bench_checkpoint_stages import ALL_SETTINGS
from bench.bench_replication import unprotected_kv
from bench.common import report
from kemari_agent.control import request
from kemari_agent.kvload import Clients

CYCLE_START = "exit: net doorbell"


def steps(timeline: list[tuple[int, str]]) -> dict[str, list[float]]:
    """Durations (us) of each kind of step `A -> B` between consecutive moments,
    the guest's runs named by the exit that ends them."""
    out: dict[str, list[float]] = collections.defaultdict(list)
    for (t0, a), (t1, b) in itertools.pairwise(timeline):
        name = f"guest runs, until {b}" if b.startswith("exit") and a != "exit: kicked" \
            else f"{a} -> {b}"
        out[name].append((t1 - t0) / 1000)
    starts = [t for t, what in timeline if what == CYCLE_START]
    out["cycle (reply doorbell to reply doorbell)"] = [
        (b - a) / 1000 for a, b in itertools.pairwise(starts)]
    return out


def measure(addr, status, seconds: float) -> dict:
    clients = Clients(addr, n=4).start()
    time.sleep(seconds)
    timeline = status()["vm"]["timeline"]
    clients.stop()
    ops = sum(len(r.latencies) for r in clients.records) / seconds
    cycles = sum(1 for _t, what in timeline if what == CYCLE_START)
    summary = {}
    for name, vals in steps(timeline).items():
        summary[name] = {"p50_us": statistics.median(vals), "per_cycle": len(vals) / cycles}
    return {"ops_per_s": ops, "steps": summary}


def unprotected(seconds: float) -> dict:
    with unprotected_kv("bench-t") as (addr, sock):
        return measure(addr, lambda: request(sock, "status"), seconds)


def protected(seconds: float, disk_mode: str, replication: str) -> dict:
    lab = FtLab(Path(tempfile.mkdtemp(prefix="kemari-bench-")), disk_mode=disk_mode,
                replication=replication)
    try:
        lab.start_pair()
        return measure(lab.addr, lab.primary.status, seconds)
    finally:
        lab.close()


def main(seconds: float, settings: list[str]) -> dict:
    os.environ["KEMARI_STAGES"] = "1"
    runs = {"unprotected": unprotected(seconds)}
    for setting in settings:
        env, replication = ALL_SETTINGS[setting]
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            for disk in ("shared", "replicated"):
                runs[f"{setting}, {disk} disk"] = protected(seconds, disk, replication)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    rows = []
    for run, got in runs.items():
        rows.append((f"[{run}] kv ops/s (4 clients)", got["ops_per_s"], "ops/s"))
        ordered = sorted(got["steps"].items(), key=lambda kv: -kv[1]["p50_us"] * kv[1]["per_cycle"])
        for name, st in ordered:
            if st["per_cycle"] >= 0.2:
                rows.append((f"[{run}] {name}",
                             f"{st['p50_us']:.0f} us x {st['per_cycle']:.2f}", "per cycle"))
    return report("kv_timeline", rows, {"seconds": seconds, "runs": runs})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--settings", default="native",
                    help=f"daemon settings for the protected runs, of: {', '.join(ALL_SETTINGS)}")
    a = ap.parse_args()
    main(a.seconds, a.settings.split(","))
