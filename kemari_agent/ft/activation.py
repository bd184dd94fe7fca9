"""Turning a standby VM into the running guest (failover) or booting it cold.

Failover: the standby's RAM already holds the last complete checkpoint. Load
the vCPU blob and the device state, open the devices here (the guest's disk,
and only now its outward identity: TAP or forward), attach the backends to
the guest's rings (redoing what was in flight), announce the guest's MAC/IP
with a gratuitous ARP, and let it run.
"""

from __future__ import annotations

import json
import logging

from ..config import VmConfig
from ..devices import netpkt
from ..devices.block import BlockBackend
from ..devices.net import NetBackend
from ..kvm.machine import Machine
from ..vmm import Vmm, open_net_port

log = logging.getLogger(__name__)

PROMOTE_LOCK_WAIT_S = 5.0


def open_devices(config: VmConfig, machine: Machine,
                 block: BlockBackend | None = None) -> Vmm:
    """A Vmm for `machine` with this node's devices (the block backend may be
    handed over from a secondary that kept the disk open)."""
    net = None
    try:
        if block is None and config.disk is not None:
            # A failed primary on this same machine may still be releasing the image.
            block = BlockBackend(machine, config.disk.path, config.disk.size_mib,
                                 wait_lock_s=PROMOTE_LOCK_WAIT_S)
        if config.net is not None:
            net = NetBackend(machine, open_net_port(config))
    except BaseException:
        if block is not None:
            block.close()
        raise
    return Vmm(config, machine, block, net)


def resume_from_checkpoint(vmm: Vmm, vcpu_blobs: list[bytes], device_blob: bytes) -> None:
    for blob in vcpu_blobs:          # the full state, then the fast one on top
        vmm.machine.set_vcpu_state(blob)
    vmm.restore_device_state(json.loads(device_blob or b"{}"))
    vmm.attach_devices()
    announce(vmm)


def announce(vmm: Vmm) -> None:
    """Gratuitous ARP from the guest's MAC/IP: the network learns where it lives now."""
    net = vmm.config.net
    if vmm.net is None or net is None or net.address is None or net.tap is None:
        return
    frame = netpkt.gratuitous_arp(net.mac, net.address.ip.packed)
    for _ in range(3):
        vmm.net.send_frame(frame)
    log.info("%s: announced %s at %s", vmm.config.name, net.address.ip,
             net.mac.hex(":"))
