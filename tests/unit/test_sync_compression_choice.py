"""The full sync's choice of LZ4 per batch follows the measured cost per page."""

from __future__ import annotations

import pytest

from kemari_agent.ft.sync_compression import MAX_PROBE_EVERY, PROBE_EVERY, CompressionChooser

pytestmark = pytest.mark.unit


def run(chooser: CompressionChooser, cost: dict[bool, float], batches: int) -> list[bool]:
    choices = []
    for _ in range(batches):
        choice = chooser.choose()
        chooser.record(choice, 512, cost[choice] * 512)
        choices.append(choice)
    return choices


@pytest.mark.parametrize("cheaper", [True, False])
def test_the_cheaper_option_wins_and_the_other_is_probed_ever_less_often(cheaper: bool) -> None:
    chooser = CompressionChooser(True)
    choices = run(chooser, {cheaper: 1e-6, not cheaper: 5e-6}, 6 * MAX_PROBE_EVERY)
    probes = [i for i, choice in enumerate(choices) if i >= 2 and choice != cheaper]
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    expected = [min(PROBE_EVERY << n, MAX_PROBE_EVERY) for n in range(1, len(gaps) + 1)]
    assert gaps == expected
    assert len(probes) >= 5


def test_a_probe_that_wins_switches_and_probes_often_again() -> None:
    """Memory turns compressible while sending plain costs the same: only a probe
    can tell, and once it has, probing starts again from PROBE_EVERY."""
    chooser = CompressionChooser(True)
    run(chooser, {True: 9e-6, False: 5e-6}, 4 * MAX_PROBE_EVERY)   # random pages
    assert chooser.probe_every == MAX_PROBE_EVERY
    later = run(chooser, {True: 1e-6, False: 5e-6}, 2 * MAX_PROBE_EVERY)
    won = later.index(True)                          # the probe that found it out
    assert won < MAX_PROBE_EVERY
    after = later[won:]
    assert after.index(False) == PROBE_EVERY         # the next probe, PROBE_EVERY later
    assert after.count(True) > 0.9 * len(after)


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
    assert choices.count(True) == 1 + 2          # the first try, then probes after 8 and 16
