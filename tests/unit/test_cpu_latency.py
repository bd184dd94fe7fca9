"""replication.cpu_latency_us: a PM QoS request held on /dev/cpu_dma_latency."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kemari_agent.ft.cpu_latency import CpuLatencyRequest, current_limit_us

pytestmark = pytest.mark.unit

ODD_US = 7      # a limit nothing else on the machine asks for


def test_the_request_holds_until_closed():
    before = current_limit_us()
    request = CpuLatencyRequest(ODD_US)
    try:
        assert request.held and request.error is None
        assert current_limit_us() == min(before, ODD_US)
        assert request.status() == {"requested_us": ODD_US, "held": True, "error": None}
    finally:
        request.close()
    assert current_limit_us() == before
    assert not request.held
    request.close()                 # twice is harmless


def test_a_dead_holder_leaves_nothing_behind():
    """The kernel drops the request with the file: a daemon killed with
    SIGKILL does not keep the host's CPUs awake."""
    before = current_limit_us()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from kemari_agent.ft.cpu_latency import CpuLatencyRequest\n"
         f"r = CpuLatencyRequest({ODD_US})\nprint(r.held, flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert current_limit_us() == min(before, ODD_US)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 5
    while current_limit_us() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert current_limit_us() == before


def test_no_device_is_an_error_in_status_not_a_failure(tmp_path, caplog):
    missing = tmp_path / "cpu_dma_latency"
    request = CpuLatencyRequest(0, device=str(missing))
    assert not request.held
    assert str(missing) in request.error
    assert request.status()["held"] is False
    assert "replication.cpu_latency_us = 0 not applied" in caplog.text
    request.close()


def test_a_refused_write_is_reported_and_closes_the_file():
    """/dev/full opens but refuses every write (ENOSPC)."""
    fds = len(os.listdir("/proc/self/fd"))
    request = CpuLatencyRequest(0, device="/dev/full")
    assert not request.held and request.error.startswith("cannot write /dev/full")
    assert len(os.listdir("/proc/self/fd")) == fds
