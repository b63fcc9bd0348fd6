"""The drift gauge's PSI: calm on the reference's own population, high on a shifted one, and it forgets."""

from __future__ import annotations

import math

import numpy as np

from recserve.drift import MIN_ROWS, Drift, psi


def test_psi_is_zero_for_equal_histograms_and_grows_with_the_shift():
    assert psi([10, 20, 30], [1, 2, 3]) == 0.0
    assert 0 < psi([12, 20, 28], [10, 20, 30]) < psi([30, 20, 10], [10, 20, 30])


def test_the_gauge_is_calm_on_its_population_high_on_a_shifted_one_and_forgets_the_shift():
    rng = np.random.default_rng(0)
    d = Drift(rng.normal(size=256), window=1000)
    assert math.isnan(d.value())
    d.observe(rng.normal(size=MIN_ROWS // 4))
    assert math.isnan(d.value()), "a handful of rows reports nothing"
    for _ in range(20):
        d.observe(rng.normal(size=100))
    assert d.value() < 0.1
    for _ in range(30):
        d.observe(rng.normal(loc=1.0, size=100))          # a shift of one standard deviation
    assert d.value() > 0.25
    for _ in range(60):
        d.observe(rng.normal(size=100))
    assert d.value() < 0.1, "about a window later the shift is forgotten"
    d.observe(np.array([np.nan, np.inf]))                  # never counted
    assert d.seen == 20 * 100 + MIN_ROWS // 4 + 90 * 100
