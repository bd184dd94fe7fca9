"""The one-call reads (ft/fast_receive.py, native/fastreceive.c) against the
Python path, over a real TLS connection with frames both ways. The
secondary's: the same commits, the same image and the same ACKs as a
reference Secondary fed the same bytes through receive_data, whatever mix of
checkpoints it is sent and wherever the keys change; a changed frame applies
nothing. The primary's: every ACK taken, among heartbeats and key changes, a
timeout that returns nothing, and a changed ACK that ends the session."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from kemari_agent._native import lib
from test_replication_session import DISK, MEM, protected_pair

from kemari_agent import stages
from kemari_agent.ft.fast_receive import ACK_MOMENTS, FastAck, FastReceive
from kemari_agent.ft.link import Link, SessionLost
from kemari_agent.replication import frames, keys, native_codec, transport
from kemari_agent.replication.codec import DiskWrite, Vcpu, encode_ack
from kemari_agent.replication.events import Acked, Committed
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.secondary import Secondary

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _c_reader() -> None:
    assert native_codec.ENABLED and native_codec.CHECKPOINT_READER, "native codec not built"


def tls_pair(key: Path) -> tuple[transport.Channel, transport.Channel]:
    """(the primary's, the secondary's) ends of one authenticated connection."""
    listener = transport.listen(str(key))
    got: list[transport.Channel] = []
    thread = threading.Thread(target=lambda: got.append(listener.accept(timeout=10)))
    thread.start()
    client = transport.connect(str(key), *listener.address, timeout=5)
    thread.join(10)
    listener.close()
    return client, got[0]


def rekeyed(client: transport.Channel, server: transport.Channel, rekey_bytes: int,
            ack_rekey_bytes: int) -> tuple[transport.Channel, transport.Channel]:
    """The same sockets with frames both ways that change keys every
    `rekey_bytes` (the primary's) and `ack_rekey_bytes` (the secondary's)."""
    secret = bytes(range(32))
    ours = transport.Channel(client._sock, 5.0,
                             sealer=frames.Sealer(secret, rekey_bytes=rekey_bytes),
                             opener=frames.Opener(secret, label=frames.SECONDARY_KEYS,
                                                  rekey_bytes=ack_rekey_bytes))
    theirs = transport.Channel(server._sock, 5.0,
                               sealer=frames.Sealer(secret, label=frames.SECONDARY_KEYS,
                                                    rekey_bytes=ack_rekey_bytes),
                               opener=frames.Opener(secret, rekey_bytes=rekey_bytes))
    return ours, theirs


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "vm.key"
    keys.keygen(path)
    return path


class Bench:
    """A protected pair whose secondary reads through a Link with one-call
    reads, and a reference Secondary fed the primary's bytes directly."""

    def __init__(self, key: Path, rekey_bytes: int | None = None,
                 ack_rekey_bytes: int = 24 * 7) -> None:
        self.pair = protected_pair(delta_cache_pages=64, max_outstanding=4)
        self.ref_sink = ImageSink(MEM, disks={0: bytearray(DISK)})
        self.ref = Secondary(self.ref_sink, name="kv1", memory_size=MEM, generation=0,
                             checkpoint_seq=0, has_checkpoint=False, now=0.0)
        self.ref_acks: list[bytes] = []
        self.ref.send_early = self.ref_acks.append
        self.ref.receive_data(b"".join(self.pair.wire), 0.0)
        self.ref.data_to_send()
        client, server = tls_pair(key)
        if rekey_bytes is not None:
            client, server = rekeyed(client, server, rekey_bytes, ack_rekey_bytes)
        self.primary_end = client
        self.link = Link(server, self.pair.secondary, 5.0)
        self.pair.secondary.send_early = self.link.send_early
        self.fast = FastReceive.for_link(self.link)
        assert self.fast is not None
        self.link.fast_receive = self.fast
        self.committed: list[Committed] = []
        self.waited_reads = 0
        self.coin = random.Random(7)       # its own: the checkpoints' draws stay the same
        self.ref_committed: list[Committed] = []
        self.acks = b""

    def checkpoint(self, pfns: list[int], *, disk: bool = False) -> bytes:
        """A checkpoint's bytes, also given to the reference."""
        pair = self.pair
        records = [Vcpu(0, 2, random.randbytes(64))]
        if disk:
            records.append(DiskWrite(0, random.randrange(8), random.randbytes(512)))
        pair.primary.checkpoint(pair.mem, pair.dirty(*pfns), records, now=0.0)
        data = pair.primary.data_to_send()
        self.ref_committed += [ev for ev in self.ref.receive_data(data, 0.0)
                               if isinstance(ev, Committed)]
        self.ref_acks.append(self.ref.data_to_send())
        return data

    def receive_until(self, count: int) -> None:
        """The secondary reads until it has committed `count` in all: half of
        the reads after the daemon's wait in the same call (FastReceive.wait)."""
        deadline = time.monotonic() + 10
        while len(self.committed) < count:
            assert time.monotonic() < deadline
            self.committed += [ev for ev in self.read() if isinstance(ev, Committed)]

    def read(self) -> list:
        waited = self.fast.wait(self.link, [], [], 0.5) if self.coin.random() < 0.5 else None
        if waited is None:
            return self.link.read()
        if waited.outcome is not None:
            self.waited_reads += 1
            return self.link.read(waited=waited.outcome)
        return self.link.read() if self.link.fileno() in waited.readable else []

    def take_acks(self) -> None:
        """The ACKs the reference sent so far, as many bytes from the secondary,
        handed to the primary."""
        want = len(b"".join(self.ref_acks))
        deadline = time.monotonic() + 10
        while len(self.acks) < want:
            assert time.monotonic() < deadline
            new = self.primary_end.recv_some()
            self.acks += new
            self.pair.primary.receive_data(new, 0.0)

    def close(self) -> None:
        self.link.close()
        self.primary_end.close()


