"""What each side receives, in one C call when it is the common case
(native/fastreceive.h): the secondary's checkpoint (FastReceive) and the
primary's ACK (FastAck).

Per checkpoint the Python path reads the socket, opens the frame, hands its
plaintext to the C reader (native_codec.receive), encodes the ACK and seals
and sends it: four wrapped C calls and the Python between them, all before
the primary may go on. Here one call does them, from the wake-up to the ACK
on its way (in the daemon the wait itself too: FastReceive.wait, its
inputs set before it sleeps), and Python then applies and commits what was staged
(Secondary.receive_taken). replication/secondary.py still decides: the call
checks against its receive_args(), the ACK leaves only where its
may_ack_early() allows, and whatever the call does not take whole (no whole
frame, a frame that is not exactly one checkpoint the C reader takes, a key
change, a frame that fails) goes through Secondary.receive_data, which gives
the verdict. Needs frames both ways (kemari-frames/2) with the C cipher.
KEMARI_FAST_RECEIVE=0 in a daemon's environment keeps every read on the
Python path (the stage benchmark compares the two); =1 keeps the
secondary's wait in Python (select()) before its one call.

The primary waits for its ACK in C too: poll(), read, open the frame, and
decode it when it is one ACK record alone (Primary.takes_lone_ack,
receive_ack); anything else goes through Primary.receive_data. The same
switch keeps it on the Python path.
"""

from __future__ import annotations

import math
import os
import select
import time
from typing import NamedTuple

from .. import stages
from ..replication import native_codec
from ..replication.errors import TransportError
from ..replication.events import Event
from .link import Link, SessionLost

try:
    from .._native import ffi, lib
except ImportError:  # pragma: no cover - depends on the build
    ffi = lib = None

# KEMARI_FAST_RECEIVE: 0 reads step by step; 1 reads in one call but the
# secondary waits in Python (select); 2, the default, waits in the same call.
_SWITCH = os.environ.get("KEMARI_FAST_RECEIVE", "2")
ENABLED = lib is not None and _SWITCH != "0"
WAIT_IN_THE_CALL = ENABLED and _SWITCH != "1"
ACK_LEN = lib.KCODEC_ACK_SIZE if lib is not None else 0    # an ACK record (codec.encode_ack)
# What poll() says of an fd that select() would list as readable, or writable.
POLL_READ = select.POLLIN | select.POLLHUP | select.POLLERR
POLL_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR


class Waited(NamedTuple):
    """FastReceive.wait()'s: the fds ready as select() gives them, the
    stream's read if it woke the wait (for FastReceive.read), and when the
    wait ended (CLOCK_MONOTONIC ns)."""
    readable: list[int]
    writable: list[int]
    outcome: tuple | None
    woke_ns: int


class _OneCallReads:
    """A session's one-call reads on a `link` (which calls read() with itself:
    this holds no reference back, so no cycle keeps the frame buffers that C
    points into alive for the garbage collector)."""

    def __init__(self, link: Link) -> None:
        channel = link.channel
        opener = channel.opener
        if opener is None or opener.native_cipher() is None or channel.frame_cipher() is None:
            raise ValueError("the one-call read needs C frames both ways")
        self._sm, self._channel, self._opener = link.sm, channel, opener
        self.reads = 0                      # what the one call took
        self.outcomes: dict = {}            # the C call's results, counted

    @classmethod
    def for_link(cls, link: Link):
        """The link's one-call reads, or None where they cannot run."""
        if not ENABLED:
            return None
        try:
            return cls(link)
        except ValueError:
            return None

    def _count(self, outcome) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _python_path(self, link: Link, plain: bytes, now: float) -> list[Event]:
        """`plain` and every other whole frame already here, through the Python
        path; a frame that fails ends the session."""
        try:
            rest = self._opener.take()
        except TransportError as exc:
            raise SessionLost(str(exc)) from exc
        data = plain + b"".join(rest) if rest else plain
        return link.receive(data, now) if data else []


# The stage trace's names of the moments one call takes (struct kfast_rx's
# moments[]; the last is 0, and left out, when the call sealed no ACK).
ONE_CALL_MOMENTS = ("c_entered", "c_read", "c_opened", "c_ack_sealed")
# The primary's (struct kfast_ack's moments[]), noted beside "ack_recv".
ACK_MOMENTS = ("ack_c_woke", "ack_c_read", "ack_c_opened")


