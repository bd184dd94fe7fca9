"""A crowd at a secondary's replication port: connections that are not its
primary, each kind kept up (reconnecting when closed) until stop().

idle        TCP connected, nothing sent
half_hello  the first half of a real TLS ClientHello, then silence
slow_tls    a ClientHello dribbled one byte every 100 ms
wrong_key   full TLS handshakes with another VM's key, one after another
no_hello    authenticated with the right key, then silent
old_primary authenticated, then a primary HELLO of an older generation

Each of its members comes back `pause` seconds after its connection ended.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import ssl
import sys
import threading
from pathlib import Path

from kemari_agent.replication import keys, transport
from kemari_agent.replication.codec import Hello, HelloFlag, Role, encode
from kemari_agent.replication.errors import TransportError

KINDS = ("idle", "half_hello", "slow_tls", "wrong_key", "no_hello", "old_primary")


def client_hello() -> bytes:
    """The first flight of a TLS 1.3 client: what a stranger's handshake begins with."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Crowd:
    def __init__(self, address: tuple[str, int], key: Path, name: str, memory_size: int,
                 old_generation: int, per_kind: int = 3, pause: float = 0.5) -> None:
        """`pause`: between one connection's end and the next of the same member."""
        self.address, self.key, self.name = address, str(key), name
        self.memory_size, self.old_generation = memory_size, old_generation
        self.pause = pause
        self.other_key = str(Path(key).with_suffix(".other.key"))
        if not Path(self.other_key).exists():
            keys.keygen(Path(self.other_key))
        self.hello = client_hello()
        self.stop_flag = threading.Event()
        self.connections = dict.fromkeys(KINDS, 0)   # connections opened, per kind
        self.closed_by_peer = dict.fromkeys(KINDS, 0)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(kind,), daemon=True)
                        for kind in KINDS for _ in range(per_kind)]

    def start(self) -> Crowd:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=30)

    def _count(self, table: dict, kind: str) -> None:
        with self.lock:
            table[kind] += 1

    def _run(self, kind: str) -> None:
        while not self.stop_flag.is_set():
            with contextlib.suppress(OSError, TransportError):
                getattr(self, f"_{kind}")()
            self._count(self.closed_by_peer, kind)
            self.stop_flag.wait(self.pause)

    def _tcp(self, kind: str) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=2)
        self._count(self.connections, kind)
        return sock

    def _hold(self, sock: socket.socket) -> None:
        """Until the secondary closes it (or the crowd stops)."""
        sock.settimeout(0.2)
        while not self.stop_flag.is_set():
            try:
                if not sock.recv(4096):
                    return
            except TimeoutError:
                continue

    def _idle(self) -> None:
        with self._tcp("idle") as sock:
            self._hold(sock)

    def _half_hello(self) -> None:
        with self._tcp("half_hello") as sock:
            sock.sendall(self.hello[: len(self.hello) // 2])
            self._hold(sock)

    def _slow_tls(self) -> None:
        with self._tcp("slow_tls") as sock:
            sock.settimeout(0.1)
            for i in range(len(self.hello)):
                if self.stop_flag.is_set():
                    return
                sock.sendall(self.hello[i:i + 1])
                try:
                    if not sock.recv(4096):
                        return
                except TimeoutError:
                    pass
            self._hold(sock)

    def _wrong_key(self) -> None:
        self._count(self.connections, "wrong_key")
        transport.connect(self.other_key, *self.address, timeout=2).close()

    def _authenticated(self, kind: str) -> transport.Channel:
        channel = transport.connect(self.key, *self.address, timeout=2)
        self._count(self.connections, kind)
        return channel

    def _no_hello(self) -> None:
        with self._authenticated("no_hello") as ch:
            ch.settimeout(0.2)
            while not self.stop_flag.is_set():
                with contextlib.suppress(transport.TransportTimeout):
                    if not ch.recv_some():
                        return

    def _old_primary(self) -> None:
        with self._authenticated("old_primary") as ch:
            ch.send_all(encode(Hello(self.name, Role.PRIMARY, self.old_generation, 0,
                                     self.memory_size, HelloFlag.FULL_SYNC)))
            ch.settimeout(0.2)
            while not self.stop_flag.is_set():
                with contextlib.suppress(transport.TransportTimeout):
                    if not ch.recv_some():
                        return


def main() -> None:
    """Run a crowd in its own process (so its threads do not share the measuring
    process's interpreter) until stdin closes; print its counts as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("key")
    ap.add_argument("name")
    ap.add_argument("memory_size", type=int)
    ap.add_argument("--old-generation", type=int, default=0)
    ap.add_argument("--per-kind", type=int, default=3)
    args = ap.parse_args()
    crowd = Crowd(("127.0.0.1", args.port), Path(args.key), args.name, args.memory_size,
                  args.old_generation, args.per_kind).start()
    sys.stdin.read()
    crowd.stop()
    print(json.dumps({"connections": crowd.connections}))


if __name__ == "__main__":
    main()
