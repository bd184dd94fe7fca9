"""The VM configuration file (TOML, DESIGN.md section 5), parsed and validated.

Every error names the key and says what is wrong with it, so that a typo in
a cluster node's config is found by `kemari run`/`start` (or the OCF agent's
validate-all), not by a guest that misbehaves later.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
BUILTIN_IMAGES = ("kv", "stress")
FORWARD_GUEST_PORT = 7000
FORWARD_DEFAULT_ADDRESS = "10.0.2.15/24"
DEFAULT_PORT = 7100


@dataclass(frozen=True)
class DiskConfig:
    path: Path
    size_mib: int
    mode: str = "shared"  # or "replicated"


@dataclass(frozen=True)
class NetConfig:
    mac: bytes
    address: ipaddress.IPv4Interface | None
    tap: str | None = None
    bridge: str | None = None
    forward: tuple[str, int] | None = None


@dataclass(frozen=True)
class ReplicationConfig:
    listen: tuple[str, int] | None = None
    peer: tuple[str, int] | None = None
    key_file: Path | None = None
    mode: str = "tap"  # or "epoch"
    epoch_ms: int = 25
    heartbeat_ms: int = 200
    peer_timeout_ms: int = 2000
    port: int = DEFAULT_PORT
    nodes: dict[str, tuple[str, int]] = field(default_factory=dict)   # node name -> address
    auto_converge: bool = True   # throttle a guest that outruns its full sync
    compression: str = "lz4"     # of a full sync's rounds, where it pays (or "none")
    sync_max_mib_s: int = 0      # a full sync's pre-copy rounds at most this fast (0: no cap)
    delta_cache_mib: int = 16    # recently sent pages kept to send as deltas (0: never)
    ack_poll_us: int = 0         # primary: spin this long for an ACK before sleeping
    receive_poll_us: int = 0     # secondary: spin this long for its stream before sleeping
    cpu_latency_us: int | None = None   # CPU wake-up latency asked of the kernel (PM QoS)


@dataclass(frozen=True)
class PolicyConfig:
    on_peer_loss: str = "continue"  # or "suspend"
    fence_peer_handler: str | None = None     # run before output leaves unprotected
    unfence_peer_handler: str | None = None   # run when the peer is back in sync


@dataclass(frozen=True)
class StressConfig:
    pages: int = 8
    rate_hz: int = 0
    working_set: int = 0
    fill: str = "none"        # the working set at boot: "none", "text" or "random"


@dataclass(frozen=True)
class VmConfig:
    name: str
    memory_mib: int
    image: str
    source: Path | None = None
    disk: DiskConfig | None = None
    net: NetConfig | None = None
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    stress: StressConfig = field(default_factory=StressConfig)


class _Table:
    """A TOML table that remembers which keys were read, to reject the rest."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self.data, self.prefix, self.used = data, prefix, set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise ConfigError(f"'{self.key(name)}' is required")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a TOML `true` is never a valid number here.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"'{self.key(name)}' must be {names}, not {value!r}")
        return value

    def int_in(self, name: str, lo: int, hi: int, default: int | None = None,
               required: bool = False) -> int | None:
        value = self.get(name, int, default, required)
        if value is not None and not lo <= value <= hi:
            raise ConfigError(f"'{self.key(name)}' must be between {lo} and {hi}, not {value}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            options = ", ".join(f'"{c}"' for c in choices)
            raise ConfigError(f"'{self.key(name)}' must be one of {options}, not {value!r}")
        return value

    def table(self, name: str) -> _Table | None:
        value = self.get(name, dict)
        return None if value is None else _Table(value, f"{self.prefix}{name}.")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"unknown key '{self.key(unknown[0])}'")


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"'{key}' must be HOST:PORT with a port from 1 to 65535, not {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"'{key}' must use an IP address, not {host!r}") from exc
    return host, int(port)


def derived_mac(name: str) -> bytes:
    """A stable locally administered MAC from the VM name (QEMU's 52:54:00 prefix)."""
    return b"\x52\x54\x00" + hashlib.sha256(name.encode()).digest()[:3]


def _disk(t: _Table, base: Path | None) -> DiskConfig:
    path = Path(t.get("path", str, required=True))
    if not path.is_absolute() and base is not None:
        path = base / path
    size = t.int_in("size_mib", 1, 1 << 20, default=64)
    mode = t.choice("mode", ("shared", "replicated"), "shared")
    t.finish()
    return DiskConfig(path=path, size_mib=size, mode=mode)


