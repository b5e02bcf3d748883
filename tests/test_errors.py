"""Bad inputs: every one is refused with a clear ValueError/TypeError that names the argument and the
offending value (levels numbered from 1), raised when the object is built or the call is made, and a
failed call leaves no half-changed state behind (stats, coin stream, seed)."""

from __future__ import annotations

import contextlib
import copy
import math
import re

import pytest
import torch

import multilevel_sde as mlsde

DTYPE = torch.float64
BATCH, D = 3, 2
NAN, INF = float("nan"), float("inf")


def _levels(k: int = 2):
    return [(lambda t, y, a=1.0 + 0.1 * l: -a * y) for l in range(k)]


def _y(batch: int = BATCH, d: int = D) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, batch * d, dtype=DTYPE).reshape(batch, d)


def _drift(k: int = 2, probabilities=None, seed: int = 7, **kw) -> mlsde.MultilevelDrift:
    p = [0.5] * (k - 1) + [1.0] if probabilities is None else probabilities
    return mlsde.MultilevelDrift(_levels(k), p, costs=[float(2**l) for l in range(k)], seed=seed, **kw)


def _esc(value) -> str:
    return re.escape(repr(value))


# -- MultilevelDrift construction -----------------------------------------------------------------
def test_empty_ladder():
    with pytest.raises(ValueError, match=r"levels must hold at least one level.*\[\]"):
        mlsde.MultilevelDrift([], [1.0])


def test_levels_not_a_sequence():
    with pytest.raises(TypeError, match=r"levels must be a sequence of callables"):
        mlsde.MultilevelDrift(lambda t, y: y, [1.0])


@pytest.mark.parametrize("bad", [3, "f", None])
def test_non_callable_level(bad):
    with pytest.raises(TypeError, match=rf"levels\[1\] \(level 2\) must be callable.*got {_esc(bad)}"):
        mlsde.MultilevelDrift([_levels(1)[0], bad, _levels(1)[0]], [0.5, 0.5, 1.0])


def test_non_callable_base():
    with pytest.raises(TypeError, match=r"base must be callable.*got 1\.5"):
        mlsde.MultilevelDrift(_levels(2), [0.5, 1.0], base=1.5)


@pytest.mark.parametrize("costs", [[1.0], [1.0, 2.0, 3.0]])
def test_costs_of_the_wrong_length(costs):
    with pytest.raises(ValueError, match=rf"costs must have one entry per level \(2\), got {len(costs)}"):
        mlsde.MultilevelDrift(_levels(2), [0.5, 1.0], costs=costs)


@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF])
def test_costs_not_finite_positive(bad):
    # the message lists (level, value) with levels numbered from 1
    with pytest.raises(ValueError, match=rf"costs must be finite and > 0.*\(2, {bad!r}\)"):
        mlsde.MultilevelDrift(_levels(2), [0.5, 1.0], costs=[1.0, bad])


def test_costs_not_numbers():
    with pytest.raises(TypeError, match=r"costs must be a sequence of 2 numbers, got 'ab'"):
        mlsde.MultilevelDrift(_levels(2), [0.5, 1.0], costs="ab")


def test_set_costs_refuses_bad_costs_and_keeps_the_old_ones():
    drift = _drift(2)
    before = drift.costs.clone()
    with pytest.raises(ValueError, match=r"costs must be finite and > 0.*\(1, -1\.0\)"):
        drift.set_costs([-1.0, 2.0])
    assert torch.equal(drift.costs, before) and drift.stats.costs == before.tolist()


@pytest.mark.parametrize("wrap", [list, mlsde.Constant], ids=["list", "Constant"])
@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5])
def test_probabilities_outside_unit_interval(wrap, bad):
    with pytest.raises(ValueError, match=rf"probabilities must lie in \(0, 1\].*\(2, {bad!r}\)"):
        mlsde.MultilevelDrift(_levels(3), wrap([0.5, bad, 1.0]), costs=[1, 2, 4])


@pytest.mark.parametrize("wrap", [list, mlsde.Constant], ids=["list", "Constant"])
def test_probabilities_nan(wrap):
    with pytest.raises(ValueError, match=r"probabilities must be finite, got \[0\.5, nan\]"):
        mlsde.MultilevelDrift(_levels(2), wrap([0.5, NAN]), costs=[1, 2])


@pytest.mark.parametrize("wrap", [list, mlsde.Constant], ids=["list", "Constant"])
@pytest.mark.parametrize("n", [2, 4])
def test_probabilities_of_the_wrong_length(wrap, n):
    with pytest.raises(ValueError, match=rf"probabilities has {n} entries but the ladder has 3 levels"):
        mlsde.MultilevelDrift(_levels(3), wrap([0.5] * n), costs=[1, 2, 4])


def test_probabilities_of_a_bad_type():
    with pytest.raises(TypeError, match=r"probabilities must be a schedule .* got 0\.5"):
        mlsde.MultilevelDrift(_levels(1), 0.5)


