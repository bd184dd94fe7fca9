"""One direction's AES-256-GCM frame cipher in C (native/frames.c), when built.

frames.Sealer and frames.Opener use it by default: per frame it costs one
call instead of the Python around cryptography's AESGCM (a nonce made in
Python, a cipher context set up per call), which on the checkpoint path of
these hosts cost more than the encryption (docs/benchmarks.md).
KEMARI_NATIVE_FRAMES=0 in a daemon's environment keeps the Python path,
which stays the reference: tests/unit check that both make and accept the
same frames. Only the cipher is here; frames.py derives the keys and says
when to move to the next.
"""

from __future__ import annotations

import os

from .codec import Buffer

try:
    from .._native import ffi, lib
except ImportError:  # pragma: no cover - depends on the build
    ffi = lib = None


def enabled_by_environment() -> bool:
    """Built, and not switched off with KEMARI_NATIVE_FRAMES=0."""
    return lib is not None and os.environ.get("KEMARI_NATIVE_FRAMES", "1") != "0"


ENABLED = enabled_by_environment()       # read once: frames.Sealer and Opener use it

# native/frames.h's return codes (the header is their one definition)
REKEY = lib.KFRAME_REKEY if lib is not None else None
BAD_LENGTH = lib.KFRAME_BAD_LENGTH if lib is not None else None


class FrameCipher:
    """The current key of one direction and its frame counter (the nonces)."""

    def __init__(self, encrypt: bool) -> None:
        ctx = lib.kframe_new(1 if encrypt else 0)
        if ctx == ffi.NULL:
            raise MemoryError("OpenSSL could not make a cipher context")
        self._ctx = ffi.gc(ctx, lib.kframe_free)

    @property
    def context(self):
        """The `struct kframe *` (for native/fastpath.c)."""
        return self._ctx

    def set_key(self, key: bytes, rekey_bytes: int) -> None:
        """From now on `key`, from frame 0, until `rekey_bytes` have gone through it."""
        if lib.kframe_set_key(self._ctx, key, rekey_bytes) != 0:
            raise RuntimeError("OpenSSL refused the frame key")

    def seal(self, part: Buffer, out) -> int:
        """Seals `part` (1 to MAX_FRAME bytes) into `out` (a cdata pointer to
        len(part) + OVERHEAD bytes): the frame's size, or REKEY (nothing sealed)."""
        return lib.kframe_seal(self._ctx, ffi.from_buffer(part), len(part), out)

    def seal_at(self, plain, n: int, out) -> int:
        """seal() of `n` bytes at the cdata pointer `plain`; `plain` may be
        `out` + 4, its place in the frame (sealed in place)."""
        return lib.kframe_seal(self._ctx, plain, n, out)

    def open(self, at, avail: int) -> int:
        """Opens the frame at `at` (a cdata pointer to `avail` bytes) in place:
        its plaintext's length (at `at` + 4), 0 when it has not all arrived,
        or REKEY, BAD_LENGTH, or another code below 0 (a failed tag: after it,
        every call fails)."""
        return lib.kframe_open(self._ctx, at, avail)


def pointer(buffer: bytearray):
    """A cdata pointer into `buffer`; while it lives the bytearray cannot be
    resized (drop it first)."""
    return ffi.from_buffer("uint8_t[]", buffer)