def _net(t: _Table, name: str) -> NetConfig:
    tap = t.get("tap", str)
    bridge = t.get("bridge", str)
    forward = t.get("forward", str)
    address = t.get("address", str)
    mac_text = t.get("mac", str)
    t.finish()
    if (tap is None) == (forward is None):
        raise ConfigError("'[net]' needs exactly one of 'net.tap' or 'net.forward'")
    if tap is not None and not IFNAME_RE.match(tap):
        raise ConfigError(f"'net.tap' must be an interface name of 1-15 characters, not {tap!r}")
    if bridge is not None and (tap is None or not IFNAME_RE.match(bridge)):
        raise ConfigError("'net.bridge' needs 'net.tap' and must be an interface name")
    if mac_text is not None:
        if not MAC_RE.match(mac_text):
            raise ConfigError(f"'net.mac' must look like 52:54:00:12:34:56, not {mac_text!r}")
        mac = bytes.fromhex(mac_text.replace(":", ""))
        if mac[0] & 1:
            raise ConfigError(f"'net.mac' must be a unicast address, not {mac_text!r}")
    else:
        mac = derived_mac(name)
    if address is None and forward is not None:
        address = FORWARD_DEFAULT_ADDRESS
    iface = None
    if address is not None:
        try:
            iface = ipaddress.IPv4Interface(address)
        except ValueError as exc:
            raise ConfigError(f"'net.address' must be an IPv4 address/prefix: {exc}") from exc
        if "/" not in address:
            raise ConfigError(f"'net.address' needs a prefix length, e.g. {address}/24")
    elif tap is not None:
        raise ConfigError("'net.address' is required with 'net.tap' (the guest's IPv4/prefix)")
    fwd = parse_hostport(forward, "net.forward") if forward is not None else None
    return NetConfig(mac=mac, address=iface, tap=tap, bridge=bridge, forward=fwd)


def _replication(t: _Table, base: Path | None) -> ReplicationConfig:
    listen = t.get("listen", str)
    peer = t.get("peer", str)
    key_file = t.get("key_file", str)
    mode = t.choice("mode", ("tap", "epoch"), "tap")
    epoch_ms = t.int_in("epoch_ms", 1, 60_000, default=25)
    heartbeat_ms = t.int_in("heartbeat_ms", 10, 60_000, default=200)
    timeout_ms = t.int_in("peer_timeout_ms", 50, 600_000, default=2000)
    port = t.int_in("port", 1, 65535, default=DEFAULT_PORT)
    auto_converge = t.get("auto_converge", bool, default=True)
    compression = t.choice("compression", ("lz4", "none"), "lz4")
    sync_max_mib_s = t.int_in("sync_max_mib_s", 0, 1 << 20, default=0)
    delta_cache_mib = t.int_in("delta_cache_mib", 0, 1 << 16, default=16)
    ack_poll_us = t.int_in("ack_poll_us", 0, 10_000, default=0)
    receive_poll_us = t.int_in("receive_poll_us", 0, 10_000, default=0)
    cpu_latency_us = t.int_in("cpu_latency_us", 0, 100_000)
    nodes_t = t.table("nodes")
    t.finish()
    nodes = _nodes(nodes_t, port) if nodes_t else {}
    if timeout_ms <= heartbeat_ms:
        raise ConfigError("'replication.peer_timeout_ms' must be longer than heartbeat_ms")
    key = Path(key_file) if key_file is not None else None
    if key is not None and not key.is_absolute() and base is not None:
        key = base / key
    return ReplicationConfig(
        listen=parse_hostport(listen, "replication.listen") if listen else None,
        peer=parse_hostport(peer, "replication.peer") if peer else None,
        key_file=key, mode=mode, epoch_ms=epoch_ms,
        heartbeat_ms=heartbeat_ms, peer_timeout_ms=timeout_ms, port=port, nodes=nodes,
        auto_converge=auto_converge, compression=compression, sync_max_mib_s=sync_max_mib_s,
        delta_cache_mib=delta_cache_mib, ack_poll_us=ack_poll_us,
        receive_poll_us=receive_poll_us, cpu_latency_us=cpu_latency_us,
    )


