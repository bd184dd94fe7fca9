"""The primary side: keeps a running guest protected by its secondary.

* A connector thread dials the peer until it answers, then runs the full
  sync (pre-copy): dirty rounds while the guest keeps running, then the
  closing checkpoint with the guest stopped, handed to the loop thread.
* From then on the loop thread owns the session. Event-tapped mode: at every
  doorbell (Vmm.tap_hook) the vCPU is already stopped; we send the pages
  dirtied since the last checkpoint, the vCPU blob, the device state and,
  for replicated disks, the writes done since the last checkpoint and those
  in flight, and wait for the ACK before the backend may perform the I/O
  (output commit). A replicated disk is not output: its doorbell takes no
  checkpoint, its writes are logged for the next one (taken at the next
  network doorbell, or while the guest idles). Epoch mode: the guest runs on,
  a checkpoint is taken every epoch, and output is held until the checkpoint
  covering it is acknowledged (Remus): network frames in a list, disk
  requests unanswered in the guest's ring, so that the checkpoint itself
  says which ones a failover must redo (and, for replicated disks, carries
  their payloads). Only reads at the head of the ring are answered at once.
* Losing the peer: `continue` runs on unprotected and reconnects;
  `suspend` keeps the guest stopped until a new secondary is in sync.
* Reconnecting: dirty-page tracking never stops and written disk sectors are
  noted while disconnected, so when the secondary still holds a checkpoint of
  this generation that we sent, one staged checkpoint of what changed since
  (a resync) re-protects the guest; a full sync only when that cannot be
  bounded (a new generation, a restarted secondary, too much disk written).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable

from .. import stages
from ..config import VmConfig
from ..kvm.machine import Machine
from ..replication import transport
from ..replication.codec import Device, DiskWrite, Vcpu
from ..replication.errors import TransportError
from ..replication.events import Acked, PeerDead, PeerGoodbye
from ..replication.primary import Primary, PrimaryState
from ..vmm import PORT_BLK, PORT_NET, Vmm
from . import fast_checkpoint
from .auto_converge import AutoConverge
from .fast_checkpoint import FastCheckpoint
from .fast_receive import FastAck
from .faults import Faults
from .fence_peer import PeerFence
from .link import Link, SessionLost
from .node import Node
from .settings import pair_settings
from .sync_compression import CompressionChooser
from .sync_pace import SyncPace

log = logging.getLogger(__name__)

VCPU_FULL = 1          # Vcpu record versions: the whole vCPU ...
VCPU_FAST = 2          # ... or what a CPL-3 guest can change (applied on top of a full one)
FULL_VCPU_EVERY_S = 1.0
DEVICE_BLOB_VERSION = 1
SYNC_BATCH_PAGES = 512
DISK_CHUNK_SECTORS = 128      # 64 KiB per DISK_WRITE record in a full sync
RECONNECT_S = 0.5
# The closing checkpoint of a full sync makes the secondary flush all it received
# (a whole replicated disk): its ACK may take longer than a heartbeat timeout. Giving
# up too early leaves a secondary holding that checkpoint while we run on unprotected.
SYNC_ACK_TIMEOUT_S = 10.0
# The secondary stages a resync in memory beside the guest (STAGING_SLACK on top
# of guest RAM); more disk than this written while disconnected means a full sync.
RESYNC_DISK_LIMIT = 48 << 20
# Pages the guest writes between nearly every two checkpoints (its stack, rings,
# counters) are left writable and sent every time instead of faulting once per
# checkpoint (native/vmm.c, "Hot pages"). KEMARI_HOT_PAGES=0: the bench's switch.
HOT_PAGES = int(os.environ.get("KEMARI_HOT_PAGES", "32"))
# Tapped mode, replicated disk: guest writes wait in a log for the next checkpoint
# (see tap()); beyond this many bytes a disk doorbell takes the checkpoint itself.
DISK_LOG_LIMIT = 16 << 20
# ... and each goes to the secondary right away, before the backend's own
# fdatasync, so the two copies become durable at the same time rather than one
# after the other. KEMARI_DISK_AHEAD=0: the bench's switch (they then wait).
DISK_AHEAD = os.environ.get("KEMARI_DISK_AHEAD", "1") != "0"


def _disk_chunks(sector: int, size: int) -> range:
    """The DISK_CHUNK_SECTORS chunks a write of `size` bytes at `sector` touches."""
    return range(sector // DISK_CHUNK_SECTORS,
                 (sector + max(size // 512, 1) - 1) // DISK_CHUNK_SECTORS + 1)


class Protector:
    def __init__(self, vmm: Vmm, config: VmConfig, node: Node) -> None:
        self.vmm, self.config, self.node = vmm, config, node
        self.machine = vmm.machine
        repl = config.replication
        self.epoch_mode = repl.mode == "epoch"
        self.epoch_s = repl.epoch_ms / 1000
        self.heartbeat_s = repl.heartbeat_ms / 1000
        self.timeout_s = repl.peer_timeout_ms / 1000
        self.suspend_on_loss = config.policy.on_peer_loss == "suspend"
        self.replicated_disk = config.disk is not None and config.disk.mode == "replicated"
        self.link: Link | None = None          # set once the pair is in sync (loop thread)
        self.state = "standalone"
        self.peer: str | None = None
        self.was_protected = False
        self.last_seq = node.checkpoint_seq
        self.checkpoints = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_checkpoint_at: float | None = None
        self.latencies: collections.deque[float] = collections.deque(maxlen=2000)
        self.stages = stages.StageLog() if stages.ENABLED else None
        self.sync_progress: dict | None = None
        self.last_sync: dict | None = None
        self.last_error: str | None = None
        self._next_epoch = time.monotonic() + self.epoch_s
        self._last_full_vcpu = 0.0
        self._last_device_version: tuple[int, ...] | None = None
        self._disk_dirty: set[int] | None = None     # chunks written during a sync or a gap
        # Tapped mode, replicated disk, protected: writes done since the last checkpoint.
        self._disk_log: list[tuple[int, bytes]] = []
        self._disk_log_bytes = 0
        self._disk_log_sent = 0        # of them, sent ahead of the checkpoint (DISK_AHEAD)
        self._broken: str | None = None     # why a send outside a checkpoint failed
        # (link, its one-call checkpoint or None where the session cannot have one)
        self._fast: tuple[Link, FastCheckpoint | None] | None = None
        self.disk_writes_ahead = 0
        # Resync bookkeeping: dirty tracking is continuous since checkpoint
        # _tracking_since (None: not since anything a secondary could hold); what
        # checkpoints after _acked_seq carried is kept until one is acknowledged.
        self._tracking_since: int | None = None
        self._acked_seq = 0
        self._unacked: dict[int, tuple[list[int], set[int]]] = {}
        self._unprotected = False     # output went out that no checkpoint covers
        self.settings = pair_settings(config)
        self._held_frames: list[tuple[int, list[bytes]]] = []   # epoch mode: (seq, frames)
        self._held_block: list[tuple[int, int]] = []   # epoch mode: (seq, ring position covered)
        self.faults = Faults()
        self.peer_fence = PeerFence(config.name, config.policy.fence_peer_handler,
                                    config.policy.unfence_peer_handler)
        self._closing = threading.Event()
        self._synced = threading.Event()
        vmm.tap_hook = self.tap
        vmm.run_vcpu = self.run_vcpu
        self._tapped = None      # the plan of a checkpoint the last run took (run_vcpu)
        vmm.services.append(self)
        self._threads = [threading.Thread(target=self._connect_loop, name="connector",
                                          daemon=True),
                         threading.Thread(target=self._ticker, name="ticker", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self) -> None:
        self._closing.set()
        self._synced.set()
        if self.link is not None:
            self.link.close()
            self.link = None

    # ---- status ------------------------------------------------------------
    def status(self) -> dict:
        lat = sorted(self.latencies)
        pct = (lambda p: round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1e6, 1)) \
            if lat else (lambda p: None)
        age = None
        if self.last_checkpoint_at is not None:
            age = round((time.monotonic() - self.last_checkpoint_at) * 1000, 1)
        link = self.link
        return {"state": self.state, "peer": self.peer, "checkpoint_seq": self.last_seq,
                "checkpoints": self.checkpoints, "last_checkpoint_age_ms": age,
                "bytes_sent": self.bytes_sent + (link.sm.bytes_sent if link else 0),
                "bytes_received": self.bytes_received,
                "latency_us": {"p50": pct(0.5), "p99": pct(0.99)},
                "sync": self.sync_progress, "mode": self.config.replication.mode,
                "last_sync": self.last_sync,
                "last_error": self.last_error,
                "page_deltas": self._page_deltas(link),
                "disk_writes_ahead": self.disk_writes_ahead,
                **({"stages": self.stages.export()} if self.stages is not None else {})}

    def _page_deltas(self, link: Link | None) -> dict | None:
        """This session's checkpoint pages sent as deltas and whole (None: no deltas)."""
        cache = link.sm.delta_cache if link is not None else None
        blobs = link.sm.blob_bases if link is not None else None
        if cache is None or blobs is None:
            return None
        fast = self._fast
        one_call = collections.Counter(fast[1].stats()) if fast is not None and fast[0] is link \
            and fast[1] is not None else collections.Counter()
        pages = collections.Counter(cache.stats) + one_call
        return {"one_call_checkpoints": one_call["checkpoints"],
                "one_call_checkpoints_at_exit": one_call["in_the_run"],
                "delta_pages": pages["xor_pages"], "delta_bytes": pages["xor_bytes"],
                "whole_pages": pages["plain_pages"], "cached_pages": len(cache),
                "unchanged_pages": pages["unchanged_pages"],
                "delta_blobs": blobs.stats["xor_blobs"] + one_call["xor_blobs"],
                "delta_blob_bytes": blobs.stats["xor_bytes"] + one_call["xor_blob_bytes"]}

    # ---- connecting and full sync (connector thread) -----------------------------
    def _connect_loop(self) -> None:
        while not self._closing.is_set():
            repl = self.config.replication     # the peer may change (`kemari peer`)
            if self.link is not None or repl.peer is None or repl.key_file is None:
                self._synced.wait(RECONNECT_S)
                self._synced.clear()
                continue
            try:
                channel = transport.connect(str(repl.key_file), *repl.peer,
                                            timeout=self.timeout_s)
            except TransportError as exc:
                self.last_error = str(exc)
                self._closing.wait(RECONNECT_S)
                continue
            self.peer = f"{repl.peer[0]}:{repl.peer[1]}"
            try:
                self._sync(channel)
            except (SessionLost, TransportError) as exc:
                self.last_error = f"{self._phase()} failed: {exc}"
                log.warning("%s: %s", self.config.name, self.last_error)
                channel.close()
                self.state = "standalone"
                self._closing.wait(RECONNECT_S)
            except Exception as exc:   # a bug must not end protection for good
                self.last_error = f"{self._phase()} failed: {exc!r}"
                log.exception("%s: %s failed", self.config.name, self._phase())
                channel.close()
                self.state = "standalone"
                self._closing.wait(RECONNECT_S)

    def _phase(self) -> str:
        return {"syncing": "full sync", "resyncing": "resync"}.get(self.state, "handshake")

    def _sync(self, channel) -> None:
        now = time.monotonic()
        resync_from, blocker = self._resync_bases()
        sm = Primary(name=self.config.name, memory_size=self.machine.mem_bytes,
                     generation=self.node.generation, checkpoint_seq=self.last_seq, now=now,
                     heartbeat_interval=self.heartbeat_s, peer_timeout=self.timeout_s,
                     force_full_sync=True, config=self.settings, resync_from=resync_from,
                     unprotected=self._unprotected,
                     compress=self.config.replication.compression == "lz4",
                     delta_cache_pages=self.config.replication.delta_cache_mib * 256)
        link = Link(channel, sm, self.timeout_s,
                    ack_poll_s=self.config.replication.ack_poll_us / 1e6)
        link.fast_receive = FastAck.for_link(link)
        link.flush()
        link.wait_for(lambda: sm.state is not PrimaryState.HANDSHAKE, self.timeout_s)
        if sm.state is PrimaryState.RESYNCING:
            self._resync(link)
            return
        if sm.state is not PrimaryState.SYNCING:
            raise SessionLost(f"the peer did not accept a full sync (state {sm.state.value})")
        reason = sm.full_sync_reason
        if blocker and reason and reason.startswith("changes since"):
            reason = blocker
        self._full_sync(link, reason or "unknown")

    def _resync_bases(self) -> tuple[range, str | None]:
        """Checkpoints a secondary may hold for a resync to cover the gap, or why none."""
        if self._tracking_since is None:
            return range(0), "no checkpoint of this generation was sent since dirty tracking began"
        unacked = list(self._unacked.values())      # the loop thread may change the dict
        chunks = len(self._disk_dirty or ()) + sum(len(c) for _p, c in unacked)
        if chunks * DISK_CHUNK_SECTORS * 512 > RESYNC_DISK_LIMIT:
            return range(0), (f"{chunks * DISK_CHUNK_SECTORS // 2048} MiB of disk written "
                              f"while disconnected exceeds the resync limit of "
                              f"{RESYNC_DISK_LIMIT >> 20} MiB")
        return range(max(self._acked_seq, self._tracking_since), self.last_seq + 1), None

    def _resync(self, link: Link) -> None:
        """Connector thread: one staged checkpoint of everything since the peer's."""
        self.state = "resyncing"
        base = link.sm.resync_base
        log.info("%s: resync to %s from its checkpoint %d", self.config.name, self.peer, base)
        started = time.monotonic()

        def report(pages: int) -> dict:
            return {"kind": "resync", "from_checkpoint": base,
                    "seconds": round(time.monotonic() - started, 4), "rounds": 0,
                    "pages": pages, "bytes": link.sm.bytes_sent,
                    "memory_bytes": self.machine.mem_bytes, "reason": None}
        self.vmm.call_in_loop(lambda: self._finish_sync(link, [], report), timeout=60)
        sync = self.last_sync
        assert sync is not None          # _finish_sync published it
        log.info("%s: resynced %s in %.3f s (%d pages, %d bytes from checkpoint %d): protected",
                 self.config.name, self.peer, sync["seconds"], sync["pages"],
                 link.sm.bytes_sent, base)

    def _full_sync(self, link: Link, reason: str) -> None:
        sm = link.sm
        self.state = "syncing"
        log.info("%s: full sync to %s started (%s)", self.config.name, self.peer, reason)
        started = time.monotonic()
        # Restarting the log makes every page dirty: round 0 sends all memory.
        self.vmm.call_in_loop(self._restart_dirty_log)
        if self.replicated_disk and self.vmm.block is not None:
            self._sync_disk(link)
        pfns = self.machine.harvest_dirty()
        total = len(pfns)
        throttle = AutoConverge(self.vmm, self.config.name, self.config.replication.auto_converge)
        chooser = CompressionChooser(sm.compress_sync)
        pace = SyncPace(self.config.replication.sync_max_mib_s, sm.bytes_sent)
        try:
            while True:
                round_started = time.monotonic()
                for i in range(0, len(pfns), SYNC_BATCH_PAGES):
                    batch, lz4 = pfns[i : i + SYNC_BATCH_PAGES], chooser.choose()
                    batch_started = time.perf_counter()
                    packed_before, sent_before = sm.sync_stats["lz4_pages"], link.bytes_sent
                    sm.sync_pages(self.machine.mem, batch, now=time.monotonic(), compress=lz4)
                    encoded = time.perf_counter()
                    link.flush()
                    chooser.record(lz4, len(batch), encoded - batch_started,
                                   link.bytes_sent - sent_before, time.perf_counter() - encoded,
                                   shrank=sm.sync_stats["lz4_pages"] > packed_before)
                    self._check_peer_events(link.drain())
                    pace.wait(sm.bytes_sent, lambda: self._check_peer_events(link.drain()),
                              self.config.replication.heartbeat_ms / 1000)
                link.flush()
                # the previous round applied before this one's dirty pages are
                # harvested: one round in flight, and what the guest dirtied
                # while the secondary caught up goes in the next round
                self._await_round(link, sm.sync_round - 1)
                log.info("%s: full sync round %d: %d pages in %.3f s (throttle %d%%)",
                         self.config.name, sm.sync_round, len(pfns),
                         time.monotonic() - round_started, throttle.percent)
                sent, pfns = len(pfns), self.machine.harvest_dirty()
                throttle.after_round(sent, len(pfns))
                self.sync_progress = {"round": sm.sync_round, "pages_sent": sm.sync_pages_sent,
                                      "pages_total": total, "pages_remaining": len(pfns),
                                      "throttle_percent": throttle.percent}
                more = sm.end_sync_round(len(pfns), now=time.monotonic())
                # not converging yet, but the throttle is still rising: it will
                # (within the round limit: at most ~18 rounds from 20% to 99%)
                if not more and not (throttle.can_still_help() and
                                     len(pfns) > sm.sync_stop_pages and
                                     sm.sync_round < sm.sync_max_rounds):
                    break
                link.flush()
            link.flush()
            self._await_round(link, sm.sync_round - 1)        # before the guest pauses
        finally:
            throttle.stop()
        leftover = pfns
        finish_started = time.monotonic()

        def report(_pages: int) -> dict:
            now = time.monotonic()
            return {"kind": "full", "seconds": round(now - started, 4), "rounds": sm.sync_round,
                    "pages": sm.sync_pages_sent, "bytes": sm.bytes_sent,
                    "memory_bytes": self.machine.mem_bytes, "reason": reason,
                    "closing_pages": len(leftover),
                    "closing_s": round(now - finish_started, 4),
                    "throttle_max_percent": round(throttle.max_fraction * 100),
                    "throttle_held_s": round(throttle.stopped_s, 3),
                    "lz4_pages": sm.sync_stats["lz4_pages"],
                    "lz4_batches_tried": chooser.compressed_batches,
                    "paced_s": round(pace.slept_s, 3)}
        self.vmm.call_in_loop(lambda: self._finish_sync(link, leftover, report), timeout=60)
        log.info("%s: full sync closing checkpoint: %d pages left, %.3f s to its ACK",
                 self.config.name, len(leftover), time.monotonic() - finish_started)
        log.info("%s: in sync with %s after %.2f s (%d rounds, %d pages): protected",
                 self.config.name, self.peer, time.monotonic() - started, sm.sync_round,
                 sm.sync_pages_sent)

    def _await_round(self, link: Link, round_: int) -> None:
        """Wait (guest running) until the secondary applied round `round_`, when it
        says so (SYNC_ACKS). Without it the rounds' pages could wait in socket
        buffers (a whole round when LZ4 shrinks them 100x), and the closing
        checkpoint, with the guest paused, would wait behind them."""
        sm = link.sm
        if sm.sync_acks and round_ > sm.sync_round_acked:
            self._check_peer_events(link.wait_for(lambda: sm.sync_round_acked >= round_,
                                                  max(self.timeout_s, SYNC_ACK_TIMEOUT_S)))

    def _restart_dirty_log(self) -> None:
        self._tracking_since = None          # what a secondary held is now unbounded
        self._unacked.clear()
        if self.machine.tracking_dirty:
            self.machine.stop_dirty_tracking()
        self.machine.start_dirty_tracking(HOT_PAGES)
        if self.replicated_disk and self.vmm.block is not None:
            self._disk_dirty = set()
            self.vmm.block.write_observer = self._note_disk_write

    def _log_disk_write(self, sector: int, data: bytes) -> None:
        """Loop thread, protected (tapped mode): the next checkpoint carries it."""
        self._disk_log.append((sector, data))
        self._disk_log_bytes += len(data)

    def _take_disk_log(self) -> list[tuple[int, bytes]]:
        """The writes logged since the last checkpoint, leaving the log empty."""
        taken, self._disk_log, self._disk_log_bytes = self._disk_log, [], 0
        self._disk_log_sent = 0
        return taken

    def _send_disk_log_ahead(self) -> None:
        """Loop thread, the block backend about to make its writes durable: the
        logged ones not sent yet go to the secondary now, which writes and syncs
        them meanwhile (and undoes them if their checkpoint never ends). They
        stay in the log: their checkpoint counts them, a lost link resyncs them."""
        link = self.link
        if link is None or self._broken or link.sm.state is not PrimaryState.PROTECTED \
                or self._disk_log_sent == len(self._disk_log):
            return
        writes = [DiskWrite(0, sector, data)
                  for sector, data in self._disk_log[self._disk_log_sent:]]
        link.sm.send_ahead(writes, now=time.monotonic())
        self._disk_log_sent = len(self._disk_log)
        self.disk_writes_ahead += len(writes)
        try:
            link.flush()
        except SessionLost as exc:      # inside the backend: the next checkpoint ends it
            self._broken = str(exc)

    def _note_disk_write(self, sector: int, data: bytes) -> None:
        """Loop thread, during a full sync or while disconnected: these sectors go
        again at the sync's end (or in the resync)."""
        if self._disk_dirty is not None:
            self._disk_dirty.update(_disk_chunks(sector, len(data)))

    def _sync_disk(self, link: Link) -> None:
        """Connector thread: the whole replicated disk, while the guest runs."""
        block = self.vmm.block
        chunks = (block.sectors + DISK_CHUNK_SECTORS - 1) // DISK_CHUNK_SECTORS
        for chunk in range(chunks):
            link.sm.sync_disk([self._disk_chunk(chunk)], now=time.monotonic())
            link.flush()
            if chunk % 64 == 0:
                self._check_peer_events(link.drain())

    def _disk_chunk(self, chunk: int) -> DiskWrite:
        block = self.vmm.block
        sector = chunk * DISK_CHUNK_SECTORS
        count = min(DISK_CHUNK_SECTORS, block.sectors - sector)
        return DiskWrite(0, sector, os.pread(block.fd, count * 512, sector * 512))

    def _finish_sync(self, link: Link, leftover: list[int],
                     report: Callable[[int], dict]) -> None:
        """Loop thread, vCPU stopped: the closing checkpoint of a full sync, or a
        resync's only one; then tapped mode. `report(pages it held)` is the
        sync's `last_sync`, published with the state "synced"."""
        pfns = set(leftover) | set(self.machine.harvest_dirty())
        chunks = set(self._disk_dirty or ())
        for old_pfns, old_chunks in self._unacked.values():   # the peer may lack them
            pfns.update(old_pfns)
            chunks.update(old_chunks)
        records = self._state_records(full=True)
        if self._disk_dirty is not None:
            records += [self._disk_chunk(c) for c in sorted(chunks)]
        pfns_sorted = sorted(pfns)
        seq = link.sm.checkpoint(self.machine.mem, pfns_sorted, records,
                                 now=time.monotonic(), detect_zero=True)
        self._sent(seq, pfns_sorted, records)
        if self._tracking_since is None:
            self._tracking_since = seq        # dirty tracking is continuous from here
        link.flush()
        link.wait_for(lambda: link.sm.is_acked(seq), max(self.timeout_s, SYNC_ACK_TIMEOUT_S))
        self._acked(seq)
        if self._disk_dirty is not None:     # kept until now: a failed sync resends them
            self._disk_dirty = None
            self.vmm.block.write_observer = None
        if self.replicated_disk and not self.epoch_mode and self.vmm.block is not None:
            self.vmm.block.write_observer = self._log_disk_write
            if DISK_AHEAD:
                self.vmm.block.before_sync = self._send_disk_log_ahead
        self.last_checkpoint_at = time.monotonic()
        self.link = link
        self.last_sync = report(len(pfns_sorted))
        self.state = "synced"
        self.was_protected = True
        self._unprotected = False
        self.sync_progress = None
        self.last_error = None
        self._next_epoch = time.monotonic() + self.epoch_s
        self._synced.set()
        self.peer_fence.peer_in_sync(self.peer)

    def _sent(self, seq: int, pfns: list[int], records: list) -> None:
        """Checkpoint `seq` left: until it is acknowledged, a resync resends its contents
        (its disk writes: those in `records` and those sent ahead of it)."""
        self.last_seq = seq
        writes = [(w.sector, len(w.data)) for w in records if isinstance(w, DiskWrite)]
        writes += [(sector, len(data)) for sector, data in self._disk_log[:self._disk_log_sent]]
        self._unacked[seq] = (pfns, {chunk for sector, size in writes
                                     for chunk in _disk_chunks(sector, size)})

    def _acked(self, seq: int) -> None:
        self._acked_seq = seq
        for old in [s for s in self._unacked if s <= seq]:
            del self._unacked[old]

    # ---- checkpoints (loop thread) --------------------------------------------------
    def _state_records(self, full: bool = False, vcpu_fast: bytes | None = None) -> list:
        """The checkpoint's records besides its pages. `vcpu_fast`: the fast vCPU
        blob, saved already (by a one-call checkpoint that gave way)."""
        now = time.monotonic()
        if vcpu_fast is not None:
            vcpu = Vcpu(0, VCPU_FAST, vcpu_fast)
        elif full or now - self._last_full_vcpu >= FULL_VCPU_EVERY_S:
            vcpu = Vcpu(0, VCPU_FULL, self.machine.get_vcpu_state())
            self._last_full_vcpu = now
        else:
            vcpu = Vcpu(0, VCPU_FAST, self.machine.get_vcpu_state_fast())
        records: list = [vcpu]
        version = self.vmm.device_state_version()
        if full or version != self._last_device_version:   # the secondary keeps the last
            device = json.dumps(self.vmm.device_state()).encode()
            records.append(Device(0, DEVICE_BLOB_VERSION, device))
            self._last_device_version = version
        if self.replicated_disk and self.vmm.block is not None:
            records += [DiskWrite(0, sector, data)
                        for sector, data in self._disk_log[self._disk_log_sent:]]
            records += [DiskWrite(0, sector, data)
                        for sector, data in self.vmm.block.pending_writes()]
        return records

    def _checkpoint(self, wait: bool) -> int:
        link = self.link
        assert link is not None
        # the plan of a checkpoint the run's call took (never armed while broken)
        plan, self._tapped = self._tapped, None
        if self._broken:
            raise SessionLost(self._broken)
        trace = self.stages if wait else None
        if plan is not None:              # taken in the run's call (run_vcpu)
            fast = self._fast[1]
            t0 = fast.tapped_at
            if trace is not None:         # no Python between the exit and that call
                trace.note("exit", int(t0 * 1e9))
                trace.note("start", int(t0 * 1e9))
            done = fast.tapped(plan, time.monotonic(), trace)
        else:
            if trace is not None:
                trace.note("exit", self.vmm.exit_ns)
                trace.mark("start")
            t0 = time.monotonic()
            fast = self._fast_path(link)
            done = fast.checkpoint(time.monotonic(), trace) if fast is not None else None
        # A one-call checkpoint leaves the books of its pages until they are
        # needed: only when its ACK does not come (then a resync resends them).
        deferred = False
        if done is not None and done.seq is not None:
            seq, pages = done.seq, fast.pages
            deferred = wait and not self.epoch_mode and done.failed is None \
                and not self._disk_log
            if deferred:
                self.last_seq = seq
            else:
                self._fast_sent(done, fast)
        else:
            if self._fast is not None and self._fast[1] is not None:
                self._fast[1].gave_way()
            seq, pages = self._checkpoint_by_steps(link, trace, done)
        if wait:
            try:
                self._check_peer_events(
                    link.wait_for(lambda: link.sm.is_acked(seq), self.timeout_s))
            except SessionLost:
                if deferred and self._acked_seq < seq:
                    self._sent(seq, fast.harvested(), [])
                raise
            self.latencies.append(time.monotonic() - t0)
            if trace is not None:
                for name, ns in link.moments.items():     # the ACK's, C took them
                    trace.note(name, ns)
                link.moments = {}
                trace.note("ack_recv", link.recv_ns)
                trace.note("ack_decoded", link.decoded_ns)
                trace.note("pages", pages)
                trace.close(seq)
            self._acked(seq)
            if self.faults.due("after-ack"):
                self.faults.die()
            self.node.record(self.node.generation, seq)
        self.checkpoints += 1
        self.last_checkpoint_at = time.monotonic()
        return seq

    def _fast_path(self, link: Link) -> FastCheckpoint | None:
        """This session's one-call checkpoint, when the next checkpoint may take
        it (ft/fast_checkpoint.py): pages and a fast vCPU blob, nothing else."""
        if self._fast is None or self._fast[0] is not link:
            usable = fast_checkpoint.ENABLED and self.faults.point != "mid-send" \
                and isinstance(self.machine, Machine)
            try:
                self._fast = (link, FastCheckpoint(self.machine, link, VCPU_FAST)
                              if usable else None)
            except ValueError:      # no C page index or no C frames in this session
                self._fast = (link, None)
        fast = self._fast[1]
        if fast is None or time.monotonic() - self._last_full_vcpu >= FULL_VCPU_EVERY_S \
                or self.vmm.device_state_version() != self._last_device_version:
            return None
        block = self.vmm.block
        if self.replicated_disk and block is not None and (
                self._disk_log_sent < len(self._disk_log) or block.pending_writes()):
            return None
        return fast

    def _fast_sent(self, done, fast: FastCheckpoint) -> None:
        """After a one-call checkpoint: what the step-by-step path does after its send."""
        block = self.vmm.block
        if self.epoch_mode and block is not None and block.has_work():
            self._held_block.append((done.seq, block.position()))
        self._sent(done.seq, fast.harvested(), [])
        self._take_disk_log()       # writes it carries were sent ahead (the END counts them)
        if done.failed is not None:
            raise SessionLost(done.failed)

    def _checkpoint_by_steps(self, link: Link, trace, done) -> tuple[int, int]:
        """A checkpoint through Primary.checkpoint, one C call per step; `done`:
        what a one-call checkpoint harvested and saved before it gave way."""
        if done is not None:
            pfns = done.pfns
            if trace is not None:
                trace.mark("harvested")
            records = self._state_records(vcpu_fast=done.vcpu)
        else:
            pfns = self.machine.harvest_dirty()
            if trace is not None:
                trace.mark("harvested")
            records = self._state_records()
        if trace is not None:
            trace.mark("state")
        seq = link.checkpoint(self.machine.mem, pfns, records)
        if trace is not None:
            trace.mark("encoded")
        block = self.vmm.block
        if self.epoch_mode and block is not None and block.has_work():
            self._held_block.append((seq, block.position()))
        if self.faults.due("mid-send"):
            data = link.sm.data_to_send()
            link.channel.send_all(data[: len(data) // 2])
            self.faults.die()
        try:
            link.flush()
        finally:
            if trace is not None:
                trace.mark("sent")
            # After the send, while the secondary works; also when the send fails:
            # a resync resends what was harvested for it.
            self._sent(seq, pfns, records)
            self._take_disk_log()           # in `records`: a resync resends them until acked
        return seq, len(pfns)

    def run_vcpu(self):
        """The vCPU's next run (Vmm.run_vcpu). Armed where the next checkpoint
        is a one-call one and the tap would take it at a doorbell (protected,
        event-tapped, no replicated disk): the run's own C call then writes and
        sends it when the guest rings, and tap() books it."""
        if self._tapped is not None and self.link is not None:   # no tap() took it (a bug)
            log.error("%s: a checkpoint taken at a doorbell was not booked", self.config.name)
            self._book_tapped()
        link = self.link
        if link is None or self._broken or self.epoch_mode or not fast_checkpoint.TAP_IN_THE_RUN \
                or (self.replicated_disk and self.vmm.block is not None):
            return self.machine.run()
        fast = self._fast_path(link)
        if fast is None:
            return self.machine.run()
        ex, self._tapped = fast.run(self._tap_ports(), self._last_full_vcpu + FULL_VCPU_EVERY_S,
                                    self.stages is not None)
        return ex

    def _tap_ports(self) -> tuple[int, int]:
        vmm = self.vmm
        return (PORT_NET if vmm.net is not None else 0, PORT_BLK if vmm.block is not None else 0)

    def _book_tapped(self) -> None:
        try:
            self._checkpoint(wait=True)
        except SessionLost as exc:
            self._lost(str(exc))

    def tap(self, vmm: Vmm, device) -> bool:
        """The guest rang a doorbell: nothing leaves before its checkpoint is acknowledged.
        Returns True when this took the requests (epoch mode) and answers them later."""
        if self._tapped is not None:      # the run's call took the checkpoint already
            self._book_tapped()
            return False
        if self.link is None:
            if self.suspend_on_loss and self.was_protected:
                self._hold_until_protected()
            else:
                self.peer_fence.before_unprotected_output(self)
            if self.link is None:
                return False
        if device is vmm.block and self.vmm.block.write_observer == self._log_disk_write \
                and self._disk_log_bytes < DISK_LOG_LIMIT:
            # A replicated disk is this guest's own state, not the outside world: its
            # writes go to the local disk now and to the secondary with the next
            # checkpoint, applied there before that checkpoint's memory. Output that
            # depends on them waits for that checkpoint like any other.
            return False
        try:
            if self.epoch_mode:
                return self._hold_output(vmm, device)
            self._checkpoint(wait=True)
        except SessionLost as exc:
            self._lost(str(exc))
            if self.link is None and self.suspend_on_loss:
                self._hold_until_protected()
        return False

    def _hold_output(self, vmm: Vmm, device) -> bool:
        """Epoch mode: tx frames are answered and kept aside; disk requests stay
        unanswered in the ring (the next checkpoint covers them), except reads
        at its head: they change nothing outside the guest and nothing held
        comes before them."""
        if device is vmm.net:
            frames = device.pending_frames()
            device.process(send=False)
            self._held_frames.append((self.last_seq + 1, frames))
        else:
            device.process_reads()
        return True

    # ---- Vmm service: heartbeats, ACKs, epochs (loop thread) ----------------------------
    def fileno(self) -> int | None:
        return self.link.fileno() if self.link is not None else None

    def deadline(self) -> float | None:
        if self.link is None:
            return None
        due = self.link.sm.next_deadline()
        if self.epoch_mode:
            due = min(due, self._next_epoch)
        return due

    def service(self) -> None:
        link = self.link
        if link is None:
            return
        try:
            if self._broken:
                raise SessionLost(self._broken)
            self._check_peer_events(link.drain())
            if self.epoch_mode:
                self._release_acked_output()
                if time.monotonic() >= self._next_epoch:
                    if link.sm.outstanding:          # one epoch in flight at a time
                        self._check_peer_events(
                            link.wait_for(lambda: not link.sm.outstanding, self.timeout_s))
                        self._release_acked_output()
                    self._checkpoint(wait=False)
                    self._next_epoch = time.monotonic() + self.epoch_s
            elif self._disk_log:
                # The guest is idle with disk writes no checkpoint carried yet: send
                # them, so an idle pair's disks are the same.
                self._checkpoint(wait=True)
        except SessionLost as exc:
            self._lost(str(exc))

    def _release_acked_output(self) -> None:
        """Epoch mode: send the frames and perform (then answer) the disk requests
        that an acknowledged checkpoint covers, in ring order."""
        link = self.link
        while self._held_frames and link is not None and link.sm.is_acked(self._held_frames[0][0]):
            if self.faults.due("after-ack"):
                self.faults.die()
            _seq, frames = self._held_frames.pop(0)
            for f in frames:
                self.vmm.net.send_frame(f)
        block = self.vmm.block
        while self._held_block and link is not None and link.sm.is_acked(self._held_block[0][0]):
            if self.faults.due("after-ack"):
                self.faults.die()
            _seq, position = self._held_block.pop(0)
            block.process(before=position)
            block.process_reads()      # reads the released writes held back

    def _check_peer_events(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, PeerDead):
                raise SessionLost(f"peer silent for {ev.silent_for:.1f} s")
            if isinstance(ev, PeerGoodbye):
                raise SessionLost("the secondary said goodbye")
            if isinstance(ev, Acked):
                self._acked(ev.seq)
                if self.epoch_mode:
                    self.latencies.append(ev.rtt)

    def _lost(self, reason: str) -> None:
        log.warning("%s: lost the secondary (%s); %s", self.config.name, reason,
                    "guest suspended until a peer is in sync" if self.suspend_on_loss
                    else "running unprotected")
        self.last_error = reason
        if self.link is not None:
            self.bytes_sent += self.link.sm.bytes_sent
            self.link.close()
        self.link = None
        self._broken = None
        self.state = "standalone"
        self.peer = None
        if not self.suspend_on_loss:
            self.peer_fence.before_unprotected_output(self)
        self._unprotected = self._unprotected or not self.suspend_on_loss
        if self.replicated_disk and self.vmm.block is not None and self._disk_dirty is None:
            self._disk_dirty = set()          # a resync sends what is written meanwhile
            self.vmm.block.write_observer = self._note_disk_write
        for sector, data in self._take_disk_log():   # logged, never sent: the resync sends them
            self._note_disk_write(sector, data)
        if self.epoch_mode and not self.suspend_on_loss:
            for _seq, frames in self._held_frames:   # unprotected now: let output go
                for f in frames:
                    self.vmm.net.send_frame(f)
            self._held_frames.clear()
            if self.vmm.block is not None:
                self.vmm.block.process()
            self._held_block.clear()
        self._synced.set()

    def _hold_until_protected(self) -> None:
        """on_peer_loss = suspend: keep the vCPU stopped until a secondary is in sync."""
        self.state = "suspended"
        log.warning("%s: guest suspended, waiting for a secondary", self.config.name)
        while self.link is None and not self._closing.is_set() and not self.vmm.stopping:
            self.vmm.serve_calls(0.05)
        if self.link is not None:
            log.info("%s: secondary in sync, guest resumes", self.config.name)

    def checkpoint_now(self) -> int | None:
        """Loop thread: a checkpoint outside the event cycle (tests, handover)."""
        if self.link is None:
            return None
        try:
            if self.epoch_mode and self.link.sm.outstanding:
                self.link.wait_for(lambda: not self.link.sm.outstanding, self.timeout_s)
            return self._checkpoint(wait=True)
        except SessionLost as exc:
            self._lost(str(exc))
            return None

    # ---- handover ------------------------------------------------------------------
    def handover(self) -> int | None:
        """Loop thread: final checkpoint + GOODBYE(HANDOVER). Returns its seq, or None
        when no secondary is in sync (nothing to hand over to)."""
        if self.link is None:
            return None
        from ..replication.codec import GoodbyeReason
        if self.epoch_mode and self.link.sm.outstanding:
            self.link.wait_for(lambda: not self.link.sm.outstanding, self.timeout_s)
        seq = self._checkpoint(wait=True)
        self._release_acked_output()
        self.link.sm.goodbye(GoodbyeReason.HANDOVER, now=time.monotonic())
        self.link.flush()
        return seq

    # ---- ticker: kicks the loop for heartbeats and epochs even when the guest computes ----
    def _ticker(self) -> None:
        period = min(self.heartbeat_s / 2, self.epoch_s if self.epoch_mode else 1.0)
        while not self._closing.wait(period):
            if self.link is not None:
                self.vmm.wake()
