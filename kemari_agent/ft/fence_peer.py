"""Fencing the peer before unprotected output (DRBD's fence-peer handler, for Kemari).

A primary that runs without a secondary in sync lets output leave that its
peer's copy does not cover. Before the first such output, the cluster must no
longer be able to promote the peer (whose copy is now behind). The primary
runs `policy.fence_peer_handler` (the OCF agent sets `kemari-fence-peer`,
which adds a CIB constraint forbidding the Promoted role anywhere else) and
holds the guest's output until it succeeds; when the peer is back in sync,
`policy.unfence_peer_handler` lifts the constraint.

Without a handler configured (a pair run by hand) nothing is called.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protector import Protector

log = logging.getLogger(__name__)

HANDLER_TIMEOUT_S = 60
RETRY_S = 1.0


class PeerFence:
    """The fenced/unfenced state of one primary's peer, and the handlers' runs."""

    def __init__(self, name: str, fence_cmd: str | None, unfence_cmd: str | None) -> None:
        self.name = name
        self.fence_cmd, self.unfence_cmd = fence_cmd, unfence_cmd
        self.fenced = False
        self.last_error: str | None = None
        self._lock = threading.Lock()   # one handler at a time, never fence and unfence racing

    def status(self) -> dict:
        return {"handler": self.fence_cmd is not None, "fenced": self.fenced,
                "error": self.last_error}

    def _run(self, cmd: str, what: str, peer: str | None) -> bool:
        env = {**os.environ, "KEMARI_NAME": self.name, "KEMARI_PEER": peer or ""}
        try:
            proc = subprocess.run(shlex.split(cmd), env=env, capture_output=True, text=True,
                                  timeout=HANDLER_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.last_error = f"{what} handler {cmd!r}: {exc}"
            log.error("%s: %s", self.name, self.last_error)
            return False
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            self.last_error = f"{what} handler {cmd!r} exited {proc.returncode}: {detail[0]}"
            log.error("%s: %s", self.name, self.last_error)
            return False
        self.last_error = None
        return True

    def fence(self, peer: str | None) -> bool:
        """True once the peer can no longer be promoted (or no handler is configured)."""
        if self.fence_cmd is None or self.fenced:
            return True
        with self._lock:
            if not self.fenced and self._run(self.fence_cmd, "fence-peer", peer):
                self.fenced = True
                log.warning("%s: peer fenced (cannot be promoted) before unprotected output",
                            self.name)
        return self.fenced

    def peer_in_sync(self, peer: str | None) -> None:
        """The pair is protected again: lift the fence, in the background (the guest runs)."""
        if not self.fenced or self.unfence_cmd is None:
            return

        def lift() -> None:
            with self._lock:
                if self.fenced and self._run(self.unfence_cmd, "unfence-peer", peer):
                    self.fenced = False
                    log.info("%s: peer in sync again, fence lifted", self.name)
        threading.Thread(target=lift, name="unfence-peer", daemon=True).start()

    def before_unprotected_output(self, protector: Protector) -> None:
        """Loop thread, vCPU stopped, output pending and no secondary in sync: hold it
        until the peer is fenced (retrying the handler) or a secondary is in sync."""
        peer = protector.config.replication.peer
        peer_text = f"{peer[0]}:{peer[1]}" if peer else None
        if self.fence(peer_text):
            return
        state = protector.state
        protector.state = "suspended"
        log.warning("%s: fence-peer failed; output held until it succeeds or a peer "
                    "is in sync", self.name)
        next_try = time.monotonic() + RETRY_S
        vmm = protector.vmm
        while protector.link is None and not protector._closing.is_set() and not vmm.stopping:
            vmm.serve_calls(0.05)
            if time.monotonic() >= next_try:
                if self.fence(peer_text):
                    break
                next_try = time.monotonic() + RETRY_S
        if protector.state == "suspended":
            protector.state = state
