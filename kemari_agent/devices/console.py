"""The guest's console: bytes on port 0x3f8, logged a line at a time."""

from __future__ import annotations

import collections
import logging

log = logging.getLogger("kemari.guest")


class Console:
    def __init__(self, name: str, keep: int = 200) -> None:
        self.name = name
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._partial = bytearray()

    def put(self, byte: int) -> None:
        if byte == 0x0A:
            line = self._partial.decode(errors="replace")
            self._partial.clear()
            self.lines.append(line)
            log.info("[%s] %s", self.name, line)
        elif len(self._partial) < 4096:
            self._partial.append(byte)

    def tail(self, n: int = 20) -> list[str]:
        return list(self.lines)[-n:]