class FastReceive(_OneCallReads):
    """The secondary's: a frame of one whole checkpoint read, checked and
    acknowledged in one call."""

    def __init__(self, link: Link) -> None:
        if not (native_codec.ENABLED and native_codec.CHECKPOINT_READER):
            raise ValueError("the one-call read needs the C checkpoint reader")
        super().__init__(link)
        channel, opener = self._channel, self._opener
        r = self._r = ffi.new("struct kfast_rx *")
        r.opener, r.sealer = opener.native_cipher(), channel.frame_cipher()
        r.fd = channel.fileno()
        r.timed = stages.ENABLED
        self._poll, self._poll_room = ffi.NULL, 0

    @property
    def spin_us(self) -> int:
        """How long wait() polls again, yielding its CPU, before it sleeps
        (replication.receive_poll_us)."""
        return int(self._r.spin_us)

    @spin_us.setter
    def spin_us(self, us: int) -> None:
        self._r.spin_us = us

    @property
    def spins(self) -> int:
        """wait()'s polls that found nothing while it spun, in all."""
        return int(self._r.spins)

    def wait(self, link: Link, reads: list[int], writes: list[int],
             timeout: float) -> Waited | None:
        """The secondary's wait for its stream and the other fds (select()'s
        `reads` and `writes`, at most `timeout` s), and the stream's read when
        it woke the wait, in one call: the read's inputs are set before the
        wait, so none of this Python lies between the wake-up and the ACK.
        None when the next bytes cannot be a checkpoint for the C reader (the
        caller selects)."""
        if not WAIT_IN_THE_CALL or not self._sm.takes_whole_checkpoints():
            return None
        fds = [link.fileno()] + reads
        polls = self._polls(fds, writes)
        rx, ack, mem = self._prepare(read=True)
        result = lib.kfast_wait_receive(self._r, rx, polls, len(fds) + len(writes),
                                        math.ceil(timeout * 1000))
        del mem
        if result == lib.KFAST_RX_POLL_FAILED:
            raise OSError(int(self._r.err), os.strerror(int(self._r.err)))
        readable = [fd for i, fd in enumerate(fds) if polls[i].revents & POLL_READ]
        writable = [fd for i, fd in enumerate(writes, len(fds))
                    if polls[i].revents & POLL_WRITE]
        outcome = None if result == lib.KFAST_RX_WAITED else (result, rx, ack)
        return Waited(readable, writable, outcome, int(self._r.woke_ns))

    def _polls(self, reads: list[int], writes: list[int]):
        """kfast_wait_receive's fds: `reads` for input, then `writes` for output."""
        n = len(reads) + len(writes)
        if self._poll_room < n:
            self._poll_room = max(n, 2 * self._poll_room)
            self._poll = ffi.new("struct kfast_poll[]", self._poll_room)
        polls = self._poll
        for i, fd in enumerate(reads):
            polls[i].fd, polls[i].events = fd, select.POLLIN
        for i, fd in enumerate(writes, len(reads)):
            polls[i].fd, polls[i].events = fd, select.POLLOUT
        return polls

    def _prepare(self, read: bool):
        """The call's inputs for the next frame (read() into the buffer first
        if `read`): kcodec_rx, whether the ACK may leave at once, and the
        pointer to the image, which the caller holds for the call."""
        sm, r = self._sm, self._r
        args = sm.receive_args()
        rx, r.bases, r.n_bases = native_codec.receive_inputs(**args)
        # per call: a pointer kept would export the image's memoryview, which
        # the garbage collector cannot release in a reference cycle
        mem = ffi.from_buffer(args["committed"])
        r.mem = mem
        r.buf, r.start, r.end, r.room = self._opener.native_room()
        r.read = read
        room = self._channel.send_room(ACK_LEN) if sm.may_ack_early() else None
        r.ack = ack = room is not None
        if ack:
            r.ack_frame = room - 4
        return rx, ack, mem

    def read(self, link: Link, waited: tuple | None = None) -> list[Event] | None:
        """The events of what arrived on `link`, or None: then nothing was
        taken, and the link reads through the Python path (which waits for a
        frame begun). `waited`: the outcome of the read wait() made."""
        sm, opener, r = self._sm, self._opener, self._r
        events: list[Event] = []
        first = True
        while waited is not None or sm.takes_whole_checkpoints():
            if waited is not None:
                (result, rx, ack), waited = waited, None
            else:
                rx, ack, mem = self._prepare(read=first)
                result = lib.kfast_receive(r, rx)
                del mem
            opener.moved(r.start, r.end)
            self._count(result)
            now = time.monotonic()
            if result == lib.KFAST_RX_TAKEN:
                events += self._taken(link, rx, ack, now)
                if r.start == r.end:        # all that was read is taken
                    return events
            elif result == lib.KFAST_RX_OPENED:
                return events + self._python_path(link, opener.take_opened(int(r.plain)), now)
            elif result == lib.KFAST_RX_READ_FAILED:
                raise SessionLost(f"receive from {self._channel.peer} failed: "
                                  f"{os.strerror(int(r.err))}")
            elif first:          # no whole frame, the peer closed or a frame refused
                return None
            else:
                break
            first = False
        if first:
            return None
        return events + self._python_path(link, b"", time.monotonic())

    def _taken(self, link: Link, rx, acked: bool, now: float) -> list[Event]:
        """The checkpoint the call took, its ACK on its way if `acked`: applied
        and committed by the state machine."""
        taken = int(self._r.taken_ns)
        if stages.ENABLED:
            link.recv_ns = link.decoded_ns = taken
            link.moments = {name: int(ns) for name, ns
                            in zip(ONE_CALL_MOMENTS, self._r.moments, strict=True) if ns}
        if acked:
            self._acked(link, taken)
        self.reads += 1
        got = native_codec.ReceivedCheckpoint(rx, int(self._r.plain))
        return link.decide(lambda: self._sm.receive_taken(got, got.consumed, acked, now))

    def _acked(self, link: Link, taken: int) -> None:
        """The ACK C sealed or wrote: the rest of it sent, or its failure kept
        for the link's next flush (as Link.send_early does)."""
        r, channel = self._r, self._channel
        self._count(("ack", r.ack_result))
        try:
            if r.ack_result == lib.KFAST_ACK_PARTIAL:
                channel.send_rest_of_frame(int(r.ack_size), int(r.ack_sent))
            elif r.ack_result == lib.KFAST_ACK_REKEY:
                channel.send_written(ACK_LEN)
            elif r.ack_result == lib.KFAST_ACK_WRITE_FAILED:
                raise TransportError(f"send to {channel.peer} failed: "
                                     f"{os.strerror(int(r.err))}")
            elif r.ack_result != lib.KFAST_ACK_SENT:
                raise TransportError(f"sealing an ACK failed ({int(r.err)})")
        except TransportError as exc:
            link.early_send_failed(str(exc))
            return
        link.sent_early(ACK_LEN, taken)


