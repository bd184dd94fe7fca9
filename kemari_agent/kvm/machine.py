"""One KVM virtual machine: guest RAM, one vCPU, dirty tracking, vCPU state.

A thin, typed face over native/vmm.c. Everything here is a primitive the
run loop and the replication engine compose; no device knows about it.
"""

from __future__ import annotations

import ctypes
import threading

from ..errors import KvmError
from ..native import ffi, last_error, lib

PAGE_SIZE = lib.KEMARI_PAGE_SIZE

EXIT_IO = lib.KVMM_EXIT_IO
EXIT_MMIO = lib.KVMM_EXIT_MMIO
EXIT_HLT = lib.KVMM_EXIT_HLT
EXIT_SHUTDOWN = lib.KVMM_EXIT_SHUTDOWN
EXIT_INTERNAL = lib.KVMM_EXIT_INTERNAL
EXIT_KICKED = lib.KVMM_EXIT_KICKED
EXIT_OTHER = lib.KVMM_EXIT_OTHER

EXIT_NAMES = {
    EXIT_IO: "port I/O",
    EXIT_MMIO: "MMIO",
    EXIT_HLT: "HLT",
    EXIT_SHUTDOWN: "shutdown (triple fault)",
    EXIT_INTERNAL: "KVM internal error",
    EXIT_KICKED: "kicked",
    EXIT_OTHER: "unexpected exit",
}


_ZERO_PAGE = bytes(PAGE_SIZE)
MADV_POPULATE_WRITE = 23        # <linux/mman.h>, Linux 5.14
PREFAULT_STEP = 16 << 20        # close() and kick() wait for one step at most (~10 ms)
_madvise = ctypes.CDLL(None, use_errno=True).madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise KvmError(f"{what}: {last_error()}")
    return rc


