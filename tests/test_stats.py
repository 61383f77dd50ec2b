"""The statistics the reports use to say whether a difference between models is noise."""

from __future__ import annotations

import math

from pdc.runner.stats import mcnemar, paired_bootstrap, paired_items, unpaired_interval


def test_mcnemar_exact_values():
    """Only discordant items count: 6 wins for b against 0 for a gives p = 2 / 2^6; ties and
    shared answers change nothing."""
    a = [0] * 6 + [1, 1, 0, 0]
    b = [1] * 6 + [1, 1, 0, 0]
    assert math.isclose(mcnemar(a, b), 2 / 2 ** 6)
    assert mcnemar(a, a) == 1.0
    # 8 discordant, split 4/4: no evidence either way
    assert mcnemar([1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]) == 1.0


def test_paired_bootstrap_is_seeded_and_brackets_the_mean():
    a = [0.1 * i for i in range(50)]
    b = [x + 0.5 + (0.05 if i % 2 else -0.05) for i, x in enumerate(a)]
    d1, d2 = paired_bootstrap(a, b), paired_bootstrap(a, b)
    assert d1 == d2 and d1.low <= d1.delta <= d1.high
    assert math.isclose(d1.delta, 0.5) and d1.significant


def test_a_shift_smaller_than_the_noise_is_not_significant():
    a = [1, 0] * 20
    b = [0, 1] * 20  # same accuracy, every item flipped
    d = paired_items(a, b)
    assert d.delta == 0 and not d.significant and d.p_value == 1.0
    u = unpaired_interval(0.5, 0.05, 0.55, 0.05)
    assert u.low < 0 < u.high and not u.significant
