"""A one-line picture of a VM's replication for a terminal: role, state and, during
a full sync, a progress bar of the pre-copy."""

from __future__ import annotations

WIDTH = 30


def sync_fraction(status: dict) -> float | None:
    sync = status.get("sync") or {}
    total = sync.get("pages_total")
    if not total:
        return None
    remaining = sync.get("pages_remaining", total)
    done = sync.get("pages_sent", 0)
    return max(0.0, min(1.0, done / max(1, done + remaining)))


def line(status: dict) -> str:
    text = f"{status.get('name')}: {status.get('role')}, {status.get('state')}"
    frac = sync_fraction(status)
    if status.get("state") == "syncing" and frac is not None:
        filled = int(frac * WIDTH)
        sync = status["sync"]
        text += (f" [{'#' * filled}{'.' * (WIDTH - filled)}] {frac * 100:5.1f}% "
                 f"round {sync.get('round', 0)}, {sync.get('pages_remaining', 0)} pages left")
    elif status.get("state") == "syncing":
        text += " [" + "." * WIDTH + "] starting"
    elif status.get("role") == "primary" and status.get("state") == "synced":
        lat = status.get("latency_us") or {}
        text += f", checkpoint {status.get('checkpoint_seq')}"
        if lat.get("p50") is not None:
            text += f", p50 {lat['p50']} us, p99 {lat['p99']} us"
    return text
