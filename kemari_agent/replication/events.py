"""What the state machines tell their driver (the daemon) after taking bytes or time."""

from __future__ import annotations

from dataclasses import dataclass

from .codec import Hello


@dataclass(frozen=True)
class PeerHello:
    """The peer's HELLO was accepted. On the primary, `full_sync` False means the
    secondary already holds every checkpoint up to hello.checkpoint_seq."""

    hello: Hello
    full_sync: bool


@dataclass(frozen=True)
class Acked:
    """Primary: checkpoint `seq` is applied on the secondary; its held I/O may go out."""

    seq: int
    rtt: float


@dataclass(frozen=True)
class Committed:
    """Secondary: checkpoint `seq` was applied atomically and its ACK is queued (or
    already sent: Secondary.send_early)."""

    seq: int
    generation: int
    records: int
    pages: int
    nbytes: int


@dataclass(frozen=True)
class Discarded:
    """Secondary: a staged checkpoint was thrown away; the previous one stays."""

    reason: str


@dataclass(frozen=True)
class SyncProgressed:
    """Secondary: one pre-copy round of a full sync has arrived."""

    round: int
    pages_sent: int
    pages_remaining: int


@dataclass(frozen=True)
class SyncComplete:
    """The full sync's closing checkpoint is applied: the pair is now protected."""

    seq: int


@dataclass(frozen=True)
class PeerGoodbye:
    """The peer ended the session in order (HANDOVER: `checkpoint_seq` is final)."""

    reason: int
    checkpoint_seq: int


@dataclass(frozen=True)
class PeerDead:
    """Nothing at all came from the peer for longer than the configured timeout."""

    silent_for: float


Event = (
    PeerHello | Acked | Committed | Discarded | SyncProgressed | SyncComplete | PeerGoodbye
    | PeerDead
)
