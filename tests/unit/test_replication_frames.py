"""Frames (the primary's half of a connection after the TLS handshake): what
goes in comes out whole and in order, however the bytes arrive, and any
change, cut, replay or reordering on the way is refused before a byte of it
is returned. Every test runs with the C cipher (native/frames.c) and with the
Python one (cryptography's AESGCM), and the two make the same frames."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kemari_agent.replication import frames, native_frames
from kemari_agent.replication.errors import AuthenticationError

pytestmark = pytest.mark.unit

SECRET = bytes(range(32))


@pytest.fixture(autouse=True, params=["C", "Python"])
def cipher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Sealers and openers made in the test use this cipher."""
    if request.param == "C":
        assert native_frames.lib is not None, "the native module is not built"
    monkeypatch.setattr(native_frames, "ENABLED", request.param == "C")
    return request.param


def sealed(sealer: frames.Sealer, data: bytes) -> list[bytes]:
    return [bytes(frame) for frame in sealer.seal(data)]


def deliver(opener: frames.Opener, wire: bytes, cuts: list[int] | None = None,
            out: list[bytes] | None = None) -> bytes:
    """Feed `wire` to `opener` the way reads would: into space(), cut at `cuts`;
    what it returns also goes into `out`, should it raise."""
    out = [] if out is None else out
    pos = 0
    for end in sorted(set(cuts or [])) + [len(wire)]:
        while pos < end:
            room = opener.space()
            n = min(len(room), end - pos)
            room[:n] = wire[pos:pos + n]
            del room
            opener.filled(n)
            pos += n
            out += opener.take()
    return b"".join(out)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * frames.MAX_FRAME // 2), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 7 * frames.MAX_FRAME), max_size=12))
def test_what_is_sealed_opens_whole_and_in_order_however_it_arrives(
        sizes: list[int], cuts: list[int]) -> None:
    sealer, opener = frames.Sealer(SECRET), frames.Opener(SECRET)
    messages = [os.urandom(n) for n in sizes]
    wire = b"".join(b"".join(sealed(sealer, m)) for m in messages)
    assert deliver(opener, wire, [c for c in cuts if c < len(wire)]) == b"".join(messages)
    assert not opener.holds_part_of_a_frame()


def test_a_message_larger_than_a_frame_is_cut_into_frames_of_at_most_max_frame() -> None:
    data = os.urandom(2 * frames.MAX_FRAME + 5)
    wire = sealed(frames.Sealer(SECRET), data)
    assert [len(f) - frames.OVERHEAD for f in wire] == [frames.MAX_FRAME, frames.MAX_FRAME, 5]
    assert sealed(frames.Sealer(SECRET), b"") == []
    assert data[:64] not in b"".join(wire)          # no plaintext on the wire


def test_a_frame_is_returned_only_once_all_of_it_has_arrived() -> None:
    wire = sealed(frames.Sealer(SECRET), b"checkpoint 7")[0]
    opener = frames.Opener(SECRET)
    assert deliver(opener, wire[:-1]) == b""
    assert opener.holds_part_of_a_frame()
    assert deliver(opener, wire[-1:]) == b"checkpoint 7"


@pytest.mark.parametrize("where", ["ciphertext", "tag", "length"])
def test_a_changed_byte_is_refused_and_nothing_of_its_frame_comes_out(where: str) -> None:
    sealer = frames.Sealer(SECRET)
    first, second = sealed(sealer, b"A" * 1000), sealed(sealer, b"B" * 1000)
    bad = bytearray(second[0])
    offset = {"ciphertext": frames.HEADER.size + 500, "tag": len(bad) - 3, "length": 3}[where]
    bad[offset] ^= 0x01              # the length 1000 -> 1001: the frame ends a byte later
    opener = frames.Opener(SECRET)
    assert deliver(opener, first[0]) == b"A" * 1000
    with pytest.raises(AuthenticationError, match="failed authentication"):
        deliver(opener, bytes(bad) + sealed(sealer, b"C")[0])


