"""The full sync's choice of LZ4 per batch follows the measured cost per page."""

from __future__ import annotations

import pytest

from kemari_agent.ft.sync_compression import PROBE_EVERY, CompressionChooser

pytestmark = pytest.mark.unit


def run(chooser: CompressionChooser, cost: dict[bool, float], batches: int) -> list[bool]:
    choices = []
    for _ in range(batches):
        choice = chooser.choose()
        chooser.record(choice, 512, cost[choice] * 512)
        choices.append(choice)
    return choices


@pytest.mark.parametrize("cheaper", [True, False])
def test_the_cheaper_option_wins_and_the_other_is_still_probed(cheaper: bool) -> None:
    chooser = CompressionChooser(True)
    choices = run(chooser, {cheaper: 1e-6, not cheaper: 5e-6}, 10 * PROBE_EVERY)
    steady = choices[2:]
    assert steady.count(not cheaper) == pytest.approx(len(steady) / PROBE_EVERY, abs=2)
    assert steady.count(cheaper) > 0.8 * len(steady)


def test_a_change_in_memory_contents_is_followed() -> None:
    chooser = CompressionChooser(True)
    run(chooser, {True: 1e-6, False: 5e-6}, 4 * PROBE_EVERY)          # compresses well
    later = run(chooser, {True: 9e-6, False: 5e-6}, 8 * PROBE_EVERY)  # now random pages
    assert later[-PROBE_EVERY + 1:].count(False) >= PROBE_EVERY - 2


def test_disabled_never_compresses_and_counts_batches() -> None:
    chooser = CompressionChooser(False)
    assert run(chooser, {True: 0.0, False: 1.0}, 20) == [False] * 20
    assert (chooser.batches, chooser.compressed_batches) == (20, 0)


def test_a_try_that_saved_nothing_rules_compression_out_until_the_next_probe() -> None:
    chooser = CompressionChooser(True)
    choices = []
    for _ in range(4 * PROBE_EVERY):
        choice = chooser.choose()
        # incompressible pages: a try costs about the same, but never shrinks anything
        chooser.record(choice, 512, 512e-6, shrank=False)
        choices.append(choice)
    assert choices.count(True) <= 1 + 4          # the first try, then one probe per 8
