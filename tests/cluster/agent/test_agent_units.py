"""Pure parts of the cluster integration: [replication.nodes], command-line
overrides, the corosync nodelist, the score table, the metrics format."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kemari_agent.cluster.scores import verdict
from kemari_agent.cluster.tools import parse_nodelist
from kemari_agent.config import node_addresses, parse_config, with_overrides
from kemari_agent.errors import ConfigError
from kemari_agent.metrics import LatencyWindow, render

pytestmark = pytest.mark.unit


def config(**repl):
    return parse_config({"name": "kv1", "replication": {"key_file": "/k", **repl}})


def test_replication_nodes_give_each_node_its_addresses():
    c = config(port=7200, nodes={"alpha": "10.0.0.1", "beta": "10.0.0.2:7300"})
    assert node_addresses(c, "alpha") == (("10.0.0.1", 7200), ("10.0.0.2", 7300))
    assert node_addresses(c, "beta") == (("10.0.0.2", 7300), ("10.0.0.1", 7200))
    with pytest.raises(ConfigError, match="no entry for this node 'gamma'"):
        node_addresses(c, "gamma")
    assert node_addresses(config(), "alpha") == (None, None)
    three = config(nodes={"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"})
    assert node_addresses(three, "a") == (("10.0.0.1", 7100), None)   # peer from notify


@pytest.mark.parametrize("nodes, message", [
    ({"a": "not-an-ip"}, "replication.nodes.a"),
    ({"a": 7}, "replication.nodes.a"),
    ({"a": "10.0.0.1:99999"}, "replication.nodes.a"),
])
def test_bad_node_entries_are_named(nodes, message):
    with pytest.raises(ConfigError, match=message):
        config(nodes=nodes)


def test_command_line_overrides():
    c = with_overrides(config(listen="0.0.0.0:7100", peer="10.0.0.9:7100"),
                       listen="10.0.0.1:7101", peer="", fence_peer_handler="fence x")
    assert c.replication.listen == ("10.0.0.1", 7101) and c.replication.peer is None
    assert c.policy.fence_peer_handler == "fence x" and c.policy.unfence_peer_handler is None
    with pytest.raises(ConfigError, match="--peer"):
        with_overrides(c, peer="nowhere")
    p = parse_config({"name": "kv1", "policy": {"fence_peer_handler": "/bin/true"}})
    assert p.policy.fence_peer_handler == "/bin/true"


def test_corosync_nodelist():
    text = """nodelist.local_node_pos (u32) = 0
nodelist.node.0.name (str) = node1
nodelist.node.0.nodeid (u32) = 1
nodelist.node.0.ring0_addr (str) = 10.213.0.11
nodelist.node.1.name (str) = node2
nodelist.node.1.nodeid (u32) = 2
nodelist.node.1.ring0_addr (str) = 10.213.0.12
"""
    assert parse_nodelist(text) == {"node1": "10.213.0.11", "node2": "10.213.0.12"}


SECONDARY = {"role": "secondary", "generation": 4, "has_checkpoint": True}


@pytest.mark.parametrize("status, newest, score, sync", [
    ({"role": "primary", "state": "synced", "generation": 4}, 4, 10000, "synced"),
    ({"role": "primary", "state": "standalone", "generation": 4}, 4, 10000, "disconnected"),
    ({**SECONDARY, "state": "synced"}, 4, 1000, "synced"),
    ({**SECONDARY, "state": "standalone"}, 4, 100, "disconnected"),
    ({**SECONDARY, "state": "standalone", "has_checkpoint": False, "generation": 0}, 0, 5,
     "disconnected"),
    ({**SECONDARY, "state": "syncing", "has_checkpoint": False,
      "sync": {"pages_sent": 300, "pages_remaining": 100}}, 4, None, "syncing 75%"),
    ({**SECONDARY, "state": "resyncing", "consistent": True}, 4, 100, "syncing"),
    ({"role": "primary", "state": "resyncing", "generation": 4}, 4, 10000, "syncing"),
    ({**SECONDARY, "state": "synced", "consistent": False}, 4, None, "inconsistent"),
    ({**SECONDARY, "state": "standalone", "outdated": True}, 4, None, "outdated"),
    ({**SECONDARY, "state": "standalone"}, 6, None, "outdated"),
    ({"role": "stopped", "state": "stopped"}, 0, None, "stopped"),
])
def test_score_table(status, newest, score, sync):
    v = verdict(status, newest)
    assert (v.score, v.sync) == (score, sync), v.reason


def test_metrics_parse_as_prometheus_text():
    window = LatencyWindow()
    for seconds in (0.0002, 0.0002, 0.003, 2.0):
        window.append(seconds)
    status = {"name": "kv1", "role": "primary", "state": "synced", "generation": 3,
              "checkpoint_seq": 40, "checkpoints": 40, "bytes_sent": 1234,
              "bytes_received": 0, "last_checkpoint_age_ms": 12.5,
              "peer_fence": {"fenced": False}, "latency_histogram": window.histogram(),
              "sync": {"pages_total": 100, "pages_remaining": 25}}
    families = {f.name: f for f in text_string_to_metric_families(render(status))}
    samples = {(s.name, s.labels.get("le") or s.labels.get("role") or s.labels.get("state")):
               s.value for f in families.values() for s in f.samples}
    assert samples[("kemari_role", "primary")] == 1
    assert samples[("kemari_role", "secondary")] == 0
    assert samples[("kemari_state", "synced")] == 1
    assert samples[("kemari_generation", None)] == 3
    assert samples[("kemari_last_checkpoint_age_seconds", None)] == 0.0125
    assert samples[("kemari_sync_progress_ratio", None)] == 0.75
    assert samples[("kemari_checkpoint_latency_seconds_bucket", "0.00025")] == 2
    assert samples[("kemari_checkpoint_latency_seconds_bucket", "0.005")] == 3
    assert samples[("kemari_checkpoint_latency_seconds_bucket", "+Inf")] == 4
    assert samples[("kemari_checkpoint_latency_seconds_count", None)] == 4
    stopped = render({"name": "kv1", "role": "stopped", "state": "stopped"})
    assert {f.name for f in text_string_to_metric_families(stopped)} == {
        "kemari_up", "kemari_role", "kemari_state"}
