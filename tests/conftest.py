"""Fixtures shared by every tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import NetLab


@pytest.fixture
def kdirs(tmp_path: Path) -> Path:
    """Private KEMARI_RUN_DIR / KEMARI_STATE_DIR parent for one test."""
    (tmp_path / "run").mkdir()
    (tmp_path / "state").mkdir()
    return tmp_path


@pytest.fixture
def netlab():
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root")
    lab = NetLab()
    try:
        yield lab
    finally:
        lab.close()


def pytest_addoption(parser):
    parser.addoption("--torture-trials", type=int, default=50,
                     help="failovers per torture test (default 50)")


@pytest.fixture
def torture_trials(request) -> int:
    return request.config.getoption("--torture-trials")
