"""The run loop: one vCPU, its exits, its devices.

Every exit is handled in one place (`_handle_io`). The doorbell exits are
the events Kemari taps: `tap_hook` is called with the vCPU stopped at the
doorbell and the requests still unanswered in the ring; only when it
returns does the backend perform the I/O (in epoch mode the hook keeps disk
requests in flight until the checkpoint covering them is acknowledged).
Unprotected (`kemari run`) the hook is None; the replication engine
installs its checkpoint there.

Other threads (the control socket) never touch the VM directly: they hand
a function to `call_in_loop`, which runs it at the next point where the
vCPU is stopped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import stages
from .config import VmConfig
from .devices.block import BlockBackend
from .devices.console import Console
from .devices.forward import ForwardPort
from .devices.net import NetBackend
from .devices.tap import TapPort
from .errors import GuestCrashed, KemariError
from .images import load_image_bytes
from .kvm import boot as kboot
from .kvm.machine import (
    EXIT_IO,
    EXIT_KICKED,
    EXIT_NAMES,
    Machine,
)
from .loop_calls import LoopCalls
from .native import lib

log = logging.getLogger(__name__)

PORT_CONSOLE = lib.KEMARI_PORT_CONSOLE
PORT_BLK = lib.KEMARI_PORT_BLK_NOTIFY
PORT_NET = lib.KEMARI_PORT_NET_NOTIFY
PORT_BLOCK = lib.KEMARI_PORT_BLOCK
PORT_EXIT = lib.KEMARI_PORT_EXIT
# How the loop's timeline (KEMARI_STAGES=1) names each exit.
EXIT_EVENTS = {PORT_BLK: "exit: blk doorbell", PORT_NET: "exit: net doorbell",
               PORT_BLOCK: "exit: guest idles", PORT_CONSOLE: "exit: console"}

Device = BlockBackend | NetBackend
# Returns True when it has taken the requests itself (the loop then leaves them).
TapHook = Callable[["Vmm", Device], bool]


class Service(Protocol):
    """Something the loop serves while the guest is stopped (e.g. a replication
    session): its fd is watched while the guest idles, `service` runs when it is
    readable, at its deadline, and whenever the loop is kicked."""

    def fileno(self) -> int | None: ...
    def deadline(self) -> float | None: ...
    def service(self) -> None: ...


@dataclass
class Counters:
    exits: int = 0
    doorbells: int = 0
    blocks: int = 0
    started: float = field(default_factory=time.monotonic)


class Vmm:
    """A guest with its machine and devices; `run()` serves it until it stops."""

    def __init__(self, config: VmConfig, machine: Machine, block: BlockBackend | None,
                 net: NetBackend | None) -> None:
        self.config = config
        self.machine = machine
        self.block = block
        self.net = net
        self.console = Console(config.name)
        self.counters = Counters()
        self.tap_hook: TapHook | None = None
        # The vCPU's next run: Machine.run, or the tap's own (Protector.run_vcpu,
        # which may checkpoint the event the vCPU stops at in the same call)
        self.run_vcpu: Callable[[], Any] = machine.run
        self.services: list[Service] = []
        self.exit_code: int | None = None
        self.exit_ns = 0          # when the last exit returned (KEMARI_STAGES=1)
        # KEMARI_STAGES=1: (ns, event) of the loop's last few thousand moments
        self.timeline: collections.deque[tuple[int, str]] | None = \
            collections.deque(maxlen=stages.KEEP) if stages.ENABLED else None
        self._stop = False
        self._calls = LoopCalls()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ---- construction ----------------------------------------------------
    @classmethod
    def create(cls, config: VmConfig) -> Vmm:
        """A new machine with the backends of `config` (for `kemari run`)."""
        machine = Machine(config.memory_mib << 20)
        try:
            return cls.for_machine(config, machine)
        except BaseException:
            machine.close()
            raise

    @classmethod
    def for_machine(cls, config: VmConfig, machine: Machine,
                    block: BlockBackend | None = None, wait_lock_s: float = 0.0) -> Vmm:
        """The backends of `config` on an existing machine (a standby VM being
        promoted). `block`: a disk backend already open; `wait_lock_s`: how long
        to wait for the disk image's lock."""
        net = None
        try:
            if block is None and config.disk is not None:
                block = BlockBackend(machine, config.disk.path, config.disk.size_mib,
                                     wait_lock_s=wait_lock_s)
            if config.net is not None:
                net = NetBackend(machine, open_net_port(config))
        except BaseException:
            if block is not None:
                block.close()
            raise
        return cls(config, machine, block, net)

    def boot_info(self) -> kboot.BootInfo:
        cfg = self.config
        args: tuple[int, ...] = ()
        if cfg.image == "stress":
            fill = ("none", "text", "random").index(cfg.stress.fill)  # KEMARI_STRESS_FILL_*
            args = (cfg.stress.pages, cfg.stress.rate_hz, cfg.stress.working_set, 0, fill)
        net = cfg.net
        return kboot.BootInfo(
            mac=net.mac if net else b"\x52\x54\x00\x00\x00\x01",
            address=net.address if net else None,
            disk_sectors=self.block.sectors if self.block else 0,
            has_net=net is not None,
            args=args,
            cmdline=f"name={cfg.name} image={os.path.basename(cfg.image)}",
        )

    def cold_boot(self) -> None:
        kboot.boot(self.machine, load_image_bytes(self.config.image), self.boot_info())

    @property
    def devices(self) -> list[Device]:
        return [d for d in (self.block, self.net) if d is not None]

    def device_state_version(self) -> tuple[int, ...]:
        return tuple(d.state_version for d in self.devices)

    def device_state(self) -> dict:
        return {d.name: d.state() for d in self.devices}

    def restore_device_state(self, state: dict) -> None:
        for d in self.devices:
            d.restore_state(state.get(d.name, {}))

    def attach_devices(self) -> None:
        """Take over the guest's rings: redo whatever was in flight."""
        for d in self.devices:
            redone = d.attach()
            if redone:
                log.info("%s: redid %d request(s) in flight", d.name, redone)

    def close(self) -> None:
        for d in self.devices:
            d.close()
        self.machine.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- other threads -----------------------------------------------------
    @property
    def wake_fd(self) -> int:
        """The write end of the loop's wake pipe: any byte written there ends the
        loop's wait (e.g. signal.set_wakeup_fd)."""
        return self._wake_w

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"!")
        self.machine.kick()

    def call_in_loop(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run fn() in the loop thread with the vCPU stopped; return its result."""
        return self._calls.call(fn, self.wake, timeout)

    def request_stop(self) -> None:
        self._stop = True
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stop

    def serve_calls(self, timeout: float) -> None:
        """Loop thread, guest held stopped: wait a little for calls and serve them."""
        select.select([self._wake_r], [], [], timeout)
        self._drain_wake()
        self._calls.run_pending()

    # ---- the loop ------------------------------------------------------------
    def run(self) -> int:
        """Serve the guest until it powers off (returns its code) or stop is requested."""
        while not self._stop:
            ex = self.run_vcpu()
            if stages.ENABLED:
                self.exit_ns = stages.now_ns()
                self._moment(EXIT_EVENTS.get(ex.io_port, "exit: other")
                             if ex.reason == EXIT_IO else "exit: kicked", self.exit_ns)
            self.counters.exits += 1
            if ex.reason == EXIT_IO:
                self._handle_io(ex)
            elif ex.reason == EXIT_KICKED:
                self._drain_wake()
                self._calls.run_pending()
                self._run_services()
            else:
                self._crash(ex)
            if self.exit_code is not None:
                return self.exit_code
        self._calls.run_pending()
        return 0

    def _handle_io(self, ex) -> None:
        port = ex.io_port
        if not ex.io_dir:   # `in`: no port of ours is read; float the bus high
            self.machine.set_in_value((1 << (8 * ex.io_size)) - 1)
            return
        if port == PORT_CONSOLE:
            self.console.put(ex.io_value & 0xFF)
        elif port == PORT_BLK and self.block is not None:
            self._doorbell(self.block)
        elif port == PORT_NET and self.net is not None:
            self._doorbell(self.net)
        elif port == PORT_BLOCK:
            self.counters.blocks += 1
            self._wait_for_event(ex.io_value)
        elif port == PORT_EXIT:
            self.exit_code = ex.io_value & 0xFF
            log.info("%s: guest powered off (code %d)", self.config.name, self.exit_code)

    def _doorbell(self, device: Device) -> None:
        self.counters.doorbells += 1
        if self.tap_hook is not None and self.tap_hook(self, device):
            return       # the hook took the requests (epoch mode) and answers them later
        if stages.ENABLED:
            self._moment(f"tap released: {device.name}")
        device.process()
        if stages.ENABLED:
            self._moment(f"answered: {device.name}")

    def _guest_has_event(self) -> bool:
        rings = []
        if self.block is not None:
            rings.append(self.block.ring)
        if self.net is not None:
            rings += [self.net.tx, self.net.rx]
        return any(r.guest_wants_event() for r in rings)

    def _wait_for_event(self, timeout_us: int) -> None:
        """The guest is idle: keep it stopped until a ring has news for it."""
        deadline = time.monotonic() + timeout_us / 1e6 if timeout_us else None
        while True:
            if self.net is not None and self.net.receive() and stages.ENABLED:
                self._moment("frames delivered")
            if self._guest_has_event():
                return
            self._calls.run_pending()
            if self._stop or self.exit_code is not None:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            fds = [self._wake_r] + ([self.net.fileno()] if self.net is not None else [])
            wakeups = [deadline] if deadline is not None else []
            for svc in self.services:
                fd, due = svc.fileno(), svc.deadline()
                if fd is not None:
                    fds.append(fd)
                if due is not None:
                    wakeups.append(due)
            wait = max(0.0, min(wakeups) - now) if wakeups else None
            if self.net is not None and self.net.port.has_pending():
                wait = 0.0
            readable, _, _ = select.select(fds, [], [], wait)
            if self._wake_r in readable:
                self._drain_wake()
            self._run_services()

    def _moment(self, event: str, ns: int = 0) -> None:
        assert self.timeline is not None
        self.timeline.append((ns or stages.now_ns(), event))

    def _run_services(self) -> None:
        for svc in list(self.services):
            svc.service()

    def _drain_wake(self) -> None:
        self.machine.clear_kick()
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _crash(self, ex) -> None:
        what = EXIT_NAMES.get(ex.reason, f"exit {ex.reason}")
        detail = f" at rip={ex.rip:#x}" if ex.rip else ""
        if ex.reason == lib.KVMM_EXIT_MMIO:
            detail += f" (address {ex.mmio_addr:#x}, {'write' if ex.mmio_write else 'read'})"
        tail = "\n  ".join(self.console.tail(10))
        raise GuestCrashed(f"guest {self.config.name} stopped: {what}{detail}"
                           + (f"\n  last console lines:\n  {tail}" if tail else ""))

    # ---- status ----------------------------------------------------------------
    def stats(self) -> dict:
        elapsed = max(1e-9, time.monotonic() - self.counters.started)
        out = {"exits": self.counters.exits, "doorbells": self.counters.doorbells,
               "blocks": self.counters.blocks,
               "exits_per_s": round(self.counters.exits / elapsed, 1),
               "uptime_s": round(elapsed, 3)}
        for d in self.devices:
            out[d.name] = dict(d.stats)
        if self.timeline is not None:
            out["timeline"] = list(self.timeline)
        return out


def open_net_port(config: VmConfig) -> TapPort | ForwardPort:
    net = config.net
    if net is None:
        raise KemariError("no [net] section")
    if net.tap is not None:
        return TapPort(net.tap, net.bridge)
    assert net.forward is not None and net.address is not None
    return ForwardPort(net.forward, net.mac, net.address)

