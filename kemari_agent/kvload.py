"""Concurrent kv clients that keep working through failovers, and the checks of
DESIGN.md section 7 made from their own records. Used by `kemari demo` and the
failover tests."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from .kvclient import KvClient, NoReply


@dataclass
class ClientRecord:
    """What one client was told: the last acknowledged version of each of its keys,
    the version in flight, and every INCR value it received."""

    acked: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    incr_values: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)     # seconds per request


class Clients:
    """Concurrent kv clients that keep going through failovers (retrying the same id)."""

    KEYS = 16

    def __init__(self, addr, n: int = 3, patience_s: float = 30.0) -> None:
        """`patience_s`: how long a client retries one request before it gives up
        (a cluster failover takes longer than a local one)."""
        self.addr, self.stop_flag = addr, threading.Event()
        self.attempts = max(1, round(patience_s / 0.15))
        self.lock = threading.Lock()
        self.records = [ClientRecord() for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(n)]

    def start(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=30)

    def snapshot(self) -> list[dict[str, int]]:
        with self.lock:
            return [dict(r.acked) for r in self.records]

    def _run(self, n: int) -> None:
        rec = self.records[n]
        prefix = f"t{n}{uuid.uuid4().hex[:6]}"
        with KvClient(self.addr, timeout=0.15, attempts=self.attempts, prefix=prefix) as c:
            version = 0
            while not self.stop_flag.is_set():
                version += 1
                key = f"c{n}k{version % self.KEYS}"
                try:
                    with self.lock:
                        rec.in_flight[key] = version
                    r = self._timed(rec, c.put, key, str(version))
                    if r.kind != "OK":
                        rec.errors.append(f"PUT {key}: {r}")
                        continue
                    with self.lock:
                        rec.acked[key] = version
                    r = self._timed(rec, c.incr, "shared")
                    if r.kind != "VAL":
                        rec.errors.append(f"INCR: {r}")
                        continue
                    with self.lock:
                        rec.incr_values.append(int(r.value))
                    r = self._timed(rec, c.get, key)
                    if r.kind != "VAL" or int(r.value) < version:
                        rec.errors.append(f"GET {key}: {r}, acknowledged version {version}")
                except NoReply as exc:
                    rec.errors.append(str(exc))
                    return

    @staticmethod
    def _timed(rec: ClientRecord, call, *args):
        t0 = time.perf_counter()
        reply = call(*args)
        rec.latencies.append(time.perf_counter() - t0)
        return reply


def check_acked_puts(addr, acked_before: list[dict[str, int]]) -> list[str]:
    """Every PUT acknowledged before the failover is still readable (or overwritten
    by a newer version of the same client)."""
    lost = []
    with KvClient(addr, timeout=0.2, attempts=50, prefix=f"chk{uuid.uuid4().hex[:8]}") as c:
        for snapshot in acked_before:
            for key, version in snapshot.items():
                got = c.get(key)
                if got.kind != "VAL" or int(got.value) < version:
                    lost.append(f"{key}: acknowledged version {version}, now {got}")
    return lost


def check_counter(addr, records: list[ClientRecord]) -> list[str]:
    problems = []
    values = [v for r in records for v in r.incr_values]
    dupes = len(values) - len(set(values))
    if dupes:
        problems.append(f"{dupes} INCR values were handed out twice")
    with KvClient(addr, timeout=0.2, attempts=50, prefix=f"cc{uuid.uuid4().hex[:8]}") as c:
        now = int(c.get("shared").value or 0)
    if values and now < max(values):
        problems.append(f"counter went backwards: {now} < acknowledged {max(values)}")
    return problems
