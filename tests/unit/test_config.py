"""Config validation: every mistake names its key; the CLI exits non-zero."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
from helpers import KEMARI, REPO

from kemari_agent.config import derived_mac, load_config, parse_config
from kemari_agent.errors import ConfigError

pytestmark = pytest.mark.unit

GOOD = """
name = "kv1"
memory_mib = 64
image = "kv"
[disk]
path = "disk.img"
size_mib = 16
mode = "replicated"
[net]
tap = "kemari-kv1"
bridge = "br0"
address = "10.213.0.50/24"
[replication]
listen = "0.0.0.0:7100"
peer = "10.213.0.12:7100"
key_file = "/etc/kemari/kv1.key"
mode = "epoch"
epoch_ms = 40
[policy]
on_peer_loss = "suspend"
"""


def write(tmp_path, text):
    path = tmp_path / "vm.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_full_config_parses(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.name == "kv1" and cfg.memory_mib == 64 and cfg.image == "kv"
    assert cfg.disk.path == tmp_path / "disk.img" and cfg.disk.mode == "replicated"
    assert cfg.net.tap == "kemari-kv1" and str(cfg.net.address) == "10.213.0.50/24"
    assert cfg.net.mac == derived_mac("kv1") and cfg.net.mac[:3] == b"\x52\x54\x00"
    assert cfg.replication.peer == ("10.213.0.12", 7100)
    assert cfg.replication.mode == "epoch" and cfg.replication.epoch_ms == 40
    assert cfg.policy.on_peer_loss == "suspend"


def test_sync_rate_cap_defaults_to_none():
    assert parse_config({"name": "a"}).replication.sync_max_mib_s == 0
    cfg = parse_config({"name": "a", "replication": {"sync_max_mib_s": 100}})
    assert cfg.replication.sync_max_mib_s == 100


def test_delta_cache_defaults_to_16_mib():
    assert parse_config({"name": "a"}).replication.delta_cache_mib == 16
    cfg = parse_config({"name": "a", "replication": {"delta_cache_mib": 0}})
    assert cfg.replication.delta_cache_mib == 0


def test_ack_polling_is_off_unless_asked_for():
    assert parse_config({"name": "a"}).replication.ack_poll_us == 0
    cfg = parse_config({"name": "a", "replication": {"ack_poll_us": 400}})
    assert cfg.replication.ack_poll_us == 400
    assert parse_config({"name": "a"}).replication.receive_poll_us == 0
    cfg = parse_config({"name": "a", "replication": {"receive_poll_us": 300}})
    assert cfg.replication.receive_poll_us == 300


def test_cpu_latency_is_asked_for_only_when_set():
    assert parse_config({"name": "a"}).replication.cpu_latency_us is None
    cfg = parse_config({"name": "a", "replication": {"cpu_latency_us": 0}})
    assert cfg.replication.cpu_latency_us == 0


def test_forward_gets_a_default_guest_address():
    cfg = parse_config({"name": "a", "net": {"forward": "127.0.0.1:7000"}})
    assert cfg.net.forward == ("127.0.0.1", 7000) and str(cfg.net.address) == "10.0.2.15/24"


@pytest.mark.parametrize(("data", "message"), [
    ({}, "'name' is required"),
    ({"name": "bad name"}, "'name' must be"),
    ({"name": "a", "memory_mib": "64"}, "'memory_mib' must be int"),
    ({"name": "a", "memory_mib": 3}, "'memory_mib' must be between 8"),
    ({"name": "a", "memory_mib": 33}, "'memory_mib' must be even"),
    ({"name": "a", "image": "nosuch"}, "'image' must be"),
    ({"name": "a", "colour": 1}, "unknown key 'colour'"),
    ({"name": "a", "disk": {}}, "'disk.path' is required"),
    ({"name": "a", "disk": {"path": "/x", "mode": "mirror"}}, "'disk.mode' must be one of"),
    ({"name": "a", "disk": {"path": "/x", "size_mib": 0}}, "'disk.size_mib' must be between"),
    ({"name": "a", "disk": {"path": "/x", "sizemib": 1}}, "unknown key 'disk.sizemib'"),
    ({"name": "a", "net": {}}, "exactly one of 'net.tap' or 'net.forward'"),
    ({"name": "a", "net": {"tap": "t", "forward": "127.0.0.1:1", "address": "1.2.3.4/8"}},
     "exactly one of"),
    ({"name": "a", "net": {"tap": "t"}}, "'net.address' is required"),
    ({"name": "a", "net": {"tap": "t", "address": "10.0.0.1"}}, "needs a prefix length"),
    ({"name": "a", "net": {"tap": "t", "address": "10.0.0.300/24"}}, "'net.address' must be"),
    ({"name": "a", "net": {"tap": "t", "address": "1.2.3.4/8", "mac": "52:54"}}, "'net.mac'"),
    ({"name": "a", "net": {"tap": "t", "address": "1.2.3.4/8", "mac": "01:00:00:00:00:01"}},
     "unicast"),
    ({"name": "a", "net": {"tap": "a-name-that-is-too-long", "address": "1.2.3.4/8"}},
     "'net.tap'"),
    ({"name": "a", "net": {"forward": "127.0.0.1"}}, "'net.forward' must be HOST:PORT"),
    ({"name": "a", "net": {"forward": "localhost:7000"}}, "must use an IP address"),
    ({"name": "a", "replication": {"peer": "1.2.3.4:99999"}}, "'replication.peer'"),
    ({"name": "a", "replication": {"mode": "remus"}}, "'replication.mode' must be one of"),
    ({"name": "a", "replication": {"epoch_ms": 0}}, "'replication.epoch_ms'"),
    ({"name": "a", "replication": {"sync_max_mib_s": -1}}, "'replication.sync_max_mib_s'"),
    ({"name": "a", "replication": {"delta_cache_mib": 70000}}, "'replication.delta_cache_mib'"),
    ({"name": "a", "replication": {"ack_poll_us": 20000}}, "'replication.ack_poll_us'"),
    ({"name": "a", "replication": {"receive_poll_us": -1}}, "'replication.receive_poll_us'"),
    ({"name": "a", "replication": {"cpu_latency_us": -1}}, "'replication.cpu_latency_us'"),
    ({"name": "a", "replication": {"cpu_latency_us": "0"}},
     "'replication.cpu_latency_us' must be int"),
    ({"name": "a", "policy": {"on_peer_loss": "panic"}}, "'policy.on_peer_loss'"),
    ({"name": "a", "policy": {"on_peer_loss": "continue", "x": 1}}, "unknown key 'policy.x'"),
    ({"name": "a", "stress": {"pages": -1}}, "'stress.pages'"),
    ({"name": "a", "memory_mib": True}, "'memory_mib' must be int"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config(data)


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, 'name = "a"\nmemory_mib = [\n')
    with pytest.raises(ConfigError, match=r"vm\.toml: not valid TOML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(("text", "message"), [
    ('name = "kv1"\n[net]\ntap = "x"\n', "'net.address' is required"),
    ('name = "kv1"\nmemory_mib = "lots"\n', "'memory_mib' must be int"),
    ("name = \n", "not valid TOML"),
])
def test_cli_reports_config_errors_and_fails(tmp_path, text, message):
    path = write(tmp_path, text)
    result = subprocess.run(KEMARI + ["run", str(path)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
