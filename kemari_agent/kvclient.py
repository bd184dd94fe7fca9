"""A client of the `kv` guest protocol (DESIGN.md section 6) over UDP.

Retries a request with the SAME id until it gets the reply, which is what
the protocol's replay table is for. Used by the demo, tests and benchmarks.
"""

from __future__ import annotations

import itertools
import socket
import time
import uuid
from dataclasses import dataclass


class NoReply(Exception):
    """The guest did not answer within the retry budget."""


@dataclass(frozen=True)
class Reply:
    kind: str          # OK, VAL, NONE, ERR
    req_id: str
    value: str | None

    @classmethod
    def parse(cls, text: str) -> Reply:
        parts = text.split(" ", 2)
        kind = parts[0]
        if kind == "ERR":
            return cls(kind, "", " ".join(parts[1:]) or None)
        return cls(kind, parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else None)


class KvClient:
    def __init__(self, addr: tuple[str, int], timeout: float = 0.3, attempts: int = 20,
                 prefix: str | None = None) -> None:
        self.addr = addr
        self.timeout, self.attempts = timeout, attempts
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # ids must never repeat across clients: the guest replays a known id
        self.prefix = prefix or f"c{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> KvClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_id(self) -> str:
        return f"{self.prefix}-{next(self._ids)}"

    def raw(self, payload: bytes, timeout: float | None = None) -> bytes | None:
        """Send one datagram, return the first reply datagram or None."""
        self.sock.settimeout(timeout or self.timeout)
        self.sock.sendto(payload, self.addr)
        try:
            return self.sock.recv(65535)
        except TimeoutError:
            return None

    def call(self, verb: str, *args: str, req_id: str | None = None) -> Reply:
        """Send `VERB id args...`, retrying with the same id; returns the matching reply."""
        req_id = req_id or self.new_id()
        line = " ".join((verb, req_id, *args)).encode()
        for _ in range(self.attempts):
            self.sock.settimeout(self.timeout)
            self.sock.sendto(line, self.addr)
            end = time.monotonic() + self.timeout
            while (left := end - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(65535)
                except TimeoutError:
                    break
                reply = Reply.parse(data.decode(errors="replace"))
                if reply.req_id == req_id or (reply.kind == "ERR" and not reply.req_id):
                    return reply
        raise NoReply(f"no reply to {line.decode()!r} after {self.attempts} attempts")

    def put(self, key: str, value: str, req_id: str | None = None) -> Reply:
        return self.call("PUT", key, value, req_id=req_id)

    def get(self, key: str, req_id: str | None = None) -> Reply:
        return self.call("GET", key, req_id=req_id)

    def incr(self, key: str, req_id: str | None = None) -> Reply:
        return self.call("INCR", key, req_id=req_id)
