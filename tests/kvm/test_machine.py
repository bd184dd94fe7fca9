"""The VMM core on real /dev/kvm: vCPU state, dirty tracking, exits."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TESTGUEST

from kemari_agent.errors import KvmError
from kemari_agent.kvm.boot import BootInfo, boot
from kemari_agent.kvm.machine import EXIT_IO, EXIT_KICKED, PAGE_SIZE, Machine
from kemari_agent.native import ffi, lib

pytestmark = pytest.mark.kvm

PORT_STEP, PORT_RESULT, PORT_EXIT = 0x600, 0x604, 0x50C
MAILBOX = 0x9000
ITERS, EVERY = 3_000_000, 10_000
# KVM on PVM (these machines: ../shared/reference/FACTS.md) emulates port I/O
ON_PVM = Path("/sys/module/kvm_pvm").exists()


def guest_image() -> bytes:
    return TESTGUEST.read_bytes()


def run_until(m: Machine, step: int | None) -> int | None:
    """Run to checkpoint `step` (returns None there) or to the end (returns the digest)."""
    while True:
        ex = m.run()
        assert ex.reason == EXIT_IO, f"unexpected exit {ex.reason} at {ex.rip:#x}"
        if ex.io_port == PORT_RESULT:
            return int.from_bytes(m.read(MAILBOX, 8), "little")
        if ex.io_port == PORT_STEP and step is not None and ex.io_value == step:
            return None


def compute_machine() -> Machine:
    m = Machine(32 << 20)
    boot(m, guest_image(), BootInfo(args=(1, ITERS, EVERY)))
    return m


@pytest.fixture(scope="module")
def reference_digest() -> int:
    with compute_machine() as m:
        return run_until(m, None)


@pytest.mark.parametrize("step", [0, 1, 137, 299])
def test_state_moved_to_fresh_vm_continues_bit_identically(reference_digest, step):
    with compute_machine() as src:
        assert run_until(src, step) is None
        blob = src.get_vcpu_state()
        pfns = src.nonzero_pages()
        pages = src.gather_pages(pfns)
    with Machine(32 << 20) as dst:
        dst.scatter_pages(pfns, pages)
        dst.set_vcpu_state(blob)
        assert run_until(dst, None) == reference_digest


def test_fast_blob_on_top_of_full_blob_continues_identically(reference_digest):
    with compute_machine() as src:
        run_until(src, 20)
        full = src.get_vcpu_state()
        run_until(src, 200)
        fast = src.get_vcpu_state_fast()
        assert len(fast) < len(full)
        pfns = src.nonzero_pages()
        pages = src.gather_pages(pfns)
    with Machine(32 << 20) as dst:
        dst.scatter_pages(pfns, pages)
        dst.set_vcpu_state(full)
        dst.set_vcpu_state(fast)
        assert run_until(dst, None) == reference_digest


# A state blob: an 8-word header, then sregs (312 bytes) and regs (144) first,
# in both kinds (native/vmm.c); a full blob goes on with xcrs (392), xsave, MSRs.
BLOB_HEADER = struct.Struct("<8I")
SREGS_REGS = slice(BLOB_HEADER.size, BLOB_HEADER.size + 312 + 144)


def full_blob_tsc(blob: bytes) -> int:
    _magic, _version, _total, nmsrs, xsave_len, *_ = BLOB_HEADER.unpack_from(blob)
    msrs = BLOB_HEADER.size + 312 + 144 + 392 + xsave_len
    for i in range(nmsrs):
        index, _reserved, value = struct.unpack_from("<IIQ", blob, msrs + 16 * i)
        if index == 0x10:
            return value
    raise AssertionError("no TSC in the full blob")


def test_fast_state_equals_what_kvm_reports_by_ioctl():
    """The fast blob copies regs and sregs from kvm_run (KVM_CAP_SYNC_REGS) and
    computes the TSC from its offset; the full blob asks KVM for each."""
    with compute_machine() as m:
        for step in (3, 50, 120):
            run_until(m, step)
            fast = m.get_vcpu_state_fast()
            full = m.get_vcpu_state()
            assert fast[SREGS_REGS] == full[SREGS_REGS]
            tsc_fast = int.from_bytes(fast[-8:], "little")
            # the full blob reads its TSC later: seconds apart at most
            assert 0 <= full_blob_tsc(full) - tsc_fast < 10**10
        m.kick(signal_thread=False)
        assert m.run().reason == EXIT_KICKED
        m.clear_kick()
        assert m.get_vcpu_state_fast()[SREGS_REGS] == m.get_vcpu_state()[SREGS_REGS]


def test_fast_state_at_an_out_is_the_state_once_it_completes():
    """At a doorbell's `out`, once completing it was seen to change nothing (KVM
    emulated it and moved RIP already: PVM, as here), the fast blob is saved
    without that KVM_RUN: the same bytes (but the TSC, read later) as after it.
    Where completing moves RIP (VMX, SVM), it is never skipped."""
    with compute_machine() as m:
        buf = ffi.new("uint8_t[]", m._state_size)
        saved_at_out = 0
        for step in range(3, 12):
            run_until(m, step)
            n = lib.kvmm_get_state_fast_at_out(m.native, buf, len(buf))
            at_out = ffi.buffer(buf, n)[:]
            m.complete_pending()
            completed = m.get_vcpu_state_fast()
            if n:
                saved_at_out += 1
                assert at_out[:-8] == completed[:-8]
            assert lib.kvmm_get_state_fast_at_out(m.native, buf, len(buf)) == 0   # completed
        moves_rip = lib.kvmm_out_completion_moves_rip(m.native)
        assert moves_rip in (0, 1)
        assert saved_at_out == (0 if moves_rip else 9 - 3)
        if ON_PVM:
            assert moves_rip == 0
        m.kick(signal_thread=False)
        assert m.run().reason == EXIT_KICKED
        m.clear_kick()
        assert lib.kvmm_get_state_fast_at_out(m.native, buf, len(buf)) == 0      # no `out`


def test_fast_state_after_a_restore_is_the_restored_state():
    """kvm_run's copy of the registers is stale once the VMM sets them."""
    with compute_machine() as src:
        run_until(src, 200)
        wanted = src.get_vcpu_state()
    with compute_machine() as dst:
        booted = dst.get_vcpu_state_fast()                   # never ran: read by ioctl
        run_until(dst, 5)
        at_5 = dst.get_vcpu_state_fast()
        assert booted[SREGS_REGS] != at_5[SREGS_REGS]
        dst.set_vcpu_state(wanted)
        assert dst.get_vcpu_state_fast()[SREGS_REGS] == wanted[SREGS_REGS]