@pytest.mark.parametrize(
    "value, pattern",
    [
        ([0.5, 1.5], r"probabilities must lie in \(0, 1\].*\[0\.5, 1\.5\] at t=0\.3, dt=0\.1"),
        ([0.0, 1.0], r"probabilities must lie in \(0, 1\].*\[0\.0, 1\.0\] at t=0\.3, dt=0\.1"),
        ([NAN, 1.0], r"probabilities must lie in \(0, 1\].*\[nan, 1\.0\] at t=0\.3, dt=0\.1"),
        ([0.5, 0.5, 1.0], r"probabilities must give 2 values \(one per level\), got shape \(3,\)"),
        ([1.0], r"probabilities must give 2 values \(one per level\), got shape \(1,\)"),
        (1.0, r"probabilities must give 2 values \(one per level\), got shape \(\)"),
    ],
)
def test_callable_schedule_checked_at_sample(value, pattern):
    drift = mlsde.MultilevelDrift(_levels(2), lambda t, dt, c: torch.tensor(value, dtype=DTYPE), costs=[1, 2])
    with pytest.raises(ValueError, match=pattern):
        drift.sample(0.3, _y(), 0.1)


def test_unknown_coupling():
    with pytest.raises(ValueError, match=r"coupling must be one of \('batch', 'sample'\), got 'both'"):
        mlsde.MultilevelDrift(_levels(2), [0.5, 1.0], coupling="both")


def test_unknown_coins():
    with pytest.raises(ValueError, match=r"coins must be one of \[.*'independent'.*\].*got 'antithetic'"):
        mlsde.MultilevelDrift(_levels(2), [0.5, 1.0], coins="antithetic")


@pytest.mark.parametrize("bad", [-1, 1.5, 2.0, True, "3"])
def test_drift_bad_seed(bad):
    with pytest.raises(ValueError, match=rf"seed must be a non-negative integer or None, got {_esc(bad)}"):
        mlsde.MultilevelDrift(_levels(2), [0.5, 1.0], seed=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_reseed_refuses_a_bad_seed_and_keeps_the_stream(bad):
    drift, twin = _drift(2, seed=3), _drift(2, seed=3)
    with pytest.raises(ValueError, match=rf"seed must be a non-negative integer or None, got {_esc(bad)}"):
        drift.reseed(bad)
    assert drift.seed == 3
    assert torch.equal(drift.sample(0.0, _y(), 0.1), twin.sample(0.0, _y(), 0.1))


# -- schedules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF])
def test_inverse_cost_bad_c(bad):
    with pytest.raises(ValueError, match=rf"c must be a finite number > 0, got {bad!r}"):
        mlsde.InverseCost(bad)


@pytest.mark.parametrize("bad", [0.0, -2.0])
def test_power_law_bad_c(bad):
    with pytest.raises(ValueError, match=rf"c must be a finite number > 0, got {bad!r}"):
        mlsde.PowerLaw(bad, 1.5)


@pytest.mark.parametrize("bad", [0.0, -1.5, NAN])
def test_power_law_bad_alpha(bad):
    with pytest.raises(ValueError, match=rf"alpha must be a finite number > 0, got {bad!r}"):
        mlsde.PowerLaw(1.0, bad)


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_theorem1_eps_not_positive(bad):
    with pytest.raises(ValueError, match=rf"eps must be a finite number > 0, got {bad!r}"):
        mlsde.Theorem1(bad, 1.0)


@pytest.mark.parametrize("bad", [1.5, 2.0])
def test_theorem1_eps_above_one(bad):
    with pytest.raises(ValueError, match=rf"eps must lie in \(0, 1\], got {bad!r}"):
        mlsde.Theorem1(bad, 1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_theorem1_bad_gamma(bad):
    with pytest.raises(ValueError, match=rf"gamma must be a finite number > 0, got {bad!r}"):
        mlsde.Theorem1(0.1, bad)


def test_theorem1_ladder_of_the_wrong_size_is_refused_when_built():
    # Theorem1 is tied to k = ceil(log2(1/eps)) levels, so the mismatch is caught even before sample().
    schedule = mlsde.Theorem1(0.1, 1.0)
    assert schedule.k == 4
    with pytest.raises(ValueError, match=r"probabilities has 4 entries but the ladder has 2 levels.*Theorem1"):
        mlsde.MultilevelDrift(_levels(2), schedule, costs=[1, 2])


def test_theorem1_ladder_of_the_wrong_size_is_refused_at_sample():
    # hidden behind a plain function the tie is invisible when built: Theorem1 itself refuses at sample()
    schedule = mlsde.Theorem1(0.1, 1.0)
    drift = mlsde.MultilevelDrift(_levels(2), lambda t, dt, c: schedule(t, dt, c), costs=[1, 2])
    with pytest.raises(ValueError, match=r"Theorem1\(eps=0\.1\) needs k = .* = 4 levels, but the ladder has 2"):
        drift.sample(0.0, _y(), 0.01)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, NAN])
