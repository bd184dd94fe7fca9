"""Kemari benchmarks: each prints a table and writes JSON under bench/results/."""

import sys
from pathlib import Path

# The benchmarks drive real VMs with the same helpers as the system tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
