"""The steady paths of MultilevelDrift (batch coins as integer codes with statistics counted per coin pattern;
per-sample coins worked out a block of steps at a time) give what the general path gives, and mlsde's own
solvers check their state every CHECK_EVERY steps instead of every estimate, yet still name the level (or the
noise, or the state) and the time when something turns NaN/inf."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import multilevel_sde as mlsde
from multilevel_sde.coins import UniformStream
from multilevel_sde.solvers.euler import CHECK_EVERY

DTYPE = torch.float64
NAN, INF = float("nan"), float("inf")


def _ladder(k: int = 4):
    return [(lambda t, y, a=1.0 + 0.1 * l: -a * y + 0.01 * l) for l in range(k)]


def _y(batch: int = 5, d: int = 3) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, batch * d, dtype=DTYPE).reshape(batch, d)


# -- integer coin codes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [7, 64, 1 << 14])  # refills mid-step, every few steps, rarely
def test_next_code_draws_the_coins_of_float_comparisons_and_keeps_the_stream_in_step(block):
    thresholds = np.array([0.5, 0.25, 0.9])
    bits = np.array([2, 4, 16], dtype=np.int64)
    coded = UniformStream(torch.Generator().manual_seed(3), block=block)
    plain = UniformStream(torch.Generator().manual_seed(3), block=block)
    for step in range(200):
        expected = 1 + sum(int(b) for b, u, p in zip(bits, plain.numpy(3), thresholds) if u < p)
        assert coded.next_code("key", thresholds, bits, 1) == expected
        if step % 17 == 5:  # another request in between: both streams advance alike
            assert np.array_equal(coded.numpy(4), plain.numpy(4))
        if step % 29 == 11:  # another key starts a fresh block at the same position
            assert coded.next_code("other", thresholds[:1], bits[:1], 0) == (2 if plain.numpy(1)[0] < 0.5 else 0)


# -- the fast path against the general one ----------------------------------------------------------------------
def _twins(p, coupling: str, levels=None, block: int = 1 << 14):
    """A drift that takes the fast path and its twin kept on the general one by recording its coins."""
    levels = _ladder(len(p)) if levels is None else levels
    fast, general = (mlsde.MultilevelDrift(levels, p, costs=[3.0 ** m for m in range(len(p))], coupling=coupling,
                                           seed=11) for _ in range(2))
    general.record_coins(True)
    for drift in (fast, general):
        drift._uniforms = UniformStream(drift._generator, block=block)
    return fast, general


def _same_stats(a, b) -> None:
    assert (a.steps, a.samples, a.evaluations, a.calls) == (b.steps, b.samples, b.evaluations, b.calls)
    assert a.expected_cost == pytest.approx(b.expected_cost, rel=1e-12)
    assert a.theory_cost == pytest.approx(b.theory_cost, rel=1e-12)


@pytest.mark.parametrize("block", [40, 1 << 14])  # per-sample blocks of 2 steps (refills between), of 64 steps
@pytest.mark.parametrize("coupling", ["batch", "sample"])
@pytest.mark.parametrize("p", [[1.0, 0.5, 0.25, 0.125], [0.3, 1.0, 0.6, 1.0], [1.0] * 4])
def test_fast_path_gives_the_general_paths_estimates_and_statistics(p, coupling, block):
    fast, general = _twins(p, coupling, block=block)
    y = _y()
    with fast.track() as fast_solve, general.track() as general_solve:
        for n in range(150):
            assert torch.equal(fast.sample(0.01 * n, y, 0.01), general.sample(0.01 * n, y, 0.01))
        per_sample = coupling == "sample" and min(p) < 1  # else one coin per level serves the whole batch
        assert isinstance(fast._fast, mlsde._fast._FastSample if per_sample else mlsde._fast._FastBatch)
        assert general._fast is None
        mid = fast.stats  # reading the stats mid-way folds in what the fast path counted
        assert mid.steps == 150 and mid.evaluations == general.stats.evaluations
        for n in range(150, 170):
            assert torch.equal(fast.sample(0.01 * n, y, 0.01), general.sample(0.01 * n, y, 0.01))
    for a, b in ((fast.stats, general.stats), (fast_solve, general_solve)):
        _same_stats(a, b)
        assert all(w >= 0 for w in a.wall_time) and sum(a.wall_time) > 0
    assert fast_solve.steps == 170


def test_per_sample_fast_path_follows_changes_of_the_state_and_other_draws_of_the_stream():
    """A new dtype, shape or batch size, and uniforms taken by someone else in between, start a fresh block
    at the stream's position: the coins and estimates stay the general path's."""
    fast, general = _twins([1.0, 0.5, 0.25], "sample")
    states = [_y(), _y(), _y().float(), _y().float(), _y(7), _y(7), _y(5, 2).reshape(5, 1, 2), _y(5, 2).reshape(5, 1, 2),
              _y(1), _y(1)]
    for n, y in enumerate(states * 3):
        assert torch.equal(fast.sample(0.0, y, 0.1), general.sample(0.0, y, 0.1))
        if n % 5 == 4:
            for drift in (fast, general):
                drift._uniforms.numpy(3)  # another consumer of the stream
    assert isinstance(fast._fast, mlsde._fast._FastSample)
    _same_stats(fast.stats, general.stats)


def test_fast_path_ends_when_the_drift_changes_and_keeps_its_counts():
    drift = mlsde.MultilevelDrift(_ladder(2), [0.5, 1.0], costs=[1, 2], seed=0)
    y = _y()
    for _ in range(5):
        drift.sample(0.0, y, 0.1)
    assert drift._fast is not None
    drift.probabilities = mlsde.Constant([1.0, 1.0])  # any attribute set ends the fast path ...
    assert drift._fast is None
    assert drift.stats.steps == 5  # ... and keeps what it counted
    assert torch.equal(drift.sample(0.0, y, 0.1), _ladder(2)[1](0.0, y))  # the new schedule is used
    drift.reset_stats()
    assert drift.stats.steps == 0


def test_fast_path_follows_a_schedule_changed_in_place():
    schedule = mlsde.Constant([0.5, 1.0])
    drift = mlsde.MultilevelDrift(_ladder(2), schedule, costs=[1, 2], seed=0)
    y = _y()
    for _ in range(3):
        drift.sample(0.0, y, 0.1)
    schedule.p.fill_(1.0)  # in place: the cache token changes
    for _ in range(3):
        assert torch.equal(drift.sample(0.0, y, 0.1), _ladder(2)[1](0.0, y))


def test_fast_path_counts_only_the_levels_that_ran_when_one_fails():
    calls = {"n": 0}

    def flaky(t, y):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("level blew up")
        return -y

    drift = mlsde.MultilevelDrift([_ladder(1)[0], flaky], [1.0, 1.0], costs=[1, 2], prune_certain=False, seed=0)
    y = _y()
    for _ in range(3):
        drift.sample(0.0, y, 0.1)  # each step: flaky (the top) first, then level 1
    with pytest.raises(RuntimeError, match="level blew up"):
        drift.sample(0.0, y, 0.1)
    assert drift.stats.steps == 4 and drift.stats.calls == [3, 3]  # the failed call of level 2 does not count


@pytest.mark.parametrize("failure", ["raises", "wrong shape"])
def test_per_sample_fast_path_counts_only_the_levels_that_ran_when_one_fails(failure):
    def flaky(calls):
        def level(t, y):
            calls["n"] += 1
            if calls["n"] == 6:
                if failure == "raises":
                    raise RuntimeError("level blew up")
                return y[:, :1]
            return -y
        return level

    fast_calls, general_calls = {"n": 0}, {"n": 0}
    fast, general = _twins([1.0, 0.5, 0.5], "sample")
    for drift, calls in ((fast, fast_calls), (general, general_calls)):
        drift.levels[2] = mlsde.drift._FunctionLevel(flaky(calls))
    y = _y(8)
    for drift in (fast, general):
        with pytest.raises((RuntimeError, ValueError), match="blew up|returned shape"):
            for _ in range(40):
                drift.sample(0.0, y, 0.1)
    assert fast._fast is not None
    _same_stats(fast.stats, general.stats)
    assert fast_calls == general_calls
    for _ in range(10):  # and they go on in step
        assert torch.equal(fast.sample(0.0, y, 0.1), general.sample(0.0, y, 0.1))
    _same_stats(fast.stats, general.stats)


# -- deferred checks in the solvers -----------------------------------------------------------------------------
def _late(value, at: float):
    return lambda t, y: -y + (value if float(t) >= at else 0.0)


@pytest.mark.parametrize("coupling", ["batch", "sample"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_sdeint_names_the_level_and_the_step_of_a_late_nan(coupling, value):
    steps = 3 * CHECK_EVERY
    bad_step = CHECK_EVERY + 5  # inside the second block of steps
    drift = mlsde.MultilevelDrift([_ladder(1)[0], _late(value, (bad_step - 0.5) / steps)], [0.5, 1.0], costs=[1, 2],
                                  coupling=coupling)
    sde = mlsde.MultilevelSDE(drift, 0.1)
    with pytest.raises(mlsde.NonFiniteError, match=rf"^level 2 returned NaN or inf at t={bad_step / steps:.6g}$"):
        mlsde.sdeint(sde, _y(), [0.0, 1.0], dt=1.0 / steps, seed=0)
    assert drift._step_log is None and drift._trackers == []


def test_odeint_names_the_level_and_the_step_backwards_in_time_too():
    drift = mlsde.MultilevelDrift([_ladder(1)[0], lambda t, y: -y + (NAN if float(t) <= 0.25 else 0.0)],
                                  [0.5, 1.0], costs=[1, 2], seed=0)
    with pytest.raises(mlsde.NonFiniteError, match=r"^level 2 returned NaN or inf at t=0\.25$"):
        mlsde.odeint(drift, _y(), torch.tensor([1.0, 0.0], dtype=DTYPE), options={"step_size": 1 / 40}, seed=0)


def test_sdeint_names_a_non_finite_initial_state():
    y0 = _y()
    y0[2, 1] = NAN
    sde = mlsde.MultilevelSDE(mlsde.MultilevelDrift(_ladder(2), [0.5, 1.0], costs=[1, 2]), 0.1)
    with pytest.raises(mlsde.NonFiniteError, match=r"the state y holds NaN or inf at t=0$"):
        mlsde.sdeint(sde, y0, [0.0, 1.0], dt=0.05, seed=0)


def test_sdeint_names_a_non_finite_noise_term():
    sigma = lambda t: NAN if t >= 0.49 else 0.1  # noqa: E731
    sde = mlsde.MultilevelSDE(mlsde.MultilevelDrift(_ladder(2), [0.5, 1.0], costs=[1, 2]), sigma)
    with pytest.raises(mlsde.NonFiniteError, match=r"the noise term g dW holds NaN or inf at t=0\.5$"):
        mlsde.sdeint(sde, _y(), [0.0, 1.0], dt=0.05, seed=0)


def test_sdeint_names_a_step_whose_state_overflows_from_finite_terms():
    huge = lambda t, y: torch.full_like(y, 1.5e308)  # noqa: E731  (the state grows by 0.75e308 a step)
    sde = mlsde.MultilevelSDE(mlsde.MultilevelDrift([huge], [1.0], costs=[1]), 0.0)
    with pytest.raises(mlsde.NonFiniteError, match=r"the state overflowed to NaN or inf in the step from t=1 to t=1\.5 "):
        mlsde.sdeint(sde, _y(), [0.0, 2.0], dt=0.5, seed=0)


def test_a_level_that_is_not_deterministic_is_reported_as_such():
    calls = {"n": 0}

    def once(t, y):
        calls["n"] += 1
        return -y + (NAN if calls["n"] == 3 else 0.0)  # NaN in the solve, not in the replay

    sde = mlsde.MultilevelSDE(mlsde.MultilevelDrift([once], [1.0], costs=[1]), 0.1)
    with pytest.raises(mlsde.NonFiniteError, match="replaying these steps gave finite values"):
        mlsde.sdeint(sde, _y(), [0.0, 1.0], dt=0.1, seed=0)


def test_check_finite_off_checks_nothing_and_a_late_nan_reaches_the_output():
    drift = mlsde.MultilevelDrift([_late(NAN, 0.5)], [1.0], costs=[1], check_finite=False)
    ys = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.1), _y(), [0.0, 0.25, 1.0], dt=0.05, seed=0)
    assert torch.isfinite(ys[1]).all() and torch.isnan(ys[2]).all()


class _PerStepChecks(mlsde.MultilevelSDE):
    """Its own f_step: the solver cannot know it is one estimate per call, so the drift checks every step."""

    def f_step(self, t, y, dt):
        return self.drift.sample(t, y, dt)


@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_a_solve_that_finds_nothing_wrong_equals_one_with_per_step_checks(coupling):
    """Deferring the checks changes no number."""
    ys = {}
    for cls in (mlsde.MultilevelSDE, _PerStepChecks):
        drift = mlsde.MultilevelDrift(_ladder(3), [1.0, 0.5, 0.25], costs=[1, 2, 4], coupling=coupling)
        calls = []
        drift.levels[2].register_forward_hook(lambda *args: calls.append(drift._step_log))
        ys[cls] = mlsde.sdeint(cls(drift, 0.2, dt=0.01), _y(), [0.0, 0.5, 1.0], seed=4)
        assert len(calls) > 10 and all((log is None) == (cls is _PerStepChecks) for log in calls)
    assert torch.equal(ys[mlsde.MultilevelSDE], ys[_PerStepChecks])


def test_a_schedule_changed_by_a_callback_takes_effect_at_the_next_step():
    """Without a callback a solve reads a time-independent schedule once; with one it rechecks it every step."""
    schedule = mlsde.Constant([0.5, 1.0])
    step = {"n": 0}
    cheap_calls = []

    def cheap(t, y):
        cheap_calls.append(step["n"])
        return -y

    def callback(n, t, y):
        step["n"] = n + 1
        if n == 9:
            schedule.p.fill_(1.0)  # from step 10 on only the top level runs (its coefficient alone is nonzero)

    drift = mlsde.MultilevelDrift([cheap, _ladder(2)[1]], schedule, costs=[1, 2], seed=0)
    mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.1), _y(), [0.0, 1.0], dt=0.02, seed=0, callback=callback)
    assert len([n for n in cheap_calls if n < 10]) > 3 and not [n for n in cheap_calls if n >= 10]


def test_fast_path_waits_for_a_plan_used_twice_in_a_row():
    """A step-size-dependent schedule on a changing step size gets a new plan each step: no fast path churn;
    a schedule that ignores the step size keeps one fast path across step sizes."""
    per_time = mlsde.MultilevelDrift(_ladder(2), mlsde.InverseCost(0.5, per_unit_time=True), costs=[1, 2], seed=0)
    fixed = mlsde.MultilevelDrift(_ladder(2), [0.5, 1.0], costs=[1, 2], seed=0)
    y = _y()
    for n in range(6):
        per_time.sample(0.0, y, 0.1 if n % 2 else 0.2)
        fixed.sample(0.0, y, 0.1 if n % 2 else 0.2)
    assert per_time._fast is None and fixed._fast is not None
    assert per_time.stats.steps == fixed.stats.steps == 6