def test_state_restored_in_another_process(tmp_path, reference_digest):
    with compute_machine() as src:
        run_until(src, 150)
        (tmp_path / "vcpu").write_bytes(src.get_vcpu_state())
        pfns = src.nonzero_pages()
        (tmp_path / "pfns").write_text(" ".join(map(str, pfns)))
        (tmp_path / "pages").write_bytes(src.gather_pages(pfns))
    code = f"""
import sys; sys.path.insert(0, {str(REPO / 'tests')!r})
from pathlib import Path
from kemari_agent.kvm.machine import Machine
from machine_child import finish
print(finish(Path({str(tmp_path)!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO / "tests" / "kvm", timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == reference_digest


def test_dirty_tracking_sees_guest_and_vmm_writes():
    with Machine(32 << 20) as m:
        boot(m, guest_image(), BootInfo(args=(2,)))
        m.start_dirty_tracking()
        assert len(m.harvest_dirty()) == m.npages        # the first round is everything
        ex = m.run()
        assert (ex.reason, ex.io_port) == (EXIT_IO, PORT_STEP)
        m.harvest_dirty()                                 # settle: stack writes etc.
        # the guest dirties pages 2000, 2003, 2006, 2009 on the next step
        mailbox = (1).to_bytes(8, "little") + (2000).to_bytes(8, "little") + \
            (4).to_bytes(8, "little") + (3).to_bytes(8, "little") + (7).to_bytes(8, "little")
        m.mem[MAILBOX : MAILBOX + 40] = mailbox           # not through write(): untracked
        ex = m.run()
        assert ex.io_port == PORT_STEP
        dirty = set(m.harvest_dirty())
        assert {2000, 2003, 2006, 2009} <= dirty
        assert not {2001, 2002, 2004} & dirty
        assert len(dirty) < 10, dirty
        for pfn in (2000, 2003, 2006, 2009):
            assert m.mem[pfn * PAGE_SIZE] == 7
        # a write by the VMM itself is not in KVM's log: it must still be reported
        m.write(5000 * PAGE_SIZE + 17, b"backend")
        assert 5000 in m.harvest_dirty()
        assert m.harvest_dirty() == []                    # harvesting reset the log


def dirty_on_next_step(m: Machine, first: int, count: int, stride: int = 1) -> set[int]:
    """The test guest's next step writes `count` pages from `first`; the harvest after."""
    m.mem[MAILBOX : MAILBOX + 40] = b"".join(
        v.to_bytes(8, "little") for v in (1, first, count, stride, 9))
    ex = m.run()
    assert (ex.reason, ex.io_port) == (EXIT_IO, PORT_STEP)
    return set(m.harvest_dirty())


