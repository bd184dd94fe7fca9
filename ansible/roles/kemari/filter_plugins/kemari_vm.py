"""Filters of the `kemari` role: check `kemari_vms` and render a VM's TOML config.

Checking happens on the controller before any node is touched, so a typo in
the inventory stops the play with a message naming the VM and the key,
instead of a daemon that refuses its config on one node later.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
UNIT_KIB = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}
BUILTIN_IMAGES = ("kv", "stress")
DISK_MODES = ("shared", "replicated")
PEER_LOSS_POLICIES = ("continue", "suspend")
# Keys the role writes itself; a VM entry may carry any other config key through.
ROLE_KEYS = {"name", "nodes", "memory", "image", "disk", "net", "replication", "policy",
             "stress", "vip", "resource"}


def size_mib(value: Any) -> int | None:
    """A size as MiB: a plain number is MiB; K/M/G/T (optionally KiB, MB...) are binary.

    None when it does not parse or is not a whole number of MiB.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = SIZE_RE.match(str(value))
    if not match:
        return None
    kib = int(match.group(1)) * UNIT_KIB[(match.group(2) or "M").upper()]
    return kib // 1024 if kib % 1024 == 0 else None


def _vm_errors(vm: Any, index: int, hosts: list[str]) -> list[str]:
    if not isinstance(vm, dict):
        return [f"kemari_vms[{index}] must be a mapping with at least name and nodes"]
    name = vm.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        return [f"kemari_vms[{index}].name must be 1-32 letters, digits, '.', '_', '-' "
                f"(starting with a letter or digit), not {name!r}"]
    where = f"VM {name!r}"
    errors = []
    nodes = vm.get("nodes")
    if (not isinstance(nodes, list) or len(nodes) != 2 or len(set(map(str, nodes))) != 2):
        errors.append(f"{where}: 'nodes' must list exactly two different inventory hosts "
                      f"(the pair that runs it), not {nodes!r}")
    else:
        unknown = [n for n in nodes if n not in hosts]
        if unknown:
            errors.append(f"{where}: 'nodes' names {unknown!r}, not hosts of this play "
                          f"({', '.join(hosts)})")
    image = vm.get("image", "kv")
    if not isinstance(image, str) or not (image in BUILTIN_IMAGES or image.startswith("/")):
        errors.append(f"{where}: unknown image {image!r}: use one of "
                      f"{', '.join(BUILTIN_IMAGES)} or an absolute path to an image file")
    memory = size_mib(vm.get("memory", 64))
    if memory is None:
        errors.append(f"{where}: 'memory' {vm.get('memory')!r} is not a size "
                      f"(a number of MiB, or e.g. 64MiB, 1G)")
    elif not 8 <= memory <= 65536 or memory % 2:
        errors.append(f"{where}: 'memory' must be an even number of MiB from 8 to 65536, "
                      f"not {memory} MiB")
    errors += _section_errors(vm, where)
    return errors


def _section_errors(vm: dict, where: str) -> list[str]:
    errors = []
    for section in ("disk", "net", "replication", "policy", "stress", "vip"):
        if section in vm and not isinstance(vm[section], dict):
            errors.append(f"{where}: '{section}' must be a mapping, not {vm[section]!r}")
    if errors:
        return errors
    disk = vm.get("disk")
    if disk is not None:
        if not isinstance(disk.get("path"), str) or not disk["path"].startswith("/"):
            errors.append(f"{where}: 'disk.path' must be an absolute path, "
                          f"not {disk.get('path')!r}")
        size = size_mib(disk.get("size", 64))
        if size is None or size < 1:
            errors.append(f"{where}: 'disk.size' {disk.get('size')!r} is not a size "
                          f"(a number of MiB, or e.g. 512MiB, 2G)")
        if disk.get("mode", "shared") not in DISK_MODES:
            errors.append(f"{where}: 'disk.mode' must be one of {', '.join(DISK_MODES)}, "
                          f"not {disk.get('mode')!r}")
        if not isinstance(disk.get("create", True), bool):
            errors.append(f"{where}: 'disk.create' must be true or false, "
                          f"not {disk.get('create')!r}")
    policy = vm.get("policy", {})
    if policy.get("on_peer_loss", "continue") not in PEER_LOSS_POLICIES:
        errors.append(f"{where}: 'policy.on_peer_loss' must be one of "
                      f"{', '.join(PEER_LOSS_POLICIES)}, not {policy.get('on_peer_loss')!r}")
    port = vm.get("replication", {}).get("port", 7100)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        errors.append(f"{where}: 'replication.port' must be a port number, not {port!r}")
    vip = vm.get("vip")
    if vip is not None:
        try:
            ipaddress.IPv4Address(str(vip.get("ip")))
        except ValueError:
            errors.append(f"{where}: 'vip.ip' must be an IPv4 address, not {vip.get('ip')!r}")
    return errors


