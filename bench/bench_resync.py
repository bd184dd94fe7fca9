"""Re-protection after a 2 s replication link cut under kv client load (issue 7):
bytes sent and time to protected again, resync vs full sync, same run.

The link runs through a loopback relay (tests/linkrelay.py) that the
benchmark cuts for 2 s. Resync: the secondary kept its checkpoint, so only
what changed since is sent. Full sync: the same cut, but the secondary is
restarted while the link is down (it lost its checkpoint), which is what every
reconnect cost before the resync existed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ftlab import FtLab
from linkrelay import LinkRelay

from bench.common import report
from kemari_agent.kvload import Clients

CUT_S = 2.0


def _listen_port(node) -> int:
    return int(node.config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])


def _reprotect(lab: FtLab, relay: LinkRelay, restart_secondary: bool) -> dict:
    """Cut the link for CUT_S; returns the primary's last_sync and the time from
    the link coming back to the pair being protected again."""
    before = lab.primary.status()["last_sync"]
    relay.cut()
    cut_end = time.monotonic() + CUT_S
    if restart_secondary:
        lab.secondary.kill()
        lab.secondary.start("secondary")
    time.sleep(max(0.0, cut_end - time.monotonic()))
    relay.restore()
    restored = time.monotonic()
    while time.monotonic() < restored + 120:
        st = lab.primary.status()
        if st["state"] == "synced" and st["last_sync"] != before:
            return dict(st["last_sync"], reprotect_s=time.monotonic() - restored)
        time.sleep(0.02)
    raise RuntimeError(f"never re-protected: {lab.primary.status()}")


def main(memory_mib: int = 256) -> dict:
    lab = FtLab(Path(tempfile.mkdtemp(prefix="kemari-bench-")), disk_mode="replicated",
                memory_mib=memory_mib)
    relay = LinkRelay(("127.0.0.1", _listen_port(lab.secondary)))
    cfg = lab.primary.config
    cfg.write_text(cfg.read_text().replace(
        f'peer = "127.0.0.1:{_listen_port(lab.secondary)}"', f'peer = "127.0.0.1:{relay.port}"'))
    clients = None
    try:
        lab.start_pair()
        clients = Clients(lab.addr).start()
        time.sleep(1.0)
        resync = _reprotect(lab, relay, restart_secondary=False)
        time.sleep(1.0)
        full = _reprotect(lab, relay, restart_secondary=True)
    finally:
        if clients is not None:
            clients.stop()
        lab.close()
        relay.close()
    assert resync["kind"] == "resync" and full["kind"] == "full", (resync, full)
    guest = f"{memory_mib} MiB kv guest + 16 MiB replicated disk, 3 clients"
    rows = [
        (f"resync after a {CUT_S:.0f} s cut: bytes sent", resync["bytes"], "B"),
        ("resync: pages sent", resync["pages"], ""),
        ("resync: link back -> protected", resync["reprotect_s"] * 1e3, "ms"),
        ("resync: the sync itself", resync["seconds"] * 1e3, "ms"),
        (f"full sync after a {CUT_S:.0f} s cut: bytes sent", full["bytes"], "B"),
        ("full sync: pages sent", full["pages"], ""),
        ("full sync: link back -> protected", full["reprotect_s"] * 1e3, "ms"),
        ("full sync: the sync itself", full["seconds"] * 1e3, "ms"),
        ("bytes full / resync", full["bytes"] / max(1, resync["bytes"]), "x"),
        ("time to protected full / resync", full["reprotect_s"] / resync["reprotect_s"], "x"),
    ]
    return report("resync", rows, {"guest": guest, "resync": resync, "full": full})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-mib", type=int, default=256)
    main(ap.parse_args().memory_mib)