def test_hot_pages_are_reported_until_they_are_write_protected_again():
    """A page written at two harvests in a row is left writable, so every harvest
    reports it, written or not, until it expires; then it is protected again:
    no longer reported, and its next write is seen."""
    with Machine(32 << 20) as m:
        boot(m, guest_image(), BootInfo(args=(2,)))
        m.start_dirty_tracking(hot_pages=8)
        assert len(m.harvest_dirty()) == m.npages
        m.run()
        m.harvest_dirty()
        assert 3000 in dirty_on_next_step(m, 3000, 1)
        assert 3000 in dirty_on_next_step(m, 3000, 1)       # again: now hot
        assert 3000 in dirty_on_next_step(m, 4000, 1)       # not written, still reported
        reported = 2                                        # since the harvest it joined
        while 3000 in m.harvest_dirty():                    # the guest stopped: no writes
            reported += 1
            assert reported <= lib.KVMM_HOT_LIFETIME + 1
        assert reported == lib.KVMM_HOT_LIFETIME + 1        # the harvest it joined, then 64
        assert m.harvest_dirty() == []                      # everything protected again
        assert 3000 in dirty_on_next_step(m, 3000, 1)       # and its next write is seen


def test_hot_pages_are_capped():
    """Twenty pages written at every step: at most `hot_pages` of them stay
    writable; with none, a harvest after no writes is empty."""
    for hot in (0, 5):
        with Machine(32 << 20) as m:
            boot(m, guest_image(), BootInfo(args=(2,)))
            m.start_dirty_tracking(hot_pages=hot)
            m.run()                                         # to the first step
            m.harvest_dirty()
            for _ in range(4):
                assert set(range(3000, 3020)) <= dirty_on_next_step(m, 3000, 20)
            left_writable = m.harvest_dirty()
            assert len(left_writable) == hot, left_writable


def test_harvest_without_tracking_is_an_error():
    with Machine(16 << 20) as m, pytest.raises(KvmError, match="not started"):
        m.harvest_dirty()


@pytest.mark.parametrize("corrupt", ["magic", "version", "length"])
def test_bad_vcpu_blob_is_refused(corrupt):
    with compute_machine() as m:
        run_until(m, 3)
        blob = bytearray(m.get_vcpu_state())
        if corrupt == "magic":
            blob[0] ^= 0xFF
        elif corrupt == "version":
            blob[4] = 99
        else:
            del blob[-8:]
        with Machine(32 << 20) as other, pytest.raises(KvmError, match="vCPU state"):
            other.set_vcpu_state(bytes(blob))


def test_bad_memory_sizes_are_refused():
    with pytest.raises(KvmError, match="multiple of 2 MiB"):
        Machine(3 << 20)


def test_kick_racing_close_never_touches_a_destroyed_vcpu():
    """Tickers and backends kick the vCPU from their own threads; a demote closes
    the machine meanwhile. Run in a child: a use after free would kill it."""
    code = """
import threading
from kemari_agent.kvm.machine import Machine
for _ in range(200):
    m = Machine(8 << 20)
    go = threading.Event()
    def kicker():
        go.set()
        for _ in range(2000):
            m.kick(signal_thread=False)
    t = threading.Thread(target=kicker)
    t.start()
    go.wait()
    m.close()
    t.join()
print("survived")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "survived" in out.stdout, (out.returncode, out.stderr)
