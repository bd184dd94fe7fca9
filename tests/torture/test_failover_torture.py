"""Failover torture: SIGKILL the primary at random points of the checkpoint cycle
while clients keep working, promote the secondary, check every promise the
clients were given (DESIGN.md section 7), re-protect, repeat."""

from __future__ import annotations

import hashlib
import random
import time

import pytest
from ftlab import FtLab
from helpers import free_udp_port, kv_config, start_kv

from kemari_agent.kvload import Clients, check_acked_puts, check_counter

pytestmark = pytest.mark.torture

POINTS = ["random", "mid-send:0.05", "after-ack:0.05"]


def wait_dead(node, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if node.pid() is None or not _alive(node.pid()):
            return
        time.sleep(0.01)
    raise AssertionError(f"node {node.letter} did not die at its fault point:\n{node.log()}")


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("disk_mode", "mode"), [("shared", "tap"), ("replicated", "tap"),
                                                  ("shared", "epoch"), ("replicated", "epoch")])
def test_failover_torture(tmp_path, disk_mode, mode, torture_trials):
    """At least 50 failovers in event-tapped mode with a shared disk; a quarter as
    many (at least 10) for the replicated disk and for epoch (Remus-style) mode,
    which share most of its code (epoch mode holds disk requests in the ring
    until their epoch is acknowledged). About 8 minutes in all at the default."""
    trials = torture_trials if (disk_mode, mode) == ("shared", "tap") \
        else max(10, torture_trials // 4)
    rng = random.Random(f"{disk_mode}-{mode}-{trials}")
    lab = FtLab(tmp_path, disk_mode=disk_mode, mode=mode)
    clients = None
    failover_times = []
    try:
        # the point at which each node dies the next time it is primary
        plan = [rng.choice(POINTS) for _ in range(trials)] + ["random", "random"]
        lab.secondary.start("secondary", fault=None if plan[1] == "random" else plan[1])
        lab.primary.start("primary")
        lab.wait_synced()
        clients = Clients(lab.addr).start()
        for trial in range(trials):
            point = plan[trial] if trial else "random"
            if point == "random":
                time.sleep(rng.uniform(0.02, 0.4))
                lab.primary.kill()
            else:
                wait_dead(lab.primary)
            time.sleep(0.05)                       # replies already on the wire arrive
            acked = clients.snapshot()
            failover_times.append(lab.failover())
            lost = check_acked_puts(lab.addr, acked)
            assert not lost, f"trial {trial} ({point}): {lost[:5]}\n{lab.primary.log()}"
            problems = check_counter(lab.addr, clients.records)
            assert not problems, f"trial {trial} ({point}): {problems}"
            nxt = plan[trial + 2]
            lab.secondary.start("secondary", fault=None if nxt == "random" else nxt)
            lab.wait_protected()
        clients.stop()
        errors = [e for r in clients.records for e in r.errors]
        assert not errors, errors[:5]
        assert not check_counter(lab.addr, clients.records)
        assert all(len(r.incr_values) > trials for r in clients.records), \
            "clients made too little progress"
        final = clients.snapshot()
        if disk_mode == "replicated":     # idle and in sync: the two disks are the same
            time.sleep(0.5)
            assert _digest(lab.primary.disk) == _digest(lab.secondary.disk)
        survivor = lab.primary.disk
    finally:
        if clients is not None:
            clients.stop()
        lab.close()
    # The disk alone (a cold boot, no memory) also has every acknowledged write.
    port = free_udp_port()
    cfg = kv_config(tmp_path, name="recover", disk_path=survivor,
                    net=f'[net]\nforward = "127.0.0.1:{port}"')
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "state").mkdir(exist_ok=True)
    proc = start_kv(tmp_path, cfg)
    try:
        lost = check_acked_puts(("127.0.0.1", port), final)
        assert not lost, lost[:5]
        assert not check_counter(("127.0.0.1", port), clients.records)
    finally:
        proc.stop()
    print(f"\n{disk_mode}/{mode}: {trials} failovers, promote->first reply "
          f"median {sorted(failover_times)[len(failover_times) // 2] * 1000:.0f} ms")
