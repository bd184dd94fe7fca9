"""The only part of replication that touches sockets: TCP under mutual TLS 1.3.

`listen()` + `Listener.accept()` and `connect()` return a `Channel` only after
both ends proved they hold the VM's key file, and after the server confirmed
that it accepted the client. A peer without the file never gets a byte of
the replication stream and none of its bytes reach the decoder.

TLS gives confidentiality, integrity, and replay/reorder protection inside
a connection (AEAD with implicit record sequence numbers), and fresh keys
per connection; the stream's own sequence numbers and generations reject a
checkpoint replayed across connections. When both ends know them (ALPN),
the bytes then go in `frames` of up to 4 MiB, sealed with keys derived from
a secret the secondary sent inside TLS: the same guarantees, far fewer reads,
and C can seal and open them. See docs/crypto.md.

Blocking sockets with timeouts; the daemon drives them with select() on
`fileno()`. A server that must keep serving while strangers connect takes
each new connection as a `Handshake` and advances it with `step()` only when
its socket is ready, so a peer that stalls its handshake stalls nothing else.
Heartbeats and dead-peer detection live in the state machines.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import time
from typing import Any

from . import frames
from .codec import Buffer
from .errors import AuthenticationError, TransportError
from .keys import check_key_file

# Sent by the server once it has verified the client's certificate: in TLS 1.3
# the client finishes its handshake before the server has judged it, so
# without this a refused client would only learn it at its first read.
ACCEPTED = b"KMR-OK\r\n"
# One read returns at most one TLS record (16 KiB) whatever is asked, but Python
# allocates the full request size every time: asking for 1 MiB cost 1 s of CPU
# per GiB received (an mmap and page faults per read), 64 KiB costs nothing.
RECV_SIZE = 64 << 10
# What one recv_some() gathers at most from records that have already arrived.
RECV_BATCH = 1 << 20
# A TLS record's plaintext at most (RFC 8446, 5.1).
MAX_RECORD = 16 << 10

# Frames carry the socket's bytes past the SSLSocket, whose own methods would
# read and write TLS records: the plain socket's methods, called on it. With a
# timeout set they poll() before every call; os.write/os.readv on the
# (then non-blocking) descriptor try first, so a frame that fits or has
# arrived costs one syscall, not two, on the checkpoint path.
_raw_sendall = socket.socket.sendall
_raw_recv_into = socket.socket.recv_into


def frames_offered() -> list[str]:
    """The ALPN names this end offers or picks, the first it prefers.
    KEMARI_FRAMES in a daemon's environment: 0 keeps its connections on TLS
    records, 1 frames only the primary's direction (the release before
    kemari-frames/2), unset or 2 frames both (benchmarks compare them; a peer
    that lacks frames gets the same)."""
    switch = os.environ.get("KEMARI_FRAMES", "2")
    if switch == "0":
        return []
    return [frames.ALPN_PRIMARY_ONLY] if switch == "1" else [frames.ALPN, frames.ALPN_PRIMARY_ONLY]


class TransportTimeout(TransportError):
    """No progress within the socket timeout."""


def make_context(key_file: str, *, server: bool) -> tuple[ssl.SSLContext, bytes]:
    """A TLS 1.3-only context that presents and trusts only `key_file`'s certificate."""
    own_cert = check_key_file(key_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the pinned certificate, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(key_file)
    ctx.load_verify_locations(cafile=key_file)
    ctx.options |= ssl.OP_NO_TICKET  # no resumption: every connection does a full handshake
    if server:
        ctx.num_tickets = 0
    if offered := frames_offered():
        ctx.set_alpn_protocols(offered)
    return ctx, own_cert


def _framed_channel(tls: ssl.SSLSocket, timeout: float | None, secret: bytes, *,
                    server: bool) -> Channel:
    """The channel the ALPN name the server picked asks for: the primary's
    (client's) direction in frames, the secondary's too with frames/2."""
    alpn = tls.selected_alpn_protocol()
    if alpn not in (frames.ALPN, frames.ALPN_PRIMARY_ONLY):
        return Channel(tls, timeout)
    ours = frames.SECONDARY_KEYS if server else frames.PRIMARY_KEYS
    theirs = frames.PRIMARY_KEYS if server else frames.SECONDARY_KEYS
    opener = frames.Opener(secret, label=theirs) if server or alpn == frames.ALPN else None
    sealer = frames.Sealer(secret, label=ours) if not server or alpn == frames.ALPN else None
    return Channel(tls, timeout, sealer=sealer, opener=opener)


class Channel:
    """An authenticated, encrypted byte pipe to the peer. With a `sealer` its
    sends, with an `opener` its receives go in frames; a direction without
    stays on TLS records."""

    def __init__(self, sock: ssl.SSLSocket, timeout: float | None, *,
                 sealer: frames.Sealer | None = None,
                 opener: frames.Opener | None = None) -> None:
        self._sock = sock
        self._sealer = sealer
        self._opener = opener
        self._timeout = timeout
        self._sock.settimeout(timeout)
        try:
            self.peer: Any = sock.getpeername()
        except OSError:  # already gone; the next send or receive will say so
            self.peer = None

    @property
    def opener(self) -> frames.Opener | None:
        """What opens the frames this channel receives (None: TLS records)."""
        return self._opener

    @property
    def framed(self) -> bool:
        return self._sealer is not None or self._opener is not None

    def send_all(self, data: Buffer) -> None:
        try:
            if self._sealer is None:
                self._sock.sendall(data)
            else:
                for frame in self._sealer.seal(data):
                    self._send_frame(frame)
        except TimeoutError:
            raise TransportTimeout("send timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"send to {self.peer} failed: {exc}") from exc

    def send_room(self, size: int):
        """Where the caller may write up to `size` bytes for send_written() (a
        cdata pointer, valid until the next send), or None when this channel
        cannot seal them in place (no frames, or no C cipher): then send_all()."""
        return self._sealer.room(size) if self._sealer is not None else None

    def send_written(self, n: int) -> None:
        """Sends the `n` bytes written at send_room()'s pointer, as one frame."""
        try:
            self._send_frame(self._sealer.seal_room(n))
        except TimeoutError:
            raise TransportTimeout("send timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"send to {self.peer} failed: {exc}") from exc

    def frame_cipher(self):
        """The C cipher that seals this channel's sends (a `struct kframe *`),
        for C that seals at send_room() and writes to fileno() itself; or None."""
        return self._sealer.native_cipher() if self._sealer is not None else None

    def send_rest_of_frame(self, size: int, sent: int) -> None:
        """The rest of the frame of `size` bytes sealed at send_room(), of which
        C wrote the first `sent`."""
        try:
            _raw_sendall(self._sock, self._sealer.sealed_in_room(size)[sent:])
        except TimeoutError:
            raise TransportTimeout("send timed out") from None
        except OSError as exc:
            raise TransportError(f"send to {self.peer} failed: {exc}") from exc

    def recv_some(self, max_bytes: int = RECV_SIZE, batch: int = RECV_BATCH) -> bytes:
        """Bytes that arrived (blocking until some do); b"" when the peer closed.

        After a full TLS record it takes every record that has already arrived,
        up to `batch` bytes, without waiting for one that has not: a full sync
        streams megabytes, and one caller's pass per 16 KiB record cost more
        than the bytes. A shorter record ends what its sender wrote at once (a
        checkpoint, an ACK), so nothing is looked for after it. Drains what TLS
        already decrypted, so a select() on fileno() after this call never
        misses buffered data. From frames it returns every whole frame that
        has arrived."""
        if self._opener is not None:
            return self._recv_frames()
        try:
            data = self._sock.recv(max_bytes)
        except TimeoutError:
            raise TransportTimeout("receive timed out") from None
        except ssl.SSLZeroReturnError:
            return b""
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"receive from {self.peer} failed: {exc}") from exc
        if not data:
            return data
        parts = [data]
        got = len(data)
        if got >= MAX_RECORD and got < batch:
            got += self._take_ready(parts, max_bytes, batch - got)
        if self._sock.pending():     # decrypted already: select() would not see it
            parts.append(self._sock.recv(self._sock.pending()))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _take_ready(self, parts: list[bytes], max_bytes: int, limit: int) -> int:
        """Append records that have arrived whole, up to about `limit` bytes.
        Non-blocking reads, ended by the first that finds no whole record: per
        call that read and switching the socket's timeout off and on again, not
        a select() per record. OpenSSL
        keeps a record's first part for the next call; the rest of it makes
        the socket readable again. The peer's close is left for the next
        recv_some."""
        got = 0
        self._sock.settimeout(0.0)
        try:
            while got < limit:
                more = self._sock.recv(max_bytes)
                if not more:
                    break
                parts.append(more)
                got += len(more)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError):
            pass
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"receive from {self.peer} failed: {exc}") from exc
        finally:
            self._sock.settimeout(self._timeout)
        return got

    def _recv_frames(self) -> bytes:
        """Reads until a frame is whole, within one timeout in all (as a TLS
        read is): a peer that sends a frame a byte at a time cannot hold the
        caller longer. What arrived of a frame stays for the next call."""
        opener = self._opener
        assert opener is not None
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        shortened = False
        try:
            while not (plain := opener.take()):
                if deadline is not None and opener.holds_part_of_a_frame():
                    # the rest of a frame begun: what is left of the time
                    self._sock.settimeout(max(deadline - time.monotonic(), 1e-6))
                    shortened = True
                try:
                    n = self._read_into(opener.space())
                except TimeoutError:
                    raise TransportTimeout("receive timed out") from None
                except OSError as exc:
                    raise TransportError(f"receive from {self.peer} failed: {exc}") from exc
                if not n:
                    return b""      # the peer closed; a frame it did not finish dies with it
                opener.filled(n)
        finally:
            if shortened:
                self._sock.settimeout(self._timeout)
        return plain[0] if len(plain) == 1 else b"".join(plain)

    def _send_frame(self, frame: memoryview) -> None:
        try:
            sent = os.write(self._sock.fileno(), frame)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            _raw_sendall(self._sock, frame[sent:])

    def _read_into(self, room: memoryview) -> int:
        try:
            return os.readv(self._sock.fileno(), [room])
        except BlockingIOError:
            return _raw_recv_into(self._sock, room)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._sock.settimeout(timeout)

    @property
    def timeout(self) -> float | None:
        """The longest a receive waits (None: no limit)."""
        return self._timeout

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _check_peer(tls: ssl.SSLSocket, own_cert: bytes) -> None:
    # The context trusts only our certificate; pinning makes the rule explicit.
    if tls.getpeercert(binary_form=True) != own_cert:
        raise AuthenticationError("peer certificate is not this VM's replication key")


