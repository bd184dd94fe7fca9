"""Every way a replication stream can be wrong, as one exception tree.

The daemon catches `StreamError` alone: whatever went wrong, the connection
is closed and the last committed checkpoint is what survives. Each class has
a numeric `code` so the reason can be sent to the peer in an ERROR record.
"""


class StreamError(Exception):
    """The stream cannot be trusted any more: close the connection."""

    code = 1


class MalformedRecord(StreamError):
    """A record's bytes do not match the layout of its type."""

    code = 2


class RecordTooLarge(MalformedRecord):
    """A record header announces more bytes than any valid record has."""

    code = 3


class UnknownRecordType(StreamError):
    """A record type this version does not know, without the skippable flag."""

    code = 4


class NotAKemariStream(StreamError):
    """The first bytes are not a Kemari HELLO (wrong magic or wrong first record)."""

    code = 5


class UnsupportedVersion(StreamError):
    """The peer speaks a stream version this node does not."""

    code = 6


class TruncatedStream(StreamError):
    """The stream ended in the middle of a record or of a checkpoint."""

    code = 7


class ProtocolError(StreamError):
    """Well-formed records that are not allowed here (wrong state or order)."""

    code = 8


class UnexpectedRecord(ProtocolError):
    """A record type that this side must never receive in its current state."""

    code = 9


class HandshakeError(ProtocolError):
    """The peer's HELLO does not match this node (name, memory size, role)."""

    code = 10


class GenerationError(ProtocolError):
    """Generations disagree: stale primary, or a record from another generation."""

    code = 11


class ReplayedCheckpoint(ProtocolError):
    """A checkpoint whose sequence number was already applied."""

    code = 12


class OutOfOrderCheckpoint(ProtocolError):
    """A checkpoint sequence number that skips ahead (a checkpoint went missing)."""

    code = 13


class ChecksumMismatch(ProtocolError):
    """CHECKPOINT_END's counts or checksum differ from the records received."""

    code = 14


class DeltaMismatch(ProtocolError):
    """Pages rebuilt from a PAGES_XOR delta differ from the primary's: its copy of
    them and this node's diverged. The checkpoint is discarded."""

    code = 16


class PeerError(StreamError):
    """The peer reported an error in an ERROR record and will close."""

    code = 15

    def __init__(self, peer_code: int, message: str) -> None:
        super().__init__(f"peer reported error {peer_code}: {message}")
        self.peer_code = peer_code
        self.peer_message = message


class ApplyError(StreamError):
    """This node could not apply a checkpoint (an I/O error such as a full disk):
    the session ends, the last applied checkpoint stays. Not the peer's fault,
    so it carries no error code of its own."""


class TransportError(Exception):
    """The encrypted channel failed (network, TLS, timeout)."""


class AuthenticationError(TransportError):
    """The peer could not prove it holds this VM's replication key."""
