"""The per-VM daemon behind `kemari start`: one process, one VM, two roles.

secondary  a standby VM (RAM only) receiving checkpoints; holds none of the
           guest's outward identity (no TAP, no forward socket)
primary    the running guest, protected by a Protector

Transitions happen in the main thread; the control socket's thread only
asks for them and waits. promote: secondary -> primary (failover from the
last checkpoint, or a cold boot when there is none); demote: primary ->
secondary (final checkpoint + handover when a peer is in sync).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

from .. import paths
from ..config import VmConfig, with_overrides
from ..control import ControlServer
from ..devices.block import BlockBackend, open_disk_image
from ..errors import KemariError
from ..kvm.machine import Machine
from ..metrics import LatencyWindow
from ..standalone import (
    install_stop_handler,
    restore_handlers,
    signals_to_main_thread,
    wake_loop_on_signal,
    write_pid_file,
)
from ..vmm import Vmm
from .activation import PROMOTE_LOCK_WAIT_S, resume_from_checkpoint
from .cpu_latency import CpuLatencyRequest
from .heap import keep_large_buffers
from .node import Node
from .protector import Protector
from .receiver import Receiver

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.node = Node(paths.state_dir() / config.name)
        self.role = "secondary"
        self.machine: Machine | None = None
        self.receiver: Receiver | None = None
        self.vmm = None
        self.protector: Protector | None = None
        self.exit_code = 0
        self._want: str | None = None          # "promote" | "demote" | "stop"
        self._done = threading.Condition()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._failover_ms: float | None = None
        self._cpu_latency: CpuLatencyRequest | None = None

    # ---- control (control thread) ------------------------------------------------
    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "peer":
            self._set_peer(req.get("address"))
            return {"ok": True, **self.status()}
        if cmd == "checkpoint-digest":
            return {"ok": True, **self._checkpoint_digest()}
        if cmd in ("promote", "demote", "stop"):
            target = {"promote": "primary", "demote": "secondary", "stop": "stopped"}[cmd]
            if self.role == target:
                return {"ok": True, **self.status()}
            if cmd == "promote":
                self._check_promotable(force=req.get("force") is True)
            with self._done:
                seen = self._transitions
                self._request(cmd)
                if not self._done.wait_for(lambda: self._transitions > seen, timeout=120):
                    raise KemariError(f"{cmd} did not complete within 120 s")
            if self.role != target and cmd != "stop":
                raise KemariError(f"{cmd} failed: {self._last_transition_error}")
            return {"ok": True, **self.status()}
        raise KemariError(f"unknown command {cmd!r}")

    _last_transition_error = "unknown error"

    def _set_peer(self, address: object) -> None:
        """Where a primary dials its secondary, changed at runtime (the OCF agent learns
        it from the cluster); the connector uses it from its next attempt."""
        if not isinstance(address, str):
            raise KemariError("peer: 'address' must be a string IP:PORT (or '' for none)")
        self.config = with_overrides(self.config, peer=address)
        if self.protector is not None:
            self.protector.config = self.config
        log.info("%s: peer is now %s", self.config.name, address or "none")
    _transitions = 0
    _forced: str | None = None        # the blocker a `promote --force` overrode
    _activation: str | None = None    # how the last promotion started the guest

    def _check_promotable(self, force: bool) -> None:
        receiver = self.receiver
        blocker = receiver.promote_blocker() if receiver is not None else None
        if blocker is None:
            self._forced = None
            return
        if not force:
            raise KemariError(f"{self.config.name}: refusing to promote: {blocker}. "
                              f"`kemari promote --force {self.config.name}` overrides this "
                              "and loses whatever the newer state held")
        log.warning("%s: promotion forced past: %s", self.config.name, blocker)
        self._forced = blocker

    def _checkpoint_digest(self) -> dict:
        """SHA-256 of guest memory: on the primary after a forced checkpoint, on the
        secondary of its last applied checkpoint. Equal when replication is exact."""
        if self.role == "primary" and self.vmm is not None:
            def take() -> dict:
                seq = self.protector.checkpoint_now()
                return {"seq": seq, "sha256": hashlib.sha256(self.vmm.machine.mem).hexdigest()}
            return self.vmm.call_in_loop(take)
        receiver = self.receiver
        if self.role == "secondary" and receiver is not None:
            # between two passes: not while a checkpoint acknowledged early is applied
            def digest() -> dict:
                return {"seq": self.node.checkpoint_seq,
                        "sha256": hashlib.sha256(self.machine.mem).hexdigest()}
            return receiver.call_in_loop(digest, lambda: os.write(self._wake_w, b"!"))
        raise KemariError("no guest memory here")

    def _request(self, what: str) -> None:
        self._want = what
        if self.vmm is not None and self.role == "primary":
            self.vmm.request_stop()
        os.write(self._wake_w, b"!")

    def status(self) -> dict:
        base = {"name": self.config.name, "pid": os.getpid(), "role": self.role,
                "generation": self.node.generation, "peer": None, "state": "standalone",
                "checkpoint_seq": self.node.checkpoint_seq, "checkpoints": 0,
                "last_checkpoint_age_ms": None, "bytes_sent": 0, "bytes_received": 0,
                "latency_us": {"p50": None, "p99": None},
                "replication_mode": self.config.replication.mode,
                "replication_peer": _address(self.config.replication.peer),
                "replication_listen": _address(self.config.replication.listen),
                "has_checkpoint": False, "consistent": self.node.consistent,
                "outdated": self.node.outdated, "promotable": False,
                "promote_blocker": "not running",
                "cpu_latency": self._cpu_latency.status() if self._cpu_latency else None}
        if self.role == "primary" and self.protector is not None:
            base.update(self.protector.status())
            base["checkpoint_seq"] = self.protector.last_seq
            # The running guest is the newest state there is.
            base.update(has_checkpoint=self.protector.was_protected, consistent=True,
                        outdated=False, promotable=True, promote_blocker=None,
                        activation=self._activation)
            if self.vmm is not None:
                base["vm"] = self.vmm.stats()
                base["console_tail"] = self.vmm.console.tail(5)
            base["peer_fence"] = self.protector.peer_fence.status()
            base["latency_histogram"] = self.protector.latencies.histogram()
            if self._failover_ms is not None:
                base["activation_ms"] = self._failover_ms
        elif self.role == "secondary" and self.receiver is not None:
            base.update(self.receiver.status())
        base["generation"] = self.node.generation
        return base

    # ---- main thread -----------------------------------------------------------------
    def serve(self, role: str) -> int:
        keep_large_buffers()
        # Listening before answering: once `kemari start` sees the daemon, its
        # replication port is open too.
        with signals_to_main_thread():
            self._become_secondary()
            try:
                server = ControlServer(paths.socket_path(self.config.name), self.handle,
                                       serve_now=False)
            except BaseException:
                self._teardown()
                raise
        # the pid file first: whoever sees the daemon answer may read it
        pid_file = write_pid_file(self.config.name)
        with signals_to_main_thread():
            server.start()
        previous = install_stop_handler(lambda: self._request("stop"), self._wake_w)
        if self.config.replication.cpu_latency_us is not None:
            self._cpu_latency = CpuLatencyRequest(self.config.replication.cpu_latency_us)
        try:
            if role == "primary":
                self._want = "promote"
            while self.role != "stopped":
                if self.role == "secondary":
                    wake_loop_on_signal(self._wake_w)
                    self.receiver.serve(lambda: self._want is not None, self._wake_r)
                else:
                    wake_loop_on_signal(self.vmm.wake_fd)
                    try:
                        code = self.vmm.run()
                    finally:     # before _transition can close the VM's pipe
                        wake_loop_on_signal(self._wake_w)
                    if self._want is None:      # the guest powered off by itself
                        log.info("%s: guest stopped with code %d", self.config.name, code)
                        self.exit_code = code
                        self._want = "stop"
                self._transition()
            return self.exit_code
        finally:
            self._teardown()
            server.close()
            pid_file.unlink(missing_ok=True)
            restore_handlers(previous)
            if self._cpu_latency is not None:
                self._cpu_latency.close()

    def _transition(self) -> None:
        want, self._want = self._want, None
        try:
            with signals_to_main_thread():
                if want == "stop":
                    self._teardown()
                    self.role = "stopped"
                elif want == "promote" and self.role == "secondary":
                    self._promote()
                elif want == "demote" and self.role == "primary":
                    self._demote()
        except KemariError as exc:
            self._last_transition_error = str(exc)
            log.error("%s: %s failed: %s", self.config.name, want, exc)
        finally:
            with self._done:
                self._transitions += 1
                self._done.notify_all()

    def _become_secondary(self) -> None:
        self.machine = Machine(self.config.memory_mib << 20)
        # a full sync writes every page: fault them in beforehand, off the loop
        threading.Thread(target=self.machine.prefault, name="prefault", daemon=True).start()
        disk_fd = None
        disk = self.config.disk
        if disk is not None and disk.mode == "replicated":
            disk_fd = open_disk_image(disk.path, disk.size_mib)
        try:
            self.receiver = Receiver(self.config, self.machine, self.node, disk_fd)
        except BaseException:
            if disk_fd is not None:
                os.close(disk_fd)
            self.machine.close()
            raise
        self.role = "secondary"
        log.info("%s: secondary, listening on %s:%d (generation %d)", self.config.name,
                 *self.config.replication.listen, self.node.generation)

    def _promote(self) -> None:
        t0 = time.perf_counter()
        disk = self.config.disk
        if disk is not None and disk.mode == "shared" and not disk.path.exists():
            raise KemariError(f"disk {disk.path} does not exist (storage not mounted?): "
                              "not promoting onto a blank disk")
        receiver = self.receiver
        failover = receiver.has_checkpoint
        blobs = receiver.checkpoint_state() if failover else None
        activation = self._describe_activation(failover)
        disk_fd = receiver.sink.disk_fd
        receiver.close()
        self.receiver = None
        block = None
        if disk_fd is not None:
            block = BlockBackend(self.machine, self.config.disk.path, self.config.disk.size_mib,
                                 fd=disk_fd)
        vmm = Vmm.for_machine(self.config, self.machine, block, PROMOTE_LOCK_WAIT_S)
        if failover:
            resume_from_checkpoint(vmm, *blobs)
        else:
            vmm.cold_boot()
        generation = self.node.new_generation()
        self._activation = activation
        self._failover_ms = round((time.perf_counter() - t0) * 1000, 2)
        self.vmm = vmm
        self.protector = Protector(vmm, self.config, self.node)
        # the same recent window, also counted into a histogram for `kemari metrics`
        self.protector.latencies = LatencyWindow(self.protector.latencies.maxlen)
        self.protector.start()
        self.role = "primary"
        log.info("%s: primary (generation %d): %s in %.1f ms", self.config.name, generation,
                 activation, self._failover_ms)

    def _describe_activation(self, failover: bool) -> str:
        node, disk = self.node, self.config.disk
        if failover:
            text = (f"resumed from checkpoint {node.checkpoint_seq} of generation "
                    f"{node.generation}")
        elif disk is not None and disk.mode == "replicated":
            text = ("cold boot: no checkpoint in memory; the replicated disk is consistent "
                    f"(its last checkpoint: {node.checkpoint_seq} of generation "
                    f"{node.generation})")
        else:
            text = "cold boot: no checkpoint in memory"
        if self._forced:
            text = f"FORCED past '{self._forced}': {text}"
            self._forced = None
        return text

    def _demote(self) -> None:
        """The loop has stopped the guest; hand over if a peer is in sync."""
        seq = None
        try:
            seq = self.protector.handover()
        except Exception as exc:   # a failed handover still stops the guest
            log.warning("%s: handover failed: %s", self.config.name, exc)
        log.info("%s: demoted%s", self.config.name,
                 f" after final checkpoint {seq}" if seq is not None else " (no peer in sync)")
        self._stop_primary()
        self._become_secondary()

    def _stop_primary(self) -> None:
        if self.protector is not None:
            self.protector.close()
            self.protector = None
        if self.vmm is not None:
            self.vmm.close()
            self.vmm = None
            self.machine = None

    def _teardown(self) -> None:
        self._stop_primary()
        if self.receiver is not None:
            fd = self.receiver.sink.disk_fd
            self.receiver.close()
            if fd is not None:
                os.close(fd)
            self.receiver = None
        if self.machine is not None:
            self.machine.close()
            self.machine = None


def _address(addr: tuple[str, int] | None) -> str | None:
    return f"{addr[0]}:{addr[1]}" if addr else None
