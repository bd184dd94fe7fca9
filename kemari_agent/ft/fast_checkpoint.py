"""The primary's protected checkpoint in one C call (native/fastpath.h).

Per checkpoint the Python path makes one wrapped C call per step (save the
vCPU, harvest the dirty log, write the checkpoint, seal the frame, write it)
and in the daemon two thirds of each call's time was the Python around it
(docs/benchmarks.md). Here the steps run in one call, into the channel's
frame buffer, while replication/primary.py still decides what is written:
Primary.fast_checkpoint() plans it (sequence number, counts queued before
it, delta mode) and Primary.fast_checkpoint_sent() books it, and the vCPU
blob's base comes from and goes back to the session's BlobBases. The bytes
are checkpoint()'s: tests compare the two paths.

Only the common checkpoint takes it: protected, nothing queued, pages and
one fast vCPU blob. The protector sends the others (a full vCPU blob, a
device's state, disk writes, a fault to inject) through Primary.checkpoint.
KEMARI_FAST_CHECKPOINT=0 in a daemon's environment keeps every checkpoint
on that path (the stage benchmark's per-step table needs it).

The protector also arms the vCPU's run with it (FastCheckpoint.run,
native kfast_run): when the guest stops at a doorbell the tap checkpoints,
the checkpoint is written and sent before the run call returns, so no
Python runs between the guest's exit and its frame leaving; the tap hook
then books it (tapped()). KEMARI_FAST_CHECKPOINT=1 keeps the one call in
the tap hook.
"""

from __future__ import annotations

import os

from ..errors import KvmError
from ..replication import native_codec
from ..replication.codec import LZ4_WORTH, PAGE_SIZE, RecordType
from ..replication.errors import TransportError
from ..replication.frames import MAX_FRAME
from .link import Link

try:
    from .._native import ffi, lib
except ImportError:  # pragma: no cover - depends on the build
    ffi = lib = None

# KEMARI_FAST_CHECKPOINT: 0 goes step by step; 1 takes the one call from the
# tap hook (Python, after the exit's dispatch); 2, the default, takes it in the
# vCPU's run call itself when the exit is a tapped event (FastCheckpoint.run).
_SWITCH = os.environ.get("KEMARI_FAST_CHECKPOINT", "2")
ENABLED = lib is not None and _SWITCH != "0"
TAP_IN_THE_RUN = ENABLED and _SWITCH != "1"
# Checkpoints of more dirty pages go the Python path (their harvest is kept):
# the frame buffer and scratch are sized for this many.
MAX_PAGES = 256
# The stage trace's names of the moments one call takes (struct kfast's moments[]).
ONE_CALL_MOMENTS = ("c_entered", "c_state", "c_harvested", "c_encoded", "c_sealed", "c_written")


class Done:
    """What one fast checkpoint did. `seq` is None when it wrote nothing: then
    the pages it harvested (`pfns`) and the vCPU blob it saved (`vcpu`) go
    through Primary.checkpoint. Else checkpoint `seq` is booked, and sent
    unless `failed` says why not (the session is lost; a resync resends its
    pages: FastCheckpoint.harvested())."""

    __slots__ = ("seq", "pfns", "vcpu", "failed")

    def __init__(self, seq: int | None, pfns: list[int] | None = None,
                 vcpu: bytes | None = None, failed: str | None = None) -> None:
        self.seq, self.pfns, self.vcpu, self.failed = seq, pfns, vcpu, failed


