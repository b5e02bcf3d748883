"""The drift's one accelerated path (``accelerate=True``: each coin pattern's levels and coefficients worked out
once per value of p) gives the reference step's estimates and statistics bit for bit; coins are the uniforms of
the seed; the host and the differentiable arithmetic agree."""

import pytest
import torch

import multilevel_sde as mlsde
from helpers import DTYPE, affine_ladder

D = 3


def _both(levels, p, **kwargs):
    return [mlsde.MultilevelDrift(levels, p, accelerate=fast, **kwargs) for fast in (True, False)]


def _same_stats(a: mlsde.Stats, b: mlsde.Stats) -> None:
    assert (a.steps, a.samples, a.evaluations, a.calls) == (b.steps, b.samples, b.evaluations, b.calls)
    assert (a.expected_cost, a.theory_cost) == (b.expected_cost, b.theory_cost)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("base", [None, "base"])
@pytest.mark.parametrize("coins", ["independent", "comonotone", "stratified"])
@pytest.mark.parametrize("coupling", ["batch", "sample"])
@pytest.mark.parametrize("p", [[1.0, 0.5, 0.25, 0.125], [0.3, 1.0, 0.6, 1.0], [1.0] * 4, [0.9, 0.4, 0.2, 0.05]])
def test_the_accelerated_path_gives_the_reference_estimates_bit_for_bit(p, coupling, coins, base, dtype):
    levels, _, _ = affine_ladder(4, D, 3)
    levels = [(lambda t, y, f=f: f(t, y.double()).to(y.dtype)) for f in levels]
    base = (lambda t, y: 0.5 * y) if base else None
    fast, reference = _both(levels, p, costs=[1, 3, 9, 27], coupling=coupling, coins=coins, base=base, seed=7)
    y = torch.randn(6, D, generator=torch.Generator().manual_seed(1), dtype=DTYPE).to(dtype)
    with fast.track() as fast_solve, reference.track() as reference_solve:
        for n in range(120):
            a, b = fast.sample(0.01 * n, y, 0.01), reference.sample(0.01 * n, y, 0.01)
            assert torch.equal(a, b), f"step {n}"
            y = y + 0.01 * a
    _same_stats(fast.stats, reference.stats)
    _same_stats(fast_solve, reference_solve)


@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_the_switch_changes_no_solve(coupling):
    levels, _, _ = affine_ladder(3, D, 5)
    y0 = torch.randn(8, D, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    out = {}
    for fast in (True, False):
        drift = mlsde.MultilevelDrift(levels, mlsde.InverseCost(2.0, per_unit_time=True), costs=[1, 4, 16],
                                      coupling=coupling, accelerate=fast)
        out[fast] = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.3), y0, [0.0, 0.5, 1.0], dt=0.01, seed=3,
                                 return_stats=True)
    assert torch.equal(out[True][0], out[False][0])
    _same_stats(out[True][1], out[False][1])


