"""The drift's hot paths: buffered coins, cached step plans and the host-side per-sample combination give
the same coins and estimates as the plain tensor computation they replace."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multilevel_sde as mlsde
from helpers import DTYPE, affine_ladder

D = 3


@settings(max_examples=20, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=12), block=st.integers(1, 512),
       seed=st.integers(0, 10_000))
def test_uniform_stream_hands_out_the_generators_own_sequence(sizes, block, seed):
    stream = mlsde.coins.UniformStream(torch.Generator().manual_seed(seed), block=block)
    got = [stream.tensor(n).clone() if i % 2 else torch.from_numpy(stream.numpy(n).copy())
           for i, n in enumerate(sizes)]
    expected = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.equal(torch.cat(got), expected)


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
        state = drift._generator.get_state()
        assert torch.equal(drift.sample(0.3, x, 0.1), levels[-1](0.3, x))
        assert torch.equal(drift._generator.get_state(), state)
        expected_shape = (1, 3) if coupling == "batch" else (1, 3, 4)
        assert drift.recorded_coins().shape == expected_shape and drift.recorded_coins().all()


@pytest.mark.parametrize("per_sample_t", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
def test_host_combination_equals_the_differentiable_one(per_sample_t, with_base):
    """Per-sample coins: the host (numpy) path used without gradients and the tensor path used when p carries
    a gradient give the same estimate for the same coins, sub-batches, base level and per-sample times."""
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
    """One coin per level: the float path (levels and coefficients worked out once per coin pattern and cached)
    and the tensor path used when p carries a gradient agree on every pattern, first and cached use alike."""
    levels, _, _ = affine_ladder(4, D, 2)
    base = (lambda t, y: 0.5 * y) if with_base else None
    patterns = torch.tensor([[(i >> j) & 1 for j in range(4)] for i in range(16)], dtype=torch.bool)
    pattern = torch.cat([patterns] * 3)  # later passes reuse the cached recipes
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
    (plan,) = host._plan_cache.values()
    assert len(plan.recipes) == (16 if with_base else 15)  # no coin and no base: 0, with no recipe
    host.base, graph.base = (None, None) if with_base else ((lambda t, y: 0.5 * y),) * 2  # changed after caching
    for n in range(16):
        torch.testing.assert_close(host.sample(t, x, 0.1), graph.sample(t, x, 0.1).detach(), rtol=1e-12, atol=1e-12)


def test_step_plans_follow_changes_of_the_schedule():
    """A time-independent schedule's probabilities are reused between steps, yet an attribute set or a
    tensor changed in place takes effect at the next step."""
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


def test_step_plans_are_computed_once_per_step_size():
    calls = []

    def per_unit_time(t, dt, costs):
        calls.append(dt)
        return torch.clamp(torch.tensor([3.0, 1.0], dtype=torch.float64) * dt, max=1.0)

    per_unit_time.time_dependent = False
    levels, _, _ = affine_ladder(2, D, 5)
    drift = mlsde.MultilevelDrift(levels, per_unit_time, costs=[1, 2], seed=0)
    x = torch.randn(2, D, dtype=DTYPE)
    for dt in [0.1, 0.2] * 10:  # two alternating step sizes (a uniform grid's rounding does this)
        drift.sample(0.0, x, dt)
    assert calls == [0.1, 0.2]
    for i in range(600):  # a long non-uniform grid: the cache stays bounded
        drift.sample(0.0, x, 0.001 * (i + 1))
    assert len(drift._plan_cache) <= 256


def test_per_sample_times_with_a_new_batch_size_get_their_own_plan():
    levels, _, _ = affine_ladder(2, D, 6)
    drift = mlsde.MultilevelDrift(levels, [1.0, 1.0], costs=[1, 2], coupling="sample", seed=0)
    for batch in (4, 7, 4):
        x, t = torch.randn(batch, D, dtype=DTYPE), torch.rand(batch, dtype=DTYPE)
        assert torch.equal(drift.sample(t, x, 0.1), levels[-1](t, x))  # every row, not the first 4 only


@settings(max_examples=25, deadline=None, derandomize=True)
@given(coefficients=st.lists(st.sampled_from([1.0, -1.0, 2.0, 0.0, 0.5, 8.0]), min_size=1, max_size=5))
def test_linear_combination_is_the_sum_and_leaves_the_levels_outputs_alone(coefficients):
    from multilevel_sde.drift import _combine_ordered, _start_with_unit

    gen = torch.Generator().manual_seed(len(coefficients))
    outputs = [torch.randn(4, D, generator=gen, dtype=DTYPE) for _ in coefficients]
    before = [f.clone() for f in outputs]
    total = _combine_ordered(_start_with_unit(list(enumerate(coefficients))), outputs)
    torch.testing.assert_close(total, sum(c * f for f, c in zip(outputs, coefficients)), rtol=1e-14, atol=1e-14)
    assert all(torch.equal(f, b) for f, b in zip(outputs, before))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(coefficients=st.lists(st.sampled_from([-8.0, -4.0, -2.0, -1.0, 0.0, 2.0, 4.0, 8.0]), min_size=1, max_size=4))
def test_lerp_chain_sums_to_one_term_less_and_keeps_a_nan(coefficients):
    """Coefficients that sum to 1 with none equal to 1 (the usual ML-EM step when p_1 = 1): a chain of lerps
    gives the weighted sum with one tensor operation fewer, and a NaN in any term, even one with weight 0."""
    from multilevel_sde.drift import _BatchRecipe, _combine, _lerp_chain, _start_with_unit

    coefficients = coefficients + [1.0 - sum(coefficients)]  # the last one makes the sum 1
    terms = list(enumerate(coefficients))
    chain = _lerp_chain(terms)
    if 1.0 in coefficients:
        assert chain is None
        return
    assert chain is not None and len(chain[1]) == len(terms) - 1
    gen = torch.Generator().manual_seed(len(coefficients))
    outputs = [torch.randn(4, D, generator=gen, dtype=DTYPE) for _ in coefficients]
    before = [f.clone() for f in outputs]
    recipe = _BatchRecipe(evaluate=[], terms=_start_with_unit(terms), chain=chain, modules=[])
    expected = sum(c * f for f, c in zip(outputs, coefficients))
    torch.testing.assert_close(_combine(recipe, outputs), expected, rtol=1e-13, atol=1e-12)
    assert all(torch.equal(f, b) for f, b in zip(outputs, before))  # the levels' outputs are left alone
    outputs[-1] = outputs[-1].clone()
    outputs[-1][0, 0] = float("nan")
    assert torch.isnan(_combine(recipe, outputs)[0, 0])
