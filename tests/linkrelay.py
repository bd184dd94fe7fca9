"""A userspace TCP relay on loopback between a primary and its secondary, that a
test can cut (every connection through it is closed, new ones are refused)
and restore: a replication link failure without touching the host's network."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class LinkRelay:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bytes_relayed = 0
        self._cut = False
        self._closing = False
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="relay", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """The link fails: open connections die, new ones are closed at once."""
        with self._lock:
            self._cut = True
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closing = True
        self.cut()
        self.listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._closing:
            with self._lock:
                pairs = list(self._pairs)
            fds = [self.listener] + [s for pair in pairs for s in pair]
            try:
                readable, _, _ = select.select(fds, [], [], 0.05)
            except (OSError, ValueError):      # a socket closed under us by cut()
                continue
            for sock in readable:
                if sock is self.listener:
                    self._accept()
                else:
                    self._forward(sock, pairs)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        if self._cut:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        with self._lock:
            self._pairs.append((client, upstream))

    def _forward(self, sock: socket.socket, pairs) -> None:
        pair = next((p for p in pairs if sock in p), None)
        if pair is None:
            return
        other = pair[1] if sock is pair[0] else pair[0]
        try:
            data = sock.recv(1 << 16)
            if data:
                other.sendall(data)
                self.bytes_relayed += len(data)
                return
        except OSError:
            pass
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for s in pair:
            s.close()
