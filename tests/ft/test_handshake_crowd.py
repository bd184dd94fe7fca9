"""Nothing unauthenticated can stall protection (issue 7 section 5): a protected
guest under client load keeps its pair in sync while a crowd of connections
that are not its primary (idle, half-open, slow TLS, wrong key, silent after
authenticating, an authenticated primary of an older generation) keeps the
secondary's replication port busy."""

from __future__ import annotations

import time

import pytest
from crowd import Crowd
from ftlab import FtLab

from kemari_agent.control import request
from kemari_agent.kvload import Clients

pytestmark = pytest.mark.kvm

CROWD_SECONDS = 7.0     # longer than a waiting connection's 5 s: timeouts happen


def replication_port(lab: FtLab) -> int:
    return int(lab.secondary.config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])


def test_a_crowd_at_the_replication_port_does_not_disturb_the_session(tmp_path):
    lab = FtLab(tmp_path)
    clients = crowd = None
    try:
        lab.start_pair()
        clients = Clients(lab.addr, n=2).start()
        before = lab.primary.status()
        assert before["state"] == "synced" and before["generation"] == 1
        crowd = Crowd(("127.0.0.1", replication_port(lab)), lab.key, lab.name,
                      lab.memory_mib << 20, old_generation=0).start()
        end = time.monotonic() + CROWD_SECONDS
        while time.monotonic() < end:
            prim, sec = lab.primary.status(), lab.secondary.status()
            # the same session throughout: no reconnect, hence no new full sync
            assert prim["state"] == "synced", (prim, lab.primary.log())
            assert prim["last_sync"] == before["last_sync"], prim
            assert sec["state"] == "synced", (sec, lab.secondary.log())
            time.sleep(0.1)
        crowd.stop()
        clients.stop()
        assert all(crowd.connections[k] > 0 for k in crowd.connections), crowd.connections
        sec = lab.secondary.status()
        assert sec["checkpoints"] > 0
        # real figures: what it sent (ACKs, heartbeats), read -> ACK latency
        assert sec["bytes_sent"] >= 16 * sec["checkpoints"], sec
        lat = sec["latency_us"]
        assert 0 < lat["p50"] <= lat["p99"] < 1e6, lat
        incoming = sec["incoming"]
        assert incoming["timed_out"] >= 1 and incoming["refused"] >= 1, incoming
        errors = " | ".join(sec["recent_errors"]) + lab.secondary.log()
        assert "refused a primary connection" in errors and "older" in errors, errors
        # no checkpoint lost: the secondary holds exactly the primary's latest one
        prim_digest = request(lab.primary.dir / "run" / f"{lab.name}.sock",
                              "checkpoint-digest")
        deadline = time.monotonic() + 5
        while lab.secondary.status()["checkpoint_seq"] < prim_digest["seq"] and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        sec_digest = request(lab.secondary.dir / "run" / f"{lab.name}.sock",
                             "checkpoint-digest")
        assert sec_digest == prim_digest
        served = sum(len(r.latencies) for r in clients.records)
        assert served > 100 and not [e for r in clients.records for e in r.errors]
    finally:
        if crowd is not None:
            crowd.stop()
        if clients is not None:
            clients.stop()
        lab.close()