@pytest.mark.parametrize("p", [[0.7, 1.0, 0.2], [1.0, 0.7, 0.2]], ids=["certain-between", "certain-first"])
@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_independent_coins_are_uniforms_below_p_and_certain_levels_take_none(coupling, p):
    """Coin l of a step is ``u < p_l`` with the next uniforms of the drift's seed, level after level (and
    sample after sample); a level with p = 1 is heads without consuming a uniform."""
    levels, _, _ = affine_ladder(3, D, 0)
    batch, steps = 5, 6
    certain = p.index(1.0)
    uncertain = [level for level in range(3) if level != certain]
    drift = mlsde.MultilevelDrift(levels, p, costs=[1, 2, 4], coupling=coupling, seed=11)
    drift.record_coins()
    x = torch.randn(batch, D, dtype=DTYPE)
    for _ in range(steps):
        drift.sample(0.0, x, 0.1)
    width = 1 if coupling == "batch" else batch
    u = torch.rand(steps, 2, width, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = torch.ones(steps, 3, width, dtype=torch.bool)
    for j, level in enumerate(uncertain):
        expected[:, level] = u[:, j] < p[level]
    got = drift.recorded_coins()
    assert torch.equal(got, expected.squeeze(-1) if coupling == "batch" else expected)


def test_every_p_one_draws_no_uniform_and_is_the_top_level():
    levels, _, _ = affine_ladder(3, D, 1)
    x = torch.randn(4, D, dtype=DTYPE)
    for coupling in ("batch", "sample"):
        drift = mlsde.MultilevelDrift(levels, [1.0, 1.0, 1.0], costs=[1, 2, 4], coupling=coupling, seed=2)
        drift.record_coins()
        state = drift.coins.generator.get_state()
        assert torch.equal(drift.sample(0.3, x, 0.1), levels[-1](0.3, x))
        assert torch.equal(drift.coins.generator.get_state(), state)
        expected_shape = (1, 3) if coupling == "batch" else (1, 3, 4)
        assert drift.recorded_coins().shape == expected_shape and drift.recorded_coins().all()


@pytest.mark.parametrize("per_sample_t", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
def test_host_combination_equals_the_differentiable_one(per_sample_t, with_base):
    """Per-sample coins: probabilities without a gradient and the same probabilities with one give the same
    estimate for the same coins, sub-batches, base level and per-sample times."""
    levels, _, _ = affine_ladder(4, D, 2)
    batch, steps = 9, 12
    base = (lambda t, y: 0.5 * y) if with_base else None
    pattern = torch.rand(steps, 4, batch, generator=torch.Generator().manual_seed(3)) < 0.5
    logits = torch.tensor([0.5, -0.3, -1.0, 0.2], dtype=DTYPE)
    detached = mlsde.Sigmoid(a=logits, floor=0.05)
    attached = mlsde.Sigmoid(a=logits, floor=0.05)
    detached.requires_grad_(False)
    host = mlsde.MultilevelDrift(levels, detached, costs=[1, 2, 4, 8], coupling="sample", base=base,
                                 coins=mlsde.Replay(pattern))
    graph = mlsde.MultilevelDrift(levels, attached, costs=[1, 2, 4, 8], coupling="sample", base=base,
                                  coins=mlsde.Replay(pattern))
    x = torch.randn(batch, D, dtype=DTYPE)
    t = torch.linspace(0.1, 0.9, batch, dtype=DTYPE) if per_sample_t else torch.tensor(0.4, dtype=DTYPE)
    for n in range(steps):
        fast, slow = host.sample(t, x, 0.1), graph.sample(t, x, 0.1)
        assert not fast.requires_grad and slow.requires_grad
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)
    assert host.stats.evaluations == graph.stats.evaluations
    assert host.stats.evaluations[0] < steps * batch  # sub-batches really ran


@pytest.mark.parametrize("with_base", [False, True])
def test_batch_recipes_give_the_differentiable_estimate_for_every_coin_pattern(with_base):
    """One coin per level: the accelerated path (levels and float coefficients kept per coin pattern) and the
    tensor arithmetic used when p carries a gradient agree on every pattern, first and later use alike, also
    when the base changes after the patterns were seen."""
    levels, _, _ = affine_ladder(4, D, 2)
    base = (lambda t, y: 0.5 * y) if with_base else None
    patterns = torch.tensor([[(i >> j) & 1 for j in range(4)] for i in range(16)], dtype=torch.bool)
    pattern = torch.cat([patterns] * 3)  # later passes reuse the kept recipes
    attached = mlsde.Sigmoid(a=torch.tensor([0.5, -0.3, -1.0, 0.2], dtype=DTYPE), floor=0.05)
    t = torch.tensor(0.4, dtype=DTYPE)
    fixed = mlsde.Constant(attached(t, 0.1, None).detach())
    host = mlsde.MultilevelDrift(levels, fixed, costs=[1, 2, 4, 8], base=base, coins=mlsde.Replay(pattern))
    graph = mlsde.MultilevelDrift(levels, attached, costs=[1, 2, 4, 8], base=base, coins=mlsde.Replay(pattern))
    x = torch.randn(5, D, dtype=DTYPE)
    for n in range(32):
        fast, slow = host.sample(t, x, 0.1), graph.sample(t, x, 0.1)
        assert not fast.requires_grad and slow.requires_grad
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)
    assert host.stats.evaluations == graph.stats.evaluations
    host.base, graph.base = (None, None) if with_base else ((lambda t, y: 0.5 * y),) * 2  # changed after use
    for n in range(16):
        torch.testing.assert_close(host.sample(t, x, 0.1), graph.sample(t, x, 0.1).detach(), rtol=1e-12, atol=1e-12)


