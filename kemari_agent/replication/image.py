"""A secondary's guest image in memory: the CheckpointSink the real secondary and
the tests both use.

Guest memory is any writable buffer (an anonymous mmap the VMM can later map
into KVM as the guest's RAM, or a bytearray); replicated disks are file
descriptors (written with pwrite) or in-memory buffers.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping, Sequence

from .codec import PAGE_SIZE, SECTOR_SIZE, Buffer
from .delta import apply_delta


class ImageSink:
    """Full copy of a guest's memory, vCPU and device blobs, and replicated disks."""

    def __init__(self, memory_size: int, *, memory: Buffer | None = None,
                 disks: Mapping[int, int | bytearray] | None = None) -> None:
        if memory_size % PAGE_SIZE:
            raise ValueError("memory size must be a multiple of 4096")
        if memory is None:
            # Prefault now: a full sync into untouched memory spends more time in
            # page faults than in copying (measured: 0.46 vs 2 GiB/s).
            memory = mmap.mmap(-1, memory_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                               | getattr(mmap, "MAP_POPULATE", 0))
        self.memory = memoryview(memory)
        if len(self.memory) != memory_size or self.memory.readonly:
            raise ValueError("memory buffer must be writable and exactly memory_size bytes")
        self.disks = dict(disks or {})
        self.vcpus: dict[int, tuple[int, bytes]] = {}
        self.devices: dict[int, tuple[int, bytes]] = {}
        self.generation = 0
        self.checkpoint_seq = 0
        self.complete = False
        self.commits = 0

    def begin_full_sync(self, generation: int) -> None:
        self.complete = False
        self.vcpus.clear()
        self.devices.clear()

    def apply_pages(self, pfns: Sequence[int], data: Buffer, zero_pfns: Sequence[int]) -> None:
        mem = self.memory
        src = 0
        run_start = run_end = -1
        run_src = 0
        for pfn in pfns:  # copy runs of consecutive pfns in one slice assignment
            if pfn == run_end:
                run_end += 1
            else:
                if run_start >= 0:
                    mem[run_start * PAGE_SIZE:run_end * PAGE_SIZE] = \
                        data[run_src:run_src + (run_end - run_start) * PAGE_SIZE]
                run_start, run_end, run_src = pfn, pfn + 1, src
            src += PAGE_SIZE
        if run_start >= 0:
            mem[run_start * PAGE_SIZE:run_end * PAGE_SIZE] = \
                data[run_src:run_src + (run_end - run_start) * PAGE_SIZE]
        for pfn in zero_pfns:
            mem[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = _ZERO_PAGE

    def rebuild_pages(self, pfns: Sequence[int], delta: bytearray) -> None:
        apply_delta(self.memory, pfns, delta)

    def set_vcpu(self, vcpu_id: int, version: int, blob: Buffer) -> None:
        self.vcpus[vcpu_id] = (version, bytes(blob))

    def set_device(self, device_id: int, version: int, blob: Buffer) -> None:
        self.devices[device_id] = (version, bytes(blob))

    def write_disk(self, disk_id: int, sector: int, data: Buffer) -> None:
        disk = self.disks.get(disk_id)
        if disk is None:
            raise KeyError(f"no replicated disk {disk_id} on this secondary")
        offset = sector * SECTOR_SIZE
        if isinstance(disk, int):
            view = memoryview(data)
            while view:
                written = os.pwrite(disk, view, offset)
                view = view[written:]
                offset += written
        else:
            if offset + len(data) > len(disk):
                raise ValueError(f"write past the end of replicated disk {disk_id}")
            disk[offset:offset + len(data)] = data

    def commit(self, generation: int, seq: int) -> None:
        self.generation = generation
        self.checkpoint_seq = seq
        self.complete = True
        self.commits += 1


_ZERO_PAGE = bytes(PAGE_SIZE)
