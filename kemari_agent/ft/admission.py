"""The secondary's door: incoming connections, from their first TCP byte until
one becomes the current primary's session.

A connection passes two waiting rooms, bounded in time and in number, and
neither ever blocks the loop that serves the current primary:

1. the TLS handshake, stepped only when its socket is ready: strangers
   (idle, half-open, slow, or without the key) stay here until they fail or
   their time is up;
2. authenticated, waiting for the peer's HELLO: a real primary of an older
   generation (or of another VM) is refused here by the session's own
   HELLO checks, and the current session never notices it.

Only a connection whose HELLO was accepted replaces the current session.
At most MAX_WAITING connections wait in both rooms together; one more
evicts the oldest unauthenticated handshake (a crowd then churns through
the room, but cannot keep out a real primary, whose handshake takes
milliseconds), or is closed at once when every waiting one is authenticated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..replication.errors import AuthenticationError, TransportError
from ..replication.events import Event, PeerHello
from ..replication.transport import Channel, Handshake, Listener
from .link import Link, SessionLost

log = logging.getLogger(__name__)

MAX_WAITING = 16
WAIT_S = 5.0            # for the TLS handshake, then again for the HELLO
ACCEPTS_PER_TURN = 64   # drain the backlog without starving the session
# An authenticated peer's partial TLS record may hold a read this long at most.
READ_WAIT_S = 0.02
# Strangers are reported at most once per this interval (with a count), so a
# flood of them cannot fill the log (in /run: memory) or hide other errors.
STRANGER_REPORT_S = 10.0


@dataclass
class _Authenticated:
    link: Link
    deadline: float


class Admission:
    def __init__(self, listener: Listener, new_session: Callable[[Channel], Link],
                 reject: Callable[[str], None]) -> None:
        """`new_session` wraps an authenticated channel in a Link whose state machine
        has queued its HELLO; `reject` records why a peer was refused."""
        self.listener = listener
        self._listener_fd = listener.fileno()     # read at every pass of the loop
        self._new_session = new_session
        self._reject = reject
        self._handshakes: list[Handshake] = []
        self._authenticated: list[_Authenticated] = []
        self.counts = {"refused": 0, "timed_out": 0, "evicted": 0}
        self._quiet_until = 0.0
        self._unreported = 0

    def status(self) -> dict:
        return {"waiting": len(self._handshakes) + len(self._authenticated), **self.counts}

    # The loop asks for these at every pass, a checkpoint's included: with both
    # rooms empty (nearly always) they answer without building anything.
    def read_fds(self) -> list[int]:
        if not (self._handshakes or self._authenticated):
            return [self._listener_fd]
        return [self._listener_fd] + \
            [h.fileno() for h in self._handshakes if not h.wants_write] + \
            [a.link.fileno() for a in self._authenticated]

    def write_fds(self) -> list[int]:
        if not self._handshakes:
            return []
        return [h.fileno() for h in self._handshakes if h.wants_write]

    def next_deadline(self) -> float:
        if not (self._handshakes or self._authenticated):
            return float("inf")
        return min([h.deadline for h in self._handshakes] +
                   [a.deadline for a in self._authenticated], default=float("inf"))

    def service(self, ready: Collection[int], now: float) -> tuple[Link, list[Event]] | None:
        """Advance every waiting connection whose fd is in `ready`, accept new
        ones, expire the late. Returns a session whose HELLO was accepted (with
        the events of its first read) to replace the current one, if any."""
        if not (self._handshakes or self._authenticated or self._listener_fd in ready):
            return None
        if self._listener_fd in ready:
            self._accept_waiting(now)
        for hs in [h for h in self._handshakes if h.fileno() in ready]:
            self._step(hs, now)
        admitted = None
        for waiting in [a for a in self._authenticated if a.link.fileno() in ready]:
            admitted = self._read_hello(waiting)
            if admitted:    # any other stays readable for the next turn
                break
        self._expire(now)
        return admitted

    def close(self) -> None:
        for hs in self._handshakes:
            hs.close()
        for waiting in self._authenticated:
            waiting.link.close()
        self._handshakes.clear()
        self._authenticated.clear()

    # ---- the rooms ----------------------------------------------------------------
    def _accept_waiting(self, now: float) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                hs = self.listener.accept_pending(WAIT_S)
            except OSError as exc:          # e.g. out of file descriptors
                log.warning("cannot accept a connection: %s", exc)
                return
            if hs is None:
                return
            if len(self._handshakes) + len(self._authenticated) >= MAX_WAITING:
                self.counts["evicted"] += 1
                if not self._handshakes:
                    hs.close()
                    continue
                self._handshakes.pop(0).close()
            self._handshakes.append(hs)
            self._step(hs, now)

    def _step(self, hs: Handshake, now: float) -> None:
        try:
            channel = hs.step()
        except AuthenticationError as exc:
            self._handshakes.remove(hs)
            self.counts["refused"] += 1
            self._report_stranger(f"refused a peer without this VM's key: {exc}", now, True)
            return
        except TransportError as exc:
            self._handshakes.remove(hs)
            self._report_stranger(f"connection attempt failed: {exc}", now)
            return
        if channel is None:
            return
        self._handshakes.remove(hs)
        try:
            link = self._new_session(channel)
        except SessionLost as exc:
            channel.close()
            log.info("peer %s left after its handshake: %s", hs.peer, exc)
            return
        link.channel.settimeout(READ_WAIT_S)
        self._authenticated.append(_Authenticated(link, now + WAIT_S))

    def _read_hello(self, waiting: _Authenticated) -> tuple[Link, list[Event]] | None:
        link = waiting.link
        try:
            events = link.read(flush=False)
        except SessionLost as exc:
            self._authenticated.remove(waiting)
            link.close()        # Link.read has told the peer why (e.g. it is stale)
            self.counts["refused"] += 1
            self._reject(f"refused a primary connection from {link.channel.peer}: {exc}; "
                         "the current session goes on")
            return None
        if not any(isinstance(ev, PeerHello) for ev in events):
            return None
        self._authenticated.remove(waiting)
        link.channel.settimeout(link.io_timeout)
        return link, events

    def _report_stranger(self, what: str, now: float, refused: bool = False) -> None:
        """Log (and for a refusal, record) one unauthenticated peer's fate, at most
        once per STRANGER_REPORT_S; the rest are counted."""
        if now < self._quiet_until:
            self._unreported += 1
            return
        if self._unreported:
            what += (f" (and {self._unreported} other unauthenticated connections since "
                     "the last report)")
        self._unreported = 0
        self._quiet_until = now + STRANGER_REPORT_S
        if refused:
            self._reject(what)
        else:
            log.info("%s", what)

    def _expire(self, now: float) -> None:
        for hs in [h for h in self._handshakes if h.deadline <= now]:
            self._handshakes.remove(hs)
            hs.close()
            self.counts["timed_out"] += 1
            self._report_stranger(f"closed connection from {hs.peer}: no TLS handshake "
                                  f"within {WAIT_S:.0f} s", now)
        for waiting in [a for a in self._authenticated if a.deadline <= now]:
            self._authenticated.remove(waiting)
            waiting.link.close()
            self.counts["timed_out"] += 1
            self._reject(f"closed an authenticated connection from {waiting.link.channel.peer}: "
                         f"no HELLO within {WAIT_S:.0f} s")
