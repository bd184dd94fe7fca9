"""The primary's side of a replication session, as a sans-I/O state machine.

One `Primary` per connection. The driver feeds it received bytes and the
current time, calls `checkpoint()` at each tapped event (guest paused), and
sends whatever `data_to_send()` returns. The checkpoint's held I/O may be
released once an `Acked` event (or `is_acked(seq)`) says so: that is the
output-commit rule, and this class is where it is decided.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from enum import Enum
from typing import NamedTuple

from . import native_codec
from .codec import (
    DEFAULT_CAPABILITIES,
    LZ4_WORTH,
    MAX_PAGES_PER_RECORD,
    PAGE_SIZE,
    VERSION,
    Ack,
    Buffer,
    Capability,
    CheckpointEnd,
    Decoder,
    Device,
    DiskWrite,
    Error,
    Goodbye,
    GoodbyeReason,
    Heartbeat,
    Hello,
    HelloFlag,
    Pages,
    Record,
    Role,
    SyncAck,
    SyncProgress,
    Unknown,
    Vcpu,
    compress_pages_records,
    crc32,
    encode,
    encode_parts,
    pages_parts,
)
from .delta import PATCHES_ENABLED, BlobBases, PageCache
from .errors import (
    GenerationError,
    HandshakeError,
    PeerError,
    ProtocolError,
    StreamError,
    UnexpectedRecord,
)
from .events import Acked, Event, PeerDead, PeerGoodbye, PeerHello, SyncComplete
from .liveness import Liveness

_END_SLOT = bytes(len(encode(CheckpointEnd(0, 0, 0, 0, 0, 0))))


def config_mismatch(mine: Mapping[str, str], theirs: Mapping[str, str], me: str,
                    peer: str) -> str | None:
    """The first setting both sides announce with different values, as a message
    naming the field; None when they agree (a field only one side sends is skipped)."""
    for key in sorted(mine.keys() & theirs.keys()):
        if mine[key] != theirs[key]:
            return (f"config mismatch in {key}: {me} has {mine[key]!r}, "
                    f"{peer} has {theirs[key]!r}")
    return None


class PrimaryState(Enum):
    HANDSHAKE = "handshake"  # waiting for the secondary's HELLO
    SYNCING = "syncing"  # full sync: pre-copy rounds, then the closing checkpoint
    RESYNCING = "resyncing"  # one staged checkpoint of what changed since the peer's
    PROTECTED = "protected"  # event-tapped (or epoch) checkpoints
    CLOSED = "closed"  # GOODBYE sent or received
    FAILED = "failed"  # a StreamError was raised; close the connection


_CHECKPOINT_STATES = (PrimaryState.SYNCING, PrimaryState.RESYNCING, PrimaryState.PROTECTED)


class FastPlan(NamedTuple):
    """What the driver's one-call checkpoint takes from Primary.fast_checkpoint
    (with what holds for the whole session: `generation`, `page_patches`,
    LZ4_WORTH)."""

    seq: int
    queued: tuple[int, int, int, int]    # records, pages, bytes and CRC-32 queued before it


class Primary:
    """Builds checkpoints, tracks which are acknowledged, runs full-sync rounds."""

    def __init__(
        self,
        *,
        name: str,
        memory_size: int,
        generation: int,
        checkpoint_seq: int,
        now: float,
        capabilities: int = int(DEFAULT_CAPABILITIES),
        heartbeat_interval: float = 0.5,
        peer_timeout: float = 3.0,
        max_outstanding: int = 1,
        force_full_sync: bool = False,
        sync_stop_pages: int = 256,
        sync_max_rounds: int = 30,
        config: Mapping[str, str] | None = None,
        resync_from: Collection[int] = (),
        unprotected: bool = False,
        compress: bool = True,
        delta_cache_pages: int = 0,
    ) -> None:
        """`config`: settings the secondary's must equal (sent and compared at HELLO).
        `resync_from`: checkpoints of this generation from which the driver can send
        every change (dirty pages, written sectors) as one checkpoint instead of a
        full sync. `unprotected`: output went out that no acknowledged checkpoint
        covers (the secondary is told it is outdated until the next commit).
        `compress`: send a full sync's rounds as PAGES_LZ4 where it pays, if the
        secondary decodes it (its HELLO has Capability.LZ4_PAGES).
        `delta_cache_pages`: remember the content of this many recently sent
        pages and send them as deltas (PAGES_PATCH, else PAGES_XOR; delta.py) if
        the secondary decodes that (Capability.PATCHES, Capability.DELTAS); 0: never."""
        self.name = name
        self.memory_size = memory_size
        self.generation = generation
        self.capabilities = capabilities
        self.max_outstanding = max_outstanding
        self.force_full_sync = force_full_sync
        self.sync_stop_pages = sync_stop_pages
        self.sync_max_rounds = sync_max_rounds
        self.config = dict(config or {})
        self.resync_from = frozenset(resync_from)
        self.unprotected = unprotected
        self.compress = compress
        self.compress_sync = False         # negotiated at HELLO
        self.sync_acks = False             # ditto: the secondary answers SYNC_PROGRESS
        self.sync_round_acked = -1         # the last round the secondary applied
        self.sync_stats: dict[str, int] = {"lz4_pages": 0}   # pages sent as PAGES_LZ4
        self.delta_cache_pages = delta_cache_pages
        self.delta_cache: PageCache | native_codec.PageIndex | None = None   # at HELLO
        self.blob_bases: BlobBases | None = None      # ditto
        self.page_patches = False                     # ditto: PAGES_PATCH, not PAGES_XOR
        # Why this session is a full sync (None: it resumes or resyncs).
        self.full_sync_reason: str | None = None
        self.resync_base: int | None = None    # the peer's checkpoint a resync starts from
        self.state = PrimaryState.HANDSHAKE
        self.liveness = Liveness(now, heartbeat_interval, peer_timeout)
        self.peer: Hello | None = None
        self.last_sent = checkpoint_seq
        # Nothing counts as acknowledged until this session's secondary says so:
        # a checkpoint sent on a previous connection may never have arrived.
        self.last_acked = 0
        self.outstanding: OrderedDict[int, float] = OrderedDict()
        self.bytes_sent = 0
        self.checkpoints_sent = 0
        # full-sync bookkeeping
        self.sync_round = 0
        self.sync_pages_sent = 0
        self.sync_pages_remaining = memory_size // 4096
        self.sync_seq: int | None = None
        self._decoder = Decoder()
        self._outbox: list[bytes | bytearray] = []
        self._heartbeats = 0
        self._reset_checkpoint()

    # -- driver interface -------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Take bytes from the secondary; return what they mean."""
        if self.state is PrimaryState.FAILED:
            raise ProtocolError("session already failed")
        if data:
            self.liveness.received(now)
        def records() -> Iterable[Record]:
            ack = self._decoder.lone_ack(data)
            return (ack,) if ack is not None else self._decoder.feed(data)
        return self._take(records, now)

    def takes_lone_ack(self) -> bool:
        """Whether the driver may read the next ACK itself (receive_ack)."""
        return self.state is not PrimaryState.FAILED and self._decoder.takes_lone_ack()

    def receive_ack(self, seq: int, generation: int, now: float) -> list[Event]:
        """An ACK record that arrived alone, which the driver's C read decoded
        (ft/fast_receive.py, FastAck) while takes_lone_ack(): as receive_data takes it."""
        self.liveness.received(now)
        return self._take(lambda: (Ack(seq, generation),), now)

    def _take(self, records: Callable[[], Iterable[Record]], now: float) -> list[Event]:
        """The events of records(), decoded and taken; an error fails the session."""
        try:
            events: list[Event] = []
            for record in records():
                self._on_record(record, now, events)
            return events
        except StreamError:
            self.state = PrimaryState.FAILED
            raise

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the secondary, oldest first."""
        if not self._outbox:
            return b""
        out = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
        self._outbox.clear()
        return out

    def poll(self, now: float) -> list[Event]:
        """Queue a heartbeat if one is due; report a dead peer once per silence."""
        if self.state in _CHECKPOINT_STATES and \
                self.liveness.heartbeat_due(now):
            self._heartbeats += 1
            self._queue(encode_parts(Heartbeat(self._heartbeats, self.last_sent)), 1, 0, now)
        silent_for = self.liveness.newly_dead(now)
        return [PeerDead(silent_for)] if silent_for is not None else []

    def next_deadline(self) -> float:
        return self.liveness.next_deadline()

    # -- checkpoints ------------------------------------------------------

    def checkpoint(
        self,
        memory: Buffer,
        pfns: Sequence[int],
        records: Sequence[Record] = (),
        *,
        now: float,
        detect_zero: bool = False,
    ) -> int:
        """Queue one checkpoint: pages `pfns` of `memory`, then `records`
        (Vcpu, Device, DiskWrite, or prebuilt Pages), then CHECKPOINT_END.

        Called with the guest paused: the pages are copied here, so the guest
        may run again as soon as this returns. Returns the sequence number.
        In SYNCING state this is the stop-and-copy checkpoint that ends the sync;
        in RESYNCING state it is the resync (everything changed since the peer's
        checkpoint), and the next one waits for its ACK.
        """
        if self.state not in _CHECKPOINT_STATES:
            raise RuntimeError(f"cannot checkpoint in state {self.state.value}")
        if self.state is not PrimaryState.PROTECTED and self.sync_seq is not None:
            raise RuntimeError("the sync's closing checkpoint is not acknowledged yet")
        if len(self.outstanding) >= self.max_outstanding:
            raise RuntimeError(f"{len(self.outstanding)} checkpoints already outstanding")
        for record in records:
            if not isinstance(record, (Pages, Vcpu, Device, DiskWrite)):
                raise TypeError(f"{type(record).__name__} cannot be part of a checkpoint")
        delta = self.delta_cache if self.state is PrimaryState.PROTECTED and not detect_zero \
            else None
        if pfns and (delta is not None or native_codec.ENABLED):   # C reads these pages
            pfns = pfns if isinstance(pfns, (list, tuple)) else list(pfns)
            if min(pfns) < 0 or max(pfns) >= len(memory) // PAGE_SIZE:
                raise ValueError("pfn outside guest memory")
        seq = self.last_sent + 1
        if isinstance(delta, native_codec.PageIndex) or (
                delta is None and native_codec.ENABLED and native_codec.CHECKPOINT_WRITER
                and not detect_zero):
            data = self._write_checkpoint(memory, pfns, records, delta, seq)
        else:
            data = self._encode_checkpoint(memory, pfns, records, delta, seq, detect_zero)
        self._outbox.append(data)
        self._checkpoint_sent(seq, len(data), now)
        return seq

    def _checkpoint_sent(self, seq: int, size: int, now: float) -> None:
        self.bytes_sent += size
        self.liveness.sent(now)
        self._reset_checkpoint()
        self.last_sent = seq
        self.outstanding[seq] = now
        self.checkpoints_sent += 1
        if self.state is not PrimaryState.PROTECTED:
            self.sync_seq = seq

    # -- the driver's one-call checkpoint (native/fastpath.h) ---------------

    def fast_checkpoint(self) -> FastPlan | None:
        """The next checkpoint as the driver may write it itself in one C call
        (ft/fast_checkpoint.py): the same bytes checkpoint() would write for
        its pages and one VCPU blob, given what this plan says. None when the
        next checkpoint must go through checkpoint(): not protected, output
        queued before it, one outstanding already, or no C page index."""
        if self.state is not PrimaryState.PROTECTED or self._outbox \
                or len(self.outstanding) >= self.max_outstanding \
                or not isinstance(self.delta_cache, native_codec.PageIndex):
            return None
        return FastPlan(self.last_sent + 1,
                        (self._records, self._pages, self._bytes, self._crc))

    def fast_checkpoint_sent(self, plan: FastPlan, size: int, now: float) -> None:
        """The driver wrote `plan`'s checkpoint (`size` bytes) and sent it."""
        if plan.seq != self.last_sent + 1:
            raise RuntimeError(f"checkpoint {plan.seq} was planned, {self.last_sent + 1} is next")
        self._checkpoint_sent(plan.seq, size, now)

    def _encode_checkpoint(self, memory: Buffer, pfns: Sequence[int], records: Sequence[Record],
                           delta: PageCache | None, seq: int, detect_zero: bool) -> bytearray:
        """checkpoint()'s bytes, record by record in Python (KEMARI_NATIVE_CODEC=0:
        the reference the C writer is checked against)."""
        npages = len(pfns)
        parts: list[Buffer] = []
        nrecords = 0
        # Pages the secondary holds from an earlier checkpoint of this session go
        # as deltas against that content; `pfns` keeps the others.
        if delta is not None and pfns:
            parts, nrecords, pfns, unchanged = delta.encode(memory, pfns,
                                                            patch=self.page_patches)
            npages -= unchanged
        # The C encoder writes the pages straight into the send buffer (same bytes);
        # below a few pages its call overhead costs more than it saves.
        native = native_codec.ENABLED and not detect_zero and len(pfns) >= native_codec.MIN_PAGES
        if native:
            nrecords += -(-len(pfns) // MAX_PAGES_PER_RECORD)
        else:
            plain, plain_records, _ = pages_parts(memory, pfns, detect_zero=detect_zero)
            parts += plain
            nrecords += plain_records
        for record in records:
            if self.blob_bases is not None and isinstance(record, Vcpu | Device):
                parts.extend(self.blob_bases.encode(record, delta=delta is not None))
            else:
                parts.extend(encode_parts(record))
            nrecords += 1
            if isinstance(record, Pages):
                npages += record.page_count
        # One copy out of guest memory into the send buffer, then the checksum
        # over that (now cache-hot) buffer, then END written into its slot.
        parts.append(_END_SLOT)
        if native:
            pos = native_codec.pages_size(len(pfns))
            data = bytearray(pos + sum(len(part) for part in parts))
            native_codec.write_pages(memory, pfns, data)
            for part in parts:
                data[pos:pos + len(part)] = part
                pos += len(part)
        else:
            data = bytearray().join(parts)
        body = memoryview(data)[:-len(_END_SLOT)]
        crc = crc32(body, self._crc)
        end = CheckpointEnd(seq, self.generation, self._records + nrecords,
                            self._pages + npages, self._bytes + len(body), crc)
        body.release()
        data[-len(_END_SLOT):] = encode(end)
        return data

    def _write_checkpoint(self, memory: Buffer, pfns: Sequence[int], records: Sequence[Record],
                          delta: native_codec.PageIndex | None, seq: int) -> bytearray:
        """The same bytes as _encode_checkpoint, in one C call (native/codec.h):
        here only the records' bases."""
        items = []
        item_records = item_pages = 0
        for record in records:
            if isinstance(record, Vcpu | Device):
                base = self.blob_bases.base_for(record, delta=delta is not None) \
                    if self.blob_bases is not None else None
                items.append((int(record.TYPE), record.ident, record.version, record.blob, base))
            else:
                items.append((native_codec.RAW, 0, 0, encode(record), None))
                item_records += 1
                if isinstance(record, Pages):
                    item_pages += record.page_count
        return native_codec.write_checkpoint(
            memory, pfns, delta, items, item_records, item_pages, seq=seq,
            generation=self.generation, queued=(self._records, self._pages, self._bytes,
                                                self._crc),
            lz4_worth=LZ4_WORTH, patch=self.page_patches,
            blob_stats=self.blob_bases.stats if self.blob_bases is not None else None)

    def is_acked(self, seq: int) -> bool:
        """True once checkpoint `seq` (or a later one, or a resume HELLO or full
        sync that covers it) is applied on the secondary: its output may go."""
        return seq <= self.last_acked

    # -- full sync --------------------------------------------------------

    def sync_pages(self, memory: Buffer, pfns: Sequence[int], *, now: float,
                   detect_zero: bool = True, compress: bool = True) -> None:
        """Queue one batch of a pre-copy round (guest running). Send it before the
        next batch so the outbox stays small. `compress`: as PAGES_LZ4 where it
        shrinks the pages, if the session negotiated it."""
        if self.state is not PrimaryState.SYNCING or self.sync_seq is not None:
            raise RuntimeError("sync_pages is only allowed during a full sync's rounds")
        compress = compress and self.compress_sync
        if native_codec.ENABLED and detect_zero and len(pfns) >= native_codec.MIN_PAGES:
            out = native_codec.scratch(native_codec.pages_size(len(pfns)))
            written, _data_pages = native_codec.write_pages_detect_zero(memory, pfns, out)
            out = out[:written]
            nrecords = -(-len(pfns) // MAX_PAGES_PER_RECORD)
            if compress:
                self._queue(compress_pages_records(out, self.sync_stats), nrecords, len(pfns),
                            now)
            else:
                self._queue([out], nrecords, len(pfns), now)
        else:
            parts, nrecords, npages = pages_parts(memory, pfns, detect_zero=detect_zero,
                                                  compress=compress, stats=self.sync_stats)
            self._queue(parts, nrecords, npages, now)
        self.sync_pages_sent += len(pfns)

    def sync_disk(self, writes: Sequence[DiskWrite], *, now: float) -> None:
        """Queue replicated-disk contents during a full sync's rounds (guest running).
        Sectors the guest writes meanwhile must be sent again in the closing
        checkpoint, like pages dirtied during a round."""
        if self.state is not PrimaryState.SYNCING or self.sync_seq is not None:
            raise RuntimeError("sync_disk is only allowed during a full sync's rounds")
        self._queue_disk_writes(writes, now)

    def send_ahead(self, writes: Sequence[DiskWrite], *, now: float) -> None:
        """Queue replicated-disk writes now, ahead of the checkpoint they belong
        to (the next one: they count in its END). The secondary can write them
        while this side makes its own copy durable; until that END arrives it
        can still undo them."""
        if self.state is not PrimaryState.PROTECTED:
            raise RuntimeError(f"cannot send disk writes ahead in state {self.state.value}")
        self._queue_disk_writes(writes, now)

    def end_sync_round(self, pages_remaining: int, *, now: float) -> bool:
        """Close a pre-copy round, `pages_remaining` being the pages dirtied during it.

        Returns True if another live round is worth it, False when it is time
        to pause the guest and send the closing checkpoint (few pages left,
        too many rounds, or the dirty rate is not converging).
        """
        if self.state is not PrimaryState.SYNCING or self.sync_seq is not None:
            raise RuntimeError("end_sync_round is only allowed during a full sync's rounds")
        previous = self.sync_pages_remaining
        self._queue(encode_parts(SyncProgress(self.sync_round, self.sync_pages_sent,
                                              pages_remaining)), 1, 0, now)
        self.sync_round += 1
        self.sync_pages_remaining = pages_remaining
        converging = self.sync_round < 3 or pages_remaining < previous
        return (pages_remaining > self.sync_stop_pages
                and self.sync_round < self.sync_max_rounds and converging)

    def goodbye(self, reason: int = GoodbyeReason.SHUTDOWN, *, now: float) -> None:
        """End the session in order. HANDOVER requires every checkpoint acknowledged."""
        if reason == GoodbyeReason.HANDOVER and (self.outstanding or
                                                 self.state is not PrimaryState.PROTECTED):
            raise RuntimeError("handover needs a protected pair with no outstanding checkpoint")
        if self.state is not PrimaryState.HANDSHAKE:
            self._outbox.append(encode(Goodbye(reason, self.last_sent)))
            self.liveness.sent(now)
        self.state = PrimaryState.CLOSED

    # -- internals --------------------------------------------------------

    def _reset_checkpoint(self) -> None:
        self._crc = 0
        self._records = 0
        self._pages = 0
        self._bytes = 0

    def _queue(self, parts: list[Buffer], nrecords: int, npages: int, now: float) -> None:
        """Queue records that belong to the next checkpoint's checksum. A lone part
        is queued as it is: only the native encoder's own buffer comes alone."""
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._crc = crc32(data, self._crc)
        self._records += nrecords
        self._pages += npages
        self._bytes += len(data)
        self.bytes_sent += len(data)
        self._outbox.append(data)
        self.liveness.sent(now)

    def _queue_disk_writes(self, writes: Sequence[DiskWrite], now: float) -> None:
        parts: list[Buffer] = []
        for write in writes:
            parts.extend(encode_parts(write))
        self._queue(parts, len(writes), 0, now)

    def _on_record(self, record: Record, now: float, events: list[Event]) -> None:
        if self.state is PrimaryState.HANDSHAKE and not isinstance(record, Hello | Error):
            raise UnexpectedRecord(f"{type(record).__name__} before the secondary's HELLO")
        if isinstance(record, Ack):
            self._on_ack(record, now, events)
        elif isinstance(record, Heartbeat | Unknown):
            pass
        elif isinstance(record, Hello):
            self._on_hello(record, now, events)
        elif isinstance(record, Goodbye):
            self.state = PrimaryState.CLOSED
            events.append(PeerGoodbye(record.reason, record.checkpoint_seq))
        elif isinstance(record, Error):
            raise PeerError(record.code, record.message)
        elif isinstance(record, SyncAck):
            self._on_sync_ack(record)
        else:
            raise UnexpectedRecord(f"primary received {type(record).__name__}")

    def _on_sync_ack(self, ack: SyncAck) -> None:
        if not self.sync_acks or self.state is not PrimaryState.SYNCING:
            raise UnexpectedRecord("SYNC_ACK outside a full sync that negotiated it")
        if not self.sync_round_acked < ack.round < self.sync_round:
            raise ProtocolError(f"SYNC_ACK for round {ack.round}: rounds "
                                f"{self.sync_round_acked + 1} to {self.sync_round - 1} "
                                "are the ones awaiting it")
        self.sync_round_acked = ack.round

    def _on_hello(self, hello: Hello, now: float, events: list[Event]) -> None:
        if self.state is not PrimaryState.HANDSHAKE:
            raise UnexpectedRecord("second HELLO in one session")
        if hello.role is not Role.SECONDARY:
            raise HandshakeError("peer announces itself as primary: two primaries for "
                                 f"{self.name!r}, refusing")
        if hello.name != self.name:
            raise HandshakeError(f"peer replicates VM {hello.name!r}, this is {self.name!r}")
        if hello.memory_size != self.memory_size:
            raise HandshakeError(
                f"config mismatch in memory_size: the secondary has {hello.memory_size} bytes "
                f"of guest memory, this primary {self.memory_size}")
        if mismatch := config_mismatch(self.config, dict(hello.config), "this primary",
                                       "the secondary"):
            raise HandshakeError(mismatch)
        has = bool(hello.flags & HelloFlag.HAVE_CHECKPOINT)
        if hello.generation > self.generation or (
                has and hello.generation == self.generation
                and hello.checkpoint_seq > self.last_sent):
            raise GenerationError(
                f"secondary holds newer state (generation {hello.generation}, checkpoint "
                f"{hello.checkpoint_seq}) than this primary (generation {self.generation}, "
                f"checkpoint {self.last_sent}): refusing to overwrite it")
        same = has and hello.generation == self.generation
        version = min(hello.version, VERSION)
        resync = version >= 2 and same and hello.checkpoint_seq in self.resync_from
        resume = (not resync and same and not self.force_full_sync
                  and hello.checkpoint_seq == self.last_sent)
        if not (resync or resume):
            self.full_sync_reason = self._why_full_sync(hello, has, version)
        self.peer = hello
        self.compress_sync = self.compress and bool(
            self.capabilities & hello.capabilities & Capability.LZ4_PAGES)
        self.sync_acks = bool(self.capabilities & hello.capabilities & Capability.SYNC_ACKS)
        if self.delta_cache_pages and self.capabilities & hello.capabilities \
                & Capability.DELTAS:
            # the C writer keeps the cache's index in C; the same slots either way
            self.delta_cache = native_codec.PageIndex(
                self.delta_cache_pages, self.memory_size // PAGE_SIZE) \
                if native_codec.ENABLED and native_codec.CHECKPOINT_WRITER \
                else PageCache(self.delta_cache_pages)
            self.blob_bases = BlobBases()
            self.page_patches = PATCHES_ENABLED and bool(
                self.capabilities & hello.capabilities & Capability.PATCHES)
        flags = HelloFlag(0) if resume else HelloFlag.RESYNC if resync else HelloFlag.FULL_SYNC
        if self.unprotected and version >= 2:
            flags |= HelloFlag.UNPROTECTED
        self._outbox.append(encode(Hello(self.name, Role.PRIMARY, self.generation,
                                         self.last_sent, self.memory_size, flags,
                                         self.capabilities & hello.capabilities, version,
                                         config=tuple(sorted(self.config.items()))
                                         if version >= 2 else ())))
        self.liveness.sent(now)
        if resume:  # the secondary holds everything up to last_sent
            self.last_acked = self.last_sent
        if resync:
            self.resync_base = hello.checkpoint_seq
        self.state = (PrimaryState.PROTECTED if resume else PrimaryState.RESYNCING if resync
                      else PrimaryState.SYNCING)
        events.append(PeerHello(hello, full_sync=not (resume or resync)))

    def _why_full_sync(self, hello: Hello, has: bool, version: int) -> str:
        if not has:
            return "the secondary holds no checkpoint"
        if hello.generation != self.generation:
            return (f"the secondary holds generation {hello.generation}, "
                    f"this primary is generation {self.generation}")
        if version < 2:
            return "the secondary speaks stream version 1 (no resync)"
        if not self.resync_from:
            return "changes since the secondary's checkpoint are not tracked"
        return (f"the secondary holds checkpoint {hello.checkpoint_seq}; changes are tracked "
                f"only since checkpoint {min(self.resync_from)}")

    def _on_ack(self, ack: Ack, now: float, events: list[Event]) -> None:
        if ack.generation != self.generation:
            raise GenerationError(f"ACK for generation {ack.generation}, "
                                  f"this primary is generation {self.generation}")
        if not self.outstanding:
            raise ProtocolError(f"ACK for checkpoint {ack.seq} but none is outstanding")
        oldest = next(iter(self.outstanding))
        if ack.seq != oldest:
            raise ProtocolError(f"ACK for checkpoint {ack.seq}, expected {oldest}")
        sent_at = self.outstanding.pop(oldest)
        self.last_acked = ack.seq
        events.append(Acked(ack.seq, now - sent_at))
        if self.sync_seq == ack.seq and self.state is not PrimaryState.PROTECTED:
            self.state = PrimaryState.PROTECTED
            self.sync_seq = None
            events.append(SyncComplete(ack.seq))
