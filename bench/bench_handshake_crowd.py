"""What a crowd at the secondary's replication port costs protection (issue 7
section 5): one protected kv guest under client load, first alone, then
while a crowd of connections that are not its primary (idle, half-open,
slow TLS, wrong key, silent after authenticating, an older primary; see
tests/crowd.py, run in its own process) keeps the port busy. Checkpoint tap->release p50/p99 at the
primary and the kv clients' view, each phase, and the ratio within the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crowd import KINDS
from ftlab import FtLab

from bench.common import REPO, percentile, report
from kemari_agent.kvload import Clients

CLIENTS = 2
PER_KIND = 3


def phase(seconds: float, with_crowd: bool) -> dict:
    """A fresh pair, then `seconds` of client load (with the crowd already at the
    door, past its 5 s waits so connections expire and come back). The primary
    reports the latencies of its last 2000 checkpoints: a fresh pair keeps
    the other phase out of them."""
    lab = FtLab(Path(tempfile.mkdtemp(prefix="kemari-bench-")))
    crowd: subprocess.Popen | None = None
    try:
        lab.start_pair()
        if with_crowd:
            port = int(lab.secondary.config.read_text().split('listen = "127.0.0.1:')[1]
                       .split('"')[0])
            crowd = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "crowd.py"), str(port), str(lab.key),
                 lab.name, str(lab.memory_mib << 20), "--per-kind", str(PER_KIND)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
            time.sleep(6.0)
        before = lab.primary.status()
        clients = Clients(lab.addr, n=CLIENTS).start()
        time.sleep(seconds)
        after = lab.primary.status()
        clients.stop()
        sec = lab.secondary.status()
    finally:
        if crowd is not None:
            crowd_counts = json.loads(crowd.communicate("", timeout=60)[0])["connections"]
        lab.close()
    lat = [x for r in clients.records for x in r.latencies]
    return {"p50_us": after["latency_us"]["p50"], "p99_us": after["latency_us"]["p99"],
            "checkpoints": after["checkpoints"] - before["checkpoints"],
            "state_after": after["state"],
            "same_session": after["last_sync"] == before["last_sync"],
            "kv_ops_s": len(lat) / seconds, "kv_p99_us": percentile(lat, 99) * 1e6,
            "kv_errors": sum(len(r.errors) for r in clients.records),
            "secondary_incoming": sec.get("incoming"),
            "secondary_ack_us": sec["latency_us"],
            "crowd_connections": crowd_counts if crowd else None}


def main(seconds: float = 6.0) -> dict:
    alone = phase(seconds, with_crowd=False)
    crowded = phase(seconds, with_crowd=True)
    rows = [
        ("checkpoint tap->release p50, no crowd", alone["p50_us"], "us"),
        ("checkpoint tap->release p99, no crowd", alone["p99_us"], "us"),
        (f"checkpoint tap->release p50, crowd of {PER_KIND * len(KINDS)}", crowded["p50_us"],
         "us"),
        (f"checkpoint tap->release p99, crowd of {PER_KIND * len(KINDS)}", crowded["p99_us"],
         "us"),
        ("ratio p99 crowd / no crowd", crowded["p99_us"] / alone["p99_us"], ""),
        ("checkpoints in each phase (no crowd / crowd)",
         f"{alone['checkpoints']} / {crowded['checkpoints']}", ""),
        ("kv ops/s (no crowd / crowd)",
         f"{alone['kv_ops_s']:.0f} / {crowded['kv_ops_s']:.0f}", ""),
        ("kv reply p99 (no crowd / crowd)",
         f"{alone['kv_p99_us']:.0f} / {crowded['kv_p99_us']:.0f}", "us"),
        ("same session throughout, state after crowd",
         f"{crowded['same_session']}, {crowded['state_after']}", ""),
        ("crowd connections refused / timed out / evicted",
         "{refused} / {timed_out} / {evicted}".format(**crowded["secondary_incoming"]), ""),
    ]
    return report("handshake_crowd", rows, {"no_crowd": alone, "crowd": crowded,
                                            "crowd_per_kind": PER_KIND, "kinds": list(KINDS)})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    main(ap.parse_args().seconds)
