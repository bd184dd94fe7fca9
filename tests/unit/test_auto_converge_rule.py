"""The auto-converge rule (QEMU's cpu-throttle): two rounds in a row that
dirty more than half of what they sent raise the throttle, 20% first, then
10 points, at most 99%; a converging round resets the count."""

from __future__ import annotations

import pytest

from kemari_agent.ft.auto_converge import throttle_step

pytestmark = pytest.mark.unit


def run(rounds):
    fraction, high, seen = 0.0, 0, []
    for sent, dirtied in rounds:
        fraction, high = throttle_step(fraction, high, sent, dirtied)
        seen.append(round(fraction * 100))
    return seen


def test_two_high_rounds_in_a_row_start_at_20_percent_then_add_10():
    assert run([(1000, 900)] * 6) == [0, 20, 20, 30, 30, 40]


def test_a_converging_round_resets_the_count_and_keeps_the_level():
    assert run([(1000, 900), (1000, 100), (1000, 900), (1000, 900), (1000, 400),
                (1000, 600), (1000, 600)]) == [0, 0, 0, 20, 20, 20, 30]


def test_exactly_half_is_converging_and_an_empty_round_changes_nothing():
    assert run([(1000, 500)] * 4 + [(0, 10_000)] * 3) == [0] * 7


def test_capped_at_99_percent():
    assert run([(10, 10_000)] * 40)[-1] == 99
