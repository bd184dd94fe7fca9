"""A session's Link over a real TLS pair on loopback: an early send that fails
is raised only once the checkpoint it interrupted is applied."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from test_replication_session import protected_pair

from kemari_agent.ft.link import Link, SessionLost
from kemari_agent.replication import keys, native_codec, transport
from kemari_agent.replication.codec import Vcpu
from kemari_agent.replication.events import Committed

pytestmark = pytest.mark.unit


@contextlib.contextmanager
def tls_pair(tmp_path) -> Iterator[tuple[transport.Channel, transport.Channel]]:
    """(server, client) channels of one authenticated connection."""
    key = tmp_path / "vm.key"
    keys.keygen(key)
    with transport.listen(str(key)) as listener:
        client: dict = {}
        t = threading.Thread(target=lambda: client.update(
            ch=transport.connect(str(key), *listener.address)))
        t.start()
        server = listener.accept(timeout=5)
        t.join(5)
        try:
            yield server, client["ch"]
        finally:
            server.close()
            client["ch"].close()


def test_a_failed_early_send_applies_the_checkpoint_and_is_raised_by_the_next_flush(
        tmp_path) -> None:
    assert native_codec.ENABLED and native_codec.CHECKPOINT_READER, "native codec not built"
    pair = protected_pair(delta_cache_pages=64)
    with tls_pair(tmp_path) as (server, client):
        link = Link(server, pair.secondary, 2.0)
        pair.secondary.send_early = link.send_early
        # this end can no longer send; it can still receive
        raw = socket.fromfd(server.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        raw.shutdown(socket.SHUT_WR)
        raw.close()
        seq = pair.primary.checkpoint(pair.mem, pair.dirty(4), [Vcpu(0, 2, b"r")], now=0.0)
        client.send_all(pair.primary.data_to_send())
        events = link.read(flush=False)
        assert [ev.seq for ev in events if isinstance(ev, Committed)] == [seq]
        assert pair.sink.checkpoint_seq == seq
        pair.assert_mirrors_primary()
        assert pair.secondary.data_to_send() == b""     # the ACK went to the failed send
        with pytest.raises(SessionLost):
            link.flush()
