"""The secondary side: a standby VM's memory kept equal to the primary's last
acknowledged checkpoint.

Checkpoints are applied straight into the memory of a KVM VM created at
start (never booted), so that promotion only has to load the vCPU state and
attach devices: no copy of guest RAM at failover. The stream's state machine
(replication.secondary) stages each checkpoint and applies it whole on its
END record, or not at all.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable

from ..config import VmConfig
from ..errors import KemariError
from ..kvm.machine import Machine
from ..replication import transport
from ..replication.codec import GoodbyeReason, HelloFlag
from ..replication.errors import AuthenticationError, TransportError
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
from .link import Link, SessionLost
from .node import Node
from .protector import VCPU_FAST, VCPU_FULL
from .settings import pair_settings

log = logging.getLogger(__name__)


class StandbySink(ImageSink):
    """ImageSink into the standby VM's RAM; replicated disk writes are made durable
    before the checkpoint is acknowledged."""

    def __init__(self, machine: Machine, disk_fd: int | None) -> None:
        super().__init__(machine.mem_bytes, memory=machine.mem,
                         disks={0: disk_fd} if disk_fd is not None else None)
        self.machine = machine
        self.disk_fd = disk_fd
        self._disk_dirty = False
        self.vcpu_full: bytes | None = None
        self.vcpu_fast: bytes | None = None

    def apply_pages(self, pfns, data, zero_pfns) -> None:
        """Straight into the standby VM's RAM, copied in C."""
        if pfns:
            self.machine.scatter_pages(list(pfns), data)
        if zero_pfns:
            self.machine.zero_pages(list(zero_pfns))

    def set_vcpu(self, vcpu_id, version, blob) -> None:
        """A full blob replaces both; a fast one goes on top of the last full one."""
        if version == VCPU_FULL:
            self.vcpu_full, self.vcpu_fast = bytes(blob), None
        elif version == VCPU_FAST:
            self.vcpu_fast = bytes(blob)
        else:
            raise KemariError(f"vCPU record version {version} is unknown to this node")

    def begin_full_sync(self, generation: int) -> None:
        super().begin_full_sync(generation)
        self.vcpu_full = self.vcpu_fast = None

    def write_disk(self, disk_id, sector, data) -> None:
        super().write_disk(disk_id, sector, data)
        self._disk_dirty = True

    def commit(self, generation: int, seq: int) -> None:
        if self._disk_dirty and self.disk_fd is not None:
            os.fdatasync(self.disk_fd)
            self._disk_dirty = False
        super().commit(generation, seq)


class Receiver:
    def __init__(self, config: VmConfig, machine: Machine, node: Node,
                 disk_fd: int | None = None) -> None:
        repl = config.replication
        if repl.listen is None or repl.key_file is None:
            raise KemariError(f"{config.name}: a secondary needs 'replication.listen' and "
                              "'replication.key_file'")
        self.config, self.machine, self.node = config, machine, node
        self.sink = StandbySink(machine, disk_fd)
        try:
            self.listener = transport.listen(str(repl.key_file), *repl.listen)
        except OSError as exc:
            raise KemariError(f"cannot listen on {repl.listen[0]}:{repl.listen[1]}: "
                              f"{exc.strerror}") from exc
        except Exception as exc:   # key file problems
            raise KemariError(f"replication key {repl.key_file}: {exc}") from exc
        self.link: Link | None = None
        self.has_checkpoint = False
        self.state = "standalone"
        self.peer: str | None = None
        self.checkpoints = 0
        self.bytes_received = 0
        self.last_commit_at: float | None = None
        self.sync_progress: dict | None = None
        self.rejections: list[str] = []
        self.handed_over = False
        self.settings = pair_settings(config)
        if disk_fd is None and not node.consistent:
            # Only a replicated disk keeps a half-done full sync across a restart;
            # guest RAM starts empty, so there is no mix left to refuse.
            node.mark(consistent=True)

    def status(self) -> dict:
        age = None
        if self.last_commit_at is not None:
            age = round((time.monotonic() - self.last_commit_at) * 1000, 1)
        link = self.link
        return {"state": self.state, "peer": self.peer,
                "checkpoint_seq": self.node.checkpoint_seq if self.has_checkpoint else 0,
                "has_checkpoint": self.has_checkpoint, "checkpoints": self.checkpoints,
                "last_checkpoint_age_ms": age,
                "bytes_received": self.bytes_received + (link.sm.bytes_received if link else 0),
                "bytes_sent": 0, "latency_us": {"p50": None, "p99": None},
                "sync": self.sync_progress,
                "last_error": self.rejections[-1] if self.rejections else None,
                "recent_errors": self.rejections[-5:],
                "consistent": self.node.consistent, "outdated": self.node.outdated,
                "promotable": self.promote_blocker() is None,
                "promote_blocker": self.promote_blocker()}

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
        self.listener.close()

    # ---- the loop ------------------------------------------------------------
    def serve(self, stop: Callable[[], bool], wake_fd: int) -> None:
        """Receive until stop() is true (checked whenever wake_fd is readable)."""
        while not stop():
            fds = [self.listener.fileno(), wake_fd]
            timeout = 1.0
            if self.link is not None:
                fds.append(self.link.fileno())
                timeout = max(0.0, min(timeout, self.link.sm.next_deadline() - time.monotonic()))
            readable, _, _ = select.select(fds, [], [], timeout)
            if wake_fd in readable:
                try:
                    while os.read(wake_fd, 512):
                        pass
                except BlockingIOError:
                    pass
            if self.listener.fileno() in readable:
                self._accept()
            if self.link is not None:
                try:
                    # ACKs leave only after this node has recorded what they acknowledge
                    events = self.link.read(flush=False) \
                        if self.link.fileno() in readable else []
                    events += self.link.sm.poll(time.monotonic())
                    self._handle(events)
                    if self.link is not None:
                        self.link.flush()
                except SessionLost as exc:
                    self._session_failed(str(exc))

    def _accept(self) -> None:
        try:
            channel = self.listener.accept(timeout=0, handshake_timeout=5.0)
        except AuthenticationError as exc:
            self._reject(f"refused a peer without this VM's key: {exc}")
            return
        except TransportError as exc:
            log.info("%s: connection attempt failed: %s", self.config.name, exc)
            return
        if self.link is not None:
            self._drop("a new primary connection replaces the old one")
        repl = self.config.replication
        sm = Secondary(self.sink, name=self.config.name, memory_size=self.machine.mem_bytes,
                       generation=self.node.generation,
                       checkpoint_seq=self.node.checkpoint_seq,
                       has_checkpoint=self.has_checkpoint, now=time.monotonic(),
                       heartbeat_interval=repl.heartbeat_ms / 1000,
                       peer_timeout=repl.peer_timeout_ms / 1000,
                       config=self.settings, outdated=self.node.outdated)
        self.link = Link(channel, sm, repl.peer_timeout_ms / 1000)
        self.peer = f"{channel.peer[0]}:{channel.peer[1]}"
        self.handed_over = False
        try:
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
        if self.link is not None:
            for ev in self.link.sm.connection_lost():
                if isinstance(ev, Discarded):
                    self._reject(f"discarded a checkpoint: {ev.reason}")
        self._reject(f"replication session ended: {reason}; keeping checkpoint "
                     f"{self.node.checkpoint_seq if self.has_checkpoint else 'none'}")
        self._drop(reason)

    def _drop(self, reason: str) -> None:
        if self.link is not None:
            self.bytes_received += self.link.sm.bytes_received
            self.link.close()
            self.link = None
        self.node.save(durable=True)
        self.state = "standalone"
        self.peer = None
