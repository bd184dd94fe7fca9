"""The primary's one-call checkpoint (native/fastpath.c, ft/fast_checkpoint.py)
on a real vCPU: it writes, seals and sends the bytes Primary.checkpoint
writes for the same pages and vCPU blob, and the secondary's image follows
the guest, through rekeys, short writes, checkpoints too big for it and
the vCPU stopped at an `out` or not."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest
from helpers import TESTGUEST

from kemari_agent.ft.fast_checkpoint import ONE_CALL_MOMENTS, FastCheckpoint
from kemari_agent.ft.link import Link
from kemari_agent.ft.protector import VCPU_FAST, VCPU_FULL
from kemari_agent.kvm.boot import BootInfo, boot
from kemari_agent.kvm.machine import EXIT_IO, PAGE_SIZE, Machine
from kemari_agent.replication.codec import Vcpu
from kemari_agent.replication.frames import Opener, Sealer
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.primary import Primary, PrimaryState
from kemari_agent.replication.secondary import Secondary
from kemari_agent.replication.transport import Channel
from kemari_agent.stages import StageLog

pytestmark = pytest.mark.kvm

MEM = 8 << 20
SECRET = bytes(range(32))
MAX_PAGES = 24          # the test's bound: a few checkpoints go the step-by-step way
# Pages the test writes as a VMM would: above the guest's image (1 MiB), below
# its stack (the top of RAM)
VMM_PAGES = range(512, 1536)
PORT_STEP = 0x600       # the testguest's `out`s


class Session:
    """A Primary and a Secondary (ImageSink) in sync with `machine`'s memory."""

    def __init__(self, machine: Machine, full_vcpu: bytes) -> None:
        self.sink = ImageSink(MEM)
        self.secondary = Secondary(self.sink, name="t", memory_size=MEM, generation=0,
                                   checkpoint_seq=0, has_checkpoint=False, now=0.0)
        self.primary = Primary(name="t", memory_size=MEM, generation=1, checkpoint_seq=0,
                               now=0.0, delta_cache_pages=64)
        self.primary.receive_data(self.secondary.data_to_send(), 0.0)
        self.primary.sync_pages(machine.mem, range(MEM // PAGE_SIZE), now=0.0)
        self.primary.end_sync_round(0, now=0.0)
        self.primary.checkpoint(machine.mem, [], [Vcpu(0, VCPU_FULL, full_vcpu)], now=0.0)
        self.deliver(self.primary.data_to_send())
        assert self.primary.state is PrimaryState.PROTECTED

    def deliver(self, data: bytes) -> None:
        self.secondary.receive_data(data, 0.0)
        self.primary.receive_data(self.secondary.data_to_send(), 0.0)


class Wire:
    """A loopback TCP connection with small buffers (the C write comes up short)
    whose far end a thread reads into an Opener."""

    def __init__(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            self.near = socket.create_connection(server.getsockname())
            self.far, _ = server.accept()
        self.near.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as transport's
        self.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        self.far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.opener = Opener(SECRET, rekey_bytes=100_000)
        self.opened: list[bytes] = []
        self.lock = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while n := self.far.recv_into(self.opener.space()):
            self.opener.filled(n)
            with self.lock:
                self.opened += self.opener.take()
                self.lock.notify_all()

    def take(self, size: int) -> bytes:
        """`size` bytes of plaintext, once they have arrived."""
        with self.lock:
            assert self.lock.wait_for(lambda: sum(map(len, self.opened)) >= size, timeout=10)
            data = b"".join(self.opened)
            assert len(data) == size
            self.opened.clear()
        return data

    def close(self) -> None:
        self.near.close()
        self.reader.join(timeout=5)
        self.far.close()


def run_to_an_out(machine: Machine, rng: random.Random) -> None:
    """Run the guest on to one of its `out`s (it writes its stack and counters
    meanwhile), and sometimes complete that `out` as the step-by-step path may."""
    for _ in range(rng.randint(1, 3)):
        assert machine.run().reason == EXIT_IO
    if rng.random() < 0.3:
        machine.complete_pending()


def tapped_run(fast: FastCheckpoint, machine: Machine, coin: random.Random, trace):
    """Run the guest to its next `out` with the run armed; the checkpoint it
    took there (its Done), or None when the run was not to take one: armed for
    another port, or with a full vCPU blob due (then checkpoint() goes on)."""
    choice = coin.random()
    ports, until = (PORT_STEP, 0), time.monotonic() + 60
    if choice < 0.15:
        ports = (0x999, 0)
    elif choice < 0.3:
        until = time.monotonic() - 1
    for _ in range(coin.randint(0, 2)):
        assert machine.run().reason == EXIT_IO
    ex, plan = fast.run(ports, until, trace is not None)
    assert (ex.reason, ex.io_port) == (EXIT_IO, PORT_STEP)
    if choice < 0.3:
        assert plan is None
        return None
    assert plan is not None and abs(fast.tapped_at - time.monotonic()) < 5
    return fast.tapped(plan, 0.0, trace)


def test_one_call_checkpoints_are_primary_checkpoints_bytes() -> None:
    rng = random.Random(7)
    coin = random.Random(8)          # its own: the checkpoints' draws stay the same
    wire = Wire()
    with Machine(MEM) as machine:
        boot(machine, TESTGUEST.read_bytes(), BootInfo(args=(1, 10**9, 2000)))
        machine.start_dirty_tracking()
        machine.harvest_dirty()
        full = machine.get_vcpu_state()
        fast_side, reference = Session(machine, full), Session(machine, full)
        channel = Channel(wire.near, 10.0, sealer=Sealer(SECRET, rekey_bytes=100_000))
        fast = FastCheckpoint(machine, Link(channel, fast_side.primary, 10.0), VCPU_FAST,
                              max_pages=MAX_PAGES)
        went = {"one call": 0, "by steps": 0, "traced": 0, "in the run": 0}
        try:
            for _ in range(90):
                # the checkpoint taken in the vCPU's run call at the guest's `out`
                # (FastCheckpoint.run), or from the tap hook after it (checkpoint())
                in_the_run = coin.random() < 0.5
                if not in_the_run:
                    run_to_an_out(machine, rng)
                for _ in range(rng.choice([0, 0, 1, 5, 20, 40])):   # and some pages the VMM writes
                    page = rng.randrange(VMM_PAGES.start, VMM_PAGES.stop)
                    size = rng.choice([8, 64, PAGE_SIZE])
                    machine.write(page * PAGE_SIZE + rng.randrange(PAGE_SIZE - size + 1),
                                  rng.randbytes(size))
                trace = StageLog() if coin.random() < 0.5 else None
                if trace is not None:
                    trace.mark("start")
                if in_the_run:
                    done = tapped_run(fast, machine, coin, trace)
                    went["in the run"] += done is not None
                if not in_the_run or done is None:
                    done = fast.checkpoint(0.0, trace)
                assert done is not None and done.failed is None
                if trace is not None and "c_entered" in trace.pending:   # sent: the steps' moments
                    went["traced"] += 1
                    moments = [trace.pending[name] for name in
                               ("start", *ONE_CALL_MOMENTS, "sent")]
                    assert moments == sorted(moments), moments
                if done.seq is None:         # too big: the protector's way
                    went["by steps"] += 1
                    pfns, records = done.pfns, [Vcpu(0, VCPU_FAST, done.vcpu)]
                    fast.gave_way()
                    fast_side.primary.checkpoint(machine.mem, pfns, records, now=0.0)
                    sent = fast_side.primary.data_to_send()
                else:
                    went["one call"] += 1
                    pfns, records = fast.harvested(), [Vcpu(0, VCPU_FAST, fast.last_blob())]
                    assert fast.pages == len(pfns)
                    sent = wire.take(fast_side.primary.bytes_sent - reference.primary.bytes_sent)
                reference.primary.checkpoint(machine.mem, pfns, records, now=0.0)
                expected = reference.primary.data_to_send()
                assert sent == expected
                fast_side.deliver(sent)
                reference.deliver(expected)
                assert fast_side.primary.is_acked(fast_side.primary.last_sent)
                assert bytes(fast_side.sink.memory) == bytes(machine.mem)
                assert fast_side.sink.vcpus == reference.sink.vcpus
            # the statistics, split between the two paths' counters, add up
            one_call = fast.stats()
            pages = {k: fast_side.primary.delta_cache.stats[k] + one_call[k]
                     for k in ("xor_pages", "xor_bytes", "plain_pages", "unchanged_pages")}
            assert pages == {k: reference.primary.delta_cache.stats[k] for k in pages}
            blobs = fast_side.primary.blob_bases.stats
            assert (blobs["xor_blobs"] + one_call["xor_blobs"],
                    blobs["xor_bytes"] + one_call["xor_blob_bytes"]) == \
                tuple(reference.primary.blob_bases.stats.values())
        finally:
            wire.close()
    assert went["one call"] >= 45 and went["by steps"] >= 3 and went["traced"] >= 10, went
    assert went["in the run"] >= 20, went
