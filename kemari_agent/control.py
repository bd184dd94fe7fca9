"""The per-VM control socket: one JSON request per line, one JSON reply per line.

Root-only by construction: the socket is created mode 0600 in a 0700
directory, and the server also checks the peer's credentials.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import KemariError
from .safefiles import private_dir

log = logging.getLogger(__name__)

Handler = Callable[[dict], dict]
MAX_REQUEST = 1 << 16


class ControlServer:
    """Serves requests on a unix socket in a background thread."""

    def __init__(self, path: Path, handler: Handler, *, serve_now: bool = True) -> None:
        """serve_now=False: bound and listening, but requests wait (in the backlog)
        until start(), e.g. until the daemon's pid file is written."""
        self.path = path
        self.handler = handler
        private_dir(path.parent)
        if _alive(path):
            raise KemariError(f"{path}: another Kemari daemon is already serving this VM")
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.listen(16)
        self._closed = False
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        if serve_now:
            self.thread.start()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(OSError):
            if self.path.exists():
                self.path.unlink()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.getuid()):
                _send(conn, {"ok": False, "error": "permission denied"})
                return
            f = conn.makefile("rb")
            line = f.readline(MAX_REQUEST)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                reply = self.handler(request)
            except ValueError as exc:
                reply = {"ok": False, "error": f"malformed request: {exc}"}
            except KemariError as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # the daemon must outlive a bad request
                log.exception("control request %r failed", line[:200])
                reply = {"ok": False, "error": f"internal error: {exc}"}
            with contextlib.suppress(OSError):
                _send(conn, reply)


def _send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def _alive(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def request(sock_path: Path, cmd: str, timeout: float = 60.0, **args: Any) -> dict:
    """Send one request to a daemon; raises KemariError if it is not there or says no."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(sock_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"no Kemari daemon at {sock_path}") from exc
        except OSError as exc:
            raise KemariError(f"{sock_path}: {exc.strerror}") from exc
        _send(s, {"cmd": cmd, **args})
        line = s.makefile("rb").readline()
    if not line:
        raise KemariError(f"{sock_path}: the daemon closed the connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise KemariError(reply.get("error", "request failed"))
    return reply


class NotRunning(KemariError):
    """No daemon serves that VM."""
