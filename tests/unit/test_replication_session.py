"""Primary and secondary state machines talking through bytes, with a real
in-memory guest image as the secondary's sink: full sync, checkpoints, and
every way a checkpoint can be wrong (the previous state must stay intact)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari_agent.replication.codec import (
    PAGE_SIZE,
    Ack,
    CheckpointEnd,
    Decoder,
    Device,
    DiskWrite,
    GoodbyeReason,
    Hello,
    HelloFlag,
    Pages,
    Role,
    SyncProgress,
    Vcpu,
    encode,
)
from kemari_agent.replication.errors import (
    ChecksumMismatch,
    GenerationError,
    HandshakeError,
    NotAKemariStream,
    OutOfOrderCheckpoint,
    PeerError,
    ProtocolError,
    ReplayedCheckpoint,
    StreamError,
    UnexpectedRecord,
)
from kemari_agent.replication.events import (
    Acked,
    Committed,
    Discarded,
    PeerDead,
    PeerGoodbye,
    PeerHello,
    SyncComplete,
    SyncProgressed,
)
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.primary import Primary, PrimaryState
from kemari_agent.replication.secondary import Secondary, SecondaryState

pytestmark = pytest.mark.unit

NPAGES = 64
MEM = NPAGES * PAGE_SIZE
DISK = 64 * 512


class Pair:
    """A primary guest (bytearray memory + disk) and a secondary with an ImageSink."""

    def __init__(self, *, generation: int = 1, sink: ImageSink | None = None,
                 sec_generation: int = 0, sec_seq: int = 0, has_checkpoint: bool = False,
                 primary_seq: int = 0, disk_ahead: bool = False,
                 **primary_kw: object) -> None:
        self.mem = bytearray(os.urandom(MEM))
        self.mem[7 * PAGE_SIZE:9 * PAGE_SIZE] = bytes(2 * PAGE_SIZE)
        self.sink = sink or ImageSink(MEM, disks={0: bytearray(DISK)})
        self.secondary = Secondary(self.sink, name="kv1", memory_size=MEM,
                                   generation=sec_generation, checkpoint_seq=sec_seq,
                                   has_checkpoint=has_checkpoint, now=0.0,
                                   disk_ahead=disk_ahead)
        self.primary = Primary(name="kv1", memory_size=MEM, generation=generation,
                               checkpoint_seq=primary_seq, now=0.0, **primary_kw)
        self.wire: list[bytes] = []  # everything the primary sent, for replays

    def to_secondary(self, now: float = 0.0) -> list:
        data = self.primary.data_to_send()
        self.wire.append(data)
        return self.secondary.receive_data(data, now)

    def to_primary(self, now: float = 0.0) -> list:
        return self.primary.receive_data(self.secondary.data_to_send(), now)

    def full_sync(self) -> None:
        assert self.to_primary() == [PeerHello(self.primary.peer, full_sync=True)]
        self.primary.sync_pages(self.mem, range(NPAGES), now=0.0)
        self.primary.end_sync_round(0, now=0.0)
        self.primary.checkpoint(self.mem, [], [Vcpu(0, 1, b"regs0"), Device(1, 1, b"ring0")],
                                now=0.0)
        events = self.to_secondary()
        assert isinstance(events[0], PeerHello)
        assert events[-1] == SyncComplete(self.primary.last_sent)
        assert SyncComplete(self.primary.last_sent) in self.to_primary()
        assert self.primary.state is PrimaryState.PROTECTED

    def dirty(self, *pfns: int) -> list[int]:
        for pfn in pfns:
            self.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = os.urandom(PAGE_SIZE)
        return list(pfns)

    def snapshot(self) -> tuple:
        s = self.sink
        return (bytes(s.memory), dict(s.vcpus), dict(s.devices), bytes(s.disks[0]),
                s.generation, s.checkpoint_seq, s.complete,
                self.secondary.generation, self.secondary.checkpoint_seq)

    def assert_mirrors_primary(self) -> None:
        assert bytes(self.sink.memory) == bytes(self.mem)


def protected_pair(**kw: object) -> Pair:
    pair = Pair(**kw)  # type: ignore[arg-type]
    pair.full_sync()
    pair.assert_mirrors_primary()
    return pair


def test_full_sync_then_checkpoints_mirror_the_primary() -> None:
    pair = protected_pair()
    assert pair.sink.complete and pair.sink.generation == 1 and pair.sink.checkpoint_seq == 1
    assert pair.sink.vcpus == {0: (1, b"regs0")}
    seq = pair.primary.checkpoint(
        pair.mem, pair.dirty(3, 4, 5, 40), [Vcpu(0, 1, b"regs1"), DiskWrite(0, 2, b"D" * 1024)],
        now=1.0)
    assert not pair.primary.is_acked(seq)
    committed = pair.to_secondary(1.0)
    assert committed == [Committed(seq, 1, 3, 4, committed[0].nbytes)]
    assert pair.to_primary(1.25) == [Acked(seq, 0.25)]
    assert pair.primary.is_acked(seq)
    pair.assert_mirrors_primary()
    assert pair.sink.vcpus[0] == (1, b"regs1")
    assert pair.sink.disks[0][1024:2048] == b"D" * 1024
    assert pair.sink.checkpoint_seq == seq == 2


def test_zero_pages_travel_without_payload() -> None:
    pair = Pair()
    pair.to_primary()
    before = pair.primary.bytes_sent
    pair.primary.sync_pages(pair.mem, [7, 8], now=0.0)
    assert pair.primary.bytes_sent - before < 64  # two zero pages: header + entries only
    pair.primary.end_sync_round(0, now=0.0)
    pair.primary.checkpoint(pair.mem, range(NPAGES), now=0.0)
    pair.to_secondary()
    pair.assert_mirrors_primary()


def test_sync_progress_reaches_the_secondary() -> None:
    pair = Pair(sync_stop_pages=10)
    pair.to_primary()
    pair.primary.sync_pages(pair.mem, range(NPAGES), now=0.0)
    assert pair.primary.end_sync_round(40, now=0.0)
    events = pair.to_secondary()
    assert events[-1] == SyncProgressed(0, NPAGES, 40)
    assert pair.secondary.state is SecondaryState.SYNCING and not pair.sink.complete


def test_end_sync_round_stops_when_few_pages_left_or_not_converging() -> None:
    pair = Pair(sync_stop_pages=10, sync_max_rounds=6)
    pair.to_primary()
    assert pair.primary.end_sync_round(50, now=0.0)
    assert not pair.primary.end_sync_round(10, now=0.0)  # few enough: stop and copy
    pair = Pair(sync_stop_pages=10, sync_max_rounds=6)
    pair.to_primary()
    decisions = [pair.primary.end_sync_round(n, now=0.0) for n in (50, 40, 45)]
    assert decisions == [True, True, False]  # round 3 dirtied more than round 2
    pair = Pair(sync_stop_pages=10, sync_max_rounds=3)
    pair.to_primary()
    decisions = [pair.primary.end_sync_round(n, now=0.0) for n in (50, 40, 30)]
    assert decisions == [True, True, False]  # round limit


def test_torn_checkpoint_is_discarded_and_not_acked() -> None:
    pair = protected_pair()
    before = pair.snapshot()
    pair.primary.checkpoint(pair.mem, pair.dirty(1, 2), [Vcpu(0, 1, b"new")], now=1.0)
    data = pair.primary.data_to_send()
    assert pair.secondary.receive_data(data[:-48], 1.0) == []  # END not yet complete
    events = pair.secondary.connection_lost()
    assert isinstance(events[0], Discarded) and "connection lost" in events[0].reason
    assert pair.snapshot() == before
    assert pair.secondary.data_to_send() == b""  # nothing to ACK


def test_goodbye_in_the_middle_of_a_checkpoint_discards_it() -> None:
    pair = protected_pair()
    before = pair.snapshot()
    pair.primary.checkpoint(pair.mem, pair.dirty(1, 2), now=1.0)
    data = pair.primary.data_to_send()
    pair.primary.outstanding.clear()
    pair.primary.goodbye(now=1.0)
    events = pair.secondary.receive_data(data[:-48] + pair.primary.data_to_send(), 1.0)
    assert isinstance(events[0], Discarded)
    assert events[1] == PeerGoodbye(GoodbyeReason.SHUTDOWN, 2)
    assert pair.snapshot() == before


def test_handover_goodbye_names_the_final_checkpoint() -> None:
    pair = protected_pair()
    seq = pair.primary.checkpoint(pair.mem, pair.dirty(9), now=1.0)
    with pytest.raises(RuntimeError, match="outstanding"):
        pair.primary.goodbye(GoodbyeReason.HANDOVER, now=1.0)
    pair.to_secondary()
    pair.to_primary()
    pair.primary.goodbye(GoodbyeReason.HANDOVER, now=1.0)
    assert pair.to_secondary() == [PeerGoodbye(GoodbyeReason.HANDOVER, seq)]
    assert pair.secondary.checkpoint_seq == seq
    assert pair.secondary.state is SecondaryState.CLOSED


def test_replayed_checkpoint_is_refused() -> None:
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(1), now=1.0)
    pair.to_secondary()
    replay = pair.wire[-1]
    pair.dirty(1)  # the primary moves on; a replay would roll page 1 back
    after = pair.snapshot()
    with pytest.raises(ReplayedCheckpoint, match="already applied"):
        pair.secondary.receive_data(replay, 2.0)
    assert pair.snapshot() == after
    assert pair.secondary.state is SecondaryState.FAILED
    with pytest.raises(ProtocolError, match="already failed"):
        pair.secondary.receive_data(b"", 2.0)


def test_replayed_session_is_refused_by_a_node_that_moved_on() -> None:
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(1), now=1.0)
    pair.to_secondary()
    after = pair.snapshot()
    # A recording of the whole first session, played to the secondary's next session.
    again = Secondary(pair.sink, name="kv1", memory_size=MEM, generation=1,
                      checkpoint_seq=pair.secondary.checkpoint_seq, has_checkpoint=True, now=0.0)
    with pytest.raises(GenerationError, match="older than this node's"):
        again.receive_data(b"".join(pair.wire), 3.0)
    assert pair.snapshot() == after


def test_reordered_checkpoints_are_refused() -> None:
    pair = protected_pair(max_outstanding=2)
    pair.primary.checkpoint(pair.mem, pair.dirty(1), now=1.0)
    first = pair.primary.data_to_send()
    pair.primary.checkpoint(pair.mem, pair.dirty(2), now=1.0)
    second = pair.primary.data_to_send()
    before = pair.snapshot()
    with pytest.raises(OutOfOrderCheckpoint, match="checkpoint 3 arrived, expected 2"):
        pair.secondary.receive_data(second + first, 1.0)
    assert pair.snapshot() == before


def test_reordered_records_inside_a_checkpoint_are_refused() -> None:
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(1), [Vcpu(0, 1, b"x" * 8)], now=1.0)
    data = pair.primary.data_to_send()
    pages_len = 8 + 8 + 8 + PAGE_SIZE
    vcpu_len = 8 + 16
    pages, vcpu, end = data[:pages_len], data[pages_len:pages_len + vcpu_len], \
        data[pages_len + vcpu_len:]
    before = pair.snapshot()
    with pytest.raises(ChecksumMismatch):
        pair.secondary.receive_data(vcpu + pages + end, 1.0)
    assert pair.snapshot() == before


def test_wrong_generation_is_refused() -> None:
    pair = protected_pair()
    pair.primary.generation = 7  # a checkpoint claiming another generation
    pair.primary.checkpoint(pair.mem, pair.dirty(1), now=1.0)
    before = pair.snapshot()
    with pytest.raises(GenerationError, match="generation 7"):
        pair.to_secondary()
    assert pair.snapshot() == before


@pytest.mark.parametrize("where", ["page", "end-checksum", "end-count"])
def test_bad_checksum_is_refused(where: str) -> None:
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(1, 2), now=1.0)
    data = bytearray(pair.primary.data_to_send())
    end = len(data) - 48
    if where == "page":
        data[100] ^= 0x10
    elif where == "end-checksum":
        data[end + 8 + 32] ^= 1
    else:
        struct.pack_into("<I", data, end + 8 + 16, 3)
    before = pair.snapshot()
    with pytest.raises(ChecksumMismatch, match="checkpoint 2"):
        pair.secondary.receive_data(bytes(data), 1.0)
    assert pair.snapshot() == before
    assert pair.secondary.data_to_send() == b""


def test_unexpected_records_are_refused() -> None:
    pair = protected_pair()
    before = pair.snapshot()
    with pytest.raises(UnexpectedRecord, match="Ack"):
        pair.secondary.receive_data(encode(Ack(2, 1)), 1.0)
    assert pair.snapshot() == before
    pair = protected_pair()
    with pytest.raises(UnexpectedRecord, match="SYNC_PROGRESS outside"):
        pair.secondary.receive_data(encode(SyncProgress(1, 2, 3)), 1.0)
    pair = protected_pair()
    with pytest.raises(UnexpectedRecord, match="Hello mid-session"):
        pair.secondary.receive_data(encode(Hello("kv1", Role.PRIMARY, 1, 1, MEM)), 1.0)
    pair = Pair()
    with pytest.raises(NotAKemariStream):
        pair.secondary.receive_data(encode(Ack(1, 1)), 0.0)


def test_pages_outside_guest_memory_are_refused() -> None:
    pair = protected_pair()
    before = pair.snapshot()
    with pytest.raises(ProtocolError, match="pfn 64"):
        pair.secondary.receive_data(encode(Pages([64], bytes(PAGE_SIZE))), 1.0)
    assert pair.snapshot() == before


def test_stale_primary_cannot_overwrite_newer_secondary() -> None:
    sink = ImageSink(MEM)
    pair = Pair(generation=2, sink=sink, sec_generation=3, sec_seq=10, has_checkpoint=True)
    with pytest.raises(GenerationError, match="refusing to overwrite"):
        pair.to_primary()
    sec = Secondary(sink, name="kv1", memory_size=MEM, generation=3, checkpoint_seq=10,
                    has_checkpoint=True, now=0.0)
    with pytest.raises(GenerationError, match="stale primary"):
        sec.receive_data(encode(Hello("kv1", Role.PRIMARY, 2, 50, MEM, HelloFlag.FULL_SYNC)),
                         0.0)
    assert sink.commits == 0 and sink.generation == 0


@pytest.mark.parametrize(("hello", "match"), [
    (Hello("kv2", Role.PRIMARY, 1, 0, MEM, HelloFlag.FULL_SYNC), "'kv2'"),
    (Hello("kv1", Role.PRIMARY, 1, 0, MEM * 2, HelloFlag.FULL_SYNC), "bytes of guest memory"),
    (Hello("kv1", Role.SECONDARY, 1, 0, MEM, HelloFlag.FULL_SYNC), "secondary"),
    (Hello("kv1", Role.PRIMARY, 1, 0, MEM), "without a full sync"),
])
def test_secondary_refuses_mismatched_hello(hello: Hello, match: str) -> None:
    pair = Pair()
    with pytest.raises(HandshakeError, match=match):
        pair.secondary.receive_data(encode(hello), 0.0)


def test_primary_refuses_a_second_primary() -> None:
    pair = Pair()
    with pytest.raises(HandshakeError, match="two primaries"):
        pair.primary.receive_data(encode(Hello("kv1", Role.PRIMARY, 1, 0, MEM)), 0.0)


def test_reconnect_resumes_without_full_sync_when_secondary_is_current() -> None:
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(5), now=1.0)
    pair.to_secondary()  # applied, but the ACK is lost with the connection
    pair.secondary.connection_lost()
    pair.dirty(6, 7)  # the guest ran on while unprotected
    sec = Secondary(pair.sink, name="kv1", memory_size=MEM, generation=pair.sink.generation,
                    checkpoint_seq=pair.sink.checkpoint_seq, has_checkpoint=True, now=2.0)
    prim = Primary(name="kv1", memory_size=MEM, generation=1,
                   checkpoint_seq=pair.primary.last_sent, now=2.0)
    assert not prim.is_acked(2)
    (hello,) = prim.receive_data(sec.data_to_send(), 2.0)
    assert hello.full_sync is False and prim.is_acked(2)  # held I/O of checkpoint 2 may go
    prim.checkpoint(pair.mem, [6, 7], now=2.0)
    events = sec.receive_data(prim.data_to_send(), 2.0)
    assert events[0] == PeerHello(prim.peer and Hello(  # the primary's resume HELLO
        "kv1", Role.PRIMARY, 1, 2, MEM, HelloFlag(0)), full_sync=False)
    assert isinstance(events[1], Committed) and events[1].seq == 3
    pair.assert_mirrors_primary()


def test_reconnect_with_a_stale_secondary_does_a_full_sync() -> None:
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(5), now=1.0)
    pair.primary.data_to_send()  # lost: the secondary never saw checkpoint 2
    sec = Secondary(pair.sink, name="kv1", memory_size=MEM, generation=1, checkpoint_seq=1,
                    has_checkpoint=True, now=2.0)
    prim = Primary(name="kv1", memory_size=MEM, generation=1, checkpoint_seq=2, now=2.0)
    assert not prim.is_acked(2)  # checkpoint 2's output stays held
    (hello,) = prim.receive_data(sec.data_to_send(), 2.0)
    assert hello.full_sync is True and not prim.is_acked(2)
    prim.sync_pages(pair.mem, range(NPAGES), now=2.0)
    prim.end_sync_round(0, now=2.0)
    prim.checkpoint(pair.mem, [], now=2.0)
    assert sec.receive_data(prim.data_to_send(), 2.0)[-1] == SyncComplete(3)
    prim.receive_data(sec.data_to_send(), 2.0)
    assert prim.is_acked(2)  # the full sync carried checkpoint 2's effects
    pair.assert_mirrors_primary()


def test_interrupted_full_sync_leaves_no_valid_checkpoint() -> None:
    pair = protected_pair()
    sec = Secondary(pair.sink, name="kv1", memory_size=MEM, generation=1, checkpoint_seq=1,
                    has_checkpoint=True, now=2.0)
    prim = Primary(name="kv1", memory_size=MEM, generation=2, checkpoint_seq=1, now=2.0)
    prim.receive_data(sec.data_to_send(), 2.0)
    prim.sync_pages(pair.mem, range(10), now=2.0)
    sec.receive_data(prim.data_to_send(), 2.0)
    assert not pair.sink.complete  # pages were written through: the image is in flux
    assert isinstance(sec.connection_lost()[0], Discarded)
    assert not pair.sink.complete and sec.has_checkpoint is False
    assert sec.generation == 1  # the last complete state's generation, not the new one


def test_primary_refuses_bad_acks() -> None:
    pair = protected_pair()
    seq = pair.primary.checkpoint(pair.mem, pair.dirty(1), now=1.0)
    with pytest.raises(ProtocolError, match=f"ACK for checkpoint {seq + 1}, expected {seq}"):
        pair.primary.receive_data(encode(Ack(seq + 1, 1)), 1.0)
    pair = protected_pair()
    with pytest.raises(ProtocolError, match="none is outstanding"):
        pair.primary.receive_data(encode(Ack(1, 1)), 1.0)  # a replayed ACK
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(1), now=1.0)
    with pytest.raises(GenerationError):
        pair.primary.receive_data(encode(Ack(2, 9)), 1.0)


def test_primary_window_and_states() -> None:
    pair = Pair()
    with pytest.raises(RuntimeError, match="handshake"):
        pair.primary.checkpoint(pair.mem, [1], now=0.0)
    pair.full_sync()
    pair.primary.checkpoint(pair.mem, [1], now=1.0)
    with pytest.raises(RuntimeError, match="outstanding"):
        pair.primary.checkpoint(pair.mem, [2], now=1.0)
    with pytest.raises(RuntimeError, match="full sync"):
        pair.primary.sync_pages(pair.mem, [2], now=1.0)
    with pytest.raises(TypeError, match="Ack"):
        protected_pair().primary.checkpoint(pair.mem, [], [Ack(1, 1)],  # type: ignore[list-item]
                                            now=0.0)


def test_peer_error_record_is_raised_on_the_other_side() -> None:
    pair = Pair()
    with pytest.raises(GenerationError) as exc:
        Primary(name="kv1", memory_size=MEM, generation=0, checkpoint_seq=0, now=0.0) \
            .receive_data(Secondary(ImageSink(MEM), name="kv1", memory_size=MEM,
                                    generation=5, checkpoint_seq=0, has_checkpoint=False,
                                    now=0.0).data_to_send(), 0.0)
    from kemari_agent.replication.codec import encode_error
    with pytest.raises(PeerError, match="refusing to overwrite"):
        pair.secondary.receive_data(encode_error(exc.value), 0.0)


def test_heartbeats_and_dead_peer_detection() -> None:
    pair = protected_pair(heartbeat_interval=0.5, peer_timeout=2.0)
    p, s = pair.primary, pair.secondary
    assert p.poll(0.2) == [] and p.data_to_send() == b""
    assert p.poll(0.6) == []
    heartbeat = p.data_to_send()
    assert len(heartbeat) == 24  # queued a HEARTBEAT
    assert s.receive_data(heartbeat, 0.6) == []
    s.poll(0.6)
    p.receive_data(s.data_to_send(), 0.6)
    assert p.next_deadline() == pytest.approx(1.1)
    assert p.poll(2.5) == []  # heard from the secondary at 0.6
    assert p.poll(2.7) == [PeerDead(pytest.approx(2.1))]
    assert p.poll(2.8) == []  # reported once
    # Heartbeats sent between checkpoints are part of the next checksum.
    seq = p.checkpoint(pair.mem, pair.dirty(3), now=3.0)
    assert pair.to_secondary(3.0)[-1].seq == seq
    assert s.poll(5.5) == []  # the secondary uses the default 3 s timeout
    assert s.poll(6.5) == [PeerDead(pytest.approx(3.5))]


def test_disk_writes_go_to_a_real_file(tmp_path: os.PathLike) -> None:
    path = os.path.join(tmp_path, "disk.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, DISK)
        pair = protected_pair(sink=ImageSink(MEM, disks={0: fd, 1: bytearray(DISK)}))
        pair.primary.checkpoint(pair.mem, [], [DiskWrite(0, 3, b"w" * 1536)], now=1.0)
        pair.to_secondary()
        with open(path, "rb") as f:
            assert f.read()[3 * 512:6 * 512] == b"w" * 1536
    finally:
        os.close(fd)


class UndoingSink(ImageSink):
    """A DiskAheadSink over a bytearray disk: undoes what it wrote since a commit."""

    def __init__(self) -> None:
        super().__init__(MEM, disks={0: bytearray(DISK)})
        self.undo: list[tuple[int, bytes]] = []
        self.flushes = 0

    def write_disk(self, disk_id: int, sector: int, data) -> None:
        disk = self.disks[disk_id]
        self.undo.append((sector * 512, bytes(disk[sector * 512:sector * 512 + len(data)])))
        super().write_disk(disk_id, sector, data)

    def flush_disks(self) -> None:
        self.flushes += 1

    def undo_disk_writes(self) -> None:
        for offset, old in reversed(self.undo):
            self.disks[0][offset:offset + len(old)] = old
        self.undo.clear()

    def commit(self, generation: int, seq: int) -> None:
        self.undo.clear()
        super().commit(generation, seq)


@pytest.mark.parametrize("disk_ahead", [True, False])
def test_disk_writes_sent_ahead_count_in_their_checkpoint(disk_ahead: bool) -> None:
    """Written at once by a secondary that can undo them (durable at the end of
    that read), staged by one that cannot; committed with their checkpoint either way."""
    sink = UndoingSink()
    pair = protected_pair(sink=sink, disk_ahead=disk_ahead)
    pair.primary.send_ahead([DiskWrite(0, 4, b"a" * 1024), DiskWrite(0, 5, b"b" * 512)], now=1.0)
    assert pair.to_secondary(1.0) == []
    ahead = bytes(sink.disks[0][4 * 512:6 * 512])
    assert ahead == (b"a" * 512 + b"b" * 512 if disk_ahead else bytes(1024))
    assert sink.flushes == (1 if disk_ahead else 0)
    seq = pair.primary.checkpoint(pair.mem, pair.dirty(2), [Vcpu(0, 1, b"r")], now=1.0)
    assert isinstance(pair.to_secondary(1.0)[-1], Committed)   # END counted them
    assert Acked(seq, 0.0) in pair.to_primary(1.0)
    assert bytes(sink.disks[0][4 * 512:6 * 512]) == b"a" * 512 + b"b" * 512
    pair.assert_mirrors_primary()
    with pytest.raises(RuntimeError, match="ahead"):
        Primary(name="kv1", memory_size=MEM, generation=1, checkpoint_seq=0,
                now=0.0).send_ahead([DiskWrite(0, 1, b"x" * 512)], now=0.0)


def test_a_checkpoint_that_staged_a_disk_write_stages_the_rest_in_order() -> None:
    """disk_ahead switched on between two reads of one checkpoint (a new session
    becoming the current one): its later writes are staged too, so the two
    writes of one sector land in the order they were made."""
    sink = UndoingSink()
    pair = protected_pair(sink=sink)
    pair.primary.send_ahead([DiskWrite(0, 4, b"1" * 512)], now=1.0)
    pair.to_secondary(1.0)
    pair.secondary.disk_ahead = True
    pair.primary.send_ahead([DiskWrite(0, 4, b"2" * 512)], now=1.0)
    pair.to_secondary(1.0)
    assert bytes(sink.disks[0][4 * 512:5 * 512]) == bytes(512)      # both staged
    pair.primary.checkpoint(pair.mem, [], now=1.0)
    assert isinstance(pair.to_secondary(1.0)[-1], Committed)
    assert bytes(sink.disks[0][4 * 512:5 * 512]) == b"2" * 512
    pair.primary.send_ahead([DiskWrite(0, 4, b"3" * 512)], now=2.0)   # the next one: ahead
    pair.to_secondary(2.0)
    assert bytes(sink.disks[0][4 * 512:5 * 512]) == b"3" * 512


@pytest.mark.parametrize("end", ["connection lost", "bad checksum", "goodbye"])
def test_disk_writes_sent_ahead_are_undone_when_their_checkpoint_is_discarded(end: str) -> None:
    sink = UndoingSink()
    pair = protected_pair(sink=sink, disk_ahead=True)
    pair.primary.checkpoint(pair.mem, [], [DiskWrite(0, 4, b"k" * 512)], now=1.0)
    pair.to_secondary(1.0)
    pair.to_primary(1.0)
    before = pair.snapshot()
    pair.primary.send_ahead([DiskWrite(0, 4, b"x" * 512), DiskWrite(0, 4, b"y" * 1024)],
                            now=2.0)
    pair.to_secondary(2.0)
    assert bytes(sink.disks[0][4 * 512:6 * 512]) == b"y" * 1024     # written at once
    if end == "connection lost":
        events = pair.secondary.connection_lost()
    elif end == "bad checksum":
        pair.primary.checkpoint(pair.mem, pair.dirty(3), now=2.0)
        data = bytearray(pair.primary.data_to_send())
        data[-5] ^= 1                              # inside END's checksum
        with pytest.raises(ChecksumMismatch):
            pair.secondary.receive_data(bytes(data), 2.0)
        events = [Discarded("")]
    else:
        pair.primary.goodbye(now=2.0)
        events = pair.to_secondary(2.0)
    assert isinstance(events[0], Discarded)
    assert pair.snapshot() == before          # disk included: both writes undone, in order


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_corrupted_checkpoints_never_apply_partially(data: st.DataObject) -> None:
    pair = protected_pair()
    good = pair.snapshot()
    pfns = data.draw(st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=6, unique=True))
    seq = pair.primary.checkpoint(pair.mem, pair.dirty(*pfns),
                                  [Vcpu(0, 1, os.urandom(20)), Device(1, 2, b"ring")], now=1.0)
    feed_damaged(pair, data, pair.primary.data_to_send())
    # CRC-32 catches every 1..3-bit error here, so a corrupted checkpoint is never
    # applied, not even in part.
    assert_not_applied(pair, good, seq)


def feed_damaged(pair: Pair, data: st.DataObject, sent: bytes) -> None:
    """Give the secondary `sent` with 1 to 3 bits flipped, cut anywhere (or not)."""
    wire = bytearray(sent)
    bits = data.draw(st.lists(st.integers(0, len(wire) * 8 - 1), min_size=1, max_size=3,
                              unique=True))
    for bit in bits:
        wire[bit // 8] ^= 1 << (bit % 8)
    cut = data.draw(st.sampled_from([len(wire), data.draw(st.integers(0, len(wire)))]))
    try:
        pair.secondary.receive_data(bytes(wire[:cut]), 1.0)
        pair.secondary.connection_lost()
    except StreamError:
        pass


def assert_not_applied(pair: Pair, good: tuple, seq: int) -> None:
    """The image is `good` still, and checkpoint `seq` was not acknowledged."""
    assert pair.snapshot() == good
    acks = Decoder()
    acks._first = False
    assert all(a.seq != seq for a in acks.feed(pair.secondary.data_to_send()))


def test_checkpoint_end_counts_every_record_since_the_last_end() -> None:
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(1, 2), [Vcpu(0, 1, b"r")], now=1.0)
    data = pair.primary.data_to_send()
    dec = Decoder()
    dec._first = False
    recs = dec.feed(data)
    end = recs[-1]
    assert isinstance(end, CheckpointEnd)
    assert (end.record_count, end.page_count, end.byte_count) == (2, 2, len(data) - 48)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_chunking_of_a_session_gives_the_same_image(data: st.DataObject) -> None:
    pair = Pair()
    pair.to_primary()
    pair.primary.sync_pages(pair.mem, range(NPAGES), now=0.0)
    pair.primary.end_sync_round(3, now=0.0)
    pair.primary.checkpoint(pair.mem, pair.dirty(1, 2, 3), [Vcpu(0, 1, b"a")], now=0.0)
    wire = bytes(pair.primary.data_to_send())
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    events = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        events += pair.secondary.receive_data(wire[prev:cut], 0.0)
        prev = cut
    assert events[-1] == SyncComplete(1)
    pair.assert_mirrors_primary()


def test_discards_are_logged_with_their_reason(caplog: pytest.LogCaptureFixture) -> None:
    pair = protected_pair()
    pair.primary.checkpoint(pair.mem, pair.dirty(1), now=1.0)
    data = bytearray(pair.primary.data_to_send())
    data[200] ^= 1
    with caplog.at_level("WARNING", logger="kemari.replication.secondary"), \
            pytest.raises(ChecksumMismatch):
        pair.secondary.receive_data(bytes(data), 1.0)
    assert "discarding staged checkpoint" in caplog.text
    assert "keeping checkpoint 1 of generation 1" in caplog.text
    assert "ChecksumMismatch" in caplog.text


def test_connection_lost_inside_the_first_record_is_a_torn_checkpoint() -> None:
    pair = protected_pair()
    before = pair.snapshot()
    pair.primary.checkpoint(pair.mem, pair.dirty(1, 2, 3), now=1.0)
    data = pair.primary.data_to_send()
    assert pair.secondary.receive_data(data[:PAGE_SIZE], 1.0) == []
    (discarded,) = pair.secondary.connection_lost()
    assert isinstance(discarded, Discarded) and "bytes of a record" in discarded.reason
    assert pair.snapshot() == before
