"""Block backend: the guest's disk is a file on the host.

A write is answered only once it is durable (pwrite + fdatasync), because
the guest replies to its clients on that answer. A full host disk is an
ENOSPC answer to the guest, never a corrupted image: the guest's own log
discards an unacknowledged torn record.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import KemariError
from ..kvm.machine import Machine
from ..native import lib
from .rings import BackendRing

log = logging.getLogger(__name__)

SECTOR = lib.KEMARI_BLK_SECTOR_SIZE
OP_READ, OP_WRITE, OP_FLUSH = (lib.KEMARI_BLK_OP_READ, lib.KEMARI_BLK_OP_WRITE,
                               lib.KEMARI_BLK_OP_FLUSH)
OK, EIO, ENOSPC, EINVAL = (lib.KEMARI_STATUS_OK, lib.KEMARI_STATUS_EIO,
                          lib.KEMARI_STATUS_ENOSPC, lib.KEMARI_STATUS_EINVAL)

# Called with (sector, payload) for every write about to be performed; the
# replication engine uses it to ship replicated-disk payloads.
WriteObserver = Callable[[int, bytes], None]


def open_disk_image(path: Path, size_mib: int, wait_lock_s: float = 0.0) -> int:
    """Open and lock an existing image. A missing or empty one is an error, never
    a blank disk made in its place (a promoted guest would resume on top of
    it): creating a disk is `kemari create-disk`.

    `wait_lock_s`: how long to wait for a lock held by another process, e.g. a
    killed primary on this same machine whose exit is still releasing it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KemariError(f"disk {path} does not exist (storage not mounted? a typo?); "
                          "to make a new blank disk run `kemari create-disk CONFIG`") from None
    except OSError as exc:
        raise KemariError(f"disk {path}: cannot open: {exc.strerror}") from exc
    deadline = time.monotonic() + wait_lock_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise KemariError(f"disk {path}: in use by another Kemari process") from exc
            time.sleep(0.01)
    if os.fstat(fd).st_size < SECTOR:
        os.close(fd)
        raise KemariError(f"disk {path} is empty; to make a new blank disk remove it and run "
                          "`kemari create-disk CONFIG`")
    return fd


def create_disk_image(path: Path, size_mib: int) -> None:
    """A new sparse blank image of size_mib (mode 0600). Never touches an existing
    file, never creates directories."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise KemariError(f"disk {path} already exists; left as it is") from None
    except OSError as exc:
        raise KemariError(f"disk {path}: cannot create: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size_mib << 20)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise KemariError(f"disk {path}: cannot create: {exc.strerror}") from exc
    os.close(fd)


class BlockBackend:
    """Serves the block ring at KEMARI_BLK_RING_GPA from an image file."""

    name = "blk"

    def __init__(self, machine: Machine, path: Path, size_mib: int, fd: int | None = None,
                 wait_lock_s: float = 0.0) -> None:
        """`fd`: an image already opened (and locked) with open_disk_image."""
        self.machine = machine
        self.path = path
        self.fd = fd if fd is not None else open_disk_image(path, size_mib, wait_lock_s)
        self.sectors = os.fstat(self.fd).st_size // SECTOR
        self.ring = BackendRing(machine, lib.KEMARI_BLK_RING_GPA, "struct kemari_blk_ring *")
        self.write_observer: WriteObserver | None = None
        # Called once a batch's writes are done, before they are made durable.
        self.before_sync: Callable[[], None] | None = None
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "errors": 0, "bytes_written": 0}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # Device interface -----------------------------------------------------
    state_version = 0        # no state of its own

    def state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        pass

    def attach(self) -> int:
        """Redo what was in flight when the snapshot was taken (writes are idempotent)."""
        return self.process()

    def has_work(self) -> bool:
        return self.ring.unanswered() > 0

    def pending_writes(self) -> list[tuple[int, bytes]]:
        """(sector, payload) of every valid write request in flight, for replication."""
        writes = []
        for _idx, req in self.ring.requests():
            if req.op == OP_WRITE and self._valid(req.sector, req.nr_sectors, req.buf_gpa):
                n = req.nr_sectors * SECTOR
                writes.append((req.sector, self.machine.read(req.buf_gpa, n)))
        return writes

    def position(self) -> int:
        """The ring index of the next request: every request before it exists now."""
        return self.ring.produced()

    def process(self, before: int | None = None) -> int:
        """Answer the unanswered requests, oldest first: all of them, or those before
        ring index `before` (epoch mode: the ones a checkpoint covers). Returns how
        many were answered."""
        count = self.ring.unanswered() if before is None else self.ring.count_before(before)
        return self._answer(count)

    def process_reads(self) -> int:
        """Answer the reads at the head of the ring: a read behind a held write
        waits for it (answers go in ring order), so it always sees that write."""
        count = 0
        for _idx, req in self.ring.requests():
            if req.op != OP_READ:
                break
            count += 1
        return self._answer(count)

    def _answer(self, count: int) -> int:
        batch = [(idx, req.id, req.op, req.sector, req.nr_sectors, req.buf_gpa)
                 for idx, req in itertools.islice(self.ring.requests(), count)]
        if not batch:
            return 0
        statuses = [self._do(op, sector, n, gpa) for _i, _id, op, sector, n, gpa in batch]
        ops = [b[2] for b in batch]
        wrote = any(op == OP_WRITE and st == OK for op, st in zip(ops, statuses, strict=True))
        if wrote and self.before_sync is not None:
            self.before_sync()
        if wrote and (sync := self._sync()) != OK:
            # nothing in this batch is durable: say so for every write and flush
            statuses = [sync if op in (OP_WRITE, OP_FLUSH) else st
                        for op, st in zip(ops, statuses, strict=True)]
        for (idx, req_id, op, *_rest), status in zip(batch, statuses, strict=True):
            rsp = self.ring.response_slot(idx)
            rsp.id, rsp.op, rsp.status = req_id, op, status
            if status != OK:
                self.stats["errors"] += 1
        self.ring.publish(len(batch))
        return len(batch)

    # Internals --------------------------------------------------------------
    def _valid(self, sector: int, n: int, gpa: int) -> bool:
        size = n * SECTOR
        return (0 < n <= lib.KEMARI_BLK_MAX_SECTORS and sector + n <= self.sectors
                and gpa + size <= self.machine.mem_bytes)

    def _do(self, op: int, sector: int, n: int, gpa: int) -> int:
        if op == OP_FLUSH:
            self.stats["flushes"] += 1
            return self._sync()
        if op not in (OP_READ, OP_WRITE) or not self._valid(sector, n, gpa):
            return EINVAL
        size, offset = n * SECTOR, sector * SECTOR
        buf = self.machine.mem[gpa : gpa + size]
        try:
            if op == OP_READ:
                got = os.preadv(self.fd, [buf], offset)
                if got < size:
                    buf[got:] = bytes(size - got)
                self.machine.mark_dirty(gpa, size)
                self.stats["reads"] += 1
            else:
                if self.write_observer is not None:
                    self.write_observer(sector, bytes(buf))
                done = 0
                while done < size:
                    done += os.pwrite(self.fd, buf[done:], offset + done)
                self.stats["writes"] += 1
                self.stats["bytes_written"] += size
        except OSError as exc:
            return self._error(exc)
        return OK

    def _sync(self) -> int:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            return self._error(exc)
        return OK

    def _error(self, exc: OSError) -> int:
        log.warning("disk %s: %s", self.path, exc.strerror)
        return ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT) else EIO