def test_sigmoid_floor_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=rf"floor must lie in \[0, 1\), got {bad!r}"):
        mlsde.Sigmoid([0.0, 0.0], floor=bad)


def test_sigmoid_length_mismatch():
    with pytest.raises(ValueError, match=r"b must have the length of a \(2\), got 3"):
        mlsde.Sigmoid([0.0, 0.0], b=[0.0, 0.0, 0.0])


def test_sigmoid_of_the_wrong_length_for_the_ladder():
    with pytest.raises(ValueError, match=r"probabilities has 3 entries but the ladder has 2 levels"):
        mlsde.MultilevelDrift(_levels(2), mlsde.Sigmoid([0.0, 0.0, 0.0]), costs=[1, 2])


# -- what the levels return -------------------------------------------------------------------------
def _bad_ladder(bad_level: int, bad_fn, coupling: str):
    """3 levels, every one evaluated every step (p = 1, no pruning); level ``bad_level`` (from 1) is bad."""
    levels = _levels(3)
    levels[bad_level - 1] = bad_fn
    return mlsde.MultilevelDrift(levels, [1.0, 1.0, 1.0], costs=[1, 2, 4], coupling=coupling, seed=0,
                                 prune_certain=False)


BAD_OUTPUTS = [
    pytest.param(lambda t, y: y[:, :1], ValueError, r"returned shape \(3, 1\) for a state of shape \(3, 2\)", id="shape"),
    pytest.param(lambda t, y: y.float(), ValueError, r"returned dtype torch\.float32 for a state of dtype torch\.float64",
                 id="dtype"),
    pytest.param(lambda t, y: torch.empty_like(y, device="meta"), ValueError, r"returned a tensor on meta for a state on cpu",
                 id="device"),
    pytest.param(lambda t, y: y.tolist(), TypeError, r"must return a tensor, got list at t=0\.3", id="list"),
    pytest.param(lambda t, y: None, TypeError, r"must return a tensor, got NoneType at t=0\.3", id="none"),
]


@pytest.mark.parametrize("coupling", ["batch", "sample"])
@pytest.mark.parametrize("bad_level", [1, 2, 3])
@pytest.mark.parametrize("bad_fn, exc, pattern", BAD_OUTPUTS)
def test_level_returning_the_wrong_thing(bad_fn, exc, pattern, bad_level, coupling):
    drift = _bad_ladder(bad_level, bad_fn, coupling)
    with pytest.raises(exc, match=rf"level {bad_level} " + pattern):
        drift.sample(0.3, _y(), 0.1)


def test_non_finite_error_is_a_value_error_and_a_floating_point_error():
    assert issubclass(mlsde.NonFiniteError, ValueError)
    assert issubclass(mlsde.NonFiniteError, FloatingPointError)


@pytest.mark.parametrize("coupling", ["batch", "sample"])
@pytest.mark.parametrize("bad_level", [1, 2, 3])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_level_returning_non_finite_values(value, bad_level, coupling):
    def bad(t, y):
        out = -y.clone()
        out[1, 0] = value
        return out

    drift = _bad_ladder(bad_level, bad, coupling)
    with pytest.raises(mlsde.NonFiniteError, match=rf"^level {bad_level} returned NaN or inf at t=0\.3$"):
        drift.sample(0.3, _y(), 0.1)
    with pytest.raises(ValueError):  # catchable as a ValueError ...
        drift.sample(0.3, _y(), 0.1)
    with pytest.raises(FloatingPointError):  # ... and as a FloatingPointError
        drift.sample(0.3, _y(), 0.1)


def test_non_finite_level_named_with_the_time_of_the_step_in_sdeint():
    def late_nan(t, y):
        return -y + (NAN if float(t) >= 0.5 else 0.0)

    drift = mlsde.MultilevelDrift([_levels(1)[0], late_nan], [0.5, 1.0], costs=[1, 2], seed=0)
    sde = mlsde.MultilevelSDE(drift, 0.1)
    with pytest.raises(mlsde.NonFiniteError, match=r"^level 2 returned NaN or inf at t=0\.5$"):
        mlsde.sdeint(sde, _y(), [0.0, 1.0], dt=0.25, seed=0)


def test_state_with_nan_is_named():
    drift = _drift(2)
    y = _y()
    y[0, 0] = NAN
    with pytest.raises(mlsde.NonFiniteError, match=r"the state y holds NaN or inf at t=0\.3"):
        drift.sample(0.3, y, 0.1)


