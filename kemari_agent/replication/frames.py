"""Frames: how a connection carries bytes once its TLS 1.3 handshake has
authenticated both ends: the primary's checkpoints, and (`kemari-frames/2`)
the secondary's ACKs.

TLS cuts a stream into 16 KiB records, and Python reads them one at a time:
two read() calls and one trip through the `ssl` module per record, which on
these hosts cost more than the AES-GCM itself and held a full sync to about
half a GiB/s (docs/benchmarks.md). A frame carries up to 4 MiB (one full-sync
batch of 512 pages, so its records are never split across frames):

    length (4 bytes, big-endian, the plaintext's) | ciphertext | tag (16 bytes)

sealed with AES-256-GCM. The key is secret, fresh per connection and known
to the two ends only: the secondary draws 32 random bytes and sends them
inside the authenticated TLS session (`transport`). Nonces are a frame
counter, never sent, so a frame replayed, dropped or moved fails its tag;
the length is the additional data, so it cannot be changed either. Each
direction has its own keys (HKDF labels `PRIMARY_KEYS`, `SECONDARY_KEYS`),
so no nonce is ever used twice under one key. Every
`REKEY_BYTES` of plaintext both ends move to the next key, derived from the
secret with HKDF, far below AES-GCM's usage limits. Only what opened whole
and authentic is returned; anything else raises `AuthenticationError`.

The cipher runs in C (native_frames) when the native module is built, and
in Python through cryptography's AESGCM otherwise or with
KEMARI_NATIVE_FRAMES=0: the same frames either way.

Sans-I/O: the transport moves the bytes. See docs/crypto.md.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import native_frames
from .codec import Buffer
from .errors import AuthenticationError

# The ALPN names a client offers and a server picks, the first it knows:
# with ALPN both directions go in frames; with ALPN_PRIMARY_ONLY (the release
# before) only the primary's, and its ACKs come in TLS records. A peer that
# knows neither (or has frames switched off) picks nothing, and the connection
# carries TLS records both ways.
ALPN = "kemari-frames/2"
ALPN_PRIMARY_ONLY = "kemari-frames/1"
# HKDF labels of each direction's keys (the key's number follows them).
PRIMARY_KEYS = b"kemari frames/1 key "
SECONDARY_KEYS = b"kemari frames/2 secondary key "
SECRET_SIZE = 32
MAX_FRAME = 4 << 20
HEADER = struct.Struct(">I")
TAG_SIZE = 16
OVERHEAD = HEADER.size + TAG_SIZE
# A read takes at least this much room, so a stream of small frames costs
# few reads; the receive buffer grows from it to what the frames need.
READ_SIZE = 256 << 10
# Plaintext bytes sealed under one key. TLS 1.3 allows 2^24.5 full records
# (about 2^38.5 bytes) per AES-GCM key (RFC 8446, 5.5); 16 GiB stays far below.
REKEY_BYTES = 1 << 34


class _Epochs:
    """One direction's key schedule: a key per REKEY_BYTES, derived from the
    connection's secret and the direction's label."""

    def __init__(self, secret: bytes, rekey_bytes: int, label: bytes) -> None:
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"a frame secret is {SECRET_SIZE} bytes, not {len(secret)}")
        self._secret = secret
        self._rekey_bytes = rekey_bytes
        self._label = label
        self._epoch = -1

    def _next_key(self) -> bytes:
        self._epoch += 1
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=self._label + self._epoch.to_bytes(8, "big")
                    ).derive(self._secret)


class _Keys(_Epochs):
    """The key and nonce sequence of the Python cipher."""

    def __init__(self, secret: bytes, rekey_bytes: int, label: bytes) -> None:
        super().__init__(secret, rekey_bytes, label)
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.aead = AESGCM(self._next_key())
        self._counter = 0
        self._sealed = 0

    def next_nonce(self, plaintext_len: int) -> bytes:
        """The nonce of the next frame (under `self.aead`); counts it."""
        if self._sealed >= self._rekey_bytes:
            self._next_epoch()
        nonce = self._counter.to_bytes(12, "big")
        self._counter += 1
        self._sealed += plaintext_len
        return nonce


class _NativeKeys(_Epochs):
    """The same keys in the C cipher, which counts the frames (the nonces) and
    the bytes under each key itself and says when the next one is due."""

    def __init__(self, secret: bytes, rekey_bytes: int, label: bytes, *,
                 encrypt: bool) -> None:
        super().__init__(secret, rekey_bytes, label)
        self.cipher = native_frames.FrameCipher(encrypt)
        self.next_epoch()

    def next_epoch(self) -> None:
        self.cipher.set_key(self._next_key(), self._rekey_bytes)


def _use_native(native: bool | None) -> bool:
    return native_frames.ENABLED if native is None else native


class Sealer:
    """Turns bytes into frames, in order, under the keys labelled `label`.
    `native`: the C cipher (default: when built and not switched off)."""

    def __init__(self, secret: bytes, *, label: bytes = PRIMARY_KEYS,
                 rekey_bytes: int = REKEY_BYTES, native: bool | None = None) -> None:
        self._native = _NativeKeys(secret, rekey_bytes, label, encrypt=True) \
            if _use_native(native) else None
        self._keys = None if self._native else _Keys(secret, rekey_bytes, label)
        self._grow(OVERHEAD)                # grows to the largest frame sealed

    def _grow(self, size: int) -> None:
        buf = bytearray(size)
        self._out = memoryview(buf)
        # The C pointer exports the bytearray, not the view: in a reference
        # cycle (a session's Link and state machine) the garbage collector may
        # clear the view first, and a view with an export cannot be released
        # (BufferError, then the interpreter crashed; fresh run 57).
        self._out_c = native_frames.pointer(buf) if self._native else None

    def seal(self, data: Buffer) -> Iterator[memoryview]:
        """The frames of `data`, each to be sent before the next is asked for
        (they share one buffer)."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), MAX_FRAME):     # no bytes: no frame
            yield self._seal_one(view[start:start + MAX_FRAME])

    def room(self, size: int):
        """Where a caller may write up to `size` bytes of plaintext to be sealed
        in place by seal_room() (a cdata pointer into the frame buffer, valid
        until the next seal), or None: the C cipher is off, or `size` is more
        than a frame holds. Spares a copy of what the caller writes in C."""
        if self._native is None or not 0 < size <= MAX_FRAME:
            return None
        if len(self._out) < size + OVERHEAD:
            self._grow(size + OVERHEAD)
        return self._out_c + HEADER.size

    def native_cipher(self):
        """The C cipher's context (a cdata `struct kframe *`), or None."""
        return self._native.cipher.context if self._native is not None else None

    def sealed_in_room(self, size: int) -> memoryview:
        """The frame of `size` bytes that C sealed at room()'s place (native/fastpath.c)."""
        return self._out[:size]

    def seal_room(self, n: int) -> memoryview:
        """The frame of the `n` bytes written at room()'s pointer, sealed where
        they are; valid until the next call."""
        cipher, out = self._native.cipher, self._out_c
        return self._native_frame(lambda: cipher.seal_at(out + HEADER.size, n, out))

    def _native_frame(self, seal: Callable[[], int]) -> memoryview:
        """The frame the C cipher's `seal()` makes in the frame buffer, moving
        to the next key when it asks (it then sealed nothing: the plaintext
        is intact)."""
        size = seal()
        while size == native_frames.REKEY:
            self._native.next_epoch()
            size = seal()
        if size < 0:
            raise RuntimeError(f"sealing a frame failed ({size})")
        return self._out[:size]

    def _seal_one(self, part: memoryview) -> memoryview:
        """The frame of `part` (bytes, at most MAX_FRAME of them), valid until
        the next call."""
        n = len(part)
        if len(self._out) < n + OVERHEAD:
            self._grow(n + OVERHEAD)
        if self._native is not None:
            cipher, out = self._native.cipher, self._out_c
            return self._native_frame(lambda: cipher.seal(part, out))
        out = self._out
        HEADER.pack_into(out, 0, n)
        nonce = self._keys.next_nonce(n)        # first: it may move to the next key
        self._keys.aead.encrypt_into(nonce, part, out[:HEADER.size],
                                     out[HEADER.size:n + OVERHEAD])
        return out[:n + OVERHEAD]


