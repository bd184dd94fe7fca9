"""The secondary's side of a replication session, as a sans-I/O state machine.

Records of a checkpoint are staged (as views into the receive buffers) and
handed to the `CheckpointSink` only when a CHECKPOINT_END arrives whose
sequence number, generation, counts and checksum all match. Anything else
discards the staged checkpoint, logs why, and leaves the sink exactly as the
last committed checkpoint left it. Only applied checkpoints are ACKed.

The one exception is a full sync: there is no valid previous state to
protect (the sink was told so by `begin_full_sync`), so pages are written
through as they arrive and the image becomes valid only at the closing
CHECKPOINT_END.

A resync (HELLO flag RESYNC) is not such an exception: it is one ordinary,
staged checkpoint holding everything that changed since this node's
checkpoint, so the node stays consistent (and promotable) until it commits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Protocol

from . import native_codec
from .codec import (
    DEFAULT_CAPABILITIES,
    PAGE_SIZE,
    Ack,
    Buffer,
    Capability,
    CheckpointEnd,
    CompressedPages,
    Decoder,
    Device,
    DiskWrite,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    HelloFlag,
    Pages,
    PatchPages,
    Record,
    RecordType,
    Role,
    SyncAck,
    SyncProgress,
    Unknown,
    Vcpu,
    XorBlob,
    XorPages,
    apply_patch,
    crc32,
    encode,
    encode_ack,
)
from .delta import xor_buffers
from .errors import (
    ApplyError,
    ChecksumMismatch,
    DeltaMismatch,
    GenerationError,
    HandshakeError,
    OutOfOrderCheckpoint,
    PeerError,
    ProtocolError,
    ReplayedCheckpoint,
    StreamError,
    TruncatedStream,
    UnexpectedRecord,
)
from .events import (
    Committed,
    Discarded,
    Event,
    PeerDead,
    PeerGoodbye,
    PeerHello,
    SyncComplete,
    SyncProgressed,
)
from .liveness import Liveness
from .primary import config_mismatch

log = logging.getLogger("kemari.replication.secondary")

# A checkpoint may rewrite every page plus this much of other state before its END.
STAGING_SLACK = 64 << 20


class CheckpointSink(Protocol):
    """Where applied checkpoints go: the secondary's guest image (or a test image)."""

    def begin_full_sync(self, generation: int) -> None:
        """The image stops being a valid checkpoint until the next commit()."""

    def apply_pages(self, pfns: Sequence[int], data: Buffer, zero_pfns: Sequence[int]) -> None:
        """Write the pages of `pfns` (4096 bytes each, in order) and zero `zero_pfns`."""

    def set_vcpu(self, vcpu_id: int, version: int, blob: Buffer) -> None:
        """Replace one vCPU's state blob (copy it: `blob` views a receive buffer)."""

    def set_device(self, device_id: int, version: int, blob: Buffer) -> None:
        """Replace one device's state blob (copy it)."""

    def rebuild_pages(self, pfns: Sequence[int], delta: bytearray) -> None:
        """delta ^= the committed content of pages `pfns`, in place (PAGES_XOR)."""

    def write_disk(self, disk_id: int, sector: int, data: Buffer) -> None:
        """Write a replicated-disk payload at `sector` (512-byte sectors)."""

    def commit(self, generation: int, seq: int) -> None:
        """Everything applied since the last commit forms checkpoint `seq`."""


class DiskAheadSink(CheckpointSink, Protocol):
    """A sink that can take a checkpoint's disk writes before its END, because it
    can undo them (Secondary(disk_ahead=True))."""

    def flush_disks(self) -> None:
        """Make the disk writes so far durable (undoing them if that fails)."""

    def undo_disk_writes(self) -> None:
        """Put back, durably, what the disk writes since the last commit overwrote."""


class SecondaryState(Enum):
    HANDSHAKE = "handshake"  # HELLO sent, waiting for the primary's
    SYNCING = "syncing"  # full sync in progress (image not valid)
    RESYNCING = "resyncing"  # staging a resync; the previous checkpoint stays valid
    PROTECTED = "protected"  # applying event-tapped checkpoints
    CLOSED = "closed"  # GOODBYE received or connection lost
    FAILED = "failed"  # a StreamError was raised; close the connection


