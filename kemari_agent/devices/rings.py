"""The backend side of a shared ring in guest memory (Xen-style indices).

The backend consumes requests in [rsp_prod, req_prod) and answers them in
ring order, so rsp_prod doubles as its consumer index (a request may stay
in flight while the guest runs: epoch mode holds disk writes). That is what
lets a new backend attach to a running guest's ring (after a restore or a
failover) with nothing but guest memory to go on.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..kvm.machine import Machine
from ..native import ffi, lib

RING_SIZE = lib.KEMARI_RING_SIZE
_U32 = 0xFFFFFFFF


class RingError(Exception):
    """The guest broke the ring protocol (e.g. more requests than slots)."""


class BackendRing:
    """One ring at `gpa`, typed by `ctype` (e.g. "struct kemari_blk_ring *")."""

    def __init__(self, machine: Machine, gpa: int, ctype: str) -> None:
        self.machine = machine
        self.gpa = gpa
        self.ring = ffi.cast(ctype, ffi.from_buffer(machine.mem[gpa : gpa + 4096]))

    def unanswered(self) -> int:
        """Requests produced by the guest and not yet answered."""
        hdr = self.ring.hdr
        pending = (hdr.req_prod - hdr.rsp_prod) & _U32
        if pending > RING_SIZE:
            raise RingError(
                f"ring at {self.gpa:#x}: {pending} requests outstanding on {RING_SIZE} slots"
            )
        return pending

    def produced(self) -> int:
        """req_prod: the ring index of the guest's next request."""
        return self.ring.hdr.req_prod

    def count_before(self, index: int) -> int:
        """How many unanswered requests come before ring index `index` (0 when
        responses have already passed it)."""
        ahead = (index - self.ring.hdr.rsp_prod) & _U32
        return 0 if ahead >= 0x80000000 else min(ahead, self.unanswered())

    def requests(self) -> Iterator:
        """The unanswered requests, oldest first (index, request struct)."""
        hdr = self.ring.hdr
        for i in range(self.unanswered()):
            idx = (hdr.rsp_prod + i) & _U32
            yield idx, self.ring.slot[idx % RING_SIZE].req

    def response_slot(self, index: int):
        """The slot a response for request `index` goes into (Xen: same slot)."""
        return self.ring.slot[index % RING_SIZE].rsp

    def publish(self, count: int) -> None:
        """Make `count` responses visible and ask to be notified of the next request."""
        hdr = self.ring.hdr
        hdr.rsp_prod = (hdr.rsp_prod + count) & _U32
        hdr.req_event = (hdr.req_prod + 1) & _U32
        self.machine.mark_dirty(self.gpa, 4096)

    def guest_wants_event(self) -> bool:
        """Has rsp_prod reached the rsp_event the guest asked to be woken at?"""
        hdr = self.ring.hdr
        return ((hdr.rsp_prod - hdr.rsp_event) & _U32) < 0x80000000

    def indices(self) -> dict[str, int]:
        hdr = self.ring.hdr
        return {"req_prod": hdr.req_prod, "req_event": hdr.req_event,
                "rsp_prod": hdr.rsp_prod, "rsp_event": hdr.rsp_event}