class Machine:
    """A VM with `mem_bytes` of RAM and one vCPU; guest-physical == offset in `mem`."""

    def __init__(self, mem_bytes: int) -> None:
        vm = lib.kvmm_create(mem_bytes)
        if vm == ffi.NULL:
            raise KvmError(f"cannot create a KVM virtual machine: {last_error()}")
        self._vm = vm
        self.mem_bytes = mem_bytes
        self.npages = mem_bytes // PAGE_SIZE
        self.mem = memoryview(ffi.buffer(lib.kvmm_mem(vm), mem_bytes))
        self._exit = ffi.new("struct kvmm_exit *")
        self._pfns = ffi.new("uint64_t[]", self.npages)
        self._state_size = lib.kvmm_state_size(vm)
        self._state_buf = ffi.new("uint8_t[]", self._state_size)   # reused per checkpoint
        self.io_pending = False   # stopped at an I/O exit not yet completed
        # kick() comes from other threads (tickers, backends, the control socket)
        # and may race close(): the lock keeps it off a destroyed vCPU's kvm_run.
        self._closing = threading.Lock()

    @property
    def native(self):
        """The C VMM's handle (a cdata `struct kvmm *`, for native/fastpath.c)."""
        return self._vm

    @property
    def state_size(self) -> int:
        """The most bytes a saved vCPU state takes."""
        return self._state_size

    # ---- lifecycle -----------------------------------------------------
    def close(self) -> None:
        with self._closing:
            if self._vm is not None:
                self.mem.release()
                lib.kvmm_destroy(self._vm)
                self._vm = None

    def prefault(self) -> bool:
        """Fault all of guest RAM in now, in the kernel (MADV_POPULATE_WRITE), so
        a standby's full sync copies into mapped pages: a page fault taken on
        first touch costs several microseconds on these PVM machines, 0.17 s per
        256 MiB. Contents do not change (concurrent writers are safe). Returns
        False if the kernel cannot (older than 5.14, or short of memory): pages
        are then faulted on first use, as before."""
        for offset in range(0, self.mem_bytes, PREFAULT_STEP):
            with self._closing:
                if self._vm is None:
                    return False
                base = int(ffi.cast("uintptr_t", lib.kvmm_mem(self._vm)))
                size = min(PREFAULT_STEP, self.mem_bytes - offset)
                if _madvise(base + offset, size, MADV_POPULATE_WRITE) != 0:
                    return False
        return True

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup_long_mode(self, entry: int, stack: int) -> None:
        _check(lib.kvmm_setup_long_mode(self._vm, entry, stack), "long mode setup")

    # ---- running -------------------------------------------------------
    def run(self, tap=None):
        """Run the vCPU until its next exit; returns the (reused) exit record.
        `tap`: a call that runs it instead, given the exit record (kfast_run)."""
        _check(tap(self._exit) if tap is not None else lib.kvmm_run(self._vm, self._exit),
               "KVM_RUN")
        self.io_pending = self._exit.reason == EXIT_IO
        return self._exit

    def set_in_value(self, value: int) -> None:
        _check(lib.kvmm_set_in_value(self._vm, value), "completing `in`")

    def kick(self, signal_thread: bool = True) -> None:
        """Make the vCPU leave (or not enter) KVM_RUN; safe from any thread, also
        during and after close() (then it does nothing)."""
        with self._closing:
            if self._vm is not None:
                lib.kvmm_kick(self._vm, 1 if signal_thread else 0)

    def clear_kick(self) -> None:
        lib.kvmm_clear_kick(self._vm)

    def complete_pending(self) -> None:
        """Finish the exit the vCPU stopped at, so its state is a clean snapshot."""
        if self.io_pending:
            _check(lib.kvmm_complete_pending(self._vm), "completing the pending exit")
            self.io_pending = False

    # ---- memory --------------------------------------------------------
    def write(self, gpa: int, data: bytes | memoryview) -> None:
        """Write into guest memory and remember the pages as dirty."""
        _check(lib.kvmm_write(self._vm, gpa, ffi.from_buffer(data), len(data)), "guest write")

    def mark_dirty(self, gpa: int, length: int) -> None:
        lib.kvmm_mark_dirty(self._vm, gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        if gpa < 0 or length < 0 or gpa + length > self.mem_bytes:
            raise KvmError(f"read of {length} bytes at {gpa:#x} is outside guest memory")
        return bytes(self.mem[gpa : gpa + length])

    # ---- vCPU state ----------------------------------------------------
    def get_vcpu_state(self) -> bytes:
        """The whole vCPU as one blob; completes a pending I/O exit first."""
        self.complete_pending()
        buf = ffi.new("uint8_t[]", self._state_size)
        n = _check(lib.kvmm_get_state(self._vm, buf, self._state_size), "saving vCPU state")
        return bytes(ffi.buffer(buf, n))

    def get_vcpu_state_fast(self) -> bytes:
        """Only what a CPL-3 guest can change (native/vmm.h): for checkpoints,
        applied on top of a full blob. At a doorbell's `out` it is saved with
        RIP past the instruction, without the KVM_RUN that completes it."""
        n = _check(lib.kvmm_get_state_fast_at_out(self._vm, self._state_buf, self._state_size),
                   "saving vCPU state") if self.io_pending else 0
        if not n:
            self.complete_pending()
            n = _check(lib.kvmm_get_state_fast(self._vm, self._state_buf, self._state_size),
                       "saving vCPU state")
        return ffi.buffer(self._state_buf, n)[:]

    def set_vcpu_state(self, blob: bytes) -> None:
        """Load a full blob, or a fast one on top of the full one loaded before."""
        _check(lib.kvmm_set_state(self._vm, blob, len(blob)), "restoring vCPU state")

    # ---- dirty tracking ------------------------------------------------
    def start_dirty_tracking(self, hot_pages: int = 0) -> None:
        """From now on track dirty pages; the first harvest returns every page.
        `hot_pages`: up to this many pages the guest writes at nearly every
        harvest stay writable (no write-protect fault for the guest), and every
        harvest reports them, written or not (native/vmm.c, "Hot pages")."""
        _check(lib.kvmm_dirty_start(self._vm, hot_pages), "starting dirty tracking")

    def stop_dirty_tracking(self) -> None:
        _check(lib.kvmm_dirty_stop(self._vm), "stopping dirty tracking")

    @property
    def tracking_dirty(self) -> bool:
        return bool(lib.kvmm_dirty_tracking(self._vm))

    def harvest_dirty(self) -> list[int]:
        """Page numbers written since the last harvest (by the guest or the VMM)."""
        n = _check(lib.kvmm_dirty_harvest(self._vm, self._pfns, self.npages), "dirty harvest")
        return list(ffi.unpack(self._pfns, n))

    def gather_pages(self, pfns: list[int]) -> bytes:
        """The contents of `pfns`, concatenated (PAGE_SIZE bytes each)."""
        out = ffi.new("uint8_t[]", len(pfns) * PAGE_SIZE)
        _check(lib.kvmm_gather_pages(self._vm, pfns, len(pfns), out), "gathering pages")
        return bytes(ffi.buffer(out))

    def scatter_pages(self, pfns: list[int], data: bytes | memoryview) -> None:
        if len(data) != len(pfns) * PAGE_SIZE:
            raise KvmError(f"{len(pfns)} pages need {len(pfns) * PAGE_SIZE} bytes, got {len(data)}")
        _check(
            lib.kvmm_scatter_pages(self._vm, pfns, len(pfns), ffi.from_buffer(data)),
            "writing pages",
        )

    def zero_pages(self, pfns: list[int]) -> None:
        for pfn in pfns:
            if not 0 <= pfn < self.npages:
                raise KvmError(f"page {pfn} is outside guest memory")
            self.mem[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = _ZERO_PAGE
        for pfn in pfns:
            self.mark_dirty(pfn * PAGE_SIZE, PAGE_SIZE)

    def nonzero_pages(self) -> list[int]:
        n = _check(lib.kvmm_nonzero_pages(self._vm, self._pfns, self.npages), "page scan")
        return list(ffi.unpack(self._pfns, n))
