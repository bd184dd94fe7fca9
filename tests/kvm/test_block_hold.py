"""The block backend's side of epoch-mode output commit, on a real guest memory:
requests stay in the ring until released, answers go in ring order, and a read
behind a held write sees that write."""

from __future__ import annotations

import pytest

from kemari_agent.devices.block import (
    OK,
    OP_READ,
    OP_WRITE,
    SECTOR,
    BlockBackend,
    create_disk_image,
)
from kemari_agent.kvm.machine import Machine
from kemari_agent.native import lib

pytestmark = pytest.mark.kvm

WRITE_BUF, READ_BUF, HEAD_READ_BUF = 0x200000, 0x210000, 0x220000


def push(blk: BlockBackend, req_id: int, op: int, sector: int, gpa: int) -> None:
    """What the guest's blkfront does: fill the next slot, advance req_prod."""
    hdr = blk.ring.ring.hdr
    req = blk.ring.ring.slot[hdr.req_prod % lib.KEMARI_RING_SIZE].req
    req.id, req.op, req.sector, req.nr_sectors, req.buf_gpa = req_id, op, sector, 1, gpa
    hdr.req_prod = (hdr.req_prod + 1) & 0xFFFFFFFF


def answered(blk: BlockBackend) -> list[tuple[int, int]]:
    hdr = blk.ring.ring.hdr
    return [(blk.ring.ring.slot[i % lib.KEMARI_RING_SIZE].rsp.id,
             blk.ring.ring.slot[i % lib.KEMARI_RING_SIZE].rsp.status)
            for i in range(hdr.rsp_prod)]


@pytest.fixture
def blk(tmp_path):
    with Machine(32 << 20) as machine:
        create_disk_image(tmp_path / "d.img", 1)
        backend = BlockBackend(machine, tmp_path / "d.img", 1)
        try:
            yield backend
        finally:
            backend.close()


def test_reads_at_the_head_go_at_once_and_the_rest_waits_in_order(blk):
    image = blk.path
    blk.machine.write(WRITE_BUF, b"N" * SECTOR)
    push(blk, 1, OP_READ, 7, HEAD_READ_BUF)          # nothing held before it
    push(blk, 2, OP_WRITE, 7, WRITE_BUF)             # held ...
    push(blk, 3, OP_READ, 7, READ_BUF)               # ... and so is the read behind it
    covered = blk.position()
    push(blk, 4, OP_WRITE, 9, WRITE_BUF)             # after the checkpoint: not covered

    assert blk.process_reads() == 1
    assert answered(blk) == [(1, OK)]
    assert blk.machine.read(HEAD_READ_BUF, SECTOR) == bytes(SECTOR)
    assert image.read_bytes()[7 * SECTOR : 8 * SECTOR] == bytes(SECTOR)   # not performed
    assert [s for s, _ in blk.pending_writes()] == [7, 9]                 # for the checkpoint

    assert blk.process(before=covered) == 2
    assert answered(blk) == [(1, OK), (2, OK), (3, OK)]
    assert image.read_bytes()[7 * SECTOR : 8 * SECTOR] == b"N" * SECTOR
    assert blk.machine.read(READ_BUF, SECTOR) == b"N" * SECTOR           # saw the write
    assert image.read_bytes()[9 * SECTOR : 10 * SECTOR] == bytes(SECTOR)  # still held
    assert blk.process(before=covered) == 0           # responses already passed it
    assert blk.process_reads() == 0

    assert blk.process() == 1
    assert image.read_bytes()[9 * SECTOR : 10 * SECTOR] == b"N" * SECTOR
