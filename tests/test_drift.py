"""MultilevelDrift: unbiasedness, variance, cost rule, sub-batching, seeds, recording and gradients
(spec §12 items 1, 2, 5)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multilevel_sde as mlsde
from helpers import DTYPE, affine_ladder, mlp, moment_within

D = 3


def _state(batch: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return x.expand(batch, D).clone()


def _differences(levels, t, x):
    outs = [torch.zeros_like(x)] + [f(t, x) for f in levels]
    return torch.stack([outs[l + 1] - outs[l] for l in range(len(levels))])  # (k, batch, d)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    k=st.integers(1, 4),
    probs=st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
)
def test_estimate_is_unbiased_with_the_variance_formula(k, probs, seed):
    """E_B[F] = f^k and E||F - f^k||^2 = sum_l (1/p_l - 1) ||Delta_l||^2, by Monte Carlo (items 1, 2)."""
    levels, _, _ = affine_ladder(k, D, seed)
    p = probs[:k]
    drift = mlsde.MultilevelDrift(levels, p, costs=[1.0] * k, coupling="sample", seed=seed)
    x = _state(20000, seed)
    F = drift.sample(0.3, x, 0.01)
    top = levels[-1](0.3, x[:1])[0]
    delta = _differences(levels, 0.3, x[:1])[:, 0]  # (k, d)
    var_coord = sum((1 / p[l] - 1) * delta[l] ** 2 for l in range(k))  # exact per-coordinate variance
    assert ((F.mean(0) - top).abs() <= 5 * var_coord.sqrt() / F.shape[0] ** 0.5 + 1e-12).all()
    sq = ((F - top) ** 2).sum(1)
    expected_trace = float(sum((1 / p[l] - 1) * (delta[l] ** 2).sum() for l in range(k)))
    if expected_trace == 0:  # every p = 1: exactly the top level (on the same batch: same matmul rounding)
        assert torch.equal(F, levels[-1](0.3, x))
    else:
        moment_within(sq, torch.tensor(expected_trace, dtype=DTYPE))


def test_covariance_matrix_matches_formula():
    """Cov_B[F] = sum_l (1/p_l - 1) Delta_l Delta_l^T entrywise (item 2)."""
    levels, _, _ = affine_ladder(3, D, 7)
    p = [0.9, 0.4, 0.15]
    drift = mlsde.MultilevelDrift(levels, p, costs=[1, 2, 4], coupling="sample", seed=3)
    x = _state(40000, 1)
    F = drift.sample(0.0, x, 0.1)
    centred = F - levels[-1](0.0, x[:1])
    products = centred.unsqueeze(2) * centred.unsqueeze(1)  # (batch, d, d)
    delta = _differences(levels, 0.0, x[:1])[:, 0]
    expected = sum((1 / p[l] - 1) * torch.outer(delta[l], delta[l]) for l in range(3))
    moment_within(products.reshape(len(F), -1), expected.reshape(-1))


def test_batch_coupling_is_unbiased_over_steps():
    """One shared coin per level and step: the average over many calls is f^k (item 1)."""
    levels, _, _ = affine_ladder(3, D, 11)
    p = [1.0, 0.5, 0.2]
    drift = mlsde.MultilevelDrift(levels, p, costs=[1, 2, 4], coupling="batch", seed=5)
    x = _state(2, 2)
    draws = torch.stack([drift.sample(0.0, x, 0.1)[0] for _ in range(4000)])
    delta = _differences(levels, 0.0, x[:1])[:, 0]
    var_coord = sum((1 / p[l] - 1) * delta[l] ** 2 for l in range(3))
    err = (draws.mean(0) - levels[-1](0.0, x[:1])[0]).abs()
    assert (err <= 5 * var_coord.sqrt() / 4000**0.5).all()
    # the batch shares its coins: both (identical) samples get identical estimates
    same = drift.sample(0.0, x, 0.1)
    assert torch.equal(same[0], same[1])


def test_time_dependent_probabilities_are_unbiased():
    """A Sigmoid schedule p_l(t): unbiased at several times (item 1, time-dependent)."""
    levels, _, _ = affine_ladder(3, D, 13)
    schedule = mlsde.Sigmoid(a=[2.0, 0.0, -1.5], b=[-1.0, 2.0, 3.0], floor=0.02)
    drift = mlsde.MultilevelDrift(levels, schedule, costs=[1, 2, 4], coupling="sample", seed=9)
    x = _state(20000, 4)
    for t in (0.0, 0.5, 1.0):
        p = schedule(t, 0.1, torch.ones(3)).detach()
        F = drift.sample(t, x, 0.1).detach()
        delta = _differences(levels, t, x[:1])[:, 0]
        var_coord = sum((1 / p[l] - 1) * delta[l] ** 2 for l in range(3))
        err = (F.mean(0) - levels[-1](t, x[:1])[0]).abs()
        assert (err <= 5 * var_coord.sqrt() / len(F) ** 0.5).all()


def test_all_probabilities_one_give_the_top_level_bitwise():
    levels, _, _ = affine_ladder(4, D, 2)
    for coupling in ("batch", "sample"):
        drift = mlsde.MultilevelDrift(levels, [1.0] * 4, costs=[1, 2, 3, 4], coupling=coupling)
        x = torch.randn(6, D, dtype=DTYPE)
        assert torch.equal(drift.sample(0.2, x, 0.1), levels[-1](0.2, x))
        assert torch.equal(drift.exact(0.2, x), levels[-1](0.2, x))


def test_base_level_enters_the_telescope():
    """With f^0 = base, E[F] = f^k still, and Delta_1 = f^1 - base."""
    levels, _, _ = affine_ladder(2, D, 3)
    base = lambda t, y: -y  # noqa: E731
    drift = mlsde.MultilevelDrift(levels, [0.5, 0.5], costs=[1, 2], coupling="sample", base=base, seed=1)
    x = _state(20000, 5)
    F = drift.sample(0.0, x, 0.1)
    outs = [base(0.0, x[:1])[0]] + [f(0.0, x[:1])[0] for f in levels]
    var_coord = sum((1 / 0.5 - 1) * (outs[l + 1] - outs[l]) ** 2 for l in range(2))
    assert ((F.mean(0) - outs[-1]).abs() <= 5 * var_coord.sqrt() / len(F) ** 0.5).all()


class _Spy:
    """A level that records the batch sizes it is called with."""

    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, t, y):
        self.sizes.append(y.shape[0])
        return self.fn(t, y)


def test_levels_run_only_where_a_coin_came_up():
    levels, _, _ = affine_ladder(3, D, 4)
    spies = [_Spy(f) for f in levels]
    drift = mlsde.MultilevelDrift(spies, [0.6, 0.3, 0.1], costs=[1, 2, 4], coupling="sample", seed=0)
    drift.record_coins()
    x = torch.randn(64, D, dtype=DTYPE)
    for _ in range(20):
        drift.sample(0.0, x, 0.1)
    coins = drift.recorded_coins()  # (steps, k, batch)
    need = coins | torch.cat([coins[:, 1:], torch.zeros_like(coins[:, :1])], dim=1)
    for m, spy in enumerate(spies):
        expected = [int(n) for n in need[:, m].sum(-1) if n > 0]
        assert spy.sizes == expected  # sub-batches only, never the masked full batch
    assert drift.stats.evaluations == [int(need[:, m].sum()) for m in range(3)]

    batch_spies = [_Spy(f) for f in levels]
    drift = mlsde.MultilevelDrift(batch_spies, [0.6, 0.3, 0.1], costs=[1, 2, 4], coupling="batch", seed=0)
    for _ in range(20):
        drift.sample(0.0, x, 0.1)
    for spy in batch_spies:
        assert set(spy.sizes) <= {64}


def test_realised_cost_follows_the_exact_rule():
    """Batch coupling: the cost is a deterministic function of the coins; on average it is
    sum_m C_m [1 - (1 - p_m)(1 - p_{m+1})], below sum_l p_l (C_l + C_{l-1}) (item 5)."""
    levels, _, _ = affine_ladder(3, D, 6)
    p, costs = [0.7, 0.3, 0.1], [1.0, 5.0, 25.0]
    drift = mlsde.MultilevelDrift(levels, p, costs=costs, coupling="batch", seed=2)
    drift.record_coins()
    x = torch.randn(4, D, dtype=DTYPE)
    with drift.track() as stats:
        for _ in range(3000):
            drift.sample(0.0, x, 0.1)
    coins = drift.recorded_coins().double()  # (steps, k)
    need = 1 - (1 - coins) * (1 - torch.cat([coins[:, 1:], torch.zeros_like(coins[:, :1])], 1))
    per_step = (need * torch.tensor(costs, dtype=DTYPE)).sum(1) * 4
    assert stats.cost == pytest.approx(float(per_step.sum()), rel=1e-12)
    expected_per_step = drift.expected_cost(0.0, 0.1) * 4
    manual = sum(costs[m] * (1 - (1 - p[m]) * (1 - (p[m + 1] if m + 1 < 3 else 0))) for m in range(3))
    assert drift.expected_cost(0.0, 0.1) == pytest.approx(manual, rel=1e-12)
    assert stats.expected_cost == pytest.approx(3000 * expected_per_step, rel=1e-12)
    moment_within(per_step, torch.tensor(expected_per_step, dtype=DTYPE))
    both_ends = sum(p[l] * (costs[l] + (costs[l - 1] if l else 0.0)) for l in range(3))
    assert drift.expected_cost(0.0, 0.1) <= both_ends
    assert drift.theory_cost(0.0, 0.1) == pytest.approx(sum(pl * c for pl, c in zip(p, costs)))


def test_same_seed_same_coins_and_different_seeds_differ():
    levels, _, _ = affine_ladder(3, D, 8)
    x = torch.randn(32, D, dtype=DTYPE)
    for coupling in ("batch", "sample"):
        runs = []
        for seed in (1, 1, 2):
            drift = mlsde.MultilevelDrift(levels, [0.5, 0.3, 0.2], costs=[1, 2, 4], coupling=coupling, seed=seed)
            runs.append(torch.stack([drift.sample(0.0, x, 0.1) for _ in range(10)]))
        assert torch.equal(runs[0], runs[1])
        assert not torch.equal(runs[0], runs[2])
        drift.reseed(1)
        assert torch.equal(torch.stack([drift.sample(0.0, x, 0.1) for _ in range(10)]), runs[0])


def test_recorded_coins_replay_exactly():
    levels, _, _ = affine_ladder(3, D, 9)
    x = torch.randn(8, D, dtype=DTYPE)
    for coupling in ("batch", "sample"):
        drift = mlsde.MultilevelDrift(levels, [0.8, 0.4, 0.1], costs=[1, 2, 4], coupling=coupling, seed=4)
        drift.record_coins()
        first = torch.stack([drift.sample(0.0, x, 0.1) for _ in range(15)])
        pattern = drift.recorded_coins()
        replay = mlsde.MultilevelDrift(levels, [0.8, 0.4, 0.1], costs=[1, 2, 4], coupling=coupling,
                                       coins=mlsde.Replay(pattern), seed=99)
        assert torch.equal(torch.stack([replay.sample(0.0, x, 0.1) for _ in range(15)]), first)
        with pytest.raises(ValueError, match="steps"):
            replay.sample(0.0, x, 0.1)


def test_estimate_is_differentiable_in_the_probabilities():
    """d/da_l of F through the 1/p weights, reverse mode and forward mode, against the closed form
    dF/da_l = -B_l / p_l^2 * dp_l/da_l * Delta_l."""
    levels, _, _ = affine_ladder(3, D, 10)
    schedule = mlsde.Sigmoid(a=[1.0, 0.0, -1.0], floor=0.1)
    coins = torch.tensor([True, False, True])
    drift = mlsde.MultilevelDrift(levels, schedule, costs=[1, 2, 4], coins=mlsde.Replay(coins[None]))
    x = torch.randn(5, D, dtype=DTYPE)
    F = drift.sample(0.0, x, 0.1)
    coins = coins.double()
    p = schedule(0.0, 0.1, None).detach()
    s = torch.sigmoid(schedule.a.detach())
    dp_da = (1 - 0.1) * s * (1 - s)
    delta = _differences(levels, 0.0, x)  # (k, batch, d)
    weights = torch.randn_like(F)
    (grad_a,) = torch.autograd.grad((F * weights).sum(), schedule.a)
    closed = torch.stack([(-coins[l] / p[l] ** 2 * dp_da[l] * delta[l] * weights).sum() for l in range(3)])
    assert torch.allclose(grad_a, closed, rtol=1e-10, atol=1e-12)

    import torch.autograd.forward_ad as fwAD

    direction = torch.tensor([0.3, -1.0, 2.0], dtype=DTYPE)
    replay = mlsde.MultilevelDrift(levels, schedule, costs=[1, 2, 4], coins=mlsde.Replay(coins.bool()[None]))
    with fwAD.dual_level():
        a = schedule.a
        del schedule.a
        schedule.a = fwAD.make_dual(a.detach(), direction)
        tangent = fwAD.unpack_dual(replay.sample(0.0, x, 0.1)).tangent
        del schedule.a
        schedule.a = a
    assert torch.allclose((tangent * weights).sum(), (closed * direction).sum(), rtol=1e-10)


def test_costs_are_measured_when_omitted():
    nets = [mlp(D, w, seed=w) for w in (4, 16, 64)]
    levels = [(lambda t, y, net=net: net(y)) for net in nets]
    drift = mlsde.MultilevelDrift(levels, [1.0, 0.5, 0.25], seed=0)
    drift.sample(0.0, torch.randn(7, D, dtype=DTYPE), 0.1)
    assert drift.cost_unit == "flops"
    assert drift.costs[0] < drift.costs[1] < drift.costs[2]
    assert drift.costs.tolist() == [2.0 * (D * w + w * D) for w in (4, 16, 64)]

    timed = mlsde.MultilevelDrift([lambda t, y: -y, lambda t, y: torch.sin(y)], [1.0, 0.5], seed=0)
    timed.sample(0.0, torch.randn(7, D, dtype=DTYPE), 0.1)
    assert timed.cost_unit == "seconds" and (timed.costs > 0).all()


def test_stats_accumulate_and_reset():
    levels, _, _ = affine_ladder(2, D, 12)
    drift = mlsde.MultilevelDrift(levels, [1.0, 1.0], costs=[1.0, 3.0], prune_certain=False)
    x = torch.randn(4, D, dtype=DTYPE)
    for _ in range(5):
        drift.sample(0.0, x, 0.1)
    assert drift.stats.evaluations == [20, 20] and drift.stats.calls == [5, 5]
    assert drift.stats.cost == 20 * 1.0 + 20 * 3.0
    assert all(w >= 0 for w in drift.stats.wall_time)
    drift.reset_stats()
    assert drift.stats.evaluations == [0, 0] and drift.stats.cost == 0.0
    assert math.isfinite(drift.stats.as_dict()["cost"])


@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_levels_that_cancel_out_are_not_evaluated(coupling):
    """p_m = p_{m+1} = 1 makes f^m's coefficient exactly 0: pruned, not paid, same estimate."""
    levels, _, _ = affine_ladder(4, D, 14)
    p, costs = [1.0, 1.0, 1.0, 0.3], [1.0, 2.0, 4.0, 8.0]
    x = torch.randn(16, D, dtype=DTYPE)
    pruned = mlsde.MultilevelDrift(levels, p, costs=costs, coupling=coupling, seed=3)
    literal = mlsde.MultilevelDrift(levels, p, costs=costs, coupling=coupling, seed=3, prune_certain=False)
    for _ in range(30):
        assert torch.allclose(pruned.sample(0.0, x, 0.1), literal.sample(0.0, x, 0.1), rtol=0, atol=1e-12)
    assert pruned.stats.evaluations[:2] == [0, 0] and literal.stats.evaluations[:2] == [480, 480]
    assert pruned.stats.evaluations[2] == literal.stats.evaluations[2] == 480
    assert pruned.stats.evaluations[3] == literal.stats.evaluations[3]
    assert pruned.expected_cost(0.0, 0.1) == pytest.approx(4.0 + 8.0 * 0.3)
    assert literal.expected_cost(0.0, 0.1) == pytest.approx(1.0 + 2.0 + 4.0 + 8.0 * 0.3)
