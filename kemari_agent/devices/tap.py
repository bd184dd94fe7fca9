"""A TAP device: the guest appears on the host's network with its own MAC/IP."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess

from ..errors import KemariError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise KemariError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class TapPort:
    """Frames to and from a TAP interface (optionally enslaved to a bridge)."""

    def __init__(self, name: str, bridge: str | None = None) -> None:
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise KemariError(f"TAP {name}: cannot open /dev/net/tun: {exc.strerror}") from exc
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                                        IFF_TAP | IFF_NO_PI))
            if bridge:
                _ip("link", "set", "dev", name, "master", bridge)
            _ip("link", "set", "dev", name, "up")
        except (OSError, KemariError) as exc:
            os.close(self.fd)
            detail = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise KemariError(f"TAP {name}: cannot set up: {detail} (root needed)") from exc
        self.name = name

    def fileno(self) -> int:
        return self.fd

    def recv(self) -> bytes | None:
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return None

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            pass  # the host side is not keeping up: drop, as a NIC would
        except OSError as exc:
            if exc.errno != 5:  # EIO while the link is down: drop
                raise

    version = 0                     # no state of its own

    def has_pending(self) -> bool:
        return False

    def state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
