"""`kemari metrics`: a VM's status in the Prometheus text exposition format.

Rendered from `status --json` (so it works for a stopped VM too), either to
stdout for a scrape wrapper or atomically into a file for node_exporter's
textfile collector. The checkpoint latency histogram is cumulative since the
daemon became primary (LatencyWindow counts every observation).
"""

from __future__ import annotations

import bisect
import collections
import os
import tempfile
from pathlib import Path

# seconds: from the ~100 us floor of a loopback round trip up to a stalled peer
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0)
ROLES = ("primary", "secondary", "stopped")
STATES = ("running", "syncing", "synced", "standalone", "suspended", "failed", "stopped")


class LatencyWindow(collections.deque):
    """The protector's window of recent checkpoint latencies (seconds), which also
    counts every one into cumulative histogram buckets."""

    def __init__(self, maxlen: int | None = 2000) -> None:
        super().__init__(maxlen=maxlen)
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)   # last: above the largest bucket
        self.total = 0
        self.sum = 0.0

    def append(self, seconds: float) -> None:
        super().append(seconds)
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += 1
        self.sum += seconds

    def histogram(self) -> dict:
        cumulative, running = [], 0
        for bound, count in zip(LATENCY_BUCKETS, self.counts, strict=False):
            running += count
            cumulative.append([bound, running])
        return {"buckets": cumulative, "count": self.total, "sum": round(self.sum, 6)}


def _labels(**labels: str) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


def render(status: dict) -> str:
    """Prometheus text format for one VM's status dict."""
    vm = status["name"]
    out: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[dict, float]]) -> None:
        out.append(f"# HELP kemari_{name} {text}")
        out.append(f"# TYPE kemari_{name} {kind}")
        for labels, value in samples:
            out.append(f"kemari_{name}{_labels(vm=vm, **labels)} {value:g}")

    role, state = status.get("role", "stopped"), status.get("state", "stopped")
    metric("up", "gauge", "1 if the VM's daemon answers", [({}, role != "stopped")])
    metric("role", "gauge", "this node's role (1 for the current one)",
           [({"role": r}, r == role) for r in ROLES])
    metric("state", "gauge", "replication state (1 for the current one)",
           [({"state": s}, s == state) for s in STATES])
    if role == "stopped":
        return "\n".join(out) + "\n"
    for name, key, text in (
            ("generation", "generation", "promotions this VM went through"),
            ("checkpoint_seq", "checkpoint_seq", "sequence number of the last checkpoint")):
        metric(name, "gauge", text, [({}, status.get(key) or 0)])
    metric("checkpoints_total", "counter", "checkpoints sent or applied by this daemon",
           [({}, status.get("checkpoints") or 0)])
    for direction in ("sent", "received"):
        metric(f"bytes_{direction}_total", "counter", f"replication bytes {direction}",
               [({}, status.get(f"bytes_{direction}") or 0)])
    age = status.get("last_checkpoint_age_ms")
    if age is not None:
        metric("last_checkpoint_age_seconds", "gauge",
               "time since the last checkpoint was acknowledged or applied (lag)",
               [({}, age / 1000)])
    for flag in ("has_checkpoint", "consistent", "outdated", "promotable"):
        if status.get(flag) is not None:
            metric(flag, "gauge", f"status flag {flag}", [({}, bool(status[flag]))])
    sync = status.get("sync") or {}
    if sync.get("pages_total"):
        done = 1 - sync.get("pages_remaining", 0) / sync["pages_total"]
        metric("sync_progress_ratio", "gauge", "progress of the running full sync",
               [({}, max(0.0, min(1.0, done)))])
    fence = status.get("peer_fence")
    if fence is not None:
        metric("peer_fenced", "gauge", "1 while the peer is barred from promotion",
               [({}, fence.get("fenced", False))])
    hist = status.get("latency_histogram")
    if hist is not None:
        out.append("# HELP kemari_checkpoint_latency_seconds checkpoint send-to-ACK time")
        out.append("# TYPE kemari_checkpoint_latency_seconds histogram")
        for bound, count in hist["buckets"]:
            out.append(f"kemari_checkpoint_latency_seconds_bucket"
                       f"{_labels(vm=vm, le=f'{bound:g}')} {count}")
        out.append(f"kemari_checkpoint_latency_seconds_bucket{_labels(vm=vm, le='+Inf')} "
                   f"{hist['count']}")
        out.append(f"kemari_checkpoint_latency_seconds_sum{_labels(vm=vm)} {hist['sum']:g}")
        out.append(f"kemari_checkpoint_latency_seconds_count{_labels(vm=vm)} {hist['count']}")
    return "\n".join(out) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Atomically (node_exporter must never read half a file): temp file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
