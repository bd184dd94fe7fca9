"""Helpers shared by the benchmarks: result tables and JSON, percentiles."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def pin(pid: int, cpu: int) -> None:
    """Every thread of pid onto one CPU (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def report(name: str, rows: list[tuple[str, object, str]], extra: dict | None = None) -> dict:
    """Print `rows` (metric, value, unit) as a table and write bench/results/NAME.json."""
    width = max(len(r[0]) for r in rows)
    print(f"\n== {name} ==")
    for metric, value, unit in rows:
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"  {metric:<{width}}  {shown:>14} {unit}")
    data = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "host": platform.node(), "metrics": {r[0]: {"value": r[1], "unit": r[2]}
                                                 for r in rows}}
    if extra:
        data.update(extra)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    return data