# with keys changed every few checkpoints, and every few ACKs
@pytest.mark.parametrize("rekey_bytes", [None, 30000])
def test_one_call_reads_commit_and_ack_what_the_python_path_does(
        key: Path, rekey_bytes: int | None) -> None:
    random.seed(rekey_bytes)
    bench = Bench(key, rekey_bytes)
    pair, send = bench.pair, bench.primary_end
    try:
        for _ in range(150):
            how = random.choice(["one", "one", "pages", "two frames", "one frame", "disk",
                                 "trickle"])
            pfns = random.sample(range(1, 64), 1 if how == "one" else random.randint(2, 12))
            if how in ("two frames", "one frame"):
                first, second = bench.checkpoint(pfns), bench.checkpoint(pfns[:1])
                if how == "one frame":            # two checkpoints in one frame
                    send.send_all(first + second)
                else:                              # two frames, likely in one read
                    send.send_all(first)
                    send.send_all(second)
            elif how == "trickle":                # a frame in two parts, apart
                data = bench.checkpoint(pfns)
                frame = bytes(next(send._sealer.seal(data)))
                socket.socket.sendall(send._sock, frame[:9])
                threading.Timer(0.02, socket.socket.sendall, (send._sock, frame[9:])).start()
            else:
                send.send_all(bench.checkpoint(pfns, disk=how == "disk"))
            bench.receive_until(len(bench.ref_committed))
            bench.take_acks()
        assert bench.committed == bench.ref_committed
        assert bench.acks == b"".join(bench.ref_acks)
        assert bytes(pair.sink.memory) == bytes(bench.ref_sink.memory) == bytes(pair.mem)
        assert pair.sink.vcpus == bench.ref_sink.vcpus
        assert bytes(pair.sink.disks[0]) == bytes(bench.ref_sink.disks[0])
        outcomes = bench.fast.outcomes
        assert bench.fast.reads >= 60
        assert bench.waited_reads >= 30
        assert outcomes.get(lib.KFAST_RX_OPENED, 0) >= 10     # disk writes, joined checkpoints
        assert outcomes.get(lib.KFAST_RX_NO_FRAME, 0) >= 5    # the trickled frames
        assert outcomes.get(("ack", lib.KFAST_ACK_SENT), 0) >= 50
        if rekey_bytes is not None:
            assert outcomes.get(lib.KFAST_RX_REFUSED, 0) >= 5   # a key change due
            assert outcomes.get(("ack", lib.KFAST_ACK_REKEY), 0) >= 5
    finally:
        bench.close()


