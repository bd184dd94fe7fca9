"""Boot a Kemari guest image: load it, describe the machine to it, point the vCPU at it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..errors import KemariError
from ..native import ffi, lib
from .machine import Machine


@dataclass(frozen=True)
class BootInfo:
    """What the guest learns at boot (struct kemari_boot_info)."""

    mac: bytes = b"\x52\x54\x00\x00\x00\x01"
    address: ipaddress.IPv4Interface | None = None
    gateway: ipaddress.IPv4Address | None = None
    disk_sectors: int = 0
    has_net: bool = False
    args: tuple[int, ...] = field(default_factory=tuple)
    cmdline: str = ""


def _ip(value: ipaddress.IPv4Address | None) -> int:
    # The guest wants network byte order in a little-endian uint32.
    return int.from_bytes(value.packed, "little") if value is not None else 0


def load_image(machine: Machine, image: bytes) -> None:
    if not image:
        raise KemariError("the guest image is empty")
    if len(image) > lib.KEMARI_MAX_IMAGE_BYTES:
        raise KemariError(
            f"the guest image is {len(image)} bytes; at most {lib.KEMARI_MAX_IMAGE_BYTES} fit"
        )
    machine.write(lib.KEMARI_IMAGE_GPA, image)


def write_boot_info(machine: Machine, info: BootInfo) -> None:
    if len(info.args) > 8:
        raise KemariError("at most 8 image arguments")
    bi = ffi.new("struct kemari_boot_info *")
    bi.magic = lib.KEMARI_BOOT_MAGIC
    bi.abi_version = lib.KEMARI_ABI_VERSION
    bi.mem_bytes = machine.mem_bytes
    bi.disk_sectors = info.disk_sectors
    bi.flags = (lib.KEMARI_BOOT_NET if info.has_net else 0) | (
        lib.KEMARI_BOOT_DISK if info.disk_sectors else 0
    )
    bi.mac = list(info.mac)
    if info.address is not None:
        bi.ipv4_addr = _ip(info.address.ip)
        bi.ipv4_netmask = _ip(info.address.netmask)
    bi.ipv4_gateway = _ip(info.gateway)
    for i, arg in enumerate(info.args):
        bi.args[i] = arg
    cmdline = info.cmdline.encode()[:255]
    ffi.memmove(bi.cmdline, cmdline, len(cmdline))
    machine.write(lib.KEMARI_BOOT_INFO_GPA, ffi.buffer(bi))


def boot(machine: Machine, image: bytes, info: BootInfo) -> None:
    """Cold boot: image at 1 MiB, boot info, long mode at CPL 3, stack at the top of RAM."""
    load_image(machine, image)
    write_boot_info(machine, info)
    machine.setup_long_mode(lib.KEMARI_IMAGE_GPA, machine.mem_bytes)
