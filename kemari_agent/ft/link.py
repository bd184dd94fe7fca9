"""A replication session's I/O: an authenticated Channel driven together with
its sans-I/O state machine (Primary or Secondary)."""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable

from .. import stages
from ..replication.codec import encode_error
from ..replication.errors import PeerError, StreamError, TransportError
from ..replication.events import Event
from ..replication.transport import Channel, TransportTimeout

# How far past its deadline wait_for lets a read run rather than set a shorter timeout.
WAIT_SLACK_S = 0.01


class SessionLost(Exception):
    """The peer is gone or broke the protocol; the reason says which."""


class Link:
    def __init__(self, channel: Channel, machine, io_timeout: float,
                 ack_poll_s: float = 0.0) -> None:
        """`io_timeout`: the longest a read of a started TLS record may block.
        `ack_poll_s`: how long wait_for spins before it sleeps on the socket."""
        self.channel = channel
        self.sm = machine
        self.closed = False
        self.io_timeout = io_timeout
        self.ack_poll_s = ack_poll_s
        self.bytes_sent = 0
        self.recv_ns = self.decoded_ns = 0    # KEMARI_STAGES=1: last read's moments
        self.moments: dict[str, int] = {}     # and those C took inside a one-call read
        # The last early send (send_early): (ready, sent), time.monotonic_ns();
        # the caller takes it once per pass.
        self.early: tuple[int, int] | None = None
        self._send_failed: str | None = None
        # One-call reads (ft/fast_receive.py: FastReceive, FastAck), set by the driver.
        self.fast_receive = None
        channel.settimeout(io_timeout)

    def fileno(self) -> int:
        return self.channel.fileno()

    def send_early(self, data: bytes) -> None:
        """Bytes out in the middle of the state machine's work (Secondary.send_early).
        A failed send is not raised here, where the caller is halfway through a
        checkpoint, but by the next flush(), once the pass has finished it."""
        if self._send_failed is not None:
            return
        ready = time.monotonic_ns()
        try:
            self.channel.send_all(data)
        except TransportError as exc:
            self.early_send_failed(str(exc))
            return
        self.sent_early(len(data), ready)

    def sent_early(self, n: int, ready: int) -> None:
        """`n` bytes left early (by send_early, or C that sent them itself), ready
        to leave at `ready` (time.monotonic_ns())."""
        self.bytes_sent += n
        self.early = (ready, time.monotonic_ns())

    def early_send_failed(self, reason: str) -> None:
        """An early send failed: the next flush() raises it."""
        self._send_failed = reason

    def checkpoint(self, memory, pfns, records) -> int:
        """The primary's Primary.checkpoint; its bytes go with the next flush()."""
        return self.sm.checkpoint(memory, pfns, records, now=time.monotonic())

    def flush(self) -> None:
        if self._send_failed is not None:
            raise SessionLost(self._send_failed)
        data = self.sm.data_to_send()
        if data:
            try:
                self.channel.send_all(data)
            except TransportError as exc:
                raise SessionLost(str(exc)) from exc
            self.bytes_sent += len(data)

    def read(self, flush: bool = True, waited: tuple | None = None) -> list[Event]:
        """Take what arrived (blocking until something does or the timeout passes).
        flush=False leaves the replies queued (the caller flushes after acting).
        `waited`: what the one-call read took while waiting (FastReceive.wait)."""
        events = self.fast_receive.read(self, waited) if waited is not None \
            else self.fast_receive.read(self) if self.fast_receive is not None else None
        if events is None:
            try:
                data = self.channel.recv_some()
            except TransportTimeout:
                return []
            except TransportError as exc:
                raise SessionLost(str(exc)) from exc
            if not data:
                raise SessionLost("the peer closed the connection")
            events = self.receive(data, time.monotonic())
        if flush:
            self.flush()
        return events

    def receive(self, data: bytes, now: float) -> list[Event]:
        """The state machine's events for bytes received."""
        if stages.ENABLED:
            self.recv_ns = stages.now_ns()
        return self.decide(lambda: self.sm.receive_data(data, now))

    def decide(self, step: Callable[[], list[Event]]) -> list[Event]:
        """step(), a call into the state machine with what was received: a
        stream it refuses ends the session, and the peer is told why."""
        try:
            events = step()
        except StreamError as exc:
            if not isinstance(exc, PeerError):     # tell the peer why (both sides log it)
                with contextlib.suppress(TransportError):
                    self.channel.send_all(encode_error(exc))
            raise SessionLost(f"{type(exc).__name__}: {exc}") from exc
        if stages.ENABLED:
            self.decoded_ns = stages.now_ns()
        return events

    def poll(self) -> list[Event]:
        """Heartbeats due and dead-peer detection."""
        events = self.sm.poll(time.monotonic())
        self.flush()
        return events

    def drain(self) -> list[Event]:
        """Whatever has arrived, without waiting."""
        events: list[Event] = []
        while select.select([self.channel.fileno()], [], [], 0)[0]:
            events += self.read()
        return events + self.poll()

    def wait_for(self, done: Callable[[], bool], timeout: float) -> list[Event]:
        """Read until done() or the timeout; raises SessionLost on timeout.
        A read keeps the channel's own timeout while that ends it at most
        WAIT_SLACK_S past the deadline: two syscalls fewer per checkpoint."""
        events: list[Event] = []
        end = time.monotonic() + timeout
        shortened = False
        try:
            while not done():
                left = end - time.monotonic()
                if left <= 0:
                    raise SessionLost(f"no answer from the peer within {timeout:.1f} s")
                if self.ack_poll_s and self.fast_receive is None:   # FastAck spins in C
                    self._spin(min(self.ack_poll_s, left))
                if left < self.io_timeout - WAIT_SLACK_S:
                    self.channel.settimeout(left)
                    shortened = True
                events += self.read()
        finally:
            if shortened:
                self.channel.settimeout(self.io_timeout)
        return events

    def _spin(self, budget: float) -> None:
        """Until the peer's bytes can be read or `budget` seconds have passed,
        without sleeping: an answer that comes meanwhile finds this thread on
        its CPU instead of waking an idle one (replication.ack_poll_us). The
        channel holds no decrypted bytes between reads (recv_some drains
        them), so the socket says whether anything came."""
        fds = [self.channel.fileno()]
        end = time.monotonic() + budget
        while not select.select(fds, [], [], 0)[0] and time.monotonic() < end:
            pass

    def close(self) -> None:
        self.closed = True
        self.channel.close()
