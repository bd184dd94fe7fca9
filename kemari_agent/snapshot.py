"""Save a whole VM to a file and build it again in a fresh process.

The primitive failover is built on: what a checkpoint carries incrementally,
a snapshot carries at once. Layout (little-endian):

    magic "KMRISNAP" | u32 version | u32 meta_len | meta (JSON)
    | vCPU blob | u64 pfn[page_count] | page_count * 4096 bytes
    | SHA-256 of everything before it

Only non-zero pages are stored (fresh guest RAM is zero). The file holds all
of guest memory: it is written 0600 to a new temporary name (O_EXCL, no
symlink followed), fsynced and renamed, so a crash never leaves a torn
snapshot under the real name and nobody else can read it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SnapshotError
from .kvm.machine import PAGE_SIZE
from .safefiles import write_private

MAGIC = b"KMRISNAP"
VERSION = 1
_HEAD = struct.Struct("<8sII")


@dataclass
class Snapshot:
    meta: dict
    vcpu: bytes
    pfns: list[int]
    pages: bytes


def capture(vmm) -> Snapshot:
    """Take a snapshot of a stopped VM (call in the VMM loop)."""
    machine = vmm.machine
    vcpu = machine.get_vcpu_state()
    pfns = machine.nonzero_pages()
    meta = {
        "name": vmm.config.name,
        "memory_mib": vmm.config.memory_mib,
        "image": vmm.config.image,
        "devices": vmm.device_state(),
        "created": time.time(),
        "page_count": len(pfns),
        "vcpu_len": len(vcpu),
    }
    return Snapshot(meta, vcpu, pfns, machine.gather_pages(pfns))


def write(snap: Snapshot, path: Path) -> None:
    meta = json.dumps(snap.meta, sort_keys=True).encode()
    parts = [_HEAD.pack(MAGIC, VERSION, len(meta)), meta, snap.vcpu,
             struct.pack(f"<{len(snap.pfns)}Q", *snap.pfns), snap.pages]
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p)
    try:
        write_private(path, [*parts, digest.digest()], durable=True)
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot {path}: {exc.strerror}") from exc


def read(path: Path) -> Snapshot:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror}") from exc
    if len(data) < _HEAD.size + 32 or data[:8] != MAGIC:
        raise SnapshotError(f"{path} is not a Kemari snapshot")
    magic, version, meta_len = _HEAD.unpack_from(data)
    if version != VERSION:
        raise SnapshotError(f"{path}: snapshot version {version}, this Kemari reads {VERSION}")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise SnapshotError(f"{path}: checksum mismatch (truncated or corrupted snapshot)")
    pos = _HEAD.size
    try:
        meta = json.loads(data[pos : pos + meta_len])
        pos += meta_len
        count, vcpu_len = int(meta["page_count"]), int(meta["vcpu_len"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"{path}: malformed snapshot header") from exc
    if pos + vcpu_len + count * (8 + PAGE_SIZE) + 32 != len(data):
        raise SnapshotError(f"{path}: snapshot length does not match its header")
    vcpu = data[pos : pos + vcpu_len]
    pos += vcpu_len
    pfns = list(struct.unpack_from(f"<{count}Q", data, pos))
    pos += 8 * count
    return Snapshot(meta, vcpu, pfns, data[pos : pos + count * PAGE_SIZE])


def apply(vmm, snap: Snapshot) -> None:
    """Load a snapshot into a freshly created (not booted) VMM and attach its devices."""
    if snap.meta.get("memory_mib") != vmm.config.memory_mib:
        raise SnapshotError(
            f"snapshot is of a {snap.meta.get('memory_mib')} MiB guest; "
            f"the config says memory_mib = {vmm.config.memory_mib}")
    if any(p >= vmm.machine.npages for p in snap.pfns):
        raise SnapshotError("snapshot has pages beyond the guest's memory")
    vmm.machine.scatter_pages(snap.pfns, snap.pages)
    vmm.machine.set_vcpu_state(snap.vcpu)
    vmm.restore_device_state(snap.meta.get("devices", {}))
    vmm.attach_devices()
