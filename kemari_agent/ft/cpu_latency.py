"""A CPU wake-up latency request to the kernel (PM QoS), held while the daemon runs.

A checkpoint is two wake-ups across CPUs: the secondary's, by the primary's
write, and the primary's, by the ACK. A CPU that went idle in a deep state,
or a virtual CPU that halted and must be woken by its host, adds its exit
latency to each, now and then a millisecond or more (docs/benchmarks.md,
session 23). Writing a number of microseconds to /dev/cpu_dma_latency and
keeping the file open asks every CPU of the host to idle only in states that
wake up within it (0: poll), as tuned's latency-performance profile does;
the kernel drops the request when the file is closed, so a daemon that dies
leaves nothing behind. The price: idle CPUs stay awake (power, and on a VM
host, CPU time of the host's).
"""

from __future__ import annotations

import logging
import os
import struct

log = logging.getLogger(__name__)

DEVICE = "/dev/cpu_dma_latency"


class CpuLatencyRequest:
    """Ask for at most `latency_us` of CPU wake-up latency until close()."""

    def __init__(self, latency_us: int, device: str = DEVICE) -> None:
        self.latency_us = latency_us
        self.error: str | None = None
        self._fd: int | None = None
        try:
            fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.error = f"cannot open {device}: {exc.strerror}"
        else:
            try:
                os.write(fd, struct.pack("=i", latency_us))
                self._fd = fd
            except OSError as exc:
                os.close(fd)
                self.error = f"cannot write {device}: {exc.strerror}"
        if self.error:
            # Protection goes on without it: slower checkpoints beat no VM.
            log.warning("replication.cpu_latency_us = %d not applied: %s", latency_us,
                        self.error)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def status(self) -> dict:
        return {"requested_us": self.latency_us, "held": self.held, "error": self.error}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def current_limit_us(device: str = DEVICE) -> int:
    """The kernel's latency limit now: the smallest request any process holds."""
    with open(device, "rb") as f:
        return struct.unpack("=i", f.read(4))[0]