@pytest.mark.parametrize("bad, exc, pattern", [
    ([[1.0, 2.0]], TypeError, r"y must be a tensor, got list"),
    (torch.ones(0, 2, dtype=DTYPE), ValueError, r"y must have shape \(batch, \.\.\.\) with batch >= 1, got \(0, 2\)"),
    (torch.tensor(1.0, dtype=DTYPE), ValueError, r"y must have shape \(batch, \.\.\.\) with batch >= 1, got \(\)"),
])
def test_sample_bad_state(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _drift(2).sample(0.3, bad, 0.1)


# -- MultilevelSDE -----------------------------------------------------------------------------------
def test_unknown_noise_type():
    with pytest.raises(ValueError, match=r"noise_type must be one of .* got 'multiplicative'"):
        mlsde.MultilevelSDE(_drift(2), 1.0, noise_type="multiplicative")


@pytest.mark.parametrize("bad", [0.0, -0.1, NAN, INF])
def test_sde_bad_dt(bad):
    with pytest.raises(ValueError, match=rf"dt must be a finite number > 0, got {bad!r}"):
        mlsde.MultilevelSDE(_drift(2), 1.0, dt=bad)


def test_sde_bool_dt():
    with pytest.raises(ValueError, match=r"dt must be a finite number > 0, got True"):
        mlsde.MultilevelSDE(_drift(2), 1.0, dt=True)


def test_sde_bad_diffusion():
    with pytest.raises(ValueError, match=r"diffusion must be finite, got nan"):
        mlsde.MultilevelSDE(_drift(2), NAN)
    with pytest.raises(TypeError, match=r"diffusion must be a number, sigma\(t\) or g\(t, y\), got 'x'"):
        mlsde.MultilevelSDE(_drift(2), "x")


# -- sdeint -------------------------------------------------------------------------------------------
TS = [0.0, 0.5, 1.0]


def _sde(seed: int = 7, dt=None) -> mlsde.MultilevelSDE:
    return mlsde.MultilevelSDE(_drift(2, seed=seed), 0.5, dt=dt)


MULTI_EVAL_METHODS = ["milstein", "srk", "midpoint", "heun", "reversible_heun", "euler_heun", "log_ode"]

# (id, sde kwargs, sdeint kwargs, exception, pattern): each fails at argument validation
SDEINT_BAD = [
    ("ts-not-increasing", {}, dict(ts=[0.0, 0.5, 0.5, 1.0]), ValueError,
     r"ts must be strictly increasing, got \[0\.0, 0\.5, 0\.5, 1\.0\]"),
    ("ts-decreasing", {}, dict(ts=[1.0, 0.5, 0.0]), ValueError, r"ts must be strictly increasing, got \[1\.0, 0\.5, 0\.0\]"),
    ("ts-nan", {}, dict(ts=[0.0, NAN, 1.0]), ValueError, r"ts must be finite, got \[0\.0, nan, 1\.0\]"),
    ("ts-inf", {}, dict(ts=[0.0, 0.5, INF]), ValueError, r"ts must be finite, got \[0\.0, 0\.5, inf\]"),
    ("ts-tensor-nan", {}, dict(ts=torch.tensor([0.0, NAN], dtype=DTYPE)), ValueError, r"ts must be finite, got \[0\.0, nan\]"),
    ("ts-2d", {}, dict(ts=torch.zeros(2, 2, dtype=DTYPE)), ValueError, r"ts must be a non-empty 1-D tensor, got shape \(2, 2\)"),
    ("dt-zero", {}, dict(dt=0.0), ValueError, r"dt must be a finite number > 0, got 0\.0"),
    ("dt-negative", {}, dict(dt=-0.1), ValueError, r"dt must be a finite number > 0, got -0\.1"),
    ("dt-nan", {}, dict(dt=NAN), ValueError, r"dt must be a finite number > 0, got nan"),
    ("dt-inf", {}, dict(dt=INF), ValueError, r"dt must be a finite number > 0, got inf"),
    ("dt-bool", {}, dict(dt=True), ValueError, r"dt must be a finite number > 0, got True"),
    ("y0-1d", {}, dict(y0=torch.ones(3, dtype=DTYPE)), ValueError, r"y0 must be 2-D \(batch, d\) .* got shape \(3,\)"),
    ("y0-3d", {}, dict(y0=torch.ones(3, 2, 1, dtype=DTYPE)), ValueError,
     r"y0 must be 2-D \(batch, d\) .* got shape \(3, 2, 1\)"),
    ("y0-list", {}, dict(y0=[[1.0, 2.0]]), TypeError, r"y0 must be a torch\.Tensor, got list"),
    ("dt-differs-from-sde", dict(dt=0.05), dict(dt=0.1), ValueError, r"dt=0\.1 differs from the SDE's own dt=0\.05"),
    ("unknown-method", {}, dict(method="rk4"), ValueError, r"unknown method='rk4'"),
    *[(f"method-{m}", {}, dict(method=m), ValueError, rf"method='{m}' is not supported by mlsde\.sdeint")
      for m in MULTI_EVAL_METHODS],
    ("adaptive", {}, dict(adaptive=True), ValueError, r"adaptive=True is not supported"),
    # the values are matched loosely here (they print as np.float64(...)); the exact wording is checked below
    ("grid-not-at-ts0", {}, dict(dt=None, grid=[0.1, 0.5, 1.0]), ValueError,
     r"grid must start at ts\[0\]=\S*0\.0\S* and end at ts\[-1\]=\S*1\.0\S*, got \[\S*0\.1\S*, \S*1\.0\S*\]"),
    ("grid-not-at-ts-end", {}, dict(dt=None, grid=[0.0, 0.5, 0.9]), ValueError,
     r"grid must start at ts\[0\]=\S*0\.0\S* and end at ts\[-1\]=\S*1\.0\S*, got \[\S*0\.0\S*, \S*0\.9\S*\]"),
    ("grid-not-increasing", {}, dict(dt=None, grid=[0.0, 0.6, 0.5, 1.0]), ValueError,
     r"grid must be strictly increasing, got \[0\.0, 0\.6, 0\.5, 1\.0\]"),
    ("dt-and-grid", {}, dict(dt=0.5, grid=[0.0, 0.5, 1.0]), ValueError, r"give either dt=0\.5 or grid=, not both"),
    ("seed-negative", {}, dict(seed=-1), ValueError, r"seed must be a non-negative integer or None, got -1"),
    ("seed-float", {}, dict(seed=1.5), ValueError, r"seed must be a non-negative integer or None, got 1\.5"),
    ("seed-integral-float", {}, dict(seed=2.0), ValueError, r"seed must be a non-negative integer or None, got 2\.0"),
    ("seed-bool", {}, dict(seed=True), ValueError, r"seed must be a non-negative integer or None, got True"),
]

# a bad bm is refused before the drift is re-seeded
BM_BAD = [
    ("bm-wrong-batch", dict(bm=mlsde.GridBrownian([0.0, 0.25, 0.5, 0.75, 1.0], size=(2, D), seed=0)), ValueError,
     r"bm must have shape \(batch=3, channels=2\), got \(2, 2\)"),
    ("bm-no-shape", dict(bm=lambda ta, tb: torch.zeros(BATCH, D)), ValueError,
     r"bm must have shape \(batch=3, channels=2\), got \(\)"),
    ("bm-not-callable", dict(bm=3), TypeError, r"bm must be a Brownian motion bm\(ta, tb\), got 3"),
]


def _call_sdeint(sde, overrides):
    kwargs = dict(y0=_y(), ts=TS, dt=0.25, seed=123)
    kwargs.update(overrides)
    return mlsde.sdeint(sde, kwargs.pop("y0"), kwargs.pop("ts"), **kwargs)


@pytest.mark.parametrize("sde_kw, call_kw, exc, pattern", [c[1:] for c in SDEINT_BAD], ids=[c[0] for c in SDEINT_BAD])
def test_sdeint_refuses_bad_arguments_before_touching_the_drift(sde_kw, call_kw, exc, pattern):
    sde, twin = _sde(**sde_kw), _sde(**sde_kw)
    with pytest.raises(exc, match=pattern):
        _call_sdeint(sde, call_kw)
    # validation happens before the drift is re-seeded: same seed, same coin stream, untouched stats
    drift = sde.drift
    assert drift.seed == twin.drift.seed == 7
    assert drift.stats.steps == 0 and drift.stats.evaluations == [0, 0]
    assert torch.equal(drift.sample(0.0, _y(), 0.25), twin.drift.sample(0.0, _y(), 0.25))


@pytest.mark.parametrize("call_kw, exc, pattern", [c[1:] for c in BM_BAD], ids=[c[0] for c in BM_BAD])
def test_sdeint_refuses_a_bad_bm(call_kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call_sdeint(_sde(), call_kw)


@pytest.mark.parametrize("call_kw, exc, pattern", [c[1:] for c in BM_BAD], ids=[c[0] for c in BM_BAD])
def test_sdeint_bad_bm_leaves_the_seed_alone(call_kw, exc, pattern):
    sde = _sde()
    with pytest.raises(exc, match=pattern):
        _call_sdeint(sde, call_kw)
    assert sde.drift.seed == 7


def test_sdeint_grid_message_prints_plain_numbers():
    with pytest.raises(ValueError, match=r"grid must start at ts\[0\]=0\.0 and end at ts\[-1\]=1\.0, "
                                         r"got \[0\.1, 1\.0\]"):
        _call_sdeint(_sde(), dict(dt=None, grid=[0.1, 0.5, 1.0]))


def test_sdeint_bm_with_the_wrong_channels_is_refused():
    bm = mlsde.GridBrownian([0.0, 0.25, 0.5, 0.75, 1.0], size=(BATCH, 5), seed=0)
    with pytest.raises(ValueError, match=r"bm must have shape .*got \(3, 5\)"):
        _call_sdeint(_sde(), dict(bm=bm))


def test_sdeint_unknown_noise_type_on_a_foreign_sde():
    class Foreign:
        noise_type, sde_type = "weird", "ito"

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return torch.ones_like(y)

    with pytest.raises(ValueError, match=r"sde\.noise_type must be .* got 'weird'"):
        mlsde.sdeint(Foreign(), _y(), TS, dt=0.25)


# -- odeint -------------------------------------------------------------------------------------------
T = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)


@pytest.mark.parametrize("method, pattern", [
    ("rk5", r"unknown method='rk5'; mlsde\.odeint supports \('euler',\)"),
    ("rk4", r"method='rk4' is not supported by mlsde\.odeint"),
    ("dopri5", r"method='dopri5' is not supported by mlsde\.odeint"),
])
def test_odeint_unknown_method(method, pattern):
    with pytest.raises(ValueError, match=pattern):
        mlsde.odeint(_drift(2), _y(), T, method=method)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], 1.0])