def test_changes_of_the_schedule_take_effect_at_the_next_step():
    """An attribute set or a tensor changed in place takes effect at the next step."""
    levels, _, _ = affine_ladder(2, D, 4)
    x = torch.randn(3, D, dtype=DTYPE)
    schedule = mlsde.Constant([1.0, 1.0])
    drift = mlsde.MultilevelDrift(levels, schedule, costs=[1, 2], seed=0)
    drift.sample(0.0, x, 0.1)
    assert drift.stats.evaluations == [0, 3]
    schedule.p.mul_(0.5)  # in place: p = (0.5, 0.5)
    drift.reset_stats()
    for _ in range(40):
        drift.sample(0.0, x, 0.1)
    assert drift.stats.expected_cost == pytest.approx(40 * 3 * (2 * 0.5 + 1 * 0.75))
    inverse = mlsde.InverseCost(1.0)
    drift = mlsde.MultilevelDrift(levels, inverse, costs=[1, 4], seed=0)
    drift.sample(0.0, x, 0.1)
    assert drift.stats.expected_cost == pytest.approx(3 * (4 * 0.25 + 1 * 1.0))
    inverse.c = 4.0  # an attribute set: p = (1, 1)
    drift.reset_stats()
    drift.sample(0.0, x, 0.1)
    assert drift.stats.expected_cost == pytest.approx(3 * 4.0)
    drift.set_costs([1.0, 2.0])  # new costs: p = (1, 1) still, the expected cost follows
    drift.reset_stats()
    drift.sample(0.0, x, 0.1)
    assert drift.stats.expected_cost == pytest.approx(3 * 2.0)
    drift.coins = "comonotone"  # another scheme: its own evaluation rule, from the drift's seed
    drift.probabilities = mlsde.Constant([0.5, 0.25])
    drift.reset_stats()
    drift.sample(0.0, x, 0.1)
    assert drift.stats.expected_cost == pytest.approx(3 * (1.0 * 0.5 + 2.0 * 0.25))


def test_per_sample_times_with_a_new_batch_size_get_their_own_probabilities():
    levels, _, _ = affine_ladder(2, D, 6)
    drift = mlsde.MultilevelDrift(levels, [1.0, 1.0], costs=[1, 2], coupling="sample", seed=0)
    for batch in (4, 7, 4):
        x, t = torch.randn(batch, D, dtype=DTYPE), torch.rand(batch, dtype=DTYPE)
        assert torch.equal(drift.sample(t, x, 0.1), levels[-1](t, x))  # every row, not the first 4 only


def test_a_scheme_given_to_two_drifts_keeps_two_streams():
    levels, _, _ = affine_ladder(2, D, 7)
    scheme = mlsde.StratifiedCoins()
    x = torch.randn(4, D, dtype=DTYPE)
    a = mlsde.MultilevelDrift(levels, [0.3, 0.6], costs=[1, 2], coins=scheme, seed=5)
    b = mlsde.MultilevelDrift(levels, [0.3, 0.6], costs=[1, 2], coins=scheme, seed=5)
    first = [a.sample(0.0, x, 0.1) for _ in range(10)]
    assert all(torch.equal(f, b.sample(0.0, x, 0.1)) for f in first)
