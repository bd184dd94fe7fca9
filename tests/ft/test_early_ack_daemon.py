"""The real secondary daemon's early ACK, driven by a FakePrimary: a checkpoint
acknowledged before it was applied stays this node's checkpoint even when
the rest of the same read breaks the session, and an image left torn after
an early ACK is not promotable."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest
from ftlab import MEM, VCPU, FakePrimary, FtLab

from kemari_agent.control import request
from kemari_agent.ft.faults import SLOW_APPLY_S
from kemari_agent.replication.codec import Device, Vcpu
from kemari_agent.replication.errors import PeerError

pytestmark = pytest.mark.kvm


def wait_for(what, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := what():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def quiet(node, seconds: float = 3 * SLOW_APPLY_S) -> bool:
    """No checkpoint came in for `seconds`."""
    before = node.status()["checkpoints"]
    time.sleep(seconds)
    return node.status()["checkpoints"] == before


def pump_until_acked(fake: FakePrimary, seq: int) -> None:
    """The early ACK, and the secondary's ERROR for what follows it, which one
    read may bring together: the ACK is taken first, then the ERROR raises."""
    with contextlib.suppress(PeerError):
        fake.pump(lambda: fake.sm.is_acked(seq))


@pytest.fixture
def pair(tmp_path) -> Iterator[tuple[FtLab, FakePrimary, bytearray]]:
    """A secondary daemon, and a FakePrimary past its full sync and one
    checkpoint, sending deltas (the secondary's C reader, which alone
    acknowledges early, needs them); with the fake guest memory."""
    lab = FtLab(tmp_path, memory_mib=MEM >> 20)
    memory = bytearray(os.urandom(MEM))
    try:
        lab.secondary.start("secondary")
        fake = FakePrimary(lab, memory, delta_cache_pages=64)
        fake.full_sync()
        memory[:4096] = os.urandom(4096)
        fake.checkpoint([0])
        yield lab, fake, memory
        fake.close()
    finally:
        lab.close()


def test_a_checkpoint_acked_early_is_kept_when_the_rest_of_its_read_is_refused(pair):
    lab, fake, memory = pair
    node = lab.secondary
    early = node.status()["early_acks"]
    memory[4096:8192] = os.urandom(4096)
    good, first = fake.build([1])
    memory[8192:12288] = os.urandom(4096)
    fake.sm.max_outstanding = 2
    _bad, second = fake.build([2])
    broken = bytearray(second)
    broken[-1] ^= 0xFF                       # the END's checksum no longer matches
    fake.send(first + bytes(broken))         # one write: the daemon reads both at once
    pump_until_acked(fake, good)
    assert fake.sm.is_acked(good)            # acknowledged early, before the bad one
    st = wait_for(lambda: (s := node.status())["state"] == "standalone" and s)
    assert st["early_acks"] == early + 1, st
    # the refused checkpoint ended the session; the acknowledged one stays recorded
    assert st["checkpoint_seq"] == good and st["has_checkpoint"], st
    assert st["consistent"] and st["promotable"], st


def test_the_digest_waits_for_the_apply_of_a_checkpoint_acked_early(tmp_path):
    """A real pair: the secondary's ACK leaves in its wait's C call, before the
    pass that applies the checkpoint (here SLOW_APPLY_S later). Its digest,
    asked for meanwhile, is taken after that pass: the acknowledged image,
    never the one before it."""
    lab = FtLab(tmp_path)
    try:
        lab.secondary.start("secondary", fault="slow-apply:1")
        lab.primary.start("primary")
        wait_for(lambda: lab.primary.status()["state"] == "synced")
        wait_for(lambda: quiet(lab.secondary))      # the guest's boot checkpoints applied
        early = lab.secondary.status()["early_acks"]
        for _ in range(3):
            prim = request(lab.primary.dir / "run" / f"{lab.name}.sock", "checkpoint-digest")
            sec = request(lab.secondary.dir / "run" / f"{lab.name}.sock", "checkpoint-digest")
            assert sec == prim
        assert lab.secondary.status()["early_acks"] >= early + 3      # all acked early
    finally:
        lab.close()


def test_an_image_torn_after_an_early_ack_is_not_promotable(pair):
    lab, fake, memory = pair
    memory[4096:8192] = os.urandom(4096)
    # a vCPU record of a version this node cannot load: the C reader takes it
    # (and acknowledges early), the daemon fails to apply it
    seq = fake.sm.checkpoint(memory, [1], [Vcpu(0, 9, VCPU.blob), Device(0, 1, b"{}")],
                             now=time.monotonic())
    fake.send()
    pump_until_acked(fake, seq)
    assert fake.sm.is_acked(seq)             # early, before the apply failed
    st = wait_for(lambda: (s := lab.secondary.status())["state"] == "standalone" and s)
    assert not st["consistent"] and not st["promotable"], st
    assert st["promote_blocker"].startswith("inconsistent"), st
    assert "cannot apply checkpoint" in st["last_error"], st
