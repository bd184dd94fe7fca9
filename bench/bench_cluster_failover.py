"""Failover in the real cluster lab: power off the Promoted node -> kv answering
again at the guest's IP, split into

  detection   power off -> corosync on the survivor forms a membership without it
  fencing     -> the lab fence agent reports the victim powered off
  promotion   -> Pacemaker's promote of ocf:kemari:vm on the survivor returns ok
  activation  -> the first kv reply to a client polling the guest's IP

with the corosync token used (KEMARI_LAB_TOKEN_MS, default 2000 ms).
`python -m bench.bench_cluster_failover [--runs N] [--token MS]`.
"""

from __future__ import annotations

import argparse
import threading
import time

from cluster.kemari_vm import GUEST, RESOURCE, KemariVm
from cluster.lab import ClusterLab

from bench.common import percentile, report
from kemari_agent.kvclient import KvClient, NoReply


def first_answer(lab: ClusterLab, found: list[float], stop: threading.Event) -> None:
    """Poll the guest every 20 ms from the client namespace; note the first reply."""
    with lab.in_client(), KvClient(GUEST, timeout=0.02, attempts=1) as c:
        while not stop.is_set():
            try:
                c.get("bench")
            except NoReply:
                continue
            found.append(time.time())
            return


def one_failover(lab: ClusterLab, vm: KemariVm) -> dict[str, float]:
    vm.wait_protected()
    victim = vm.promoted()[0]
    survivor = next(n for n in lab.names if n != victim)
    victim_id = next(n["nodeid"] for n in lab.spec["nodes"] if n["name"] == victim)
    found: list[float] = []
    stop = threading.Event()
    t0 = time.time()
    lab.power_off(victim)
    poller = threading.Thread(target=first_answer, args=(lab, found, stop))
    poller.start()
    try:
        lab.wait(lambda: vm.promoted(on=survivor) == [survivor], 120, "promotion")
        lab.wait(lambda: bool(found), 60, "kv answering")
    finally:
        stop.set()
        poller.join()
    detected = lab.log_time(survivor, "corosync/corosync.log",
                            rf"A new membership .* left: {victim_id}\b", t0)
    fence = lab.fence_times(victim, t0)
    promoted = lab.log_time(survivor, "pacemaker/pacemaker.log",
                            rf"Result of promote operation for {RESOURCE}\S* on {survivor}: ok",
                            t0)
    assert detected and fence and promoted, (detected, fence, promoted)
    lab.wait_online(timeout=120, on=survivor)          # the victim reboots and rejoins
    return {"detection": detected - t0, "fencing": fence[1] - detected,
            "promotion": promoted - fence[1], "activation": found[0] - promoted,
            "total": found[0] - t0}


def main(runs: int = 3, token_ms: int | None = None) -> dict:
    phases = ("detection", "fencing", "promotion", "activation", "total")
    results: list[dict[str, float]] = []
    with ClusterLab(nodes=2, token_ms=token_ms) as lab:
        vm = KemariVm(lab)
        vm.define_with_crm(lab.names[0])
        for _ in range(runs):
            results.append(one_failover(lab, vm))
        token = lab.token_ms
    rows = [(f"{p} p50", percentile([r[p] for r in results], 50) * 1000, "ms")
            for p in phases]
    rows += [("total max", max(r["total"] for r in results) * 1000, "ms"),
             ("corosync token", token, "ms"), ("runs", runs, "")]
    return report("cluster_failover", rows, {"runs": results, "token_ms": token})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--token", type=int, default=None, help="corosync token (ms)")
    a = p.parse_args()
    main(a.runs, a.token)