@pytest.mark.parametrize("after_a_good_one", [False, True])
def test_a_changed_frame_ends_the_session_and_applies_nothing(
        key: Path, after_a_good_one: bool) -> None:
    bench = Bench(key)
    pair, send = bench.pair, bench.primary_end
    try:
        good = bench.checkpoint([3]) if after_a_good_one else b""
        held = (bytes(pair.sink.memory), pair.secondary.checkpoint_seq) if not good else None
        pair.primary.checkpoint(pair.mem, pair.dirty(4), [Vcpu(0, 2, b"x" * 64)], now=0.0)
        frames_out = [bytes(f) for data in (good, pair.primary.data_to_send()) if data
                      for f in send._sealer.seal(data)]
        bad = bytearray(frames_out[-1])
        bad[len(bad) // 2] ^= 0x01
        socket.socket.sendall(send._sock, b"".join(frames_out[:-1]) + bytes(bad))
        with pytest.raises(SessionLost, match="authentication"):
            for _ in range(3):
                bench.committed += [ev for ev in bench.read() if isinstance(ev, Committed)]
        if after_a_good_one:     # the good one committed, and acknowledged
            assert pair.secondary.checkpoint_seq == bench.ref_committed[-1].seq
            bench.take_acks()
            assert bench.acks == b"".join(bench.ref_acks)
            held = (bytes(bench.ref_sink.memory), bench.ref.checkpoint_seq)
        assert (bytes(pair.sink.memory), pair.secondary.checkpoint_seq) == held
        assert bytes(pair.sink.memory[4 * 4096:5 * 4096]) != bytes(pair.mem[4 * 4096:5 * 4096])
    finally:
        bench.close()


def test_the_secondary_waits_for_any_of_its_fds_in_the_same_call(key: Path) -> None:
    """FastReceive.wait: select()'s answer when the stream does not wake it."""
    bench = Bench(key)
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        started = time.monotonic()        # nothing comes: nothing, in time
        waited = bench.fast.wait(bench.link, [r], [], 0.2)
        assert (waited.readable, waited.writable, waited.outcome) == ([], [], None)
        assert 0.15 < time.monotonic() - started < 2.0
        os.write(w, b"!")                  # another fd wakes it; one for output is ready
        waited = bench.fast.wait(bench.link, [r], [other_w], 5.0)
        assert (waited.readable, waited.writable, waited.outcome) == ([r], [other_w], None)
        assert abs(waited.woke_ns - time.monotonic_ns()) < 1e9
        os.read(r, 1)
        bench.fast._r.timed = True        # as KEMARI_STAGES=1 sets it
        bench.primary_end.send_all(bench.checkpoint([5]))    # the stream: read at once
        waited = bench.fast.wait(bench.link, [r], [], 5.0)
        assert waited.readable == [bench.link.fileno()] and waited.outcome is not None
        entered, read, opened, sealed = bench.fast._r.moments
        assert bench.fast._r.ack_result == lib.KFAST_ACK_SENT     # the ACK left in the call
        moments = [waited.woke_ns, entered, read, opened, bench.fast._r.taken_ns, sealed]
        assert moments == sorted(moments)       # ... taken, then the ACK sealed
        events = bench.link.read(waited=waited.outcome)
        assert [ev for ev in events if isinstance(ev, Committed)] == bench.ref_committed
        bench.take_acks()
        assert bench.acks == b"".join(bench.ref_acks)
    finally:
        for fd in (r, w, other_r, other_w):
            os.close(fd)
        bench.close()


@pytest.mark.parametrize("ack_rekey_bytes", [1 << 30, 24 * 5])
def test_the_primary_takes_each_ack_in_one_call(key: Path, ack_rekey_bytes: int) -> None:
    bench = Bench(key, rekey_bytes=1 << 30, ack_rekey_bytes=ack_rekey_bytes)
    pair, send = bench.pair, bench.primary_end
    link = Link(send, pair.primary, 5.0)
    fast = FastAck.for_link(link)
    assert fast is not None
    link.fast_receive = fast
    acked: list[int] = []
    try:
        for i in range(60):
            if i % 6 == 3:          # a heartbeat ahead of the ACK: not one ACK alone
                pair.secondary.poll(1000.0 + i)
                bench.link.flush()
            send.send_all(bench.checkpoint([1 + i % 50]))
            bench.receive_until(len(bench.ref_committed))
            deadline = time.monotonic() + 10
            while pair.primary.outstanding:
                assert time.monotonic() < deadline
                acked += [ev.seq for ev in link.read() if isinstance(ev, Acked)]
        assert acked == [ev.seq for ev in bench.ref_committed[-60:]]
        outcomes = fast.outcomes
        assert fast.reads >= (45 if ack_rekey_bytes > 1000 else 30)
        assert outcomes.get(lib.KFAST_WAIT_OPENED, 0) >= 8          # the heartbeats
        if ack_rekey_bytes < 1000:
            assert outcomes.get(lib.KFAST_WAIT_REFUSED, 0) >= 8     # a key change due
        send.settimeout(0.2)                      # nothing comes: nothing, in time
        started = time.monotonic()
        assert link.read() == []
        assert 0.15 < time.monotonic() - started < 2.0
        assert outcomes[lib.KFAST_WAIT_TIMED_OUT] >= 1
        send.settimeout(5.0)
        # a changed ACK ends the session, and acknowledges nothing
        seq = pair.primary.checkpoint(pair.mem, pair.dirty(2), [Vcpu(0, 2, b"v" * 64)], now=0.0)
        send.send_all(pair.primary.data_to_send())
        frame = bytearray(next(bench.link.channel._sealer.seal(encode_ack(seq, 1))))
        frame[-3] ^= 0x10
        socket.socket.sendall(bench.link.channel._sock, bytes(frame))
        with pytest.raises(SessionLost, match="authentication"):
            link.read()
        assert not pair.primary.is_acked(seq)
    finally:
        bench.close()


def test_the_primary_spins_for_its_ack_in_the_call(key: Path) -> None:
    """replication.ack_poll_us: the one call reads again, yielding, before it
    sleeps, and the spin neither loses the ACK nor outlasts the timeout."""
    bench = Bench(key, rekey_bytes=1 << 30, ack_rekey_bytes=1 << 30)
    pair, send = bench.pair, bench.primary_end
    link = Link(send, pair.primary, 5.0, ack_poll_s=0.05)
    fast = FastAck.for_link(link)
    link.fast_receive = fast
    link._spin = None                 # the Python spin must not run: the call spins
    try:
        for i in range(5):
            send.send_all(bench.checkpoint([1 + i]))
            late = threading.Timer(0.02, bench.receive_until, [len(bench.ref_committed)])
            late.start()              # the ACK comes 20 ms later, within the spin
            spins = fast._a.spins
            link.wait_for(lambda: not pair.primary.outstanding, 5.0)
            late.join()
            assert fast._a.spins > spins
        assert fast.reads == 5
        send.settimeout(0.2)          # nothing comes: the spin ends, then poll() times out
        spins, started = fast._a.spins, time.monotonic()
        assert link.read() == []
        assert 0.15 < time.monotonic() - started < 2.0
        assert fast._a.spins > spins
    finally:
        bench.close()


def test_the_primary_notes_the_moments_of_its_ack(key: Path, monkeypatch) -> None:
    """KEMARI_STAGES=1: the call's moments are those of the read the ACK's
    arrival let begin, not of the call's start, and come in order."""
    monkeypatch.setattr(stages, "ENABLED", True)
    bench = Bench(key, rekey_bytes=1 << 30, ack_rekey_bytes=1 << 30)
    pair, send = bench.pair, bench.primary_end
    link = Link(send, pair.primary, 5.0)
    fast = link.fast_receive = FastAck.for_link(link)
    assert fast._a.timed
    sent: list[int] = []

    def ack_late() -> None:
        sent.append(time.monotonic_ns())
        bench.receive_until(len(bench.ref_committed))

    try:
        send.send_all(bench.checkpoint([1]))
        late = threading.Timer(0.05, ack_late)
        late.start()
        waited_from = time.monotonic_ns()
        link.wait_for(lambda: not pair.primary.outstanding, 5.0)
        late.join()
        woke, read, opened = (link.moments[name] for name in ACK_MOMENTS)
        assert waited_from < sent[0] < woke <= read <= opened <= link.recv_ns
    finally:
        bench.close()


def test_the_secondary_spins_for_its_stream_in_the_call(key: Path) -> None:
    """replication.receive_poll_us: wait() polls again, yielding, before it
    sleeps; what comes meanwhile is read as at once, and the spin neither
    outlasts the timeout nor runs without one asked for."""
    bench = Bench(key)
    r, w = os.pipe()
    try:
        bench.fast.wait(bench.link, [r], [], 0.05)
        assert bench.fast.spins == 0                 # off unless asked for
        bench.fast.spin_us = 50_000
        started = time.monotonic()        # nothing comes: the spin ends within the timeout
        waited = bench.fast.wait(bench.link, [r], [], 0.02)
        assert waited.outcome is None and waited.readable == []
        assert time.monotonic() - started < 0.045 and bench.fast.spins > 0
        for i in range(5):                # the checkpoint comes 10 ms later, within the spin
            spins = bench.fast.spins
            late = threading.Timer(0.01, lambda i=i: bench.primary_end.send_all(
                bench.checkpoint([3 + i])))
            late.start()
            waited = bench.fast.wait(bench.link, [r], [], 5.0)
            late.join()
            assert waited.outcome is not None and bench.fast.spins > spins
            bench.committed += [ev for ev in bench.link.read(waited=waited.outcome)
                                if isinstance(ev, Committed)]
            bench.take_acks()
        assert bench.committed == bench.ref_committed
        os.write(w, b"!")                  # another fd: still select()'s answer
        waited = bench.fast.wait(bench.link, [r], [], 5.0)
        assert (waited.readable, waited.outcome) == ([r], None)
    finally:
        for fd in (r, w):
            os.close(fd)
        bench.close()
