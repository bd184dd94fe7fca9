"""`kemari run`: one unprotected guest in the foreground.

Wires the pieces together (VMM, control socket, signals, pid file); the
replicated daemon of `kemari start` reuses the same pieces.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from . import paths, snapshot
from .config import VmConfig
from .control import ControlServer
from .errors import KemariError
from .safefiles import private_dir, write_private
from .vmm import Vmm

log = logging.getLogger(__name__)
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# A stop still running after this long dumps every thread's stack to the log:
# a daemon that hangs on SIGTERM must say where (Pacemaker would fence it).
STOP_GRACE_S = 10.0


@contextlib.contextmanager
def signals_to_main_thread():
    """Threads started inside inherit a mask without SIGINT/SIGTERM, so those
    signals reach the loop thread and interrupt KVM_RUN there."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stop_handler(request_stop: Callable[[], None]):
    """The SIGINT/SIGTERM handler: request the stop and arm the stack dump."""
    def handle(signum: int, _frame: object) -> None:
        faulthandler.dump_traceback_later(STOP_GRACE_S, file=sys.stderr)
        request_stop()
    return handle


def install_stop_handler(request_stop: Callable[[], None], wake_fd: int) -> dict:
    """Install stop_handler for STOP_SIGNALS; returns the previous handlers.
    `wake_fd`: the write end of the main loop's wake pipe (see wake_loop_on_signal)."""
    wake_loop_on_signal(wake_fd)
    return {s: signal.signal(s, stop_handler(request_stop)) for s in STOP_SIGNALS}


def wake_loop_on_signal(wake_fd: int) -> None:
    """Python runs a signal handler only between bytecodes: a signal that lands
    after the loop's last check and before it sleeps in select() would wait
    for the next event (forever, for an idle guest). The C-level handler
    writes a byte to this pipe, so that select() returns at once."""
    signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)


def restore_handlers(previous: dict) -> None:
    faulthandler.cancel_dump_traceback_later()
    signal.set_wakeup_fd(-1)
    for s, h in previous.items():
        signal.signal(s, h)


def write_pid_file(name: str) -> Path:
    path = paths.pid_path(name)
    private_dir(path.parent)
    write_private(path, [f"{os.getpid()}\n".encode()])
    return path


def status(vmm: Vmm) -> dict:
    return {
        "name": vmm.config.name, "pid": os.getpid(), "role": "primary", "state": "standalone",
        "peer": None, "generation": 0, "checkpoint_seq": 0, "last_checkpoint_age_ms": None,
        "checkpoints": 0, "bytes_sent": 0, "bytes_received": 0,
        "latency_us": {"p50": None, "p99": None}, "vm": vmm.stats(),
        "console_tail": vmm.console.tail(5),
    }


def handler(vmm: Vmm):
    def handle(req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **status(vmm)}
        if cmd == "save":
            target = Path(str(req.get("path", "")))
            if not target.is_absolute():
                raise KemariError("save needs an absolute path")
            snap = vmm.call_in_loop(lambda: snapshot.capture(vmm))
            snapshot.write(snap, target)
            return {"ok": True, "path": str(target), "pages": len(snap.pfns)}
        if cmd == "stop":
            vmm.request_stop()
            return {"ok": True}
        raise KemariError(f"unknown command {cmd!r}")
    return handle


def run(config: VmConfig, restore: Path | None = None) -> int:
    """Boot (or restore) the guest and serve it until it stops; returns the exit code."""
    snap = snapshot.read(restore) if restore is not None else None
    with signals_to_main_thread():
        vmm = Vmm.create(config)
        try:
            server = ControlServer(paths.socket_path(config.name), handler(vmm), serve_now=False)
        except BaseException:
            vmm.close()
            raise
    pid_file = write_pid_file(config.name)     # before anyone can see the daemon answer
    with signals_to_main_thread():
        server.start()
    previous = install_stop_handler(vmm.request_stop, vmm.wake_fd)
    try:
        if snap is not None:
            snapshot.apply(vmm, snap)
            log.info("%s: restored from %s (%d pages)", config.name, restore, len(snap.pfns))
        else:
            vmm.cold_boot()
            log.info("%s: booted image %s with %d MiB", config.name, config.image,
                     config.memory_mib)
        return vmm.run()
    finally:
        restore_handlers(previous)    # first: the wakeup fd is closed below
        server.close()
        pid_file.unlink(missing_ok=True)
        vmm.close()