@pytest.mark.parametrize("length", [0, frames.MAX_FRAME + 1])
def test_an_empty_or_oversized_frame_is_refused_before_its_body_is_awaited(length: int) -> None:
    opener = frames.Opener(SECRET)
    with pytest.raises(AuthenticationError, match="frames hold 1 to"):
        deliver(opener, frames.HEADER.pack(length))


@pytest.mark.parametrize("tamper", ["replayed", "dropped", "reordered"])
def test_replayed_dropped_or_reordered_frames_are_refused(tamper: str) -> None:
    sealer = frames.Sealer(SECRET)
    f = [sealed(sealer, bytes([i]) * 100)[0] for i in range(3)]
    wire = {"replayed": [f[0], f[0]], "dropped": [f[0], f[2]], "reordered": [f[1], f[0]]}[tamper]
    opener = frames.Opener(SECRET)
    with pytest.raises(AuthenticationError):
        deliver(opener, b"".join(wire))


def test_another_connections_secret_opens_nothing() -> None:
    wire = sealed(frames.Sealer(os.urandom(32)), b"guest memory")[0]
    with pytest.raises(AuthenticationError):
        deliver(frames.Opener(os.urandom(32)), wire)


def test_keys_change_every_rekey_bytes_on_both_ends() -> None:
    sealer = frames.Sealer(SECRET, rekey_bytes=1000)
    wire = b"".join(b"".join(sealed(sealer, bytes([i]) * 600)) for i in range(5))
    # the same secret and schedule opens all five (three keys)
    assert deliver(frames.Opener(SECRET, rekey_bytes=1000), wire) == \
        b"".join(bytes([i]) * 600 for i in range(5))
    # an opener that kept the first key opens the frames sealed before the change only
    opener = frames.Opener(SECRET, rekey_bytes=10**9)
    with pytest.raises(AuthenticationError):
        deliver(opener, wire)


def test_the_receive_buffer_stays_bounded_by_the_largest_frames() -> None:
    sealer, opener = frames.Sealer(SECRET), frames.Opener(SECRET)
    big = os.urandom(frames.MAX_FRAME)
    wire = b"".join(b"".join(sealed(sealer, big)) for _ in range(6))
    cuts = list(range(frames.MAX_FRAME // 3, len(wire), frames.MAX_FRAME // 3))
    assert deliver(opener, wire, cuts) == big * 6
    assert len(opener._buf) <= 4 * (frames.MAX_FRAME + frames.OVERHEAD)


def test_a_secret_of_the_wrong_size_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        frames.Sealer(b"short")


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=6),
       rekey=st.sampled_from([1, 1000, 65_536, frames.REKEY_BYTES]))
def test_the_c_and_the_python_cipher_make_and_open_the_same_frames(
        sizes: list[int], rekey: int) -> None:
    """Byte for byte, through key changes; each opens the other's frames."""
    c_sealer = frames.Sealer(SECRET, rekey_bytes=rekey, native=True)
    py_sealer = frames.Sealer(SECRET, rekey_bytes=rekey, native=False)
    messages = [os.urandom(n) for n in sizes]
    c_wire = b"".join(b"".join(sealed(c_sealer, m)) for m in messages)
    py_wire = b"".join(b"".join(sealed(py_sealer, m)) for m in messages)
    assert c_wire == py_wire
    for native in (True, False):
        opener = frames.Opener(SECRET, rekey_bytes=rekey, native=native)
        assert deliver(opener, c_wire) == b"".join(messages)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
       in_place=st.lists(st.booleans(), min_size=6, max_size=6),
       rekey=st.sampled_from([1, 1000, 65_536, frames.REKEY_BYTES]))
