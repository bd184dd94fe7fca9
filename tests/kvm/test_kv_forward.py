"""The kv guest through the zero-config user-mode forward (loopback UDP)."""

from __future__ import annotations

import pytest
from helpers import free_udp_port, kv_config, start_kv
from kv_checks import check_malformed, check_oversize, check_put_get_incr, check_retried_ids

from kemari_agent.kvclient import KvClient

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def kv_forward(tmp_path_factory):
    dirs = tmp_path_factory.mktemp("fwd")
    (dirs / "run").mkdir()
    (dirs / "state").mkdir()
    port = free_udp_port()
    cfg = kv_config(dirs, name="fwd1", net=f'[net]\nforward = "127.0.0.1:{port}"')
    proc = start_kv(dirs, cfg)
    try:
        yield proc, ("127.0.0.1", port)
    finally:
        assert proc.stop() == 0, proc.output()


@pytest.mark.parametrize("check", [check_put_get_incr, check_retried_ids, check_malformed,
                                   check_oversize])
def test_protocol_over_forward(kv_forward, check):
    _proc, addr = kv_forward
    with KvClient(addr) as c:
        check(c)


def test_clients_get_their_own_replies(kv_forward):
    _proc, addr = kv_forward
    clients = [KvClient(addr, prefix=f"multi{i}") for i in range(4)]
    try:
        for round_ in range(5):
            for i, c in enumerate(clients):
                assert c.put(f"own{i}", f"r{round_}").kind == "OK"
        for i, c in enumerate(clients):
            assert c.get(f"own{i}").value == "r4"
    finally:
        for c in clients:
            c.close()


def test_status_of_running_guest(kv_forward):
    proc, _addr = kv_forward
    import json
    status = json.loads(proc.cli("status", "fwd1", "--json").stdout)
    assert status["name"] == "fwd1" and status["pid"] == proc.pid
    assert status["role"] == "primary" and status["state"] == "standalone"
    assert status["vm"]["blk"]["writes"] > 0 and status["vm"]["exits"] > 0
    assert "timeline" not in status["vm"]          # only with KEMARI_STAGES=1


def test_loop_timeline_with_stages_on(tmp_path, monkeypatch):
    """KEMARI_STAGES=1: status shows the loop's moments, in the order a PUT makes
    them (bench_kv_timeline reads them); without it there is no timeline."""
    import json
    (tmp_path / "run").mkdir()
    (tmp_path / "state").mkdir()
    port = free_udp_port()
    cfg = kv_config(tmp_path, name="tl1", net=f'[net]\nforward = "127.0.0.1:{port}"')
    monkeypatch.setenv("KEMARI_STAGES", "1")
    proc = start_kv(tmp_path, cfg)
    try:
        with KvClient(("127.0.0.1", port), prefix="tl") as c:
            for i in range(5):
                assert c.put("k", str(i)).kind == "OK"
        status = json.loads(proc.cli("status", "tl1", "--json").stdout)
    finally:
        assert proc.stop() == 0, proc.output()
    moments = [what for _ns, what in status["vm"]["timeline"]]
    stamps = [ns for ns, _what in status["vm"]["timeline"]]
    assert stamps == sorted(stamps)
    put = ["frames delivered", "exit: blk doorbell", "tap released: blk", "answered: blk",
           "exit: net doorbell", "tap released: net", "answered: net"]
    # each PUT's moments, in order, with the guest's other exits between them
    at = 0
    for _ in range(5):
        for want in put:
            at = moments.index(want, at) + 1
