"""Which 64 KiB chunks of a replicated disk a write touches: what a resync
resends for a checkpoint that was never acknowledged."""

from __future__ import annotations

import pytest

from kemari_agent.ft.protector import DISK_CHUNK_SECTORS, _disk_chunks

pytestmark = pytest.mark.unit


def test_a_write_is_remembered_by_every_chunk_it_touches() -> None:
    last = DISK_CHUNK_SECTORS - 1
    assert list(_disk_chunks(0, 512)) == [0]
    assert list(_disk_chunks(last, 512)) == [0]
    assert list(_disk_chunks(last, 1024)) == [0, 1]            # across a boundary
    assert list(_disk_chunks(DISK_CHUNK_SECTORS, DISK_CHUNK_SECTORS * 512)) == [1]
    assert list(_disk_chunks(1, 3 * DISK_CHUNK_SECTORS * 512)) == [0, 1, 2, 3]
