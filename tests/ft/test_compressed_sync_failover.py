"""A full sync whose rounds went LZ4-compressed leaves a secondary that takes
over with every acknowledged write (real guests, real daemons)."""

from __future__ import annotations

import pytest
from ftlab import FtLab

from kemari_agent.kvclient import KvClient

pytestmark = pytest.mark.kvm

KEYS = 400


def value(i: int) -> str:
    return f"v{i}-" + "kemari-" * 8            # 64 bytes at most, compressible


def full_sync_again(lab: FtLab) -> dict:
    """Restart the secondary: it lost its checkpoint, so the primary sends it all."""
    before = lab.primary.status()["last_sync"]
    lab.secondary.kill()
    lab.secondary.start("secondary")
    lab.wait_protected()
    sync = lab.primary.status()["last_sync"]
    assert sync != before and sync["kind"] == "full", sync
    return sync


@pytest.mark.parametrize("compression", ["lz4", "none"])
def test_a_compressed_full_sync_fails_over_with_every_write(tmp_path, compression):
    lab = FtLab(tmp_path)
    cfg = lab.primary.config
    cfg.write_text(cfg.read_text().replace(
        "[replication]\n", f'[replication]\ncompression = "{compression}"\n', 1))
    try:
        lab.start_pair()
        with KvClient(lab.addr) as c:
            for i in range(KEYS):
                assert c.put(f"key{i}", value(i)).kind == "OK"
        sync = full_sync_again(lab)
        if compression == "lz4":
            # the first batch (guest code, its store) is always tried compressed
            assert sync["lz4_pages"] > 0, sync
            assert "PAGES_LZ4" not in lab.secondary.log()       # no decode error
        else:
            assert sync["lz4_pages"] == 0, sync
        lab.failover()
        with KvClient(lab.addr) as c:
            got = {i: c.get(f"key{i}").value for i in range(KEYS)}
        assert got == {i: value(i) for i in range(KEYS)}
    finally:
        lab.close()