class FastAck(_OneCallReads):
    """The primary's: the wait for the next frame, and the ACK it holds, in
    one call (with the GIL released while it waits). With
    replication.ack_poll_us the call reads again for that long, yielding its
    CPU between reads, before it sleeps in poll()."""

    def __init__(self, link: Link) -> None:
        super().__init__(link)
        a = self._a = ffi.new("struct kfast_ack *")
        a.opener, a.fd = self._opener.native_cipher(), self._channel.fileno()
        a.spin_us = int(link.ack_poll_s * 1e6)    # replication.ack_poll_us, spun in C
        a.timed = stages.ENABLED

    def read(self, link: Link) -> list[Event] | None:
        """What arrived within the channel's timeout (nothing: []), or None:
        then the link reads through the Python path."""
        sm, opener, a = self._sm, self._opener, self._a
        if not sm.takes_lone_ack():
            return None
        a.buf, a.start, a.end, a.room = opener.native_room()
        timeout = self._channel.timeout
        a.timeout_ms = -1 if timeout is None else int(timeout * 1000)
        result = lib.kfast_wait_ack(a)
        opener.moved(a.start, a.end)
        self._count(result)
        now = time.monotonic()
        if result == lib.KFAST_WAIT_TAKEN:
            self.reads += 1
            if stages.ENABLED:
                link.recv_ns = stages.now_ns()
                link.moments = dict(zip(ACK_MOMENTS, map(int, a.moments), strict=True))
            seq, generation = int(a.seq), int(a.generation)
            events = link.decide(lambda: sm.receive_ack(seq, generation, now))
            return events + self._python_path(link, b"", now) if a.start != a.end else events
        if result == lib.KFAST_WAIT_OPENED:
            return self._python_path(link, opener.take_opened(int(a.plain)), now)
        if result == lib.KFAST_WAIT_TIMED_OUT:
            return []
        if result == lib.KFAST_WAIT_CLOSED:
            raise SessionLost("the peer closed the connection")
        if result == lib.KFAST_WAIT_READ_FAILED:
            raise SessionLost(f"receive from {self._channel.peer} failed: "
                              f"{os.strerror(int(a.err))}")
        return None          # no room for the frame begun, or a frame refused
