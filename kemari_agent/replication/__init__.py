"""Kemari's replication stream: codec and sans-I/O primary/secondary state machines
(no sockets, threads or clocks), plus the TLS transport and the on-disk state.

docs/stream-format.md specifies the bytes; docs/crypto.md the transport.

Driving it (the daemon's job; `now` is time.monotonic()):

    primary:   ch = transport.connect(key, host, port)
               p = Primary(name=, memory_size=, generation=, checkpoint_seq=, now=)
               on readable: events = p.receive_data(ch.recv_some(), now)
               at a tapped event (vCPU stopped):
                   seq = p.checkpoint(mem, dirty_pfns, [Vcpu(..), Device(..), DiskWrite(..)],
                                      now=now)
                   ch.send_all(p.data_to_send()); resume nothing until p.is_acked(seq)
               on a timer: events += p.poll(now); ch.send_all(p.data_to_send())
               reconnecting: Primary(..., resync_from=checkpoints the driver can cover,
                   unprotected=output went out uncovered, config=pair settings); in
                   state RESYNCING the first checkpoint() is the resync (pages dirtied and
                   sectors written since p.resync_base); else p.full_sync_reason says why

    secondary: ch = listener.accept()
               s = Secondary(sink, name=, memory_size=, generation=, checkpoint_seq=,
                             has_checkpoint=, now=, config=, outdated=)
               s.consistent / s.outdated: persist them (promotion decisions)
               ch.send_all(s.data_to_send())             # its HELLO
               per recv: events = s.receive_data(data, now); ch.send_all(s.data_to_send())
               on EOF/transport error: events = s.connection_lost()

On StreamError: send what data_to_send() still holds (ACKs of checkpoints
already applied), then codec.encode_error(exc), then close.
"""

from .codec import Decoder, encode, encode_error
from .errors import StreamError, TransportError
from .primary import Primary, PrimaryState
from .secondary import CheckpointSink, Secondary, SecondaryState

__all__ = [
    "CheckpointSink",
    "Decoder",
    "Primary",
    "PrimaryState",
    "Secondary",
    "SecondaryState",
    "StreamError",
    "TransportError",
    "encode",
    "encode_error",
]
