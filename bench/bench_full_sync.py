"""Full sync of a guest whose memory is all in use (issue 10): page-data
bytes/s, pages, rounds, the guest's slowdown while it runs (stress
events/s during the sync vs before it), and each daemon's CPU seconds per
GiB of page data (the primary's beyond what it used before the sync: its
guest), which say what one core per side, on two hosts, would carry.
Medians of RUNS syncs in one run, for each content of memory (`stress.fill`:
none = one counter per page, text = random words, random = incompressible)
with LZ4 on and off, and with the primary's bytes in frames (the default) or
in TLS records (`--transport tls`, KEMARI_FRAMES=0 in both daemons).

The `stress` guest dirties PAGES pages per I/O event at RATE events/s over a
working set of all its memory, so after FILL_S every page is non-zero. Each
run restarts the secondary (it loses its checkpoint), so the primary sends a
full sync while the guest keeps dirtying pages. Doorbells (one per stress
event) are the guest's progress counter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from ftlab import FtLab

from bench.common import report
from kemari_agent.control import request

PAGES, RATE = 256, 100          # 25,600 pages/s dirtied: 100 MiB/s
RUNS = 3


def _status(node) -> dict:
    """The daemon's status over its control socket: the `kemari status` command
    would start a Python process per poll, a core's worth of CPU at this rate,
    taken from the daemons being measured."""
    return request(node.dir / "run" / f"{node.lab.name}.sock", "status", timeout=10)


def _doorbells(node) -> tuple[int, float]:
    vm = _status(node)["vm"]
    return vm["doorbells"], vm["uptime_s"]


def _cpu_s(node) -> float:
    """CPU seconds the node's daemon has used (the primary's includes its guest)."""
    fields = Path(f"/proc/{node.pid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(node, seconds: float) -> tuple[float, float]:
    """The guest's events/s, and the daemon's CPU seconds per second, meanwhile."""
    d0, t0 = _doorbells(node)
    c0 = _cpu_s(node)
    time.sleep(seconds)
    d1, t1 = _doorbells(node)
    c1 = _cpu_s(node)
    return (d1 - d0) / max(1e-9, t1 - t0), (c1 - c0) / max(1e-9, t1 - t0)


def _one_sync(lab: FtLab, primary_cpu_before: float) -> dict:
    """Restart the secondary; returns the primary's last_sync plus the guest's
    event rate over the sync (sampled from the primary's status) and each
    daemon's CPU seconds per GiB of page data: the secondary's from its start
    (its imports done), the primary's beyond `primary_cpu_before` per second
    (its guest and loop before the sync)."""
    before = _status(lab.primary)["last_sync"]
    lab.secondary.kill()
    lab.secondary.start("secondary")
    s0, p0, w0 = _cpu_s(lab.secondary), _cpu_s(lab.primary), time.monotonic()
    d0, t0 = _doorbells(lab.primary)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        st = _status(lab.primary)
        if st["state"] == "synced" and st["last_sync"] != before:
            s1, p1, w1 = _cpu_s(lab.secondary), _cpu_s(lab.primary), time.monotonic()
            d1, t1 = st["vm"]["doorbells"], st["vm"]["uptime_s"]
            sync = st["last_sync"]
            assert sync["kind"] == "full", sync
            gib = max(1, sync["pages"]) * 4096 / (1 << 30)
            # the sync started after t0 (the secondary's start): the rate over
            # [t0, t1] covers it plus the handshake
            return dict(sync, events_per_s=(d1 - d0) / max(1e-9, t1 - t0),
                        secondary_cpu_s_per_gib=(s1 - s0) / gib,
                        primary_cpu_s_per_gib=(p1 - p0 - primary_cpu_before * (w1 - w0)) / gib)
        time.sleep(0.05)
    raise RuntimeError(f"never in sync: {_status(lab.primary)}")


FILLS = ("none", "text", "random")     # the stress guest's memory: see docs/configuration.md


TRANSPORTS = ("frames", "tls")


def _settings(fill: str, compression: str, transport: str) -> str:
    return f"fill={fill}, compression={compression}, transport={transport}"


def _syncs_of(memory_mib: int, fill: str, compression: str, transport: str,
              runs: int) -> tuple[list, list]:
    """`runs` full syncs of one guest, each after restarting the secondary."""
    lab = FtLab(Path(tempfile.mkdtemp(prefix="kemari-bench-")), memory_mib=memory_mib,
                image="stress",
                extra=f"[stress]\npages = {PAGES}\nrate_hz = {RATE}\n"
                      f"working_set = 1000000\nfill = \"{fill}\"")
    for node in lab.nodes:
        node.env["KEMARI_FRAMES"] = "1" if transport == "frames" else "0"
    cfg = lab.primary.config
    cfg.write_text(cfg.read_text().replace(
        "[replication]\n", f"[replication]\ncompression = \"{compression}\"\n", 1))
    syncs, before = [], []
    try:
        lab.primary.start("primary")
        time.sleep((memory_mib << 8) / (PAGES * RATE) + 1.0)   # every page written once
        lab.secondary.start("secondary")
        lab.wait_synced(300)
        for _ in range(runs):
            events, cpu = _rate(lab.primary, 2.0)
            before.append(events)
            syncs.append(_one_sync(lab, cpu))
    finally:
        lab.close()
    return syncs, before


def main(memory_mib: int = 256, runs: int = RUNS, fills: tuple[str, ...] = FILLS,
         compressions: tuple[str, ...] = ("lz4", "none"),
         transports: tuple[str, ...] = TRANSPORTS) -> dict:
    """Each content of guest memory with LZ4 on and off, over frames and TLS
    records, one guest per setting, the settings interleaved: page-data GiB/s,
    wire bytes per page byte, rounds, guest speed."""
    results = {}
    for fill in fills:
        for compression in compressions:
            for transport in transports:
                results[_settings(fill, compression, transport)] = _syncs_of(
                    memory_mib, fill, compression, transport, runs)
    load = os.getloadavg()
    rows = []
    for tag, (syncs, before) in results.items():
        med = lambda key, s=syncs: statistics.median(x[key] for x in s)  # noqa: E731
        page_bytes = [x["pages"] * 4096 / x["seconds"] for x in syncs]
        slow = [x["events_per_s"] / b for x, b in zip(syncs, before, strict=True) if b > 0]
        rows += [
            (f"{tag}: pages sent", int(med("pages")), ""),
            (f"{tag}: rounds", int(med("rounds")), ""),
            (f"{tag}: sync time", med("seconds") * 1e3, "ms"),
            (f"{tag}: page data rate", statistics.median(page_bytes) / (1 << 30), "GiB/s"),
            (f"{tag}: stream bytes / page data",
             med("bytes") / (med("pages") * 4096), "x"),
            (f"{tag}: guest speed during / before",
             statistics.median(slow) if slow else 0.0, "x"),
            (f"{tag}: primary CPU per GiB of page data (beyond its guest's)",
             med("primary_cpu_s_per_gib"), "s"),
            (f"{tag}: secondary CPU per GiB of page data", med("secondary_cpu_s_per_gib"), "s"),
            # what the sync would reach with a core for each daemon (two hosts)
            (f"{tag}: page data rate a core per side would carry",
             1 / max(med("primary_cpu_s_per_gib"), med("secondary_cpu_s_per_gib"), 1e-9),
             "GiB/s"),
        ]
    rows.append(("load average (1 min) after", load[0], ""))
    guest = (f"{memory_mib} MiB stress guest, {PAGES} pages x {RATE}/s over all memory, "
             f"{runs} full syncs per setting (medians)")
    return report("full_sync", rows, {"guest": guest, "loadavg": load,
                                      "syncs": {k: v[0] for k, v in results.items()},
                                      "events_before": {k: v[1] for k, v in results.items()}})


FAST_PAGES, FAST_RATE = 2048, 500      # all of memory dirty again in every round


def _fast_dirtier_sync(memory_mib: int, auto_converge: bool) -> dict:
    """One full sync of a guest that dirties memory faster than the link."""
    lab = FtLab(Path(tempfile.mkdtemp(prefix="kemari-bench-")), memory_mib=memory_mib,
                image="stress", extra=f"[stress]\npages = {FAST_PAGES}\n"
                                      f"rate_hz = {FAST_RATE}\nworking_set = 1000000\n"
                                      'fill = "random"')   # LZ4 cannot help
    cfg = lab.primary.config
    cfg.write_text(cfg.read_text().replace(
        "[replication]\n", f"[replication]\nauto_converge = {str(auto_converge).lower()}\n", 1))
    try:
        lab.primary.start("primary")
        time.sleep((memory_mib << 8) / (FAST_PAGES * FAST_RATE) + 1.0)
        before, cpu = _rate(lab.primary, 2.0)
        lab.secondary.start("secondary")
        lab.wait_synced(300)
        return _one_sync(lab, cpu) | {"events_before": before}
    finally:
        lab.close()


def auto_converge(memory_mib: int = 128, runs: int = RUNS) -> dict:
    """The same fast-dirtying guest synced with and without auto-converge,
    interleaved: rounds, the guest's pause for the closing checkpoint, the
    time it was throttled, and its speed during the sync."""
    runs_by = {True: [], False: []}
    for _ in range(runs):
        for setting in (True, False):
            runs_by[setting].append(_fast_dirtier_sync(memory_mib, setting))
    load = os.getloadavg()
    rows = []
    for setting, syncs in runs_by.items():
        tag = "auto-converge on " if setting else "auto-converge off"
        med = lambda key, s=syncs: statistics.median(x[key] for x in s)  # noqa: E731
        rows += [
            (f"{tag}: rounds (median)", int(med("rounds")), ""),
            (f"{tag}: pages left for the closing checkpoint", int(med("closing_pages")), ""),
            (f"{tag}: guest paused for it (closing checkpoint)", med("closing_s") * 1e3, "ms"),
            (f"{tag}: highest throttle", int(med("throttle_max_percent")), "%"),
            (f"{tag}: guest held by the throttle", med("throttle_held_s") * 1e3, "ms"),
            (f"{tag}: sync time", med("seconds") * 1e3, "ms"),
            (f"{tag}: guest speed during / before",
             statistics.median(x["events_per_s"] / x["events_before"] for x in syncs), "x"),
        ]
    rows.append(("load average (1 min) after", load[0], ""))
    guest = (f"{memory_mib} MiB stress guest, {FAST_PAGES} pages x {FAST_RATE}/s asked over "
             f"all memory, {runs} syncs per setting")
    return report("full_sync_auto_converge", rows,
                  {"guest": guest, "syncs": {str(k): v for k, v in runs_by.items()},
                   "loadavg": load})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--fill", choices=FILLS, action="append",
                    help="memory contents to sync (repeatable; default: all)")
    ap.add_argument("--compression", choices=("lz4", "none"), action="append",
                    help="replication.compression settings (repeatable; default: both)")
    ap.add_argument("--transport", choices=TRANSPORTS, action="append",
                    help="frames or TLS records (repeatable; default: both)")
    ap.add_argument("--auto-converge", action="store_true",
                    help="a guest that outruns the link, with and without auto-converge")
    a = ap.parse_args()
    if a.auto_converge:
        auto_converge(min(a.memory_mib, 128), a.runs)
    else:
        main(a.memory_mib, a.runs, tuple(a.fill or FILLS),
             tuple(a.compression or ("lz4", "none")), tuple(a.transport or TRANSPORTS))
