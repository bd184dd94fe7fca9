"""From `kemari status --json` to what Pacemaker sees: the promotion score and the
node attributes shown by `crm_mon -A` / `pcs status --full`.

The score table (docs/cluster.md):

| this node | score |
|---|---|
| primary (Promoted, running the guest) | 10000 |
| secondary in sync with the newest generation | 1000 |
| secondary holding a consistent checkpoint, not connected | 100 |
| no state at all (never synced: a cold cluster may boot here) | 5 |
| inconsistent (mid full sync), outdated, or older than the cluster's newest generation | none |
"""

from __future__ import annotations

from dataclasses import dataclass

SCORE_PRIMARY = 10000
SCORE_SYNCED = 1000
SCORE_CONSISTENT = 100
SCORE_NO_STATE = 5


@dataclass(frozen=True)
class Verdict:
    score: int | None          # None: delete the promotion score (never promote here)
    sync: str                  # node attribute: synced / syncing n% / disconnected / outdated
    reason: str                # why, for logs and `crm_mon -A`


def _sync_percent(status: dict) -> int | None:
    sync = status.get("sync") or {}
    remaining = sync.get("pages_remaining")
    total = sync.get("pages_total") or (sync.get("pages_sent", 0) + (remaining or 0))
    if remaining is None or not total:
        return None
    return max(0, min(99, int(100 * (1 - remaining / total))))


def _blocker(status: dict, newest_generation: int) -> str | None:
    """Why this secondary must not be promoted, or None."""
    if status.get("outdated"):
        return status.get("promote_blocker") or "outdated: its peer went on without it"
    if status.get("consistent") is False or status.get("promotable") is False:
        return status.get("promote_blocker") or "inconsistent: a full sync is incomplete"
    if "consistent" not in status and status.get("state") == "syncing":
        return "inconsistent: a full sync is incomplete"
    generation = status.get("generation") or 0
    if generation < newest_generation:
        return (f"outdated: generation {generation} is older than generation "
                f"{newest_generation} seen in the cluster")
    return None


def verdict(status: dict, newest_generation: int = 0) -> Verdict:
    """The promotion score and sync attribute for this node's status.

    `newest_generation`: the highest generation any node of the cluster has
    published (a node that was down while the other ran on is behind it)."""
    role, state = status.get("role"), status.get("state")
    if role == "stopped":
        return Verdict(None, "stopped", "the daemon is not running")
    percent = _sync_percent(status)
    syncing = f"syncing {percent}%" if percent is not None else "syncing"
    if role == "primary":
        sync = {"synced": "synced", "syncing": syncing, "suspended": "suspended"}.get(
            state, "disconnected")
        return Verdict(SCORE_PRIMARY, sync, f"primary, {state}")
    blocker = _blocker(status, newest_generation)
    if blocker is not None:
        sync = syncing if state == "syncing" else "outdated" \
            if "outdated" in blocker else "inconsistent"
        return Verdict(None, sync, blocker)
    if state == "synced" and status.get("has_checkpoint", True):
        return Verdict(SCORE_SYNCED, "synced", "in sync with the primary")
    if status.get("has_checkpoint"):
        return Verdict(SCORE_CONSISTENT, "disconnected",
                       "consistent checkpoint, no primary connected")
    return Verdict(SCORE_NO_STATE, "disconnected", "no checkpoint: promotion cold-boots")
