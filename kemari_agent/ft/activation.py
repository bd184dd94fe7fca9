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

from ..devices import netpkt
from ..vmm import Vmm

log = logging.getLogger(__name__)

# A failed primary on this same machine may still be releasing the disk image.
PROMOTE_LOCK_WAIT_S = 5.0


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