def kemari_vm_errors(vms: Any, hosts: list[str]) -> list[str]:
    """Every problem with `kemari_vms`, as messages naming the VM and key (empty: fine)."""
    if not isinstance(vms, list) or not vms:
        return ["kemari_vms is missing or empty: define at least one VM "
                "(name, nodes, ...; see roles/kemari/README.md)"]
    errors = []
    for index, vm in enumerate(vms):
        errors += _vm_errors(vm, index, list(hosts))
    names = [vm.get("name") for vm in vms if isinstance(vm, dict)]
    errors += [f"VM {n!r} is defined more than once" for n in sorted(set(names), key=str)
               if names.count(n) > 1]
    return errors


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(str(value))


def _toml_key(key: str) -> str:
    return key if BARE_KEY_RE.match(key) else json.dumps(key)


def _toml_table(header: str, table: dict) -> list[str]:
    lines = [f"[{header}]"] if header else []
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()
              if not isinstance(v, dict)]
    for key, sub in table.items():
        if isinstance(sub, dict):
            name = f"{header}.{_toml_key(key)}" if header else _toml_key(key)
            lines += ["", *_toml_table(name, sub)]
    return lines


def node_address(hostvars: Any, node: str) -> str:
    """Where a node receives checkpoints: kemari_replication_address, else ansible_host."""
    host = hostvars[node]
    return str(host.get("kemari_replication_address") or host.get("ansible_host") or node)


def kemari_vm_config(vm: dict, key_file: str, hostvars: Any) -> dict:
    """The VM's config file contents (DESIGN.md section 5) as a nested dict.

    The same file serves both nodes: `replication.nodes` maps each node name
    to its replication address (port: `replication.port`), and the agent picks
    this node's and the peer's.
    """
    config: dict[str, Any] = {"name": vm["name"], "memory_mib": size_mib(vm.get("memory", 64)),
                              "image": vm.get("image", "kv")}
    config.update({k: v for k, v in vm.items() if k not in ROLE_KEYS and not isinstance(v, dict)})
    if "disk" in vm:
        # size is written in MiB; create is the role's own (see tasks/vm.yml)
        disk = {k: v for k, v in vm["disk"].items() if k not in ("size", "create")}
        config["disk"] = {**disk, "size_mib": size_mib(vm["disk"].get("size", 64))}
    if "net" in vm:
        config["net"] = dict(vm["net"])
    replication = dict(vm.get("replication", {}))
    replication["key_file"] = key_file
    replication["nodes"] = {node: node_address(hostvars, node) for node in vm["nodes"]}
    config["replication"] = replication
    for section in ("policy", "stress"):
        if section in vm:
            config[section] = dict(vm[section])
    return config


def kemari_toml(config: dict) -> str:
    """A nested dict of scalars as TOML (the subset Kemari's config uses)."""
    return "# Managed by Ansible (role kemari): edit the inventory, not this file.\n" + \
        "\n".join(_toml_table("", config)) + "\n"


class FilterModule:
    def filters(self) -> dict:
        return {"kemari_vm_errors": kemari_vm_errors, "kemari_vm_config": kemari_vm_config,
                "kemari_toml": kemari_toml, "kemari_size_mib": size_mib}
