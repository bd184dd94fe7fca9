"""Net backend: moves Ethernet frames between the guest's rings and a host port.

The port is a TAP device or the user-mode forward (same small interface:
fileno, recv, send, state). Receiving needs no queue of our own: frames wait
in the host socket until the guest has posted a buffer for them.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..kvm.machine import Machine
from ..native import lib
from .rings import BackendRing

log = logging.getLogger(__name__)

OK, EINVAL = lib.KEMARI_STATUS_OK, lib.KEMARI_STATUS_EINVAL
FRAME_MAX = lib.KEMARI_NET_FRAME_MAX


class NetPort(Protocol):
    version: int                    # bumped whenever state() would change

    def fileno(self) -> int: ...
    def has_pending(self) -> bool: ...
    def recv(self) -> bytes | None: ...
    def send(self, frame: bytes) -> None: ...
    def state(self) -> dict: ...
    def restore_state(self, state: dict) -> None: ...
    def close(self) -> None: ...


class NetBackend:
    """Serves the net tx and rx rings through `port`."""

    name = "net"

    def __init__(self, machine: Machine, port: NetPort) -> None:
        self.machine = machine
        self.port = port
        self.tx = BackendRing(machine, lib.KEMARI_NET_TX_RING_GPA, "struct kemari_net_ring *")
        self.rx = BackendRing(machine, lib.KEMARI_NET_RX_RING_GPA, "struct kemari_net_ring *")
        self.stats = {"tx_frames": 0, "rx_frames": 0, "tx_errors": 0, "rx_dropped": 0}

    def close(self) -> None:
        self.port.close()

    def fileno(self) -> int:
        return self.port.fileno()

    # Device interface -----------------------------------------------------
    def state(self) -> dict:
        return {"port": self.port.state()}

    def restore_state(self, state: dict) -> None:
        self.port.restore_state(state.get("port", {}))

    @property
    def state_version(self) -> int:
        """Changes whenever state() would: lets checkpoints skip unchanged state."""
        return self.port.version

    def attach(self) -> int:
        """Resend what the guest had queued when the snapshot was taken."""
        return self.process()

    def has_work(self) -> bool:
        return self.tx.unanswered() > 0

    def pending_frames(self) -> list[bytes]:
        """The frames queued for transmission (for output buffering in epoch mode)."""
        return [self.machine.read(req.buf_gpa, req.len) for _i, req in self.tx.requests()
                if 0 < req.len <= FRAME_MAX and req.buf_gpa + req.len <= self.machine.mem_bytes]

    def process(self, send: bool = True) -> int:
        """Answer every queued tx request; with send=False the frames are dropped
        (the caller has taken them with pending_frames() to release later)."""
        batch = [(idx, req.id, req.buf_gpa, req.len) for idx, req in self.tx.requests()]
        for idx, req_id, gpa, length in batch:
            status = OK
            if not 0 < length <= FRAME_MAX or gpa + length > self.machine.mem_bytes:
                status = EINVAL
                self.stats["tx_errors"] += 1
            elif send:
                self.port.send(bytes(self.machine.mem[gpa : gpa + length]))
                self.stats["tx_frames"] += 1
            rsp = self.tx.response_slot(idx)
            rsp.id, rsp.len, rsp.status = req_id, 0, status
        if batch:
            self.tx.publish(len(batch))
        return len(batch)

    def receive(self) -> int:
        """Fill posted rx buffers with frames waiting at the port; returns frames delivered."""
        posted = [(idx, req.id, req.buf_gpa, req.len) for idx, req in self.rx.requests()]
        delivered = 0
        for idx, req_id, gpa, size in posted:
            frame = self._next_frame(min(size, FRAME_MAX))
            if frame is None:
                break
            rsp = self.rx.response_slot(idx)
            if gpa + len(frame) > self.machine.mem_bytes:
                rsp.id, rsp.len, rsp.status = req_id, 0, EINVAL
            else:
                self.machine.write(gpa, frame)
                rsp.id, rsp.len, rsp.status = req_id, len(frame), OK
                self.stats["rx_frames"] += 1
            delivered += 1
        if delivered:
            self.rx.publish(delivered)
        return delivered

    def _next_frame(self, room: int) -> bytes | None:
        while (frame := self.port.recv()) is not None:
            if len(frame) <= room:
                return frame
            self.stats["rx_dropped"] += 1
        return None

    def send_frame(self, frame: bytes) -> None:
        """A frame from the host itself (e.g. a gratuitous ARP after failover)."""
        self.port.send(frame)
