"""TLS transport over real loopback TCP: only holders of the key file get a channel,
and a primary and secondary exchange a full sync, a checkpoint and its ACK."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kemari_agent.replication import frames, keys, transport
from kemari_agent.replication.codec import (
    PAGE_SIZE,
    Hello,
    HelloFlag,
    Role,
    Vcpu,
    encode,
    encode_error,
)
from kemari_agent.replication.errors import (
    AuthenticationError,
    PeerError,
    StreamError,
    UnsupportedVersion,
)
from kemari_agent.replication.events import Acked, Committed, Discarded, SyncComplete
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.primary import Primary
from kemari_agent.replication.secondary import Secondary

pytestmark = pytest.mark.unit

MEM = 256 * PAGE_SIZE


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    keys.keygen(d / "vm.key")
    keys.keygen(d / "other.key")
    pem = (d / "vm.key").read_bytes()
    (d / "vm.crt").write_bytes(pem[pem.index(b"-----BEGIN CERTIFICATE"):])
    return d


class Server:
    """Runs `accept` (and then `then(channel)`) in a thread; keeps result or exception."""

    def __init__(self, key: Path, then: Callable[[transport.Channel], Any] | None = None,
                 **accept_kw: Any) -> None:
        self.listener = transport.listen(str(key))
        self.address = self.listener.address
        self.result: Any = None
        self.error: BaseException | None = None
        self.received = b""

        def run() -> None:
            try:
                ch = self.listener.accept(timeout=10, **accept_kw)
                with ch:
                    self.result = then(ch) if then else ch
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()
        self.listener.close()


def test_keygen_writes_one_private_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "kv1.key"
    keys.keygen(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    pem = path.read_bytes()
    assert pem.count(b"-----BEGIN PRIVATE KEY-----") == 1
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 1
    with pytest.raises(FileExistsError):
        keys.keygen(path)
    assert path.read_bytes() == pem
    keys.keygen(path, overwrite=True)
    assert path.read_bytes() != pem
    assert os.listdir(path.parent) == ["kv1.key"]


def test_key_file_checks_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "k"
    keys.keygen(path)
    os.chmod(path, 0o644)
    with pytest.raises(keys.KeyFileError, match="too open"):
        transport.listen(str(path))
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(keys.KeyFileError, match="not a Kemari key file"):
        transport.connect(str(path), "127.0.0.1", 1)
    with pytest.raises(keys.KeyFileError, match="cannot read"):
        keys.check_key_file(tmp_path / "missing")


def test_client_with_another_key_is_refused(keydir: Path) -> None:
    server = Server(keydir / "vm.key")
    with pytest.raises(AuthenticationError):
        transport.connect(str(keydir / "other.key"), *server.address)
    server.join()
    assert isinstance(server.error, AuthenticationError)


def test_client_that_trusts_the_server_but_lacks_the_key_is_refused(keydir: Path) -> None:
    """An attacker with the (public) certificate but another private key."""
    server = Server(keydir / "vm.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(keydir / "vm.crt"))
    ctx.load_cert_chain(str(keydir / "other.key"))
    with socket.create_connection(server.address, timeout=5) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError)):
        tls = ctx.wrap_socket(raw)
        tls.sendall(encode(Hello("kv1", Role.PRIMARY, 9, 0, MEM, HelloFlag.FULL_SYNC)))
        data = tls.recv(100)  # no byte of the stream: an alert, or a plain close
        raise ConnectionError(f"closed after {data!r}")
    server.join()
    assert isinstance(server.error, AuthenticationError)
    assert "certificate" in str(server.error).lower() or "unknown ca" in str(server.error)


def test_server_with_another_key_is_refused(keydir: Path) -> None:
    server = Server(keydir / "other.key")
    with pytest.raises(AuthenticationError, match="certificate verify failed"):
        transport.connect(str(keydir / "vm.key"), *server.address)
    server.join()
    assert isinstance(server.error, AuthenticationError)


def test_plain_tcp_client_sending_garbage_never_gets_a_channel(keydir: Path) -> None:
    server = Server(keydir / "vm.key")
    reply = b""
    with socket.create_connection(server.address, timeout=5) as raw:
        try:  # the server may hang up before all of it is sent
            raw.sendall(encode(Hello("kv1", Role.PRIMARY, 9, 0, MEM, HelloFlag.FULL_SYNC)))
            raw.sendall(os.urandom(4096))
            while chunk := raw.recv(4096):
                reply += chunk
        except ConnectionError:
            pass
    server.join()
    assert isinstance(server.error, AuthenticationError)
    assert b"KEMARIRS" not in reply  # at most a TLS alert came back


def test_silent_client_times_out_in_the_handshake(keydir: Path) -> None:
    server = Server(keydir / "vm.key", handshake_timeout=0.3)
    with socket.create_connection(server.address, timeout=5):
        server.join()
    assert isinstance(server.error, transport.TransportTimeout)


def _run_secondary(sink: ImageSink) -> Callable[[transport.Channel], list]:
    def run(ch: transport.Channel) -> list:
        sec = Secondary(sink, name="kv1", memory_size=MEM, generation=0, checkpoint_seq=0,
                        has_checkpoint=False, now=time.monotonic())
        events: list = []
        ch.send_all(sec.data_to_send())
        while True:
            data = ch.recv_some()
            if not data:
                return events + sec.connection_lost()
            try:
                events += sec.receive_data(data, time.monotonic())
            except StreamError as exc:
                ch.send_all(encode_error(exc))
                return [*events, exc]
            if out := sec.data_to_send():
                ch.send_all(out)
    return run


def test_primary_and_secondary_exchange_a_checkpoint_and_ack(keydir: Path) -> None:
    sink = ImageSink(MEM)
    server = Server(keydir / "vm.key", then=_run_secondary(sink))
    mem = bytearray(os.urandom(MEM))
    with transport.connect(str(keydir / "vm.key"), *server.address) as ch:
        prim = Primary(name="kv1", memory_size=MEM, generation=1, checkpoint_seq=0,
                       now=time.monotonic())

        def pump() -> list:
            while True:
                events = prim.receive_data(ch.recv_some(), time.monotonic())
                if events:
                    return events

        assert pump()[0].full_sync
        prim.sync_pages(mem, range(MEM // PAGE_SIZE), now=time.monotonic())
        prim.end_sync_round(0, now=time.monotonic())
        prim.checkpoint(mem, [], [Vcpu(0, 1, b"regs")], now=time.monotonic())
        ch.send_all(prim.data_to_send())
        events = pump()
        assert [type(e) for e in events] == [Acked, SyncComplete]
        mem[5 * PAGE_SIZE:37 * PAGE_SIZE] = os.urandom(32 * PAGE_SIZE)
        seq = prim.checkpoint(mem, range(5, 37), now=time.monotonic())
        ch.send_all(prim.data_to_send())
        (acked,) = pump()
        assert acked.seq == seq and prim.is_acked(seq)
    server.join()
    assert server.error is None
    assert [type(e) for e in server.result][-3:] == [Committed, SyncComplete, Committed]
    assert bytes(sink.memory) == bytes(mem)
    assert sink.vcpus == {0: (1, b"regs")}


def test_wrong_version_hello_is_rejected_with_a_clear_error(keydir: Path) -> None:
    sink = ImageSink(MEM)
    server = Server(keydir / "vm.key", then=_run_secondary(sink))
    with transport.connect(str(keydir / "vm.key"), *server.address) as ch:
        hello = bytearray(encode(Hello("kv1", Role.PRIMARY, 1, 0, MEM, HelloFlag.FULL_SYNC)))
        struct.pack_into("<H", hello, 16, 3)  # a future stream version
        ch.send_all(bytes(hello))
        prim = Primary(name="kv1", memory_size=MEM, generation=1, checkpoint_seq=0, now=0.0)
        data = b""
        while chunk := ch.recv_some():
            data += chunk
        with pytest.raises(PeerError, match="version 3, this node speaks 1 to 2"):
            prim.receive_data(data, 0.0)
    server.join()
    assert isinstance(server.result[-1], UnsupportedVersion)
    assert sink.commits == 0


def test_primary_dying_mid_checkpoint_leaves_the_secondary_intact(keydir: Path) -> None:
    sink = ImageSink(MEM)
    server = Server(keydir / "vm.key", then=_run_secondary(sink))
    mem = bytearray(os.urandom(MEM))
    with transport.connect(str(keydir / "vm.key"), *server.address) as ch:
        prim = Primary(name="kv1", memory_size=MEM, generation=1, checkpoint_seq=0, now=0.0)
        while not prim.receive_data(ch.recv_some(), 0.0):
            pass
        prim.end_sync_round(0, now=0.0)
        prim.checkpoint(mem, range(MEM // PAGE_SIZE), now=0.0)
        ch.send_all(prim.data_to_send())
        while not prim.receive_data(ch.recv_some(), 0.0):
            pass
        synced = bytes(sink.memory)
        mem[0:PAGE_SIZE * 8] = os.urandom(PAGE_SIZE * 8)
        prim.checkpoint(mem, range(8), now=0.0)
        data = prim.data_to_send()
        ch.send_all(data[:len(data) // 2])  # then the primary "dies"
    server.join()
    assert isinstance(server.result[-1], Discarded)
    assert bytes(sink.memory) == synced and sink.checkpoint_seq == 1


def test_channel_reports_timeout_and_orderly_close(keydir: Path) -> None:
    server = Server(keydir / "vm.key", then=lambda ch: ch.recv_some())
    with transport.connect(str(keydir / "vm.key"), *server.address, timeout=0.2) as ch:
        with pytest.raises(transport.TransportTimeout):
            ch.recv_some()
        ch.send_all(b"bye")
        ch.settimeout(5)
        server.join()
        assert server.result == b"bye"
        assert ch.recv_some() == b""  # the server closed its end


def test_recv_some_takes_every_record_already_arrived_without_waiting(
        keydir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMARI_FRAMES", "0")        # TLS records, both ways
    payload = os.urandom(3 << 20)
    sent = threading.Event()

    def send(ch: transport.Channel) -> None:
        ch.send_all(payload)                 # ~190 TLS records
        sent.set()
        time.sleep(1.0)                      # keep the connection open, send nothing more

    server = Server(keydir / "vm.key", then=send)
    with transport.connect(str(keydir / "vm.key"), *server.address, timeout=5) as ch:
        ch.settimeout(5)
        got, calls = b"", 0
        while len(got) < len(payload):
            if not got:
                assert sent.wait(5)
                time.sleep(0.2)              # all of it has arrived
            chunk = ch.recv_some()
            assert len(chunk) <= transport.RECV_BATCH + transport.RECV_SIZE
            got += chunk
            calls += 1
        assert got == payload                # in order, nothing lost or repeated
        assert calls <= 5                    # one call per MiB, not one per 16 KiB record
        started = time.monotonic()
        with pytest.raises(transport.TransportTimeout):
            ch.settimeout(0.3)
            ch.recv_some()                   # nothing more: waits only its own timeout
        assert time.monotonic() - started < 1.0
    server.join()


class Relay:
    """Loopback TCP relay between one client and `target`; `_pump` says how."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.target = target

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
        self._pump(server, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        raise NotImplementedError


class HoldingRelay(Relay):
    """A relay whose server-to-client direction can stop after a set number of
    bytes: a TLS record left half-arrived."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.relayed = 0                       # server -> client bytes
        self.limit: int | None = None
        self.changed = threading.Condition()
        self.start()

    def hold_after(self, more: int | None) -> None:
        with self.changed:
            self.limit = None if more is None else self.relayed + more
            self.changed.notify_all()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1):         # byte by byte: the limit is exact
                if not upstream:
                    with self.changed:
                        self.changed.wait_for(lambda: self.limit is None
                                              or self.relayed < self.limit)
                        self.relayed += 1
                dst.sendall(data)


TLS13_RECORD_OVERHEAD = 5 + 1 + 16             # header, inner content type, AEAD tag


@pytest.mark.parametrize("first_size", [1000, transport.MAX_RECORD])
def test_a_record_cut_in_half_is_kept_for_the_next_call(keydir: Path, first_size: int) -> None:
    """A short first record ends recv_some at once; a full one makes it look for
    more, and it finds the second record only half there: neither waits for
    the rest, loses the half, nor leaves the socket silent when the rest comes."""
    first, second = os.urandom(first_size), os.urandom(1000)
    go = threading.Event()

    def send(ch: transport.Channel) -> None:
        assert go.wait(5)
        ch.send_all(first)
        ch.send_all(second)
        time.sleep(2)

    server = Server(keydir / "vm.key", then=send)
    relay = HoldingRelay(server.address)
    with transport.connect(str(keydir / "vm.key"), *relay.address, timeout=5) as ch:
        relay.hold_after(len(first) + TLS13_RECORD_OVERHEAD + 500)   # the 2nd record half there
        go.set()
        time.sleep(0.5)
        ch.settimeout(0.5)
        started = time.monotonic()
        assert ch.recv_some() == first
        assert time.monotonic() - started < 0.4   # did not wait for the rest of the second
        relay.hold_after(None)
        assert select.select([ch.fileno()], [], [], 5)[0]   # the rest wakes the reader
        assert ch.recv_some() == second
    server.join()


def _directions(ch: transport.Channel) -> tuple[bool, bool]:
    """(sends, receives) in frames."""
    return ch._sealer is not None, ch._opener is not None


# KEMARI_FRAMES: 2 (the default) both ways, 1 the primary's direction only (the
# release before kemari-frames/2), 0 neither (or a release before frames).
@pytest.mark.parametrize("server_frames, client_frames, primary_framed, acks_framed", [
    ("2", "2", True, True), ("2", "1", True, False), ("1", "2", True, False),
    ("2", "0", False, False), ("0", "2", False, False), ("1", "1", True, False)])
def test_each_direction_goes_in_frames_only_when_both_ends_know_them(
        keydir: Path, monkeypatch: pytest.MonkeyPatch, server_frames: str,
        client_frames: str, primary_framed: bool, acks_framed: bool) -> None:
    payload = os.urandom(3 << 20)
    answer = os.urandom(5000)
    monkeypatch.setenv("KEMARI_FRAMES", server_frames)

    def receive(ch: transport.Channel) -> tuple[tuple[bool, bool], bytes, int]:
        got, calls = b"", 0
        while len(got) < len(payload):
            got += ch.recv_some()
            calls += 1
        ch.send_all(answer)
        return _directions(ch), got, calls

    server = Server(keydir / "vm.key", then=receive)
    monkeypatch.setenv("KEMARI_FRAMES", client_frames)
    with transport.connect(str(keydir / "vm.key"), *server.address, timeout=5) as ch:
        ch.send_all(b"")                          # nothing to send: no (empty) frame
        ch.send_all(payload)
        got = b""
        while len(got) < len(answer):
            got += ch.recv_some()
        assert got == answer
        client_sends, client_receives = _directions(ch)
    server.join()
    assert server.error is None
    (server_sends, server_receives), got, calls = server.result
    assert got == payload
    assert client_sends == server_receives == primary_framed
    assert server_sends == client_receives == acks_framed
    if primary_framed:
        assert calls <= 3                         # 3 MiB is one frame, not 192 records


def test_the_two_directions_use_different_keys() -> None:
    """Each direction counts its own nonces from 0: under one key the first
    ACK would reuse the first checkpoint's nonce."""
    secret = os.urandom(frames.SECRET_SIZE)
    data = b"the same bytes"
    primary = bytes(next(frames.Sealer(secret).seal(data)))
    secondary = bytes(next(frames.Sealer(secret, label=frames.SECONDARY_KEYS).seal(data)))
    assert primary != secondary
    opener = frames.Opener(secret, label=frames.SECONDARY_KEYS)
    space = opener.space()
    space[:len(primary)] = primary
    opener.filled(len(primary))
    with pytest.raises(AuthenticationError):
        opener.take()


class FlippingRelay(Relay):
    """A relay that can flip one byte of the client-to-server direction."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.upstream = 0                      # client -> server bytes relayed
        self.flip_at: int | None = None
        self.start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream:
                    data = bytearray(data)
                    at = self.flip_at
                    if at is not None and self.upstream <= at < self.upstream + len(data):
                        data[at - self.upstream] ^= 0x40
                    self.upstream += len(data)
                dst.sendall(data)


# the length (1000 -> 936), the body, the tag
@pytest.mark.parametrize("offset", [3, 100, 4 + 1000 + 15])
def test_a_byte_changed_on_the_wire_after_the_handshake_ends_the_connection(
        keydir: Path, offset: int) -> None:
    """Frames are authenticated: the secondary returns none of a changed frame,
    raises AuthenticationError, and what came before it stays good."""
    first, second = os.urandom(1000), os.urandom(1000)
    received: list[bytes] = []

    def receive(ch: transport.Channel) -> None:
        while chunk := ch.recv_some():
            received.append(chunk)

    server = Server(keydir / "vm.key", then=receive)
    relay = FlippingRelay(server.address)
    with transport.connect(str(keydir / "vm.key"), *relay.address, timeout=5) as ch:
        assert ch.framed
        ch.send_all(first)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        relay.flip_at = relay.upstream + offset
        ch.send_all(second)
        server.join()
    assert received == [first]
    assert isinstance(server.error, AuthenticationError), server.error


def test_a_frame_sent_a_byte_at_a_time_holds_a_read_one_timeout_and_loses_nothing(
        keydir: Path) -> None:
    """The secondary's serving loop waits at most its timeout per read, however
    slowly a frame trickles in; the part that came is kept for the next read."""
    payload = os.urandom(100)
    results: list[Any] = []

    def receive(ch: transport.Channel) -> None:
        ch.settimeout(0.5)
        started = time.monotonic()
        try:
            ch.recv_some()
        except transport.TransportTimeout:
            results.append(time.monotonic() - started)
        ch.settimeout(10)
        results.append(ch.recv_some())

    server = Server(keydir / "vm.key", then=receive)
    with transport.connect(str(keydir / "vm.key"), *server.address, timeout=5) as ch:
        assert ch._sealer is not None
        (frame,) = [bytes(f) for f in ch._sealer.seal(payload)]
        for i in range(len(frame)):
            socket.socket.sendall(ch._sock, frame[i:i + 1])
            time.sleep(0.1 if i < 15 else 0.0)   # 1.5 s for the first 15 bytes
        server.join()
    assert server.error is None
    waited, got = results
    assert 0.4 < waited < 1.0
    assert got == payload
