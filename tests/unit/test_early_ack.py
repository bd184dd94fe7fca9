"""The secondary's early ACK: a checkpoint the C reader verified is acknowledged
before it is applied, so the primary's wake-up overlaps the apply; never where
the commit must be made durable first (tests/unit/test_link.py: a failed early
send)."""

from __future__ import annotations

import pytest
from test_replication_session import PAGE_SIZE, Pair, protected_pair

from kemari_agent.replication import native_codec
from kemari_agent.replication.codec import DiskWrite, Vcpu
from kemari_agent.replication.events import Acked, Committed

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _c_reader() -> None:
    # The early ACK belongs to the C reader's path: without it these prove nothing.
    assert native_codec.ENABLED and native_codec.CHECKPOINT_READER, "native codec not built"


def watch_early(pair: Pair, pfn: int) -> list[tuple[bytes, int, bytes]]:
    """Each early send, with what the sink held at that moment: its last
    commit and page `pfn`."""
    seen: list[tuple[bytes, int, bytes]] = []
    sink = pair.sink
    pair.secondary.send_early = lambda data: seen.append(
        (data, sink.checkpoint_seq, bytes(sink.memory[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE])))
    return seen


def test_the_ack_leaves_before_the_checkpoint_is_applied() -> None:
    pair = protected_pair(delta_cache_pages=64)
    seen = watch_early(pair, 3)
    before = bytes(pair.sink.memory[3 * PAGE_SIZE:4 * PAGE_SIZE])
    seq = pair.primary.checkpoint(pair.mem, pair.dirty(3), [Vcpu(0, 2, b"regs1")], now=0.0)
    events = pair.to_secondary()
    assert [type(ev) for ev in events] == [Committed]
    [(ack, committed_then, page_then)] = seen
    assert committed_then == seq - 1 and page_then == before    # not applied yet
    assert pair.secondary.data_to_send() == b""                  # one ACK, not two
    assert [type(ev) for ev in pair.primary.receive_data(ack, 0.0)] == [Acked]
    assert pair.primary.is_acked(seq)
    assert pair.sink.checkpoint_seq == seq and pair.sink.vcpus[0] == (2, b"regs1")
    pair.assert_mirrors_primary()


def test_each_checkpoint_of_one_read_gets_its_own_early_ack() -> None:
    pair = protected_pair(delta_cache_pages=64, max_outstanding=3)
    seen = watch_early(pair, 5)
    seqs = [pair.primary.checkpoint(pair.mem, pair.dirty(5), [Vcpu(0, 2, bytes([i]))], now=0.0)
            for i in range(3)]
    assert [ev.seq for ev in pair.to_secondary()] == seqs
    assert [committed for _ack, committed, _page in seen] == [s - 1 for s in seqs]
    for ack, _committed, _page in seen:
        pair.primary.receive_data(ack, 0.0)
    assert all(pair.primary.is_acked(s) for s in seqs)
    pair.assert_mirrors_primary()


def test_the_commit_that_ends_a_full_sync_waits_for_its_record() -> None:
    # Ending a sync makes the node promotable: recorded durably before any ACK.
    pair = Pair(delta_cache_pages=64)
    seen = watch_early(pair, 0)
    pair.full_sync()
    assert seen == []
    pair.primary.checkpoint(pair.mem, pair.dirty(0), [Vcpu(0, 2, b"r")], now=0.0)
    pair.to_secondary()
    assert len(seen) == 1


def test_a_checkpoint_the_c_reader_does_not_take_is_acked_after_it_is_applied() -> None:
    pair = protected_pair(delta_cache_pages=64)
    seen = watch_early(pair, 2)
    seq = pair.primary.checkpoint(pair.mem, pair.dirty(2),
                                  [Vcpu(0, 2, b"r"), DiskWrite(0, 1, bytes(range(256)) * 2)],
                                  now=0.0)
    assert [ev.seq for ev in pair.to_secondary()] == [seq]
    assert seen == []
    assert [type(ev) for ev in pair.to_primary()] == [Acked]
    assert bytes(pair.sink.disks[0][512:1024]) == bytes(range(256)) * 2
