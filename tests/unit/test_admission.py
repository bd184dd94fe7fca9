"""Incoming connections are authenticated without ever blocking the server:
a handshake is stepped only as far as the bytes at hand allow, waiting
connections are bounded in number and time."""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path

import pytest
from crowd import client_hello

from kemari_agent.ft import admission
from kemari_agent.ft.admission import Admission
from kemari_agent.ft.link import Link
from kemari_agent.replication import keys, transport
from kemari_agent.replication.codec import (
    PAGE_SIZE,
    Decoder,
    Error,
    Hello,
    HelloFlag,
    Role,
    encode,
)
from kemari_agent.replication.errors import AuthenticationError
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.secondary import Secondary

pytestmark = pytest.mark.unit

MEM = 16 * PAGE_SIZE


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    keys.keygen(d / "vm.key")
    keys.keygen(d / "other.key")
    return d / "vm.key"


def test_a_stalled_handshake_never_blocks_and_a_good_one_completes(key):
    with transport.listen(str(key)) as listener:
        assert listener.accept_pending(5.0) is None
        stalled = socket.create_connection(listener.address)
        stalled.sendall(client_hello()[:40])
        select.select([listener], [], [], 2)
        hs = listener.accept_pending(5.0)
        t0 = time.monotonic()
        assert hs.step() is None and not hs.wants_write
        assert time.monotonic() - t0 < 0.1
        hs.close()
        stalled.close()

        result = {}
        client = threading.Thread(target=lambda: result.update(
            ch=transport.connect(str(key), *listener.address)))
        client.start()
        select.select([listener], [], [], 5)
        hs = listener.accept_pending(5.0)
        channel = None
        while channel is None:
            fd = [hs.fileno()]
            select.select([] if hs.wants_write else fd, fd if hs.wants_write else [], [], 5)
            channel = hs.step()
        client.join(5)
        channel.send_all(b"hi")
        assert result["ch"].recv_some() == b"hi"
        channel.close()
        result["ch"].close()


def test_a_wrong_key_is_refused_by_step(key):
    with transport.listen(str(key)) as listener:
        client = threading.Thread(target=lambda: pytest.raises(
            AuthenticationError, transport.connect, str(key.with_name("other.key")),
            *listener.address))
        client.start()
        select.select([listener], [], [], 5)
        hs = listener.accept_pending(5.0)
        with pytest.raises(AuthenticationError):
            for _ in range(100):
                select.select([hs], [], [], 1)
                hs.step()
        client.join(5)


def _secondary_session(channel: transport.Channel) -> Link:
    sm = Secondary(ImageSink(MEM), name="vm", memory_size=MEM, generation=3, checkpoint_seq=9,
                   has_checkpoint=True, now=time.monotonic())
    link = Link(channel, sm, 2.0)
    link.flush()
    return link


def run_admission(door: Admission, until, timeout: float = 10.0) -> list:
    admitted = []
    end = time.monotonic() + timeout
    while not until() and time.monotonic() < end:
        ready, writable, _ = select.select(door.read_fds(), door.write_fds(), [], 0.05)
        got = door.service(set(ready) | set(writable), time.monotonic())
        if got:
            admitted.append(got)
    return admitted


def test_waiting_connections_are_bounded_and_time_out(key, monkeypatch):
    monkeypatch.setattr(admission, "WAIT_S", 0.5)
    rejected: list[str] = []
    with transport.listen(str(key)) as listener:
        door = Admission(listener, _secondary_session, rejected.append)
        idle = [socket.create_connection(listener.address)
                for _ in range(admission.MAX_WAITING + 4)]
        run_admission(door, lambda: door.counts["evicted"] >= 4, timeout=5)
        assert door.status()["waiting"] == admission.MAX_WAITING
        assert door.counts["evicted"] == 4
        run_admission(door, lambda: door.status()["waiting"] == 0, timeout=5)
        assert door.counts["timed_out"] == admission.MAX_WAITING
        for s in idle:
            s.close()


def test_only_an_accepted_hello_is_admitted(key):
    rejected: list[str] = []
    with transport.listen(str(key)) as listener:
        door = Admission(listener, _secondary_session, rejected.append)

        def primary(generation: int) -> transport.Channel:
            ch = transport.connect(str(key), *listener.address)
            ch.send_all(encode(Hello("vm", Role.PRIMARY, generation, 0, MEM,
                                     HelloFlag.FULL_SYNC)))
            return ch

        chans = []
        for gen in (2, 4):
            t = threading.Thread(target=lambda g=gen: chans.append(primary(g)))
            t.start()
            admitted = run_admission(door, lambda: bool(door.counts["refused"]), timeout=2) \
                if gen == 2 else run_admission(door, lambda: False, timeout=1)
            t.join(5)
            if gen == 2:
                assert admitted == [] and door.counts["refused"] == 1
                assert "older than this node's" in rejected[-1]
                decoder, records = Decoder(), []
                chans[-1].settimeout(5)
                while data := chans[-1].recv_some():       # our HELLO, then why it was closed
                    records += decoder.feed(data)
                assert [type(r) for r in records] == [Hello, Error]
                assert "older than this node's" in records[1].message
            else:
                assert len(admitted) == 1
                link, events = admitted[0]
                assert events[0].hello.generation == 4
                link.close()
        for ch in chans:
            ch.close()
        door.close()


def test_strangers_are_reported_once_per_interval_and_counted(key):
    rejected: list[str] = []
    with transport.listen(str(key)) as listener:
        door = Admission(listener, _secondary_session, rejected.append)
        for n in range(1, 4):
            t = threading.Thread(target=lambda: pytest.raises(
                AuthenticationError, transport.connect, str(key.with_name("other.key")),
                *listener.address))
            t.start()
            run_admission(door, lambda n=n: door.counts["refused"] == n, timeout=5)
            t.join(5)
        assert door.counts["refused"] == 3
        assert len(rejected) == 1 and "without this VM's key" in rejected[0]
        door.close()
