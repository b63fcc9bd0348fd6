"""The drift gauge's PSI: calm on the reference's own population, high on a shifted one, and it forgets."""

from __future__ import annotations

import math

import numpy as np

from recserve.drift import MIN_ROWS, Buckets, Drift, psi


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


def test_buckets_count_every_value_at_or_below_each_bound_and_start_again_after_take():
    edges = [0.123456, 0.5, 0.5000001, 2.0, np.inf]           # rounded to 4 digits; duplicates and inf dropped
    b = Buckets(edges)
    assert b.labels == ["0.1235", "0.5", "2", "+Inf"]
    values = np.array([-np.inf, 0.1, 0.1235, 0.2, 0.5, 1.0, 2.0, 3.0, np.inf, np.nan])
    b.observe(values[:5])
    b.observe(values[5:])
    bounds = [0.1235, 0.5, 2.0, np.inf]
    expected = {label: int((values[~np.isnan(values)] <= le).sum()) for label, le in zip(b.labels, bounds)}
    assert b.take() == expected == {"0.1235": 3, "0.5": 5, "2": 7, "+Inf": 9}
    assert b.take() == {}, "take hands over what came since the last call"
    b.observe([5.0])
    assert b.take() == {"+Inf": 1}
