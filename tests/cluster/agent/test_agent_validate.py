"""validate-all refuses every misconfiguration the way DRBD's agent does, with the
OCF code Pacemaker acts on: 6 (ERR_CONFIGURED, fatal everywhere) for the
resource definition, 5 (ERR_INSTALLED, this node only) for missing files."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_support import AgentNode, make_cib, vm_name

pytestmark = pytest.mark.cluster

GOOD_META = {"notify": "true", "clone_max": "2", "promoted_max": "1"}


def validate(inst, tmp_path: Path, config: Path, meta: dict) -> tuple[int, str]:
    name = vm_name(config) if config.exists() else "missing"
    node = AgentNode(inst, tmp_path, "node1", config, make_cib(tmp_path / "cib.xml", name),
                     name, meta=meta)
    r = node.run("validate-all", timeout=60)
    return r.returncode, r.stderr


def test_a_good_definition_passes(inst, tmp_path, vm_config):
    code, err = validate(inst, tmp_path, vm_config, GOOD_META)
    assert code == 0, err


@pytest.mark.parametrize("meta, reason", [
    ({**GOOD_META, "notify": "false"}, "notify=true"),
    ({"clone_max": "2", "promoted_max": "1"}, "notify=true"),
    ({**GOOD_META, "promoted_max": "2"}, "promoted-max=2"),
    ({"notify": "true", "clone_max": "2", "master_max": "2"}, "promoted-max=2"),
    ({**GOOD_META, "promoted_node_max": "2"}, "promoted-node-max=2"),
    ({**GOOD_META, "clone_max": "3"}, "clone-max=3"),
    ({"notify": "true"}, "promotable clone"),
])
def test_refuses_a_bad_clone_definition(inst, tmp_path, vm_config, meta, reason):
    code, err = validate(inst, tmp_path, vm_config, meta)
    assert code == 6, err
    assert "ocf-exit-reason:" in err and reason in err


def test_refuses_a_missing_config_on_this_node(inst, tmp_path):
    code, err = validate(inst, tmp_path, tmp_path / "nowhere.toml", GOOD_META)
    assert code == 5 and "nowhere.toml does not exist" in err


def test_refuses_a_missing_key_file(inst, tmp_path, vm_config):
    key = Path(vm_config.read_text().split('key_file = "')[1].split('"')[0])
    key.unlink()
    code, err = validate(inst, tmp_path, vm_config, GOOD_META)
    assert code == 5 and str(key) in err


def test_refuses_a_config_without_key_or_with_a_typo(inst, tmp_path, vm_config):
    text = vm_config.read_text()
    vm_config.write_text("\n".join(line for line in text.splitlines()
                                   if not line.startswith("key_file")))
    code, err = validate(inst, tmp_path, vm_config, GOOD_META)
    assert code == 6 and "replication.key_file" in err
    vm_config.write_text(text.replace("memory_mib", "memroy_mib"))
    code, err = validate(inst, tmp_path, vm_config, GOOD_META)
    assert code == 6 and "memroy_mib" in err
