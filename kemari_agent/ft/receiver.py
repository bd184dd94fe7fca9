"""The secondary side: a standby VM's memory kept equal to the primary's last
acknowledged checkpoint.

Checkpoints are applied straight into the memory of a KVM VM created at
start (never booted), so that promotion only has to load the vCPU state and
attach devices: no copy of guest RAM at failover. The stream's state machine
(replication.secondary) stages each checkpoint and applies it whole on its
END record, or not at all.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import stages
from ..config import VmConfig
from ..errors import KemariError
from ..kvm.machine import Machine
from ..loop_calls import LoopCalls
from ..replication import transport
from ..replication.codec import GoodbyeReason, HelloFlag
from ..replication.events import (
    Committed,
    Discarded,
    PeerDead,
    PeerGoodbye,
    PeerHello,
    SyncComplete,
    SyncProgressed,
)
from ..replication.image import ImageSink
from ..replication.secondary import Secondary
from .admission import Admission
from .fast_receive import FastReceive, Waited
from .faults import Faults
from .link import Link, SessionLost
from .node import Node
from .protector import VCPU_FAST, VCPU_FULL
from .settings import pair_settings

log = logging.getLogger(__name__)

# A verified checkpoint's ACK leaves before this node applies and records it, so
# the primary's wake-up overlaps that work (Secondary._ack_early says when it may).
# KEMARI_EARLY_ACK=0: the bench's switch (the ACK then waits for both).
EARLY_ACK = os.environ.get("KEMARI_EARLY_ACK", "1") != "0"


class StandbySink(ImageSink):
    """ImageSink into the standby VM's RAM. Replicated disk writes are applied
    first and made durable before the checkpoint touches memory; if one fails
    (a full disk) the disk is put back as the last checkpoint left it, so
    memory and disk still hold that checkpoint."""

    def __init__(self, machine: Machine, disk_fd: int | None,
                 disk_path: Path | None = None) -> None:
        super().__init__(machine.mem_bytes, memory=machine.mem,
                         disks={0: disk_fd} if disk_fd is not None else None)
        self.machine = machine
        self.disk_fd = disk_fd
        self.disk_path = disk_path
        self._disk_dirty = False
        self._syncing = False    # a full sync writes through: nothing valid to keep
        self._undo: list[tuple[int, bytes]] = []     # (offset, old bytes) of this checkpoint
        self.vcpu_full: bytes | None = None
        self.vcpu_fast: bytes | None = None
        self.apply_ns = 0      # KEMARI_STAGES=1: time in apply_pages since the last commit

    def apply_pages(self, pfns, data, zero_pfns) -> None:
        """Straight into the standby VM's RAM, copied in C."""
        self._settle_disk()
        t0 = stages.now_ns() if stages.ENABLED else 0
        if pfns:
            self.machine.scatter_pages(list(pfns), data)
        if zero_pfns:
            self.machine.zero_pages(list(zero_pfns))
        if t0:
            self.apply_ns += stages.now_ns() - t0

    def set_vcpu(self, vcpu_id, version, blob) -> None:
        """A full blob replaces both; a fast one goes on top of the last full one."""
        self._settle_disk()
        if version == VCPU_FULL:
            self.vcpu_full, self.vcpu_fast = bytes(blob), None
        elif version == VCPU_FAST:
            self.vcpu_fast = bytes(blob)
        else:
            raise KemariError(f"vCPU record version {version} is unknown to this node")

    def set_device(self, device_id, version, blob) -> None:
        self._settle_disk()
        super().set_device(device_id, version, blob)

    def begin_full_sync(self, generation: int) -> None:
        super().begin_full_sync(generation)
        self.vcpu_full = self.vcpu_fast = None
        self._syncing = True
        self._undo.clear()

    def write_disk(self, disk_id, sector, data) -> None:
        if not self._syncing and self.disk_fd is not None:
            offset = sector * 512
            self._undo.append((offset, os.pread(self.disk_fd, len(data), offset)))
        try:
            super().write_disk(disk_id, sector, data)
        except OSError as exc:
            self._roll_back()
            raise OSError(exc.errno, f"replicated disk {self.disk_path}: "
                          f"{exc.strerror}") from exc
        self._disk_dirty = True

    def commit(self, generation: int, seq: int) -> None:
        self._syncing = False
        self._settle_disk()
        self._undo.clear()
        super().commit(generation, seq)

    def flush_disks(self) -> None:
        """Disk writes that came ahead of their checkpoint's END, durable now."""
        self._settle_disk()

    def undo_disk_writes(self) -> None:
        """Their checkpoint was discarded: the disk goes back to the last commit."""
        self._roll_back()
        if self.disk_fd is not None:
            with contextlib.suppress(OSError):   # the next checkpoint's sync reports it
                os.fdatasync(self.disk_fd)

    def _settle_disk(self) -> None:
        """The disk writes applied so far, durable (or undone, if that fails); a
        full sync's are made durable only at its closing commit."""
        if self._disk_dirty and self.disk_fd is not None and not self._syncing:
            try:
                os.fdatasync(self.disk_fd)
            except OSError as exc:
                self._roll_back()
                raise OSError(exc.errno, f"replicated disk {self.disk_path}: "
                              f"{exc.strerror}") from exc
            self._disk_dirty = False

    def _roll_back(self) -> None:
        for offset, old in reversed(self._undo):
            # rewriting blocks just written needs no new space
            with contextlib.suppress(OSError):
                os.pwrite(self.disk_fd, old, offset)
        self._undo.clear()
        self._disk_dirty = False


