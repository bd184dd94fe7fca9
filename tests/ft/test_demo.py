"""`kemari demo` (what `make demo` runs) keeps its promises and says so."""

from __future__ import annotations

import subprocess

import pytest
from helpers import KEMARI, REPO

pytestmark = pytest.mark.kvm


def test_demo_survives_a_killed_primary():
    r = subprocess.run(KEMARI + ["demo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "SIGKILL of the primary" in out and "node B promoted: generation 2" in out
    assert "invariants OK" in out and "BROKEN" not in out
