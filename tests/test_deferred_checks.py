"""mlsde's own solvers check their state every CHECK_EVERY steps instead of every estimate, yet still name the
level (or the noise, or the state) and the time when something turns NaN/inf; a drift follows changes made to it
between steps, and a level that fails leaves consistent statistics."""

from __future__ import annotations

import pytest
import torch

import multilevel_sde as mlsde
from multilevel_sde.solvers.base import CHECK_EVERY

DTYPE = torch.float64
NAN, INF = float("nan"), float("inf")


def _ladder(k: int = 4):
    return [(lambda t, y, a=1.0 + 0.1 * l: -a * y + 0.01 * l) for l in range(k)]


def _y(batch: int = 5, d: int = 3) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, batch * d, dtype=DTYPE).reshape(batch, d)


# -- changes and failures between steps -------------------------------------------------------------------------
def test_a_new_schedule_takes_effect_and_the_counts_are_kept():
    drift = mlsde.MultilevelDrift(_ladder(2), [0.5, 1.0], costs=[1, 2], seed=0)
    y = _y()
    for _ in range(5):
        drift.sample(0.0, y, 0.1)
    drift.probabilities = mlsde.Constant([1.0, 1.0])
    assert drift.stats.steps == 5
    assert torch.equal(drift.sample(0.0, y, 0.1), _ladder(2)[1](0.0, y))  # the new schedule is used
    drift.reset_stats()
    assert drift.stats.steps == 0


def test_a_schedule_changed_in_place_takes_effect():
    schedule = mlsde.Constant([0.5, 1.0])
    drift = mlsde.MultilevelDrift(_ladder(2), schedule, costs=[1, 2], seed=0)
    y = _y()
    for _ in range(3):
        drift.sample(0.0, y, 0.1)
    schedule.p.fill_(1.0)
    for _ in range(3):
        assert torch.equal(drift.sample(0.0, y, 0.1), _ladder(2)[1](0.0, y))


def test_only_the_levels_that_ran_are_counted_when_one_fails():
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
def test_per_sample_coins_count_only_the_levels_that_ran_when_one_fails(failure):
    returned = {"calls": 0, "samples": 0}

    def level(t, y):
        returned["n"] = returned.get("n", 0) + 1
        if returned["n"] == 6:
            if failure == "raises":
                raise RuntimeError("level blew up")
            return y[:, :1]
        returned["calls"] += 1
        returned["samples"] += y.shape[0]
        return -y

    drift = mlsde.MultilevelDrift(_ladder(2) + [level], [1.0, 0.5, 0.5], costs=[1, 2, 4], coupling="sample", seed=11)
    y = _y(8)
    with pytest.raises((RuntimeError, ValueError), match="blew up|returned shape"):
        for _ in range(40):
            drift.sample(0.0, y, 0.1)
    if failure == "wrong shape":  # it ran, so it is paid for, but its output was refused
        returned["calls"] += 1
        returned["samples"] += 1
    assert drift.stats.calls[2] == returned["calls"] and drift.stats.evaluations[2] >= returned["samples"]
    assert drift.stats.samples == drift.stats.steps * 8
    for _ in range(10):  # and it goes on
        drift.sample(0.0, y, 0.1)


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
    with pytest.raises(mlsde.NonFiniteError, match="^level 2 returned NaN"):  # the solve's deferral has ended
        drift.sample(1.0, _y(), 1.0 / steps)


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
        ys[cls] = mlsde.sdeint(cls(drift, 0.2, dt=0.01), _y(), [0.0, 0.5, 1.0], seed=4)
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
