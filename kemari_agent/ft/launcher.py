"""`kemari start`: run the daemon detached, return once it answers (what an OCF
agent wants from a start action)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import paths
from ..config import VmConfig
from ..control import NotRunning, request
from ..errors import KemariError

START_TIMEOUT_S = 30


def log_path(name: str) -> Path:
    return paths.run_dir() / f"{name}.log"


def start(config: VmConfig, config_path: Path, role: str, flags: Sequence[str] = ()) -> dict:
    """`flags`: more `kemari start` options for the daemon (this node's addresses...)."""
    sock = paths.socket_path(config.name)
    try:
        status = request(sock, "status", timeout=5)
        raise KemariError(f"{config.name} is already running (pid {status['pid']}, "
                          f"{status['role']})")
    except NotRunning:
        pass
    log = log_path(config.name)
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kemari_agent.cli", "start", str(config_path), "--role", role,
             "--foreground", *flags],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd="/", env=os.environ.copy())
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise KemariError(f"{config.name}: the daemon exited with {proc.returncode}:\n  "
                              + "\n  ".join(tail))
        try:
            status = request(sock, "status", timeout=5)
            if status.get("pid") == proc.pid and (role == "secondary" or
                                                  status["role"] == "primary"):
                return status
        except NotRunning:
            pass
        time.sleep(0.05)
    raise KemariError(f"{config.name}: the daemon did not answer within {START_TIMEOUT_S} s "
                      f"(see {log})")