def _nodes(t: _Table, port: int) -> dict[str, tuple[str, int]]:
    """[replication.nodes]: cluster node name -> "IP" or "IP:PORT" (default port: `port`)."""
    nodes = {}
    for name in list(t.data):
        value = t.get(name, str)
        try:
            nodes[name] = (str(ipaddress.ip_address(value)), port)   # a bare address
        except ValueError:
            nodes[name] = parse_hostport(value, t.key(name))
    t.finish()
    return nodes


def node_addresses(config: VmConfig, node: str) -> tuple[tuple[str, int] | None,
                                                        tuple[str, int] | None]:
    """(listen, peer) for cluster node `node` from `[replication.nodes]`: its own entry,
    and the other entry when there is exactly one other. (None, None) without a table."""
    nodes = config.replication.nodes
    if not nodes:
        return None, None
    if node not in nodes:
        raise ConfigError(f"'replication.nodes' has no entry for this node {node!r} "
                          f"(it lists {', '.join(sorted(nodes))})")
    others = [addr for name, addr in sorted(nodes.items()) if name != node]
    return nodes[node], others[0] if len(others) == 1 else None


def with_overrides(config: VmConfig, *, listen: str | None = None, peer: str | None = None,
                   fence_peer_handler: str | None = None,
                   unfence_peer_handler: str | None = None) -> VmConfig:
    """The config with what the command line (e.g. the OCF agent) says about this node."""
    repl, policy = config.replication, config.policy
    if listen is not None:
        repl = replace(repl, listen=parse_hostport(listen, "--listen"))
    if peer is not None:
        repl = replace(repl, peer=parse_hostport(peer, "--peer") if peer else None)
    if fence_peer_handler is not None:
        policy = replace(policy, fence_peer_handler=fence_peer_handler or None)
    if unfence_peer_handler is not None:
        policy = replace(policy, unfence_peer_handler=unfence_peer_handler or None)
    return replace(config, replication=repl, policy=policy)


def parse_config(data: dict[str, Any], source: Path | None = None) -> VmConfig:
    top = _Table(data, "")
    name = top.get("name", str, required=True)
    if not NAME_RE.match(name):
        raise ConfigError(
            f"'name' must be 1-32 characters of letters, digits, '.', '_' or '-', not {name!r}"
        )
    memory = top.int_in("memory_mib", 8, 65536, default=64)
    if memory % 2:
        raise ConfigError(f"'memory_mib' must be even (2 MiB pages), not {memory}")
    image = top.get("image", str, default="kv")
    base = source.parent if source is not None else None
    if image not in BUILTIN_IMAGES:
        path = Path(image)
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            builtin = ", ".join(f'"{i}"' for i in BUILTIN_IMAGES)
            raise ConfigError(f"'image' must be {builtin} or an existing file, not {image!r}")
        image = str(path)
    disk_t, net_t = top.table("disk"), top.table("net")
    repl_t, policy_t, stress_t = top.table("replication"), top.table("policy"), top.table("stress")
    top.finish()
    disk = _disk(disk_t, base) if disk_t else None
    net = _net(net_t, name) if net_t else None
    repl = _replication(repl_t, base) if repl_t else ReplicationConfig()
    policy = PolicyConfig()
    if policy_t:
        policy = PolicyConfig(
            on_peer_loss=policy_t.choice("on_peer_loss", ("continue", "suspend"), "continue"),
            fence_peer_handler=policy_t.get("fence_peer_handler", str) or None,
            unfence_peer_handler=policy_t.get("unfence_peer_handler", str) or None)
        policy_t.finish()
    stress = StressConfig()
    if stress_t:
        stress = StressConfig(
            pages=stress_t.int_in("pages", 0, 1 << 20, default=8),
            rate_hz=stress_t.int_in("rate_hz", 0, 1_000_000, default=0),
            working_set=stress_t.int_in("working_set", 0, 1 << 24, default=0),
            fill=stress_t.choice("fill", ("none", "text", "random"), "none"),
        )
        stress_t.finish()
    if disk and disk.size_mib * 2048 > (1 << 40):
        raise ConfigError("'disk.size_mib' is too large")
    return VmConfig(name=name, memory_mib=memory, image=image, source=source, disk=disk,
                    net=net, replication=repl, policy=policy, stress=stress)


def load_config(path: str | Path) -> VmConfig:
    """Read and validate a config file; raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_config(data, source=path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