def test_odeint_non_tensor_y0(bad):
    with pytest.raises(TypeError, match=rf"y0 must be a torch\.Tensor, got {type(bad).__name__}"):
        mlsde.odeint(_drift(2), bad, T)


def test_odeint_unknown_option():
    with pytest.raises(ValueError, match=r"unknown options \['first_step'\]"):
        mlsde.odeint(_drift(2), _y(), T, options={"first_step": 0.1})


@pytest.mark.parametrize("bad", [0.0, -0.1, NAN, True])
def test_odeint_bad_step_size(bad):
    with pytest.raises(ValueError, match=rf"options\['step_size'\] must be a finite number > 0, got {bad!r}"):
        mlsde.odeint(_drift(2), _y(), T, options={"step_size": bad})


def test_odeint_infinite_step_size():
    with pytest.raises(ValueError, match=r"options\['step_size'\] must be .* got inf"):
        mlsde.odeint(_drift(2), _y(), T, options={"step_size": INF})


def test_odeint_bad_t_and_seed():
    with pytest.raises(ValueError, match=r"t must be finite, got \[0\.0, nan\]"):
        mlsde.odeint(_drift(2), _y(), torch.tensor([0.0, NAN], dtype=DTYPE))
    with pytest.raises(ValueError, match=r"t must be strictly increasing"):
        mlsde.odeint(_drift(2), _y(), torch.tensor([0.0, 0.5, 0.2], dtype=DTYPE))
    drift = _drift(2)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer or None, got -3"):
        mlsde.odeint(drift, _y(), T, seed=-3)
    assert drift.seed == 7