class Secondary:
    """Stages checkpoints and applies each one whole, or not at all."""

    def __init__(
        self,
        sink: CheckpointSink,
        *,
        name: str,
        memory_size: int,
        generation: int,
        checkpoint_seq: int,
        has_checkpoint: bool,
        now: float,
        capabilities: int = int(DEFAULT_CAPABILITIES),
        heartbeat_interval: float = 0.5,
        peer_timeout: float = 3.0,
        config: Mapping[str, str] | None = None,
        outdated: bool = False,
        disk_ahead: bool = False,
    ) -> None:
        """`config`: settings the primary's must equal (sent and compared at HELLO).
        `outdated`: this node already knows its peer went on without it.
        `disk_ahead`: the sink is a DiskAheadSink. Protected, a DISK_WRITE is then
        written as it arrives and made durable at the end of that read, while the
        primary makes its own copy durable; a discarded checkpoint's are undone.
        It may be switched on between reads: a checkpoint that has staged a
        DISK_WRITE stages the rest of them too."""
        self.sink = sink
        self.disk_ahead = disk_ahead
        self.name = name
        self.memory_size = memory_size
        self.generation = generation
        self.checkpoint_seq = checkpoint_seq
        self.has_checkpoint = has_checkpoint
        self.config = dict(config or {})
        # False while the sink holds a mix of two states (a full sync in progress).
        self.consistent = True
        # True once this node knows its primary went on past this node's checkpoint:
        # a newer generation, or a primary that ran unprotected. Cleared by a commit.
        self.outdated = outdated
        self.state = SecondaryState.HANDSHAKE
        self.liveness = Liveness(now, heartbeat_interval, peer_timeout)
        self.peer: Hello | None = None
        # What the primary's HELLO negotiated, decided once: IntFlag arithmetic is
        # slow, and these are read per record.
        self._peer_sends_lz4 = self._peer_sends_deltas = self._peer_wants_sync_acks = False
        self.checkpoints = 0
        self.early_acks = 0       # checkpoints acknowledged before they were applied
        self.bytes_received = 0
        self.sync_progress: SyncProgress | None = None
        self._npages = memory_size // PAGE_SIZE
        self._staging_limit = memory_size + STAGING_SLACK
        self._session_generation = generation
        self._expected_seq = checkpoint_seq + 1
        self._decoder = Decoder()
        # The last VCPU and DEVICE blob of each kind, id and version this session
        # received: BLOB_XOR's bases.
        self._blobs: dict[tuple[int, int, int], bytes] = {}
        self._outbox: list[bytes] = []
        self._heartbeats = 0
        # Set by a driver that can send at once (the daemon's Link): then the ACK of
        # a checkpoint the C reader verified leaves before it is applied (_ack_early).
        self.send_early: Callable[[bytes], None] | None = None
        self._reset_staging()
        flags = HelloFlag.HAVE_CHECKPOINT if has_checkpoint else HelloFlag(0)
        self._send(encode(Hello(name, Role.SECONDARY, generation, checkpoint_seq,
                                memory_size, flags, capabilities,
                                config=tuple(sorted(self.config.items())))), now)

    # -- driver interface -------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Take bytes from the primary; apply whatever checkpoints they complete."""
        def take(events: list[Event]) -> None:
            nonlocal data
            data = self._receive_whole_checkpoints(data, now, events)
            for record, raw in self._decoder.feed_raw(data):
                self._on_record(record, raw, now, events)
            if self._unflushed:        # written ahead, and their END has not come yet
                self._unflushed = False
                self.sink.flush_disks()
        return self._receiving(len(data), now, take)

    def takes_whole_checkpoints(self) -> bool:
        """Whether the next bytes may be a whole checkpoint for the C reader
        (native_codec.receive, or a driver's own C read with receive_args()):
        protected, nothing of a checkpoint staged or half-decoded."""
        return (self.state is SecondaryState.PROTECTED and self._peer_sends_deltas
                and not self._staged and not self._pages and not self._decoder.buffered
                and getattr(self.sink, "memory", None) is not None
                and native_codec.ENABLED and native_codec.CHECKPOINT_READER)

    def receive_args(self) -> dict:
        """What the C reader checks the next checkpoint against, and rebuilds
        deltas from (native_codec.receive's arguments but the data)."""
        return {"committed": self.sink.memory, "bases": self._blobs,
                "expected_seq": self._expected_seq, "generation": self._session_generation,
                "staging_limit": self._staging_limit,
                "queued": (self._records, self._bytes, self._crc),
                "patches": self._peer_sends_patches}

    def may_ack_early(self) -> bool:
        """Whether the ACK of a checkpoint verified whole may leave before it is
        applied and committed (_ack_early), with nothing queued before it."""
        return (self.send_early is not None and self.generation == self._session_generation
                and self.has_checkpoint and self.consistent and not self.outdated
                and not self._unflushed)

    def receive_taken(self, got: native_codec.ReceivedCheckpoint, size: int, acked: bool,
                      now: float) -> list[Event]:
        """A whole checkpoint of `size` bytes that the driver's C read took
        (verified and staged, with receive_args(), when takes_whole_checkpoints()),
        its ACK already sent if `acked` (as may_ack_early() allowed): booked,
        applied and committed as receive_data does."""
        def take(events: list[Event]) -> None:
            if acked:
                self.early_acks += 1
            self._take_received(got, acked or self._ack_early(got.seq, now), now, events)
        return self._receiving(size, now, take)

    def _receiving(self, size: int, now: float, take: Callable[[list[Event]], None],
                   ) -> list[Event]:
        """take(events) for `size` bytes received, its errors ending the session."""
        if self.state is SecondaryState.FAILED:
            raise ProtocolError("session already failed")
        if size:
            self.liveness.received(now)
            self.bytes_received += size
        events: list[Event] = []
        try:
            take(events)
        except StreamError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise
        except OSError as exc:   # the sink's disk or memory: keep the daemon, end the session
            error = ApplyError(f"cannot apply checkpoint {self._expected_seq}: "
                               f"{exc.strerror or exc}")
            self._fail(str(error))
            raise error from exc
        return events

    def connection_lost(self) -> list[Event]:
        """The transport closed or failed: a checkpoint in flight is torn."""
        events: list[Event] = []
        if self.state in (SecondaryState.CLOSED, SecondaryState.FAILED):
            return events
        partial = self._decoder.buffered  # bytes of a record that never completed
        with contextlib.suppress(TruncatedStream):
            self._decoder.eof()
        torn = self._records or partial or self.state is SecondaryState.SYNCING
        if torn and self.state is not SecondaryState.HANDSHAKE:
            reason = (f"connection lost in the middle of checkpoint {self._expected_seq} "
                      f"({self._records} records staged, {partial} bytes of a record)")
            self._discard(reason)
            events.append(Discarded(reason))
        self.state = SecondaryState.CLOSED
        return events

    def data_to_send(self) -> bytes:
        """ACKs and heartbeats queued for the primary."""
        if not self._outbox:
            return b""
        out = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
        self._outbox.clear()
        return out

    def poll(self, now: float) -> list[Event]:
        """Queue a heartbeat if one is due; report a dead peer once per silence."""
        if self.state not in (SecondaryState.CLOSED, SecondaryState.FAILED) and \
                self.liveness.heartbeat_due(now):
            self._heartbeats += 1
            self._send(encode(Heartbeat(self._heartbeats, self.checkpoint_seq)), now)
        silent_for = self.liveness.newly_dead(now)
        return [PeerDead(silent_for)] if silent_for is not None else []

    def next_deadline(self) -> float:
        return self.liveness.next_deadline()

    # -- records ----------------------------------------------------------

    def _on_record(self, record: Record, raw: memoryview, now: float,
                   events: list[Event]) -> None:
        if self.state is SecondaryState.HANDSHAKE:
            if isinstance(record, Error):
                raise PeerError(record.code, record.message)
            if not isinstance(record, Hello):
                raise UnexpectedRecord(f"{type(record).__name__} before the primary's HELLO")
            self._on_hello(record, events)
            return
        if self.state is SecondaryState.CLOSED:
            raise UnexpectedRecord(f"{type(record).__name__} after GOODBYE")
        if isinstance(record, CheckpointEnd):
            self._on_end(record, events, now)
            return
        if isinstance(record, Error):
            raise PeerError(record.code, record.message)
        if isinstance(record, Goodbye):
            if self._records or self.state is SecondaryState.SYNCING:
                reason = (f"primary said goodbye in the middle of checkpoint "
                          f"{self._expected_seq}")
                self._discard(reason)
                events.append(Discarded(reason))
            self.state = SecondaryState.CLOSED
            events.append(PeerGoodbye(record.reason, record.checkpoint_seq))
            return
        if isinstance(record, Hello | Ack):
            raise UnexpectedRecord(f"secondary received {type(record).__name__} mid-session")
        # Everything else belongs to the next checkpoint's counts and checksum.
        self._crc = crc32(raw, self._crc)
        self._records += 1
        self._bytes += len(raw)
        # A full sync writes through (nothing staged), and its rounds may resend
        # pages many times: only a staged checkpoint is bounded by memory.
        if self._bytes > self._staging_limit and self.state is not SecondaryState.SYNCING:
            raise ProtocolError(f"checkpoint {self._expected_seq} exceeds {self._staging_limit} "
                                "bytes without an END")
        if isinstance(record, PatchPages | XorPages):
            if isinstance(record, PatchPages):
                record = self._patched_as_xor(record)
                self._rebuild(record, "PAGES_PATCH")
            else:
                self._rebuild(record, "PAGES_XOR")
            self._pages += record.page_count
            self._staged.append(record)      # only in PROTECTED state: always staged
        elif isinstance(record, Pages):
            if isinstance(record, CompressedPages):
                self._check_compressed()
            self._check_pages(record)
            self._pages += record.page_count
            self._stage(record)
        elif isinstance(record, DiskWrite):
            # Ahead or staged, a checkpoint's writes all go the same way, in order.
            if self.disk_ahead and self.state is SecondaryState.PROTECTED \
                    and not self._staged_writes:
                self.sink.write_disk(record.disk_id, record.sector, record.data)
                self._wrote_ahead = self._unflushed = True
            else:
                self._stage(record)
                self._staged_writes = True
        elif isinstance(record, Vcpu | Device | XorBlob):
            blob = self._rebuild_blob(record) if isinstance(record, XorBlob) else record
            # The next BLOB_XOR's base, from now on: if this checkpoint does not
            # commit, the session ends and its bases with it.
            self._blobs[(blob.TYPE, blob.ident, blob.version)] = bytes(blob.blob)
            self._stage(blob)
        elif isinstance(record, SyncProgress):
            if self.state is not SecondaryState.SYNCING:
                raise UnexpectedRecord("SYNC_PROGRESS outside a full sync")
            self.sync_progress = record
            events.append(SyncProgressed(record.round, record.pages_sent,
                                         record.pages_remaining))
            if self._peer_wants_sync_acks:
                self._send(encode(SyncAck(record.round)), now)   # the round is applied
        else:
            assert isinstance(record, Heartbeat | Unknown)

    def _on_hello(self, hello: Hello, events: list[Event]) -> None:
        if hello.role is not Role.PRIMARY:
            raise HandshakeError(f"peer announces itself as secondary of {hello.name!r}: "
                                 "nobody would send checkpoints")
        if hello.name != self.name:
            raise HandshakeError(f"peer replicates VM {hello.name!r}, this is {self.name!r}")
        if hello.memory_size != self.memory_size:
            raise HandshakeError(
                f"config mismatch in memory_size: the primary has {hello.memory_size} bytes "
                f"of guest memory, this node expects {self.memory_size}")
        if mismatch := config_mismatch(self.config, dict(hello.config), "this secondary",
                                       "the primary"):
            raise HandshakeError(mismatch)
        if hello.generation < self.generation or (
                self.has_checkpoint and hello.generation == self.generation
                and hello.checkpoint_seq < self.checkpoint_seq):
            raise GenerationError(
                f"primary state (generation {hello.generation}, checkpoint "
                f"{hello.checkpoint_seq}) is older than this node's (generation "
                f"{self.generation}, checkpoint {self.checkpoint_seq}): a stale primary "
                "must not overwrite newer state")
        full = bool(hello.flags & HelloFlag.FULL_SYNC)
        resync = bool(hello.flags & HelloFlag.RESYNC)
        same = self.has_checkpoint and hello.generation == self.generation
        if full and resync:
            raise HandshakeError("primary HELLO asks for both a full sync and a resync")
        if resync and not same:
            held = f"generation {self.generation}" if self.has_checkpoint else "no checkpoint"
            raise HandshakeError(f"primary resyncs generation {hello.generation}, "
                                 f"this node holds {held}")
        if not (full or resync) and not (same and hello.checkpoint_seq == self.checkpoint_seq):
            raise HandshakeError(
                f"primary resumes after checkpoint {hello.checkpoint_seq} of generation "
                f"{hello.generation} without a full sync, but this node holds "
                f"{self.checkpoint_seq if self.has_checkpoint else 'no checkpoint'} of "
                f"generation {self.generation}")
        if hello.generation > self.generation or hello.flags & HelloFlag.UNPROTECTED:
            self.outdated = True     # the peer went on without this node
        self.peer = hello
        self._peer_sends_lz4 = bool(hello.capabilities & Capability.LZ4_PAGES)
        self._peer_sends_deltas = bool(hello.capabilities & Capability.DELTAS)
        self._peer_sends_patches = self._peer_sends_deltas and bool(
            hello.capabilities & Capability.PATCHES)
        self._peer_wants_sync_acks = bool(hello.capabilities & Capability.SYNC_ACKS)
        self._session_generation = hello.generation
        self._expected_seq = hello.checkpoint_seq + 1
        if full:
            self.sink.begin_full_sync(hello.generation)
            self.has_checkpoint = False
            self.consistent = False
            self.state = SecondaryState.SYNCING
        else:
            self.state = SecondaryState.RESYNCING if resync else SecondaryState.PROTECTED
        events.append(PeerHello(hello, full_sync=full))

    def _on_end(self, end: CheckpointEnd, events: list[Event], now: float) -> None:
        if end.generation != self._session_generation:
            raise GenerationError(f"checkpoint {end.seq} is of generation {end.generation}, "
                                  f"the session is generation {self._session_generation}")
        if end.seq < self._expected_seq:
            raise ReplayedCheckpoint(f"checkpoint {end.seq} was already applied "
                                     f"(expected {self._expected_seq}): replay refused")
        if end.seq > self._expected_seq:
            raise OutOfOrderCheckpoint(f"checkpoint {end.seq} arrived, expected "
                                       f"{self._expected_seq}: a checkpoint went missing")
        mine = (self._records, self._pages, self._bytes, self._crc)
        theirs = (end.record_count, end.page_count, end.byte_count, end.checksum)
        if mine != theirs:
            raise ChecksumMismatch(
                f"checkpoint {end.seq}: received records/pages/bytes/crc32 {mine[:3]} "
                f"{mine[3]:#010x}, END says {theirs[:3]} {theirs[3]:#010x}")
        # Disk writes first (in order): when one fails (a full disk), guest memory
        # still holds the last checkpoint.
        for record in sorted(self._staged, key=lambda r: not isinstance(r, DiskWrite)):
            self._apply(record)
        self._commit(end.seq, end.generation, events, now)

    def _receive_whole_checkpoints(self, data: bytes, now: float, events: list[Event]) -> bytes:
        """The common case in one C call per checkpoint (native_codec.receive): a
        protected checkpoint that arrived whole, of pages, deltas and blobs only.
        The C code takes only what _on_record and _on_end would accept, and
        stages it the same way; whatever it does not take (anything else, a
        partial checkpoint, any error) comes back to be decoded record by
        record, which gives the verdict. Records of the checkpoint taken before
        and not staged (disk writes sent ahead, heartbeats) are counted in.
        Returns the bytes left."""
        while data and self.takes_whole_checkpoints():
            got = native_codec.receive(data, **self.receive_args())
            if got is None:
                break
            self._take_received(got, self._ack_early(got.seq, now), now, events)
            data = data[got.consumed:]
        return data

    def _take_received(self, got: native_codec.ReceivedCheckpoint, acked: bool, now: float,
                       events: list[Event]) -> None:
        """Apply and commit what the C reader staged."""
        try:
            self._apply_received(got)
        except Exception as exc:
            # The image may hold part of this checkpoint, which the primary
            # may already count as held (an early ACK): no state to resume.
            self.consistent = False
            raise ApplyError(f"cannot apply checkpoint {got.seq}: {exc}") from exc
        self._records, self._pages, self._bytes = got.counts()
        self._commit(got.seq, self._session_generation, events, now, acked=acked)

    def _apply_received(self, got: native_codec.ReceivedCheckpoint) -> None:
        pfns = got.pfns
        if pfns:
            self.sink.apply_pages(pfns, got.data, ())
        for type_, ident, version, blob in got.blobs:
            self._blobs[(type_, ident, version)] = blob
            if type_ == RecordType.VCPU:
                self.sink.set_vcpu(ident, version, blob)
            else:
                self.sink.set_device(ident, version, blob)

    def _ack_early(self, seq: int, now: float) -> bool:
        """The ACK of checkpoint `seq`, verified and staged whole, sent now through
        send_early, before it is applied: the primary's wake-up overlaps the apply.
        Only where committing it needs nothing made durable first: the generation
        of the last commit (the node records it lazily), promotability unchanged,
        no disk write waiting for its sync. Applying staged memory cannot fail
        halfway, and nothing else is read before it is done."""
        if not self.may_ack_early():
            return False
        self._send(encode_ack(seq, self._session_generation), now)
        self.send_early(self.data_to_send())
        self.early_acks += 1
        return True

    def _commit(self, seq: int, generation: int, events: list[Event], now: float,
                acked: bool = False) -> None:
        """Checkpoint `seq`, applied, becomes this node's: commit, ACK (unless
        `acked` already), report."""
        self.sink.commit(generation, seq)
        was_syncing = self.state in (SecondaryState.SYNCING, SecondaryState.RESYNCING)
        self.generation = generation
        self.consistent = True
        self.outdated = False
        self.checkpoint_seq = seq
        self.has_checkpoint = True
        self.checkpoints += 1
        self.state = SecondaryState.PROTECTED
        if not acked:
            self._send(encode_ack(seq, generation), now)
        events.append(Committed(seq, generation, self._records, self._pages, self._bytes))
        if was_syncing:
            events.append(SyncComplete(seq))
        self._expected_seq = seq + 1
        self._reset_staging()

    # -- staging ----------------------------------------------------------

    def _check_pages(self, pages: Pages) -> None:
        for pfns in (pages.pfns, pages.zero_pfns):
            if pfns and max(pfns) >= self._npages:
                raise ProtocolError(f"PAGES names pfn {max(pfns)}, guest memory has "
                                    f"{self._npages} pages")

    def _check_compressed(self) -> None:
        # Only a full sync's write-through may be compressed: a staged checkpoint is
        # bounded by the bytes received, and a small LZ4 block expands up to 16 MiB.
        if not self._peer_sends_lz4:
            raise UnexpectedRecord("PAGES_LZ4 in a session that did not negotiate it")
        if self.state is not SecondaryState.SYNCING:
            raise UnexpectedRecord("PAGES_LZ4 outside a full sync")

    def _rebuild(self, record: XorPages, what: str) -> None:
        """Turn a PAGES_XOR's delta into its pages' new content (in place), from
        this node's copy of them, and check the result. `what`: the record
        type that came (PAGES_PATCH arrives as the PAGES_XOR it stands for)."""
        self._check_delta_allowed(what)
        if max(record.pfns) >= self._npages:
            raise ProtocolError(f"{what} names pfn {max(record.pfns)}, guest memory has "
                                f"{self._npages} pages")
        # Counted like received bytes: a small block expands to 4096 bytes a page.
        self._expanded += len(record.delta)
        if self._bytes + self._expanded > self._staging_limit:
            raise ProtocolError(f"checkpoint {self._expected_seq} exceeds "
                                f"{self._staging_limit} bytes without an END")
        delta = record.delta
        assert isinstance(delta, bytearray)
        self.sink.rebuild_pages(record.pfns, delta)   # this node's committed pages
        if crc32(delta) != record.check:
            raise DeltaMismatch(
                f"checkpoint {self._expected_seq}: pages rebuilt from {what} have "
                f"CRC-32 {crc32(delta):#010x}, the primary's are {record.check:#010x}: "
                "its copy of them and this node's differ")

    def _patched_as_xor(self, record: PatchPages) -> XorPages:
        """A PAGES_PATCH as the PAGES_XOR of the same pages (then rebuilt and
        checked as one): the XOR of this node's copy of each page with that
        copy patched."""
        self._check_delta_allowed("PAGES_PATCH")
        if not self._peer_sends_patches:
            raise UnexpectedRecord("PAGES_PATCH in a session that did not negotiate it")
        if max(record.pfns) >= self._npages:
            raise ProtocolError(f"PAGES_PATCH names pfn {max(record.pfns)}, guest memory has "
                                f"{self._npages} pages")
        if self._bytes + self._expanded + PAGE_SIZE * record.page_count > self._staging_limit:
            raise ProtocolError(f"checkpoint {self._expected_seq} exceeds "
                                f"{self._staging_limit} bytes without an END")
        copy = bytearray(PAGE_SIZE * record.page_count)
        self.sink.rebuild_pages(record.pfns, copy)     # zeros ^ committed = committed
        patched = bytearray(copy)
        view = memoryview(patched)
        for i, patch in enumerate(record.patches):
            apply_patch(patch, view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        return XorPages(record.pfns, bytearray(xor_buffers(patched, copy)), record.check)

    def _rebuild_blob(self, record: XorBlob) -> Vcpu | Device:
        """The VCPU or DEVICE record a BLOB_XOR carries, from the last such blob
        this session received."""
        self._check_delta_allowed("BLOB_XOR")
        base = self._blobs.get((record.kind, record.ident, record.version))
        if base is None or len(base) != len(record.delta):
            raise DeltaMismatch(
                f"checkpoint {self._expected_seq}: BLOB_XOR for {record.kind.name} "
                f"{record.ident} version {record.version} ({len(record.delta)} bytes), but "
                + ("this session received no such blob" if base is None else
                   f"the last one had {len(base)} bytes"))
        self._expanded += len(record.delta)
        blob = xor_buffers(record.delta, base)
        if crc32(blob) != record.check:
            raise DeltaMismatch(
                f"checkpoint {self._expected_seq}: {record.kind.name} {record.ident} rebuilt "
                f"from BLOB_XOR has CRC-32 {crc32(blob):#010x}, the primary's is "
                f"{record.check:#010x}: its copy and this node's differ")
        cls = Vcpu if record.kind is RecordType.VCPU else Device
        return cls(record.ident, record.version, blob)

    def _check_delta_allowed(self, what: str) -> None:
        if not self._peer_sends_deltas:
            raise UnexpectedRecord(f"{what} in a session that did not negotiate it")
        if self.state is not SecondaryState.PROTECTED:
            # Its base is the last committed checkpoint, which a sync is replacing.
            raise UnexpectedRecord(f"{what} while {self.state.value}")

    def _stage(self, record: Pages | Vcpu | Device | DiskWrite) -> None:
        if self.state is SecondaryState.SYNCING:
            self._apply(record)  # write-through: no valid state to protect
        else:
            self._staged.append(record)

    def _apply(self, record: Record) -> None:
        if isinstance(record, Pages):
            self.sink.apply_pages(record.pfns, record.data, record.zero_pfns)
        elif isinstance(record, XorPages):     # rebuilt at staging: `delta` is the pages
            self.sink.apply_pages(record.pfns, record.delta, ())
        elif isinstance(record, Vcpu):
            self.sink.set_vcpu(record.ident, record.version, record.blob)
        elif isinstance(record, Device):
            self.sink.set_device(record.ident, record.version, record.blob)
        elif isinstance(record, DiskWrite):
            self.sink.write_disk(record.disk_id, record.sector, record.data)

    def _reset_staging(self) -> None:
        self._staged: list[Pages | XorPages | Vcpu | Device | DiskWrite] = []
        self._crc = 0
        self._records = 0
        self._pages = 0
        self._bytes = 0
        self._expanded = 0     # bytes PAGES_XOR deltas grew to
        self._wrote_ahead = self._unflushed = False    # disk_ahead: this checkpoint's
        self._staged_writes = False

    def _discard(self, reason: str) -> None:
        if self.state is SecondaryState.SYNCING:
            log.warning("%s: full sync abandoned, no valid checkpoint: %s", self.name, reason)
        else:
            log.warning("%s: discarding staged checkpoint (%d records), keeping checkpoint "
                        "%d of generation %d: %s", self.name, len(self._staged),
                        self.checkpoint_seq, self.generation, reason)
        if self._wrote_ahead:
            self.sink.undo_disk_writes()
        self._reset_staging()

    def _fail(self, reason: str) -> None:
        if self._records or self.state is SecondaryState.SYNCING:
            self._discard(reason)
        else:
            log.warning("%s: replication session failed, keeping checkpoint %d of "
                        "generation %d: %s", self.name, self.checkpoint_seq,
                        self.generation, reason)
        self.state = SecondaryState.FAILED

    def _send(self, data: bytes, now: float) -> None:
        self._outbox.append(data)
        self.liveness.sent(now)