class Handshake:
    """One incoming connection's server-side TLS handshake, advanced by `step()`
    without blocking. Until it returns a Channel, no byte from the peer has
    reached anything but OpenSSL."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, own_cert: bytes,
                 deadline: float) -> None:
        raw.setblocking(False)
        try:
            self.peer: Any = raw.getpeername()
        except OSError:
            self.peer = None
        self.deadline = deadline
        self.wants_write = False
        self._own_cert = own_cert
        self._tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)

    def fileno(self) -> int:
        return self._tls.fileno()

    def step(self) -> Channel | None:
        """Advance as far as the bytes at hand allow: a Channel once the peer proved
        it holds the key, None while more bytes are needed. On failure the
        connection is closed and AuthenticationError or TransportError raised."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self.wants_write = False
            return None
        except ssl.SSLWantWriteError:
            self.wants_write = True
            return None
        except (ssl.SSLError, ConnectionError) as exc:
            self.close()
            raise AuthenticationError(f"peer {self.peer} failed the TLS handshake: "
                                      f"{exc}") from exc
        except OSError as exc:
            self.close()
            raise TransportError(f"peer {self.peer} went away in the handshake: {exc}") from exc
        framed = self._tls.selected_alpn_protocol() is not None
        secret = os.urandom(frames.SECRET_SIZE) if framed else b""
        try:
            _check_peer(self._tls, self._own_cert)
            # A fresh connection's empty send buffer takes these few bytes at once.
            self._tls.settimeout(1.0)
            self._tls.sendall(ACCEPTED + secret)
        except (AuthenticationError, OSError) as exc:
            self.close()
            if isinstance(exc, AuthenticationError):
                raise
            raise TransportError(f"peer went away after the handshake: {exc}") from exc
        return _framed_channel(self._tls, None, secret, server=True)

    def wait(self) -> Channel:
        """Run the handshake to its end or its deadline (blocking)."""
        while (channel := self.step()) is None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise TransportTimeout("peer did not complete the TLS handshake")
            fd = [self.fileno()]
            select.select([] if self.wants_write else fd, fd if self.wants_write else [], [],
                          left)
        return channel

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._tls.close()