# -- GridBrownian -------------------------------------------------------------------------------------
GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("ta, tb, bad", [(0.0, 0.375, 0.375), (0.125, 0.5, 0.125), (0.0, 2.0, 2.0), (-1.0, 0.5, -1.0)])
def test_grid_brownian_off_its_grid(ta, tb, bad):
    bm = mlsde.GridBrownian(GRID, size=(BATCH, D), seed=0)
    with pytest.raises(ValueError, match=rf"GridBrownian queried at t={bad!r}, which is not on its grid"):
        bm(ta, tb)


def test_grid_brownian_backwards():
    bm = mlsde.GridBrownian(GRID, size=(BATCH, D), seed=0)
    with pytest.raises(ValueError, match=r"GridBrownian needs ta <= tb, got ta=0\.5, tb=0\.25"):
        bm(0.5, 0.25)


@pytest.mark.parametrize("size", [(0, 2), (2, 0), (2, -1), (2,), (1, 2, 3), ()])
def test_grid_brownian_bad_size(size):
    with pytest.raises(ValueError, match=rf"size must be \(batch, noise_channels\) with positive entries, got {re.escape(str(size))}"):
        mlsde.GridBrownian(GRID, size=size)


def test_grid_brownian_non_integer_size():
    with pytest.raises((ValueError, TypeError), match=r"size .*2\.5"):
        mlsde.GridBrownian(GRID, size=(2.5, 1))


@pytest.mark.parametrize("times, pattern", [
    ([0.0, 0.5, 0.5, 1.0], r"times must be strictly increasing, got \[0\.0, 0\.5, 0\.5, 1\.0\]"),
    ([0.0, NAN], r"times must be finite, got \[0\.0, nan\]"),
    ([0.0], r"times must be 1-D with at least 2 times, got shape \(1,\)"),
])
def test_grid_brownian_bad_times(times, pattern):
    with pytest.raises(ValueError, match=pattern):
        mlsde.GridBrownian(times, size=(1, 1))


@pytest.mark.parametrize("bad", [-1, 0.5, True])
def test_grid_brownian_bad_seed(bad):
    with pytest.raises(ValueError, match=rf"seed must be a non-negative integer or None, got {bad!r}"):
        mlsde.GridBrownian(GRID, size=(1, 1), seed=bad)


