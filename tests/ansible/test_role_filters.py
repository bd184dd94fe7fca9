"""The kemari role's filters: sizes, and a rendered config that Kemari itself accepts."""

from __future__ import annotations

import importlib.util
import tomllib

import pytest
from deployvars import lab_vm
from sshlab import PLAYBOOK_DIR

from kemari_agent.config import parse_config

pytestmark = pytest.mark.unit

_spec = importlib.util.spec_from_file_location(
    "kemari_vm_filters", PLAYBOOK_DIR / "roles/kemari/filter_plugins/kemari_vm.py")
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)


@pytest.mark.parametrize(("text", "mib"), [
    (64, 64), ("64", 64), ("64MiB", 64), ("64 M", 64), ("1G", 1024), ("1GiB", 1024),
    ("2048K", 2), ("1T", 1024 * 1024), ("64mb", 64),
    ("lots", None), ("", None), ("1.5G", None), ("100K", None), ("-4M", None), (True, None),
])
def test_sizes(text, mib):
    assert filters.size_mib(text) == mib


def test_rendered_config_is_what_kemari_reads():
    vm = lab_vm(name="kv.1", memory="1GiB")
    hostvars = {"node1": {"ansible_host": "10.213.0.11"},
                "node2": {"ansible_host": "10.213.0.12",
                          "kemari_replication_address": "10.213.1.12"}}
    text = filters.kemari_toml(filters.kemari_vm_config(vm, "/etc/kemari/kv.1.key", hostvars))
    data = tomllib.loads(text)
    assert data["replication"]["nodes"] == {"node1": "10.213.0.11", "node2": "10.213.1.12"}
    assert "vip" not in data and "resource" not in data and "nodes" not in data
    config = parse_config(data)
    assert (config.name, config.memory_mib, config.disk.size_mib) == ("kv.1", 1024, 16)
    assert config.replication.nodes["node2"] == ("10.213.1.12", 7100)
    assert str(config.replication.key_file) == "/etc/kemari/kv.1.key"


def test_strings_are_escaped_for_toml():
    text = filters.kemari_toml({"name": 'a"b\\c', "net": {"tap": "t\n"}, "x": {"a.b": True}})
    assert tomllib.loads(text) == {"name": 'a"b\\c', "net": {"tap": "t\n"}, "x": {"a.b": True}}


def test_disk_create_is_the_roles_own_and_must_be_a_bool():
    vm = lab_vm()
    vm["disk"] = {**vm["disk"], "create": True}
    hostvars = {"node1": {"ansible_host": "10.213.0.11"}, "node2": {"ansible_host": "10.213.0.12"}}
    data = tomllib.loads(filters.kemari_toml(filters.kemari_vm_config(vm, "/k", hostvars)))
    assert "create" not in data["disk"]          # Kemari's config has no such key
    parse_config(data)
    vm["disk"]["create"] = "yes please"
    errors = filters.kemari_vm_errors([vm], ["node1", "node2"])
    assert any("'disk.create' must be true or false" in e for e in errors), errors