class Listener:
    """A listening TCP socket that hands out only authenticated channels."""

    def __init__(self, key_file: str, host: str, port: int, backlog: int = 64) -> None:
        self._ctx, self._own_cert = make_context(key_file, server=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(backlog)
        except OSError:
            self._sock.close()
            raise
        self.address: tuple[str, int] = self._sock.getsockname()[:2]

    def accept(self, timeout: float | None = None, *,
               handshake_timeout: float = 5.0) -> Channel:
        """Wait for a peer and authenticate it. Raises AuthenticationError for a
        peer without the key (the connection is closed; call accept again)."""
        self._sock.settimeout(timeout)
        try:
            raw, _ = self._sock.accept()
        except TimeoutError:
            raise TransportTimeout("no peer connected") from None
        channel = self._handshake(raw, handshake_timeout).wait()
        channel.settimeout(timeout)
        return channel

    def accept_pending(self, handshake_timeout: float) -> Handshake | None:
        """A connection waiting in the backlog, its handshake begun but not run;
        None when none waits. Never blocks."""
        self._sock.setblocking(False)
        try:
            raw, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        return self._handshake(raw, handshake_timeout)

    def _handshake(self, raw: socket.socket, handshake_timeout: float) -> Handshake:
        _tune(raw)
        return Handshake(raw, self._ctx, self._own_cert, time.monotonic() + handshake_timeout)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listen(key_file: str, host: str = "127.0.0.1", port: int = 0, backlog: int = 64) -> Listener:
    """Listen for the peer (port 0: the OS picks one, see `Listener.address`)."""
    return Listener(key_file, host, port, backlog)


def connect(key_file: str, host: str, port: int, timeout: float = 5.0) -> Channel:
    """Connect and authenticate both ways; returns only once the server accepted us."""
    ctx, own_cert = make_context(key_file, server=False)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise TransportTimeout(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {exc}") from exc
    _tune(raw)
    try:
        tls = ctx.wrap_socket(raw)
    except ssl.SSLError as exc:
        raw.close()
        raise AuthenticationError(f"{host}:{port} failed the TLS handshake: {exc}") from exc
    except (TimeoutError, OSError) as exc:
        raw.close()
        raise TransportError(f"TLS handshake with {host}:{port} failed: {exc}") from exc
    framed = tls.selected_alpn_protocol() is not None
    want = len(ACCEPTED) + (frames.SECRET_SIZE if framed else 0)
    try:
        _check_peer(tls, own_cert)
        got = b""
        while len(got) < want:
            chunk = tls.recv(want - len(got))
            if not chunk:
                break
            got += chunk
        if got[:len(ACCEPTED)] != ACCEPTED or len(got) != want:
            raise AuthenticationError(f"{host}:{port} did not accept our key")
    except AuthenticationError:
        tls.close()
        raise
    except ssl.SSLError as exc:
        tls.close()
        raise AuthenticationError(f"{host}:{port} refused our key: {exc}") from exc
    except (TimeoutError, OSError) as exc:
        tls.close()
        raise TransportError(f"{host}:{port} closed the connection: {exc}") from exc
    return _framed_channel(tls, timeout, got[len(ACCEPTED):], server=False)