def test_grid_brownian_bad_uniform_grid():
    with pytest.raises(ValueError, match=r"dt must be a finite number > 0, got -0\.1"):
        mlsde.GridBrownian(size=(1, 1), t0=0.0, t1=1.0, dt=-0.1)
    with pytest.raises(ValueError, match=r"needs either times= or all of t0=, t1=, dt="):
        mlsde.GridBrownian(size=(1, 1), t0=0.0, t1=1.0)


def test_grid_brownian_bad_cache():
    with pytest.raises(ValueError, match=r"cache must be one of \('chunk', 'all'\), got 'everything'"):
        mlsde.GridBrownian(GRID, size=(1, 1), cache="everything")
    with pytest.raises(ValueError, match=r"build the GridBrownian with cache='all' \(it has cache='chunk'\)"):
        mlsde.GridBrownian(GRID, size=(1, 1)).predraw()


# -- nothing half-done --------------------------------------------------------------------------------
class _Counted:
    """A level that counts the samples it returned and raises on its ``fail_on``-th call while armed."""

    def __init__(self, fn, fail_on=None, error=None):
        self.fn, self.fail_on, self.error = fn, fail_on, error or RuntimeError("level blew up")
        self.calls = self.samples = 0

    def __call__(self, t, y):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise self.error
        self.samples += y.shape[0]
        return self.fn(t, y)


def _flaky_setup(coupling: str, fail_on, seed: int = 11):
    counted = [_Counted(f) for f in _levels(3)]
    counted[1].fail_on = fail_on  # level 2 runs every step (p_3 = 1), after level 3 (top first)
    drift = mlsde.MultilevelDrift(counted, [0.6, 0.7, 1.0], costs=[1.0, 2.0, 4.0], coupling=coupling, seed=seed)
    return drift, counted


def _watch_solves(drift: mlsde.MultilevelDrift) -> list:
    """Wraps ``drift.track()`` (what a solve collects its stats with): the list fills with the ``Stats`` of every
    block opened since."""
    opened, track = [], drift.track

    @contextlib.contextmanager
    def watched():
        with track() as stats:
            opened.append(stats)
            yield stats

    drift.track = watched
    return opened


def _assert_consistent(stats: mlsde.Stats, counted, completed_steps: int, batch: int, per_step_expected: float,
                       per_step_theory: float):
    assert all(isinstance(e, int) and e >= 0 for e in stats.evaluations + stats.calls)
    assert all(math.isfinite(w) and w >= 0 for w in stats.wall_time)
    # evaluations count exactly the samples the levels returned (a call that raised is not counted)
    assert stats.evaluations == [c.samples for c in counted]
    # the step in flight may or may not be counted, but steps, samples and the expected costs agree
    assert completed_steps <= stats.steps <= completed_steps + 1
    assert stats.samples == stats.steps * batch
    assert stats.expected_cost == pytest.approx(stats.steps * per_step_expected)
    assert stats.theory_cost == pytest.approx(stats.steps * per_step_theory)
    assert math.isfinite(stats.cost) and stats.cost >= 0


@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_failed_sdeint_leaves_consistent_stats_and_a_reproducible_drift(coupling):
    drift, counted = _flaky_setup(coupling, fail_on=3)
    p = torch.tensor([0.6, 0.7, 1.0], dtype=DTYPE)
    costs = torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE)
    per_expected = float((drift.evaluation_probabilities(p) * costs).sum()) * BATCH
    per_theory = float((p * costs).sum()) * BATCH
    sde = mlsde.MultilevelSDE(drift, 0.3)
    solves = _watch_solves(drift)

    with pytest.raises(RuntimeError, match="level blew up"):  # the level's own error passes through untouched
        mlsde.sdeint(sde, _y(), TS, dt=0.125, seed=5)
    _assert_consistent(drift.stats, counted, 2, BATCH, per_expected, per_theory)
    failed = solves[0]  # the failed solve's own stats: as consistent, and closed (nothing later lands in them)
    _assert_consistent(failed, counted, 2, BATCH, per_expected, per_theory)
    frozen = copy.deepcopy(vars(failed))

    counted[1].fail_on = None
    ys, stats = mlsde.sdeint(sde, _y(), TS, dt=0.125, seed=5, return_stats=True)
    assert len(solves) == 2 and stats is solves[1] and vars(failed) == frozen
    fresh, _ = _flaky_setup(coupling, fail_on=None, seed=99)  # another seed: sdeint(seed=5) re-seeds the coins
    ys_fresh, stats_fresh = mlsde.sdeint(mlsde.MultilevelSDE(fresh, 0.3), _y(), TS, dt=0.125, seed=5,
                                         return_stats=True)
    assert torch.equal(ys, ys_fresh)
    assert stats.evaluations == stats_fresh.evaluations and stats.steps == stats_fresh.steps == 8
    assert stats.expected_cost == stats_fresh.expected_cost and stats.seed == stats_fresh.seed