def test_a_frame_sealed_in_place_is_the_frame_seal_makes(
        sizes: list[int], in_place: list[bool], rekey: int) -> None:
    """Bytes written at room() and sealed there (the primary's checkpoints,
    Channel.send_room) make the frames seal() makes of them, mixed with
    seal()'s own in any order and through key changes, and open the same."""
    in_room = frames.Sealer(SECRET, rekey_bytes=rekey, native=True)
    reference = frames.Sealer(SECRET, rekey_bytes=rekey, native=False)
    messages = [os.urandom(n) for n in sizes]
    wire = []
    for message, here in zip(messages, in_place, strict=False):
        if here:
            room = in_room.room(len(message))
            native_frames.ffi.memmove(room, message, len(message))
            wire.append(bytes(in_room.seal_room(len(message))))
        else:
            wire += sealed(in_room, message)
    assert b"".join(wire) == b"".join(b"".join(sealed(reference, m)) for m in messages)
    assert deliver(frames.Opener(SECRET, rekey_bytes=rekey), b"".join(wire)) == \
        b"".join(messages)


def test_only_the_c_cipher_offers_room_and_only_for_a_frame(cipher: str) -> None:
    sealer = frames.Sealer(SECRET)
    assert sealer.room(frames.MAX_FRAME + 1) is None
    assert sealer.room(0) is None
    assert (sealer.room(frames.MAX_FRAME) is not None) == (cipher == "C")


def test_a_frame_that_fails_leaves_no_plaintext_and_the_opener_opens_nothing_more() -> None:
    sealer = frames.Sealer(SECRET)
    first, second = sealed(sealer, b"secret page " * 50)[0], sealed(sealer, b"next")[0]
    bad = bytearray(first)
    bad[-1] ^= 0x80                     # the tag: the ciphertext itself is intact
    opener = frames.Opener(SECRET)
    room = opener.space()
    room[:len(bad)] = bad
    del room
    opener.filled(len(bad))
    with pytest.raises(AuthenticationError, match="failed authentication"):
        opener.take()
    assert b"secret page" not in bytes(opener._buf)
    with pytest.raises(AuthenticationError):
        deliver(opener, second)


def _verdict(wire: bytes, native: bool, cuts: list[int]) -> tuple[bytes, str | None]:
    """What an opener returns of `wire` before it stops, and why it stopped."""
    opener = frames.Opener(SECRET, rekey_bytes=2000, native=native)
    out: list[bytes] = []
    try:
        deliver(opener, wire, [c for c in cuts if c < len(wire)], out)
    except AuthenticationError as exc:
        return b"".join(out), str(exc)
    return b"".join(out), None


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=5),
       edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]),
                                st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
       cuts=st.lists(st.integers(0, 20_000), max_size=6))
def test_both_ciphers_give_the_same_verdict_on_any_changed_stream(
        sizes: list[int], edits: list[tuple[str, int, int]], cuts: list[int]) -> None:
    """Bytes flipped, inserted or dropped anywhere (a length, a body, a tag),
    through key changes: the C opener returns exactly what the Python one
    does, and stops with the same error; never a byte it did not authenticate."""
    sealer = frames.Sealer(SECRET, rekey_bytes=2000, native=False)
    messages = [os.urandom(n) for n in sizes]
    wire = bytearray(b"".join(b"".join(sealed(sealer, m)) for m in messages))
    for kind, at, value in edits:
        at %= len(wire) + (kind == "insert")
        if kind == "flip" and at < len(wire):
            wire[at] ^= value
        elif kind == "insert":
            wire[at:at] = bytes([value])
        elif at < len(wire):
            del wire[at]
    c_verdict = _verdict(bytes(wire), True, cuts)
    assert c_verdict == _verdict(bytes(wire), False, cuts)
    assert b"".join(messages).startswith(c_verdict[0])



@pytest.mark.parametrize("size", [100, 70_000])      # as built, and grown for larger frames
def test_the_c_pointer_leaves_the_sealers_view_free_to_release(size: int) -> None:
    """A session's Link and state machine form a reference cycle that holds
    its channel's Sealer. The garbage collector may clear the Sealer's view
    of its frame buffer before anything else, and a view that the C
    pointer exported cannot be released: fresh run 57 crashed in
    gc.collect(). The pointer exports the buffer, not the view."""
    sealer = frames.Sealer(bytes(range(32)), native=True)     # the C cipher, whatever the fixture

    assert len(b"".join(bytes(f) for f in sealer.seal(b"x" * size))) > size
    assert sealer.room(50) is not None         # the C pointer is in use
    sealer._out.release()                      # what the collector's clear does
