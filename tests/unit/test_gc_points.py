"""gc_points: the daemons' young collections happen where they call for them,
at CPython's own rate, and the backstop still collects without them."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kemari_agent import gc_points

pytestmark = pytest.mark.unit


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """take_over() for one test; the process's collector as it was after."""
    thresholds = gc.get_threshold()
    monkeypatch.setattr(gc_points, "ENABLED", True)
    monkeypatch.setattr(gc_points, "_taken", False)
    gc.collect()
    try:
        assert gc_points.take_over()
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.collect()


def _cycle() -> None:
    a: list = []
    a.append(a)


def test_young_objects_wait_for_the_call_and_go_at_cpythons_rate(taken) -> None:
    assert gc.get_threshold() == (gc_points.BACKSTOP, gc_points.OLDER, gc_points.OLDER)
    assert gc.get_freeze_count() > 0          # start-up's objects: never traversed again
    keep = []
    generations = []
    for _ in range((gc_points.OLDER + 1) ** 2):
        for _ in range(gc_points.YOUNG):
            keep.append([])                    # net allocations
            _cycle()                           # garbage only a collection frees
        assert gc.get_count()[0] >= gc_points.YOUNG    # no automatic collection ran
        generations.append(gc_points.collect_if_due())
        assert gc.get_count()[0] < gc_points.YOUNG
    # the middle generation after every OLDER young ones, the oldest after OLDER middle ones
    step = gc_points.OLDER + 1
    middle = list(range(gc_points.OLDER, step * gc_points.OLDER, step))
    assert [i for i, generation in enumerate(generations) if generation == 1] == middle
    assert [i for i, generation in enumerate(generations) if generation == 2] == [middle[-1] + 1]
    assert gc_points.collect_if_due() is None          # not due: nothing collected
    before = len(gc.get_objects())
    _cycle()
    gc_points.collect_if_due()
    assert len(gc.get_objects()) <= before + 1


def test_the_backstop_collects_when_no_loop_calls(taken) -> None:
    garbage_before = gc.get_stats()[0]["collections"]
    for _ in range(gc_points.BACKSTOP + 1000):
        _cycle()
    assert gc.get_stats()[0]["collections"] > garbage_before


def test_switched_off_it_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc_points, "ENABLED", False)
    monkeypatch.setattr(gc_points, "_taken", False)
    thresholds = gc.get_threshold()
    assert not gc_points.take_over()
    assert gc.get_threshold() == thresholds
    assert gc_points.collect_if_due() is None