class FastCheckpoint:
    """One session's one-call checkpoints of `machine` (kvm.Machine) over `link`,
    of up to about `max_pages` dirty pages (more go through Primary.checkpoint).
    What it leaves to later, off the way from the tap to the ACK: the pages
    it harvested (harvested()), the last vCPU blob as the session's delta
    base (gave_way(), before any checkpoint of the session's own); its page
    and blob statistics are its own (stats())."""

    def __init__(self, machine, link: Link, vcpu_version: int,
                 max_pages: int = MAX_PAGES) -> None:
        sm = link.sm
        cipher = link.channel.frame_cipher()
        if not isinstance(sm.delta_cache, native_codec.PageIndex) or cipher is None \
                or sm.blob_bases is None:
            raise ValueError("the one-call checkpoint needs the C page index, C frames "
                             "and blob deltas")
        frame_room = int(lib.kcodec_checkpoint_bound(
            max_pages, max_pages, 1, machine.state_size)) + 20
        if frame_room > MAX_FRAME + 20:
            raise ValueError(f"{max_pages} pages do not fit a frame")
        self.machine, self.link, self._sm = machine, link, sm
        self.key = (int(RecordType.VCPU), 0, vcpu_version)
        self._index, self._blobs = sm.delta_cache, sm.blob_bases
        self._channel = link.channel
        f = self._f = ffi.new("struct kfast *")
        self._keep = [
            pfns := ffi.new("uint64_t[]", machine.npages),
            plan_pfns := ffi.new("uint64_t[]", machine.npages),
            plan_slots := ffi.new("uint32_t[]", machine.npages),
            vcpu0 := ffi.new("uint8_t[]", machine.state_size),
            vcpu1 := ffi.new("uint8_t[]", machine.state_size),
        ]
        f.vm, f.index, f.arena = machine.native, self._index.native, self._index.arena_ptr
        # guest RAM by the VMM's pointer: a buffer export would keep close() from
        # unmapping it
        f.mem, f.mem_size = lib.kvmm_mem(machine.native), machine.mem_bytes
        f.pfns, f.plan_pfns, f.plan_slots, f.guest_pages = pfns, plan_pfns, plan_slots, \
            machine.npages
        f.vcpu[0], f.vcpu[1], f.vcpu_room = vcpu0, vcpu1, machine.state_size
        f.vcpu_type, f.vcpu_ident, f.vcpu_version = self.key
        need = max_pages * PAGE_SIZE + machine.state_size     # pages or the blob's XOR
        scratch = native_codec.scratch(2 * need + need // 255 + 16)
        self._keep.append(scratch)
        f.scratch = ffi.from_buffer(scratch)
        f.scratch_size = len(scratch)
        f.sealer = cipher
        f.fd = self._channel.fileno()
        f.frame_room = frame_room
        self._frame = None                  # the channel's frame buffer, as f.frame has it
        self._frame_size = frame_room - 20
        self._base = None                   # the blob f.vcpu_base points into
        self.in_the_run = 0                 # checkpoints written in the vCPU's run call
        c = self._ckpt = ffi.new("struct kcodec_ckpt *")
        c.generation, c.item_records, c.item_pages = sm.generation, 0, 0
        c.lz4_worth, c.patch = LZ4_WORTH, sm.page_patches

    def checkpoint(self, now: float, trace=None) -> Done | None:
        """The next checkpoint; None when Primary says it must go its own way
        (nothing was done). `trace`: a stages.StageLog, marked "sent"."""
        plan = self._arm(trace is not None)
        if plan is None:
            return None
        self._f.io_pending = self.machine.io_pending
        return self._finish(plan, lib.kfast_checkpoint(self._f, self._ckpt), now, trace)

    def run(self, ports: tuple[int, int], fast_until: float, timed: bool):
        """The vCPU's next run (Machine.run), armed: if it stops at an `out` to
        one of `ports` before time.monotonic() reaches `fast_until`, the
        checkpoint is written and sent before the call returns (kfast_run).
        Returns the exit and, when it was, the plan for tapped()."""
        plan = self._arm(timed)
        f = self._f
        if plan is not None:
            f.armed = 1
            f.tap_ports = ports
            f.fast_until_ns = int(fast_until * 1e9)
        ex = self.machine.run(tap=self._tap)
        return ex, (plan if f.tapped else None)

    def _tap(self, ex) -> int:
        return lib.kfast_run(self._f, self._ckpt, ex)

    @property
    def tapped_at(self) -> float:
        """When the last run's tap checkpointed (time.monotonic())."""
        return self._f.tapped_ns / 1e9

    def tapped(self, plan, now: float, trace=None) -> Done:
        """What the checkpoint of the run that returned `plan` did, booked as
        checkpoint()'s."""
        done = self._finish(plan, int(self._f.tap_result), now, trace)
        self.in_the_run += done.seq is not None
        return done

    def _arm(self, timed: bool):
        """The next call's inputs, as Primary plans the checkpoint; None when it
        must go its own way."""
        sm = self._sm
        plan = sm.fast_checkpoint()
        if plan is None:
            return None
        f, c = self._f, self._ckpt
        frame = self._channel.send_room(self._frame_size)
        if frame != self._frame:            # the channel grew its buffer
            self._frame, f.frame = frame, frame - 4
        f.timed = timed
        c.seq = plan.seq
        c.records, c.pages, c.bytes, c.crc = plan.queued
        if not f.own_base:                  # the last blob went through Primary.checkpoint
            self._base = self._blobs.last(self.key)
            f.vcpu_base = ffi.from_buffer(self._base) if self._base else ffi.NULL
            f.vcpu_base_len = len(self._base) if self._base else 0
        return plan

    def _finish(self, plan, result: int, now: float, trace) -> Done:
        """After the call: booked, or what else it did (_other)."""
        if trace is not None:               # stages.StageLog: the one call's steps and end
            self._trace(trace, result)
            trace.mark("sent")
        if self._f.completed:
            self.machine.io_pending = False
        if result == lib.KFAST_SENT:
            self._booked(plan, now)
            return Done(plan.seq)
        return self._other(result, plan, now)

    def _trace(self, trace, result: int) -> None:
        """The moments C took inside a call that sent its frame."""
        if result in (lib.KFAST_SENT, lib.KFAST_PARTIAL):
            for name, ns in zip(ONE_CALL_MOMENTS, self._f.moments, strict=True):
                trace.note(name, int(ns))

    def _booked(self, plan, now: float) -> None:
        """The checkpoint the last call wrote, in Primary's and the link's books."""
        self._sm.fast_checkpoint_sent(plan, self._f.written, now)
        self.link.bytes_sent += self._f.written

    def _other(self, result: int, plan, now: float) -> Done:
        """checkpoint() for the results but KFAST_SENT."""
        f, channel = self._f, self._channel
        if result in (lib.KFAST_VCPU_FAILED, lib.KFAST_HARVEST_FAILED):   # nothing taken
            what = "saving vCPU state" if result == lib.KFAST_VCPU_FAILED else "dirty harvest"
            raise KvmError(f"{what}: {ffi.string(lib.kvmm_error()).decode(errors='replace')}")
        if result in (lib.KFAST_TOO_BIG, lib.KFAST_ENCODE_FAILED):        # nothing written
            return Done(None, self.harvested(),
                        ffi.buffer(f.vcpu[f.last ^ 1], f.vcpu_len)[:])
        failed = None
        try:
            if result == lib.KFAST_REKEY:
                channel.send_written(f.written)
            elif result == lib.KFAST_PARTIAL:
                channel.send_rest_of_frame(f.frame_size, f.sent)
            elif result == lib.KFAST_WRITE_FAILED:
                failed = f"send to {channel.peer} failed: {os.strerror(int(f.err))}"
            else:
                failed = f"sealing a frame failed ({int(f.err)})"
        except TransportError as exc:
            failed = str(exc)
        self._booked(plan, now)       # also when the send failed, as Primary.checkpoint does
        return Done(plan.seq, failed=failed)

    @property
    def pages(self) -> int:
        """How many pages the last call harvested."""
        return int(self._f.n_pfns)

    def harvested(self) -> list[int]:
        """The pages the last call harvested."""
        f = self._f
        return ffi.unpack(f.pfns, f.n_pfns) if f.n_pfns else []

    def gave_way(self) -> None:
        """A checkpoint goes through Primary.checkpoint: the session's blob
        bases get the last blob this sent, and the next call takes its base
        from them."""
        if self._f.own_base:
            self._blobs.remember(self.key, self.last_blob())
            self._f.own_base = 0

    def last_blob(self) -> bytes:
        """The vCPU blob the last call that wrote a checkpoint sent."""
        f = self._f
        return ffi.buffer(f.vcpu[f.last], f.last_len)[:]

    def stats(self) -> dict[str, int]:
        """This session's one-call checkpoints, and their page and blob
        statistics (those of the others are in the page index's and the blob
        bases')."""
        f = self._f
        return {"checkpoints": f.checkpoints, "in_the_run": self.in_the_run,
                "xor_pages": f.xor_pages, "xor_bytes": f.xor_bytes,
                "plain_pages": f.plain_pages, "unchanged_pages": f.unchanged_pages,
                "xor_blobs": f.xor_blobs, "xor_blob_bytes": f.xor_blob_bytes}
