"""Where a VM's daemon keeps its socket, pid file and state (DESIGN.md section 5)."""

from __future__ import annotations

import os
from pathlib import Path


def run_dir() -> Path:
    return Path(os.environ.get("KEMARI_RUN_DIR", "/run/kemari"))


def state_dir() -> Path:
    return Path(os.environ.get("KEMARI_STATE_DIR", "/var/lib/kemari"))


def socket_path(name: str) -> Path:
    return run_dir() / f"{name}.sock"


def pid_path(name: str) -> Path:
    return run_dir() / f"{name}.pid"
