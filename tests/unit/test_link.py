"""A session's Link over a real TLS pair on loopback: an early send that fails
is raised only once the checkpoint it interrupted is applied."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
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


def test_waiting_spins_first_and_still_sleeps_until_the_answer(tmp_path) -> None:
    """replication.ack_poll_us: wait_for spins on the socket for at most its
    budget, then reads as before; an answer that comes during the spin, or
    after it, is taken either way."""
    pair = protected_pair(delta_cache_pages=0)
    with tls_pair(tmp_path) as (server, client):
        link = Link(client, pair.primary, 2.0, ack_poll_s=0.2)
        spins = []            # (budget, how long the spin took)
        spin = link._spin

        def timed_spin(budget: float) -> None:
            t0 = time.monotonic()
            spin(budget)
            spins.append((budget, time.monotonic() - t0))
        link._spin = timed_spin
        for delay in (0.005, 0.5):       # the ACK in the middle of the spin, then after it
            seq = pair.primary.checkpoint(pair.mem, pair.dirty(2), now=0.0)
            link.flush()
            ack = b""
            while not ack:
                pair.secondary.receive_data(server.recv_some(), 0.0)
                ack = pair.secondary.data_to_send()
            timer = threading.Timer(delay, server.send_all, (ack,))
            timer.start()
            t0 = time.monotonic()
            link.wait_for(lambda s=seq: pair.primary.is_acked(s), 2.0)
            waited = time.monotonic() - t0
            timer.join()
            assert pair.primary.is_acked(seq)
            assert delay <= waited + 0.005 and waited < delay + 0.5
        (budget_1, took_1), (budget_2, took_2) = spins
        assert budget_1 == budget_2 == 0.2
        assert took_1 < 0.2             # the ACK came at 5 ms: the spin saw it
        assert 0.2 <= took_2 < 0.45     # none in its budget: it stopped, the read slept


@pytest.mark.parametrize("wait_s, io_timeout", [(0.3, 0.3), (0.2, 1.0), (0.7, 0.25)])
def test_waiting_on_a_silent_peer_ends_at_its_deadline_and_keeps_the_read_timeout(
        tmp_path, wait_s: float, io_timeout: float) -> None:
    """wait_for shortens a read's timeout only where the channel's own would
    end it more than WAIT_SLACK_S past the deadline, and puts it back."""
    pair = protected_pair(delta_cache_pages=0)
    with tls_pair(tmp_path) as (_server, client):
        link = Link(client, pair.primary, io_timeout)
        seq = pair.primary.checkpoint(pair.mem, pair.dirty(2), now=0.0)
        link.flush()
        t0 = time.monotonic()
        with pytest.raises(SessionLost, match="no answer from the peer"):
            link.wait_for(lambda: pair.primary.is_acked(seq), wait_s)
        waited = time.monotonic() - t0
        assert wait_s <= waited < wait_s + 0.15
        assert client._sock.gettimeout() == io_timeout
