"""The full sync's choice of LZ4 per batch follows the measured cost per page."""

from __future__ import annotations

import pytest

from kemari_agent.ft.sync_compression import MAX_PROBE_EVERY, PROBE_EVERY, CompressionChooser

pytestmark = pytest.mark.unit


def run(chooser: CompressionChooser, cost: dict[bool, float], batches: int) -> list[bool]:
    """Batches of 512 pages whose encoding costs cost[choice] per page, the same
    bytes either way, sent for free: the cheaper encoding should win."""
    choices = []
    for _ in range(batches):
        choice = chooser.choose()
        chooser.record(choice, 512, cost[choice] * 512, 512 * 4096, 0.0)
        choices.append(choice)
    return choices


def run_link(chooser: CompressionChooser, encode_s: dict[bool, float], sent: dict[bool, int],
             send_s_per_byte, batches: int) -> list[bool]:
    """Batches with their encoding time and bytes per page for each choice, sent at
    send_s_per_byte(choice, previous choice) seconds per byte."""
    choices: list[bool] = []
    for _ in range(batches):
        choice = chooser.choose()
        nbytes = 512 * sent[choice]
        chooser.record(choice, 512, 512 * encode_s[choice], nbytes,
                       nbytes * send_s_per_byte(choice, choices[-1] if choices else None))
        choices.append(choice)
    return choices


@pytest.mark.parametrize("link_s_per_byte, compress", [(10e-9, True), (0.5e-9, False)])
def test_bytes_saved_pay_for_the_encoding_only_when_bytes_are_dear(link_s_per_byte, compress):
    """LZ4 halving pages at 12 us a page, plain at 1: on a 100 MB/s link the bytes
    saved are worth it, on a 2 GB/s one they are not."""
    choices = run_link(CompressionChooser(True), {True: 12e-6, False: 1e-6},
                       {True: 2048, False: 4096}, lambda _c, _p: link_s_per_byte, 200)
    assert choices[2:].count(compress) > 0.9 * len(choices[2:])


def test_a_socket_found_full_does_not_steer_the_choice():
    """Words: LZ4 saves 5% of the bytes at 12 us a page. A plain batch finds the
    socket full (the secondary is behind) and waits; a compressed one took so long
    to encode that the socket has drained. Timed per choice, LZ4 would look the
    cheaper (12 + 1.2 against 1 + 12.3 us a page); the shared price of a byte
    says it is not."""
    def price(choice, _previous):
        return 0.3e-9 if choice else 3e-9
    choices = run_link(CompressionChooser(True), {True: 12e-6, False: 1e-6},
                       {True: 3900, False: 4096}, price, 300)
    assert choices[2:].count(False) > 0.95 * len(choices[2:])


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
        chooser.record(choice, 512, 512e-6, 512 * 4096, 1e-3, shrank=False)
        choices.append(choice)
    assert choices.count(True) == 1 + 2          # the first try, then probes after 8 and 16
