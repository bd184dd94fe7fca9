"""Heartbeat and dead-peer bookkeeping from explicit `now` values (no clock inside).

Both sides use it: send a HEARTBEAT after `interval` seconds of silence,
declare the peer dead after `timeout` seconds without a single byte from it.
"""

from __future__ import annotations


class Liveness:
    """When to send a heartbeat and when the peer counts as dead."""

    def __init__(self, now: float, interval: float = 0.5, timeout: float = 3.0) -> None:
        if interval <= 0 or timeout <= interval:
            raise ValueError("need 0 < heartbeat interval < peer timeout")
        self.interval = interval
        self.timeout = timeout
        self.last_sent = now
        self.last_received = now
        self._reported = False

    def sent(self, now: float) -> None:
        self.last_sent = max(self.last_sent, now)

    def received(self, now: float) -> None:
        self.last_received = max(self.last_received, now)
        self._reported = False

    def heartbeat_due(self, now: float) -> bool:
        return now - self.last_sent >= self.interval

    def peer_dead(self, now: float) -> bool:
        return now - self.last_received > self.timeout

    def newly_dead(self, now: float) -> float | None:
        """How long the peer has been silent, the first time it counts as dead
        in a silence; None otherwise (each silence is reported once)."""
        if self._reported or not self.peer_dead(now):
            return None
        self._reported = True
        return now - self.last_received

    def next_deadline(self) -> float:
        """The next `now` at which heartbeat_due or peer_dead can change: a select timeout."""
        return min(self.last_sent + self.interval, self.last_received + self.timeout)
