"""Stream version 2: reconnecting with a resync (only what changed since the
secondary's checkpoint, staged and applied whole), the secondary's
consistent/outdated flags, config checks at HELLO, and talking to version 1."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari_agent.replication.codec import (
    PAGE_SIZE,
    Decoder,
    DiskWrite,
    Hello,
    HelloFlag,
    Role,
    Vcpu,
    encode,
)
from kemari_agent.replication.errors import HandshakeError
from kemari_agent.replication.events import Committed, PeerHello, SyncComplete
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.primary import Primary, PrimaryState
from kemari_agent.replication.secondary import Secondary, SecondaryState

pytestmark = pytest.mark.unit

NPAGES = 64
MEM = NPAGES * PAGE_SIZE
DISK = 64 * 512
CONFIG = {"image": "sha256:0123", "disk_mode": "replicated", "disk_size_mib": "16"}


class Guest:
    """A primary guest with its own secondary image, able to reconnect."""

    def __init__(self) -> None:
        self.mem = bytearray(os.urandom(MEM))
        self.disk = bytearray(DISK)
        self.sink = ImageSink(MEM, disks={0: bytearray(DISK)})
        self.last_sent = 0
        self.acked = 0

    def connect(self, *, resync_from=(), unprotected: bool = False,
                sec_config=CONFIG, prim_config=CONFIG, has_checkpoint: bool | None = None,
                ) -> tuple[Primary, Secondary, list, list]:
        has = self.sink.complete if has_checkpoint is None else has_checkpoint
        sec = Secondary(self.sink, name="kv1", memory_size=MEM, generation=self.sink.generation,
                        checkpoint_seq=self.sink.checkpoint_seq, has_checkpoint=has,
                        now=0.0, config=sec_config)
        prim = Primary(name="kv1", memory_size=MEM, generation=1, checkpoint_seq=self.last_sent,
                       now=0.0, force_full_sync=True, config=prim_config,
                       resync_from=resync_from, unprotected=unprotected)
        prim_events = prim.receive_data(sec.data_to_send(), 0.0)
        sec_events = sec.receive_data(prim.data_to_send(), 0.0)
        return prim, sec, prim_events, sec_events

    def dirty(self, pfns) -> list[int]:
        for pfn in pfns:
            self.mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = os.urandom(PAGE_SIZE)
        return sorted(set(pfns))

    def write_disk(self, sector: int) -> DiskWrite:
        data = os.urandom(512)
        self.disk[sector * 512:(sector + 1) * 512] = data
        return DiskWrite(0, sector, data)

    def full_sync(self) -> tuple[Primary, Secondary]:
        prim, sec, _, _ = self.connect()
        assert prim.state is PrimaryState.SYNCING
        prim.sync_pages(self.mem, range(NPAGES), now=0.0)
        prim.end_sync_round(0, now=0.0)
        seq = prim.checkpoint(self.mem, [], [Vcpu(0, 1, b"regs"),
                                             DiskWrite(0, 0, bytes(self.disk))], now=0.0)
        self.deliver(prim, sec)
        assert prim.is_acked(seq)
        self.last_sent = self.acked = seq
        return prim, sec

    def deliver(self, prim: Primary, sec: Secondary) -> list:
        events = sec.receive_data(prim.data_to_send(), 0.0)
        prim.receive_data(sec.data_to_send(), 0.0)
        return events

    def image(self) -> tuple:
        return (bytes(self.sink.memory), bytes(self.sink.disks[0]), self.sink.checkpoint_seq)

    def assert_mirrored(self) -> None:
        assert bytes(self.sink.memory) == bytes(self.mem)
        assert bytes(self.sink.disks[0]) == bytes(self.disk)


def test_resync_sends_only_the_changes_and_applies_them_whole() -> None:
    g = Guest()
    prim, sec = g.full_sync()
    full_bytes = prim.bytes_sent
    # checkpoint 2 reaches the secondary, its ACK is lost with the link
    seq = prim.checkpoint(g.mem, g.dirty([3, 4]), [g.write_disk(5)], now=1.0)
    g.last_sent = seq
    sec.receive_data(prim.data_to_send(), 1.0)
    sec.connection_lost()
    changed = g.dirty([4, 9, 10])             # the guest ran on, disconnected
    write = g.write_disk(7)
    before = g.image()
    prim, sec, prim_events, sec_events = g.connect(resync_from=range(1, seq + 1))
    assert prim.state is PrimaryState.RESYNCING and prim.resync_base == seq
    assert prim_events == [PeerHello(prim.peer, full_sync=False)]
    assert sec.state is SecondaryState.RESYNCING and sec.consistent and not sec.outdated
    resync = prim.checkpoint(g.mem, changed, [Vcpu(0, 1, b"regs2"), write], now=2.0)
    data = prim.data_to_send()
    assert len(data) < full_bytes / 4
    sec.receive_data(data[:-8], 2.0)          # everything but the END's tail: staged only
    assert g.image() == before and sec.consistent and sec.has_checkpoint
    events = sec.receive_data(data[-8:], 2.0)
    assert [type(e) for e in events] == [Committed, SyncComplete]
    prim.receive_data(sec.data_to_send(), 2.0)
    assert prim.is_acked(resync) and prim.state is PrimaryState.PROTECTED
    assert sec.state is SecondaryState.PROTECTED
    g.assert_mirrored()


def test_resync_covers_a_checkpoint_the_secondary_never_received() -> None:
    g = Guest()
    prim, sec = g.full_sync()
    lost = g.dirty([20, 21])
    g.last_sent = prim.checkpoint(g.mem, lost, [g.write_disk(2)], now=1.0)
    prim.data_to_send()                        # never arrives
    sec.connection_lost()
    prim, sec, _, _ = g.connect(resync_from=range(g.acked, g.last_sent + 1))
    assert prim.resync_base == g.acked == 1
    # the driver resends the unacknowledged checkpoint's pages and sectors too
    prim.checkpoint(g.mem, sorted(set(lost) | set(g.dirty([30]))),
                    [Vcpu(0, 1, b"r"), DiskWrite(0, 2, bytes(g.disk[1024:1536]))], now=2.0)
    assert [type(e) for e in g.deliver(prim, sec)] == [Committed, SyncComplete]
    assert g.sink.checkpoint_seq == g.last_sent + 1
    g.assert_mirrored()


def test_a_torn_resync_keeps_the_previous_checkpoint_and_stays_consistent() -> None:
    g = Guest()
    g.full_sync()
    g.dirty([1, 2, 3])
    before = g.image()
    prim, sec, _, _ = g.connect(resync_from=[g.last_sent])
    prim.checkpoint(g.mem, [1, 2, 3], [Vcpu(0, 1, b"x")], now=1.0)
    data = prim.data_to_send()
    sec.receive_data(data[: len(data) // 2], 1.0)
    sec.connection_lost()
    assert g.image() == before and sec.consistent and sec.has_checkpoint


def test_full_sync_when_the_gap_cannot_be_bounded_says_why() -> None:
    g = Guest()
    g.full_sync()
    g.last_sent = 5                             # sent 2..5, tracked only since 4
    prim, sec, events, _ = g.connect(resync_from=range(4, 6))
    assert events == [PeerHello(prim.peer, full_sync=True)]
    assert prim.state is PrimaryState.SYNCING
    assert "holds checkpoint 1" in prim.full_sync_reason
    assert "since checkpoint 4" in prim.full_sync_reason
    assert not sec.consistent and sec.state is SecondaryState.SYNCING
    prim, _, _, _ = g.connect(resync_from=[1], has_checkpoint=False)
    assert prim.full_sync_reason == "the secondary holds no checkpoint"


def test_outdated_until_the_next_commit_when_the_primary_ran_unprotected() -> None:
    g = Guest()
    g.full_sync()
    g.dirty([8])
    prim, sec, _, _ = g.connect(resync_from=[1], unprotected=True)
    assert prim.state is PrimaryState.RESYNCING
    assert sec.outdated and sec.consistent
    prim.checkpoint(g.mem, [8], [Vcpu(0, 1, b"x")], now=1.0)
    g.deliver(prim, sec)
    assert not sec.outdated and sec.consistent


def test_a_newer_generation_makes_the_secondary_outdated_and_a_full_sync_inconsistent() -> None:
    sink = ImageSink(MEM)
    sec = Secondary(sink, name="kv1", memory_size=MEM, generation=1, checkpoint_seq=9,
                    has_checkpoint=True, now=0.0)
    assert sec.consistent and not sec.outdated
    sec.receive_data(encode(Hello("kv1", Role.PRIMARY, 2, 3, MEM, HelloFlag.FULL_SYNC)), 0.0)
    assert sec.outdated and not sec.consistent and not sec.has_checkpoint


@pytest.mark.parametrize("field", ["image", "disk_mode", "disk_size_mib"])
def test_a_config_mismatch_is_refused_at_hello_naming_the_field(field: str) -> None:
    g = Guest()
    other = dict(CONFIG, **{field: "something else"})
    with pytest.raises(HandshakeError, match=f"config mismatch in {field}"):
        g.connect(prim_config=other)
    sec = Secondary(g.sink, name="kv1", memory_size=MEM, generation=0, checkpoint_seq=0,
                    has_checkpoint=False, now=0.0, config=CONFIG)
    hello = Hello("kv1", Role.PRIMARY, 1, 0, MEM, HelloFlag.FULL_SYNC,
                  config=tuple(sorted(other.items())))
    with pytest.raises(HandshakeError, match=f"config mismatch in {field}"):
        sec.receive_data(encode(hello), 0.0)
    assert g.sink.commits == 0


def test_memory_size_mismatch_names_the_field() -> None:
    prim = Primary(name="kv1", memory_size=MEM * 2, generation=1, checkpoint_seq=0, now=0.0)
    sec = Secondary(ImageSink(MEM), name="kv1", memory_size=MEM, generation=0,
                    checkpoint_seq=0, has_checkpoint=False, now=0.0)
    with pytest.raises(HandshakeError, match="config mismatch in memory_size"):
        prim.receive_data(sec.data_to_send(), 0.0)


def test_a_version_1_secondary_gets_a_version_1_full_sync() -> None:
    prim = Primary(name="kv1", memory_size=MEM, generation=1, checkpoint_seq=4, now=0.0,
                   force_full_sync=True, config=CONFIG, resync_from=[4], unprotected=True)
    old = Hello("kv1", Role.SECONDARY, 1, 4, MEM, HelloFlag.HAVE_CHECKPOINT, version=1)
    prim.receive_data(encode(old), 0.0)
    (reply,) = Decoder().feed(prim.data_to_send())
    assert reply.version == 1 and reply.flags == HelloFlag.FULL_SYNC and reply.config == ()
    assert "version 1" in prim.full_sync_reason


def test_the_secondary_refuses_a_resync_of_a_state_it_does_not_hold() -> None:
    sec = Secondary(ImageSink(MEM), name="kv1", memory_size=MEM, generation=1,
                    checkpoint_seq=3, has_checkpoint=False, now=0.0)
    with pytest.raises(HandshakeError, match="holds no checkpoint"):
        sec.receive_data(encode(Hello("kv1", Role.PRIMARY, 1, 3, MEM, HelloFlag.RESYNC)), 0.0)


cuts = st.lists(st.tuples(st.lists(st.integers(0, NPAGES - 1), max_size=12),
                          st.sampled_from(["acked", "ack-lost", "checkpoint-lost"]),
                          st.lists(st.integers(0, NPAGES - 1), max_size=12)),
                min_size=1, max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts)
def test_any_sequence_of_link_cuts_ends_with_an_exact_mirror(plan) -> None:
    """Whatever the link loses (a checkpoint, an ACK), a resync built the way the
    Protector builds it (dirty since the last harvest + every unacknowledged
    checkpoint's pages) leaves the secondary equal to the primary."""
    g = Guest()
    prim, sec = g.full_sync()
    unacked: set[int] = set()
    for before_cut, what, while_down in plan:
        pfns = g.dirty(before_cut)
        g.last_sent = prim.checkpoint(g.mem, pfns, [Vcpu(0, 1, b"r")], now=1.0)
        unacked |= set(pfns)
        data = prim.data_to_send()
        if what != "checkpoint-lost":
            sec.receive_data(data, 1.0)
            if what == "acked":
                prim.receive_data(sec.data_to_send(), 1.0)
                g.acked, unacked = g.last_sent, set()
        sec.connection_lost()
        gap = set(g.dirty(while_down))
        prim, sec, _, _ = g.connect(resync_from=range(g.acked, g.last_sent + 1))
        assert prim.state is PrimaryState.RESYNCING
        seq = prim.checkpoint(g.mem, sorted(gap | unacked), [Vcpu(0, 1, b"r")], now=2.0)
        g.deliver(prim, sec)
        assert prim.is_acked(seq)
        g.last_sent = g.acked = seq
        unacked = set()
        assert bytes(g.sink.memory) == bytes(g.mem)