class Receiver:
    def __init__(self, config: VmConfig, machine: Machine, node: Node,
                 disk_fd: int | None = None) -> None:
        repl = config.replication
        if repl.listen is None or repl.key_file is None:
            raise KemariError(f"{config.name}: a secondary needs 'replication.listen' and "
                              "'replication.key_file'")
        self.config, self.machine, self.node = config, machine, node
        self.sink = StandbySink(machine, disk_fd,
                                config.disk.path if config.disk is not None else None)
        try:
            self.listener = transport.listen(str(repl.key_file), *repl.listen)
        except OSError as exc:
            raise KemariError(f"cannot listen on {repl.listen[0]}:{repl.listen[1]}: "
                              f"{exc.strerror}") from exc
        except Exception as exc:   # key file problems
            raise KemariError(f"replication key {repl.key_file}: {exc}") from exc
        self.admission = Admission(self.listener, self._new_session, self._reject)
        self.link: Link | None = None
        self.has_checkpoint = False
        self.state = "standalone"
        self.peer: str | None = None
        self.checkpoints = 0
        self.bytes_received = 0
        self.early_acks = 0
        self.one_call_reads = 0   # checkpoints read, checked and ACKed in one C call
        self.bytes_sent = 0
        # read that completed a checkpoint -> its ACK sent (after apply and record,
        # or before them: an early ACK)
        self.ack_latencies: collections.deque[float] = collections.deque(maxlen=2000)
        self.faults = Faults()
        # Calls another thread wants run between two passes, when no checkpoint
        # is half applied: an early ACK leaves in the wait's C call, before the
        # pass that applies and records its checkpoint (Daemon's digest).
        self._calls = LoopCalls()
        self.last_commit_at: float | None = None
        self.sync_progress: dict | None = None
        self.rejections: list[str] = []
        self.handed_over = False
        self.settings = pair_settings(config)
        self.stages = stages.StageLog() if stages.ENABLED else None
        self._first_wake = 0      # KEMARI_STAGES=1: first wake-up of the checkpoint in progress
        if disk_fd is None and not node.consistent:
            # Only a replicated disk keeps a half-done full sync across a restart;
            # guest RAM starts empty, so there is no mix left to refuse.
            node.mark(consistent=True)

    def status(self) -> dict:
        age = None
        if self.last_commit_at is not None:
            age = round((time.monotonic() - self.last_commit_at) * 1000, 1)
        link = self.link
        lat = sorted(self.ack_latencies)
        pct = (lambda p: round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1e6, 1)) \
            if lat else (lambda p: None)
        return {"state": self.state, "peer": self.peer,
                "checkpoint_seq": self.node.checkpoint_seq if self.has_checkpoint else 0,
                "has_checkpoint": self.has_checkpoint, "checkpoints": self.checkpoints,
                "last_checkpoint_age_ms": age,
                "bytes_received": self.bytes_received + (link.sm.bytes_received if link else 0),
                "bytes_sent": self.bytes_sent + (link.bytes_sent if link else 0),
                "early_acks": self.early_acks + (link.sm.early_acks if link else 0),
                "one_call_reads": self.one_call_reads + self._one_call_reads(link),
                "latency_us": {"p50": pct(0.5), "p99": pct(0.99)},
                "incoming": self.admission.status(),
                "sync": self.sync_progress,
                "last_error": self.rejections[-1] if self.rejections else None,
                "recent_errors": self.rejections[-5:],
                "consistent": self.node.consistent, "outdated": self.node.outdated,
                "promotable": self.promote_blocker() is None,
                "promote_blocker": self.promote_blocker(),
                **({"stages": self.stages.export()} if self.stages is not None else {})}

    @staticmethod
    def _one_call_reads(link: Link | None) -> int:
        return link.fast_receive.reads if link is not None and link.fast_receive else 0

    def promote_blocker(self) -> str | None:
        """Why promoting this node would resume a state that is not the guest's last
        (docs/operations.md, "Promotion states"); None when it may be promoted."""
        if not self.node.consistent:
            what = "guest memory and the replicated disk hold" if self.sink.disk_fd is not None \
                else "guest memory holds"
            when = "is in progress" if self.state == "syncing" else "did not complete"
            return f"inconsistent: a full sync {when}, {what} a mix of two states"
        if self.node.outdated:
            return ("outdated: the primary went on without this node (a newer generation, "
                    "or output it let go unprotected); its last checkpoint is not the "
                    "guest's latest state")
        return None

    def checkpoint_state(self) -> tuple[list[bytes], bytes]:
        """The last applied checkpoint's vCPU blobs (to load in order) and device state."""
        sink = self.sink
        if not self.has_checkpoint or sink.vcpu_full is None:
            raise KemariError("this secondary holds no complete checkpoint")
        blobs = [sink.vcpu_full] + ([sink.vcpu_fast] if sink.vcpu_fast else [])
        return blobs, sink.devices.get(0, (0, b"{}"))[1]

    def close(self) -> None:
        self._drop("closing")
        self.admission.close()
        self.listener.close()

    # ---- the loop ------------------------------------------------------------
    def serve(self, stop: Callable[[], bool], wake_fd: int) -> None:
        """Receive until stop() is true (checked whenever wake_fd is readable).
        Connections that are not (yet) the current session wait in `admission`,
        which never blocks this loop."""
        while not stop():
            reads, writes = [wake_fd] + self.admission.read_fds(), self.admission.write_fds()
            deadline = min(time.monotonic() + 1.0, self.admission.next_deadline())
            link = self.link
            if link is not None:
                deadline = min(deadline, link.sm.next_deadline())
            timeout = max(0.0, deadline - time.monotonic())
            # The common case waits and reads the stream in one C call (FastReceive)
            waited = link.fast_receive.wait(link, reads, writes, timeout) \
                if link is not None and link.fast_receive is not None else None
            if waited is None:
                if link is not None:
                    reads.append(link.fileno())
                readable, writable, _ = select.select(reads, writes, [], timeout)
                waited = Waited(readable, writable, None, 0)
            if waited.outcome is not None and self.faults.due("slow-apply"):
                self.faults.stall()       # the C call may have sent the ACK already
            self._pass(waited, wake_fd)
            self._calls.run_pending()

    def call_in_loop(self, fn: Callable[[], Any], wake: Callable[[], None],
                     timeout: float = 10.0) -> Any:
        """fn() run by the loop between two passes (wake() interrupts its wait)."""
        return self._calls.call(fn, wake, timeout)

    def _pass(self, waited: Waited, wake_fd: int) -> None:
        """What the wait found ready: the stream (read already if `waited` has its
        outcome), the wake-up pipe, admission."""
        readable, writable = waited.readable, waited.writable
        woke = (waited.woke_ns or stages.now_ns()) if self.stages is not None else 0
        if self.link is None or self.link.fileno() not in readable:
            woke = 0     # a heartbeat deadline or another fd: not the stream waking us
        if wake_fd in readable:
            try:
                while os.read(wake_fd, 512):
                    pass
            except BlockingIOError:
                pass
        if self.link is not None:
            try:
                # ACKs leave only after this node has recorded what they acknowledge,
                # but for an early one, whose record need not be durable (_ack_early)
                started = waited.woke_ns / 1e9 if waited.woke_ns else time.monotonic()
                events = self.link.read(flush=False, waited=waited.outcome) \
                    if self.link.fileno() in readable else []
                events += self.link.sm.poll(time.monotonic())
                decoded = self.link.decoded_ns if woke else 0
                self._handle(events)
                if self.link is not None:
                    handled = stages.now_ns() if woke else 0
                    self.link.flush()
                    early, self.link.early = self.link.early, None
                    acked = early[1] / 1e9 if early else time.monotonic()
                    self.ack_latencies.extend(acked - started for ev in events
                                              if isinstance(ev, Committed))
                    if woke:
                        self._trace(woke, decoded, handled, events, early)
            except SessionLost as exc:
                self._session_failed(str(exc))
        admitted = self.admission.service(readable + writable, time.monotonic())
        if admitted is not None:
            self._replace_session(*admitted)

    def _trace(self, woke: int, decoded: int, handled: int, events: list,
               early: tuple[int, int] | None) -> None:
        """KEMARI_STAGES=1: the moments of each checkpoint this pass committed."""
        link = self.link
        first = self._first_wake or woke
        self._first_wake = first
        committed = [ev.seq for ev in events if isinstance(ev, Committed)]
        if not committed:
            return
        moments = {"decoded": decoded, "handled": handled, "ack_sent": stages.now_ns()}
        if early is not None:       # the ACK left first; apply and record after it
            ready, sent = early
            moments = {"decoded": ready, "handled": ready, "ack_sent": sent,
                       "after_ack": handled}
        self.stages.pending = {"wake": first, "last_wake": woke, "recv": link.recv_ns,
                               "apply": self.sink.apply_ns, **link.moments, **moments}
        link.moments = {}
        for seq in committed:
            self.stages.close(seq)
        self.sink.apply_ns = 0
        self._first_wake = 0

    def _new_session(self, channel: transport.Channel) -> Link:
        """A session for an authenticated peer, our HELLO sent; it replaces the
        current one only once its HELLO has been accepted."""
        repl = self.config.replication
        sm = Secondary(self.sink, name=self.config.name, memory_size=self.machine.mem_bytes,
                       generation=self.node.generation,
                       checkpoint_seq=self.node.checkpoint_seq,
                       has_checkpoint=self.has_checkpoint, now=time.monotonic(),
                       heartbeat_interval=repl.heartbeat_ms / 1000,
                       peer_timeout=repl.peer_timeout_ms / 1000,
                       config=self.settings, outdated=self.node.outdated)
        link = Link(channel, sm, repl.peer_timeout_ms / 1000)
        link.flush()
        return link

    def _replace_session(self, link: Link, events: list) -> None:
        if self.link is not None:
            self._drop("a newer primary session replaces this one")
        # Only now, the old session's torn checkpoint undone: disk writes may come
        # ahead of their checkpoint (those of its first read were staged).
        link.sm.disk_ahead = self.sink.disk_fd is not None
        if EARLY_ACK:
            link.sm.send_early = link.send_early
        link.fast_receive = FastReceive.for_link(link)
        if link.fast_receive is not None:
            link.fast_receive.spin_us = self.config.replication.receive_poll_us
        self.link = link
        self.peer = f"{link.channel.peer[0]}:{link.channel.peer[1]}"
        self.handed_over = False
        try:
            self._handle(events)
            if self.link is not None:
                self.link.flush()
        except SessionLost as exc:
            self._session_failed(str(exc))

    def _handle(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, PeerHello):
                resync = bool(ev.hello.flags & HelloFlag.RESYNC)
                self.state = "syncing" if ev.full_sync else "resyncing" if resync else "synced"
                self._persist_promotability()
                if ev.full_sync:
                    self.has_checkpoint = False
                    log.info("%s: full sync from %s (generation %d)", self.config.name,
                             self.peer, ev.hello.generation)
                elif resync:
                    log.info("%s: resync from %s: changes since checkpoint %d, staged; this "
                             "node keeps that checkpoint until the resync commits%s",
                             self.config.name, self.peer, self.node.checkpoint_seq,
                             " (outdated meanwhile: the primary ran on unprotected)"
                             if self.node.outdated else "")
            elif isinstance(ev, SyncProgressed):
                self.sync_progress = {"round": ev.round, "pages_sent": ev.pages_sent,
                                      "pages_remaining": ev.pages_remaining}
            elif isinstance(ev, Committed):
                self.has_checkpoint = True
                self.checkpoints += 1
                self.last_commit_at = time.monotonic()
                self.node.record(ev.generation, ev.seq)
                self._persist_promotability()
            elif isinstance(ev, SyncComplete):
                self.state = "synced"
                self.sync_progress = None
                self.node.save(durable=True)
                log.info("%s: in sync at checkpoint %d", self.config.name, ev.seq)
            elif isinstance(ev, Discarded):
                self._reject(f"discarded a checkpoint: {ev.reason}")
            elif isinstance(ev, PeerGoodbye):
                self.handed_over = ev.reason == GoodbyeReason.HANDOVER or self.handed_over
                self.node.save(durable=True)
                self._drop(f"the primary said goodbye (reason {ev.reason})")
            elif isinstance(ev, PeerDead):
                raise SessionLost(f"primary silent for {ev.silent_for:.1f} s")

    def _persist_promotability(self) -> None:
        """Before the ACK leaves: a restart must not forget a half-done full sync or
        that the peer went on without this node."""
        sm = self.link.sm
        if (sm.consistent, sm.outdated) != (self.node.consistent, self.node.outdated):
            self.node.mark(consistent=sm.consistent, outdated=sm.outdated)

    def _reject(self, reason: str) -> None:
        log.warning("%s: %s", self.config.name, reason)
        self.rejections.append(reason)
        del self.rejections[:-20]

    def _session_failed(self, reason: str) -> None:
        self._discard_torn()
        self._reject(f"replication session ended: {reason}; keeping checkpoint "
                     f"{self.node.checkpoint_seq if self.has_checkpoint else 'none'}")
        self._drop(reason)

    def _discard_torn(self) -> None:
        """The session ends: a checkpoint it had begun is torn, and the disk writes
        it sent ahead are undone (before a promotion or a newer session uses the disk)."""
        if self.link is not None:
            for ev in self.link.sm.connection_lost():
                if isinstance(ev, Discarded):
                    self._reject(f"discarded a checkpoint: {ev.reason}")

    def _keep_what_the_session_did(self) -> None:
        """An error later in a read loses the events of what that read did before
        it: a checkpoint it committed (whose ACK may have left early) is recorded
        all the same, and an image it left torn is no longer promotable."""
        sm = self.link.sm
        if sm.checkpoints and sm.consistent and \
                (sm.generation, sm.checkpoint_seq) != (self.node.generation,
                                                       self.node.checkpoint_seq):
            self.has_checkpoint = True
            self.node.record(sm.generation, sm.checkpoint_seq)
        if not sm.consistent and self.node.consistent:
            self.node.mark(consistent=False)

    def _drop(self, reason: str) -> None:
        if self.link is not None:
            self._discard_torn()
            self._keep_what_the_session_did()
            self.bytes_received += self.link.sm.bytes_received
            self.early_acks += self.link.sm.early_acks
            self.one_call_reads += self._one_call_reads(self.link)
            self.bytes_sent += self.link.bytes_sent
            self.link.close()
            self.link = None
        self.node.save(durable=True)
        self.state = "standalone"
        self.peer = None
