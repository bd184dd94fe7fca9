"""Fixtures of the cluster tier: a booted lab shared by a module's tests
(booting one costs ~10 s), torn down by PID even when a test fails."""

from __future__ import annotations

import os

import pytest
from cluster.lab import ClusterLab


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the cluster lab needs root (network namespaces, mounts)")
    with ClusterLab(nodes=2) as lab:
        yield lab


def pytest_addoption(parser):
    parser.addoption("--cluster-cycles", type=int, default=3,
                     help="power-off/return cycles in the cluster failover scenario (default 3)")


@pytest.fixture
def cluster_cycles(request) -> int:
    return request.config.getoption("--cluster-cycles")
