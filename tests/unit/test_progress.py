"""The terminal status line and its full-sync progress bar."""

import pytest

from kemari_agent.progress import line, sync_fraction

pytestmark = pytest.mark.unit


def test_bar_during_sync():
    st = {"name": "kv1", "role": "primary", "state": "syncing",
          "sync": {"round": 2, "pages_sent": 30000, "pages_remaining": 10000,
                   "pages_total": 16384}}
    assert sync_fraction(st) == 0.75
    text = line(st)
    assert "[######################........]" in text and "75.0%" in text
    assert "round 2, 10000 pages left" in text


def test_synced_primary_shows_latency():
    st = {"name": "kv1", "role": "primary", "state": "synced", "checkpoint_seq": 42,
          "latency_us": {"p50": 80.5, "p99": 200.0}}
    assert line(st) == "kv1: primary, synced, checkpoint 42, p50 80.5 us, p99 200.0 us"


def test_secondary_line_has_no_bar():
    assert line({"name": "kv1", "role": "secondary", "state": "synced"}) == \
        "kv1: secondary, synced"


def test_fresh_pair_has_no_latency_yet():
    st = {"name": "kv1", "role": "primary", "state": "synced", "checkpoint_seq": 1,
          "latency_us": {"p50": None, "p99": None}}
    assert line(st) == "kv1: primary, synced, checkpoint 1"