@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_failed_sample_leaves_consistent_stats(coupling):
    drift, counted = _flaky_setup(coupling, fail_on=3)
    y = _y()
    p = torch.tensor([0.6, 0.7, 1.0], dtype=DTYPE)
    costs = torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE)
    per_expected = float((drift.evaluation_probabilities(p) * costs).sum()) * BATCH
    per_theory = float((p * costs).sum()) * BATCH
    drift.sample(0.0, y, 0.1)
    drift.sample(0.1, y, 0.1)
    with pytest.raises(RuntimeError, match="level blew up"):
        drift.sample(0.2, y, 0.1)
    _assert_consistent(drift.stats, counted, 2, BATCH, per_expected, per_theory)
    drift.sample(0.3, y, 0.1)  # the drift keeps working
    _assert_consistent(drift.stats, counted, 3, BATCH, per_expected, per_theory)


@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_failed_odeint_then_same_seed_reproduces_a_fresh_drift(coupling):
    drift, counted = _flaky_setup(coupling, fail_on=3)
    t = torch.linspace(0.0, 1.0, 5, dtype=DTYPE)
    solves = _watch_solves(drift)
    with pytest.raises(RuntimeError, match="level blew up"):
        mlsde.odeint(drift, _y(), t, seed=4)
    assert len(solves) == 1 and solves[0].steps >= 1
    frozen = copy.deepcopy(vars(solves[0]))
    counted[1].fail_on = None
    fresh, _ = _flaky_setup(coupling, fail_on=None, seed=99)
    assert torch.equal(mlsde.odeint(drift, _y(), t, seed=4), mlsde.odeint(fresh, _y(), t, seed=4))
    assert len(solves) == 2 and vars(solves[0]) == frozen  # the failed solve's stats were closed


def test_failed_non_finite_solve_then_same_seed_reproduces_a_fresh_drift():
    armed = {"on": True}

    def top(t, y):
        return -1.2 * y + (NAN if armed["on"] and float(t) >= 0.5 else 0.0)

    def make(seed):
        return mlsde.MultilevelDrift(_levels(2) + [top], [0.5, 0.6, 1.0], costs=[1, 2, 4], seed=seed)

    drift = make(1)
    sde = mlsde.MultilevelSDE(drift, 0.2)
    with pytest.raises(mlsde.NonFiniteError, match=r"level 3 returned NaN or inf at t=0\.5"):
        mlsde.sdeint(sde, _y(), TS, dt=0.25, seed=8)
    # the state is checked every CHECK_EVERY steps and at the end: the solve's 4 steps may all have run and count
    assert all(e >= 0 for e in drift.stats.evaluations) and 2 <= drift.stats.steps <= 4
    armed["on"] = False
    ys = mlsde.sdeint(sde, _y(), TS, dt=0.25, seed=8)
    assert torch.equal(ys, mlsde.sdeint(mlsde.MultilevelSDE(make(2), 0.2), _y(), TS, dt=0.25, seed=8))


@pytest.mark.parametrize("bad_value", [[0.5, 1.5], [0.5]])
def test_failed_schedule_draws_no_coin_and_records_nothing(bad_value):
    """A schedule that fails at sample() is caught before any coin is drawn or any stat recorded."""
    state = {"p": [0.5, 0.8]}
    schedule = lambda t, dt, c: torch.tensor(state["p"], dtype=DTYPE)  # noqa: E731
    drift = mlsde.MultilevelDrift(_levels(2), schedule, costs=[1, 2], seed=3)
    twin = mlsde.MultilevelDrift(_levels(2), [0.5, 0.8], costs=[1, 2], seed=3)
    y = _y()
    assert torch.equal(drift.sample(0.0, y, 0.1), twin.sample(0.0, y, 0.1))
    state["p"] = bad_value
    with pytest.raises(ValueError, match="probabilities"):
        drift.sample(0.1, y, 0.1)
    state["p"] = [0.5, 0.8]
    for n in range(1, 6):
        assert torch.equal(drift.sample(0.1 * n, y, 0.1), twin.sample(0.1 * n, y, 0.1))
    assert drift.stats.steps == twin.stats.steps == 6
    assert drift.stats.evaluations == twin.stats.evaluations
    assert drift.stats.expected_cost == twin.stats.expected_cost


@pytest.mark.parametrize("bad_fn", [p.values[0] for p in BAD_OUTPUTS])
def test_level_with_a_bad_output_is_still_paid_for(bad_fn):
    counted = [_Counted(f) for f in _levels(2)]
    counted[1] = _Counted(bad_fn)
    drift = mlsde.MultilevelDrift(counted, [1.0, 1.0], costs=[1, 2], seed=0)
    with pytest.raises((ValueError, TypeError), match="level 2"):
        drift.sample(0.3, _y(), 0.1)
    # the call ran (level 1 cancels out with p = (1, 1) and is pruned): its work is counted
    assert drift.stats.evaluations == [0, BATCH] and drift.stats.calls == [0, 1]
