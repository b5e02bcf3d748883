"""Exponent fits: gamma of a ladder and cost exponents, with intervals."""

import math

import numpy as np
import pytest

import multilevel_sde as mlsde


def test_estimate_gamma_recovers_a_known_exponent():
    costs = 2.0 ** (2.5 * np.arange(1, 7))
    errors = 3.0 * costs ** (-1 / 2.5)
    est = mlsde.estimate_gamma(errors, costs)
    assert est.gamma == pytest.approx(2.5, rel=1e-9)
    assert est.interval[0] == pytest.approx(2.5, rel=1e-6) and est.interval[1] == pytest.approx(2.5, rel=1e-6)
    squared = mlsde.estimate_gamma(errors**2, costs, squared=True)
    assert squared.gamma == pytest.approx(2.5, rel=1e-9)


def test_interval_covers_the_truth_at_its_nominal_rate():
    """Over noisy repetitions, the 90% interval covers the true gamma about 90% of the time."""
    gen = np.random.default_rng(0)
    costs = 2.0 ** (3 * np.arange(1, 8))
    hits, trials = 0, 400
    for _ in range(trials):
        errors = costs ** (-1 / 3.0) * np.exp(0.1 * gen.standard_normal(costs.size))
        lo, hi = mlsde.estimate_gamma(errors, costs, confidence=0.9).interval
        hits += lo <= 3.0 <= hi
    se = math.sqrt(0.9 * 0.1 / trials)
    assert abs(hits / trials - 0.9) <= 4.5 * se


def test_cost_exponent_and_bad_input():
    errors = np.array([0.1, 0.05, 0.025])
    fit = mlsde.cost_exponent(errors, 7.0 * errors**-3.0)
    assert fit.slope == pytest.approx(3.0) and np.allclose(fit.predict(1 / errors), 7.0 * errors**-3.0)
    with pytest.raises(ValueError, match="costs|x"):
        mlsde.estimate_gamma([0.1, 0.2], [1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2"):
        mlsde.estimate_gamma([0.1], [1.0])
    with pytest.raises(ValueError, match="do not decrease"):
        mlsde.estimate_gamma([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