class Opener:
    """Takes the bytes that arrive, gives back the plaintext of whole frames.

    `space()` is where the next read goes, `filled(n)` says how much it put
    there, `take()` opens every whole frame so far."""

    def __init__(self, secret: bytes, *, label: bytes = PRIMARY_KEYS,
                 rekey_bytes: int = REKEY_BYTES, native: bool | None = None) -> None:
        self._native = _NativeKeys(secret, rekey_bytes, label, encrypt=False) \
            if _use_native(native) else None
        self._keys = None if self._native else _Keys(secret, rekey_bytes, label)
        self._buf = bytearray(READ_SIZE)
        self._buf_c = None        # the C cipher's pointer into _buf, made when needed
        self._start = 0           # first byte not yet opened
        self._end = 0             # first byte not yet filled

    def space(self) -> memoryview:
        """Room for the next read, after `take()`: at least the rest of the
        frame begun, so a frame never waits for room."""
        if self._start == self._end:
            self._start = self._end = 0
        want = max(self._missing(), READ_SIZE)
        if len(self._buf) - self._end < want:
            # move the frame begun to the front; grow (at least double: frames
            # of a size come in series) if that is not room enough
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start:self._end]
            self._start, self._end = 0, left
            if len(self._buf) - left < want:
                self._buf_c = None          # a bytearray in use cannot grow
                self._buf.extend(bytes(max(want + left, len(self._buf))))
        return memoryview(self._buf)[self._end:]

    def _missing(self) -> int:
        """Bytes still to come of the frame begun (0 if its header is not here)."""
        if self._end - self._start < HEADER.size:
            return 0
        (n,) = HEADER.unpack_from(self._buf, self._start)
        return min(n, MAX_FRAME) + OVERHEAD - (self._end - self._start)

    def filled(self, n: int) -> None:
        self._end += n

    def take(self) -> list[bytes]:
        """The plaintexts of the frames that arrived whole, in order."""
        if self._native is not None:
            return self._take_native()
        out = []
        buf = memoryview(self._buf)
        while self._end - self._start >= HEADER.size:
            (n,) = HEADER.unpack_from(buf, self._start)
            if not 0 < n <= MAX_FRAME:      # an empty one would be read without end
                raise _bad_length(n)
            end = self._start + n + OVERHEAD
            if end > self._end:
                break
            nonce = self._keys.next_nonce(n)    # first: it may move to the next key
            try:
                plain = self._keys.aead.decrypt(nonce, buf[self._start + HEADER.size:end],
                                                buf[self._start:self._start + HEADER.size])
            except InvalidTag as exc:
                raise _failed() from exc
            self._start = end
            out.append(plain)
        return out

    def _take_native(self) -> list[bytes]:
        """take() with the C cipher: each frame opens in place, its plaintext
        is copied out once."""
        assert self._native is not None
        out = []
        while self._end - self._start >= HEADER.size:
            if self._buf_c is None:
                self._buf_c = native_frames.pointer(self._buf)
            n = self._native.cipher.open(self._buf_c + self._start, self._end - self._start)
            if n == 0:
                break
            if n == native_frames.REKEY:
                self._native.next_epoch()
                continue
            if n == native_frames.BAD_LENGTH:
                raise _bad_length(HEADER.unpack_from(self._buf, self._start)[0])
            if n < 0:
                raise _failed()
            out.append(self.take_opened(n))
        return out

    def holds_part_of_a_frame(self) -> bool:
        return self._end > self._start

    # For C that reads and opens frames itself (ft/fast_receive.py):

    def native_cipher(self):
        """The C cipher's context (a cdata `struct kframe *`), or None."""
        return self._native.cipher.context if self._native is not None else None

    def native_room(self) -> tuple[object, int, int, int]:
        """The buffer as space() leaves it: its pointer, the first byte not
        opened, the first not filled, and its size (C then calls moved())."""
        self.space()
        if self._buf_c is None:
            self._buf_c = native_frames.pointer(self._buf)
        return self._buf_c, self._start, self._end, len(self._buf)

    def moved(self, start: int, end: int) -> None:
        """C opened the frames before `start` (their plaintext was taken) and
        filled the buffer up to `end`."""
        self._start, self._end = start, end

    def take_opened(self, n: int) -> bytes:
        """The plaintext (`n` bytes) of the frame at the start, which C opened
        in place."""
        start = self._start + HEADER.size
        with memoryview(self._buf) as view:
            plain = bytes(view[start:start + n])
        self._start = start + n + TAG_SIZE
        return plain


def _bad_length(n: int) -> AuthenticationError:
    return AuthenticationError(f"a frame says it holds {n} bytes; frames hold 1 to {MAX_FRAME}")


def _failed() -> AuthenticationError:
    return AuthenticationError("a frame failed authentication: the stream was changed, "
                               "cut or replayed on its way")
