"""Probability schedules, and Theorem 1's probabilities and cost bound (spec §12 item 8)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multilevel_sde as mlsde

COSTS = torch.tensor([2.0, 8.0, 32.0, 128.0], dtype=torch.float64)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(eps=st.floats(1e-3, 1.0), gamma=st.floats(0.5, 6.0), dt=st.floats(1e-5, 1e-1))
def test_theorem1_probabilities_shape(eps, gamma, dt):
    schedule = mlsde.Theorem1(eps=eps, gamma=gamma)
    k = schedule.k
    assert k == max(1, math.ceil(math.log2(1 / eps) - 1e-12)) and 2.0**-k <= eps * (1 + 1e-9)
    costs = torch.ones(k, dtype=torch.float64)
    p = schedule(0.0, dt, costs)
    assert p.shape == (k,) and ((p > 0) & (p <= 1)).all()
    assert (p[1:] <= p[:-1]).all()  # decreasing in l
    raw = schedule.A * dt * 2.0 ** (-(1 + gamma / 2) * torch.arange(1, k + 1, dtype=torch.float64))
    assert torch.allclose(p, raw.clamp(max=1.0), rtol=1e-12)
    # proportional to dt before clipping
    half = schedule(0.0, dt / 2, costs)
    unclipped = raw < 1
    assert torch.allclose(half[unclipped], p[unclipped] / 2, rtol=1e-12)


@pytest.mark.parametrize("gamma", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("eps", [0.3, 0.05, 0.01])
def test_theorem1_cost_bound_holds_for_every_dt(gamma, eps):
    """Expected cost (one evaluation per drawn level) over [0, T] <= T A c^gamma G_k, whatever dt is."""
    schedule, T, c = mlsde.Theorem1(eps=eps, gamma=gamma), 2.0, 1.3
    costs = torch.tensor([(c * 2**l) ** gamma for l in range(1, schedule.k + 1)], dtype=torch.float64)
    bound = schedule.cost_bound(T, c)
    assert bound == pytest.approx(9 * T * c**gamma * schedule.G_k**2 / eps**2)
    for dt in (1.0, 0.1, 1e-2, 1e-4):
        expected = (T / dt) * float((schedule(0.0, dt, costs) * costs).sum())
        assert expected <= bound * (1 + 1e-12)


def test_geometric_sum_cases():
    for k in (1, 5, 12):
        r = 2.0 ** (1.5 / 2 - 1)  # gamma < 2: bounded by r / (1 - r)
        assert mlsde.Theorem1.geometric_sum(1.5, k) <= r / (1 - r)
        assert mlsde.Theorem1.geometric_sum(2.0, k) == pytest.approx(k)  # gamma = 2: = k
        r = 2.0 ** (3.0 / 2 - 1)  # gamma > 2: <= r^k / (1 - 1/r)
        assert mlsde.Theorem1.geometric_sum(3.0, k) <= r**k / (1 - 1 / r) * (1 + 1e-12)


def test_inverse_cost_and_power_law():
    p = mlsde.InverseCost(c=4.0)(0.0, 0.01, COSTS)
    assert torch.allclose(p, torch.tensor([1.0, 0.5, 0.125, 1 / 32], dtype=torch.float64))
    rate = mlsde.InverseCost(c=400.0, per_unit_time=True)
    assert torch.allclose(rate(0.0, 0.01, COSTS), p) and rate.per_unit_time
    assert torch.allclose(rate(0.0, 0.005, COSTS)[1:], p[1:] / 2)
    # power law on derived accuracies eps_l = C_l^(-1/gamma): alpha = gamma is inverse cost
    gamma = 2.5
    assert torch.allclose(mlsde.PowerLaw(c=4.0, alpha=gamma, gamma=gamma)(0.0, 0.01, COSTS), p)
    given = mlsde.PowerLaw(c=2.0, alpha=2.0, eps=[0.5, 0.25, 0.1, 0.01])(0.0, 0.1, COSTS)
    assert torch.allclose(given, torch.tensor([0.5, 0.125, 0.02, 0.0002], dtype=torch.float64))
    dyadic = mlsde.PowerLaw(c=8.0, alpha=2.0)(0.0, 0.1, COSTS)
    assert torch.allclose(dyadic, torch.tensor([1.0, 0.5, 0.125, 1 / 32], dtype=torch.float64))
    per_time = mlsde.PowerLaw(c=80.0, alpha=2.0, per_unit_time=True)(0.0, 0.1, COSTS)
    assert torch.allclose(per_time, dyadic)


def test_constant_and_sigmoid():
    const = mlsde.Constant([1.0, 0.5])
    assert const(0.3, 0.1, None).tolist() == [1.0, 0.5]
    assert const(torch.zeros(4), 0.1, None).shape == (2, 4)
    sig = mlsde.Sigmoid(a=[0.0, 1.0], b=[2.0, -1.0], floor=0.1, time_scale=0.5)
    p = sig(1.0, 0.1, None)
    expected = 0.1 + 0.9 * torch.sigmoid(torch.tensor([0.0 + 2.0 * 0.5, 1.0 - 0.5], dtype=torch.float64))
    assert torch.allclose(p, expected)
    assert sig(torch.tensor([0.0, 1.0, 2.0]), 0.1, None).shape == (2, 3)
    assert {name for name, _ in sig.named_parameters()} == {"a", "b"}
    drift = mlsde.MultilevelDrift([lambda t, y: y, lambda t, y: 2 * y], sig, costs=[1, 2])
    assert {name for name, _ in drift.named_parameters()} == {"probabilities.a", "probabilities.b"}


def test_a_plain_function_is_a_schedule():
    drift = mlsde.MultilevelDrift([lambda t, y: y, lambda t, y: 2 * y],
                                  lambda t, dt, costs: torch.tensor([1.0, 0.25]), costs=[1, 2], seed=0)
    assert drift.expected_cost(0.0, 0.1) == pytest.approx(1 * 1.0 + 2 * 0.25)
