"""Entry points with torchsde's and torchdiffeq's signatures: ``sdeint`` and ``odeint``.

Both run (ML-)EM / (ML-)Euler on a fixed grid; with a ``MultilevelDrift`` they give ML-EM, with any
other drift plain EM, and they reproduce torchsde's and torchdiffeq's ``"euler"`` results to rounding
(same step times, same interpolation at output times). Statistics come back beside the solution.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Mapping
from numbers import Number
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .brownian import GridBrownian
from .drift import MultilevelDrift
from .grid import (
    as_times,
    numpy_dtype,
    torchdiffeq_grid,
    torchdiffeq_output_plan,
    torchsde_output_plan,
    uniform_grid,
    validate_grid,
)
from .random_streams import check_seed, make_generator, solve_seeds
from .sde import MultilevelSDE
from .solvers.euler import Euler
from .solvers.poisson import Poisson
from .stats import Stats

__all__ = ["sdeint", "odeint", "SDE_METHODS", "ODE_METHODS"]

SDE_METHODS = ("euler", "poisson")
ODE_METHODS = ("euler",)
# torchsde's methods that call the drift more than once per step (or need its derivatives): ML-EM needs
# exactly one drift estimate per step, so they are refused.
_MULTI_EVAL_SDE_METHODS = ("milstein", "srk", "midpoint", "reversible_heun", "adjoint_reversible_heun", "heun",
                           "log_ode", "euler_heun")
_TORCHSDE_DEFAULT_DT = 1e-3


def _check_method(method, allowed: Sequence[str], others: Sequence[str], what: str) -> str:
    if method in allowed:
        return method
    if method in others:
        raise ValueError(
            f"method={method!r} is not supported by mlsde.{what}: it evaluates the drift more than once per step "
            f"(or differentiates it), while ML-EM draws one drift estimate per step; use one of {tuple(allowed)}"
        )
    raise ValueError(f"unknown method={method!r}; mlsde.{what} supports {tuple(allowed)}")


class _SDEProtocol:
    """Adapts any torchsde-style SDE object to ``drift(t, y, h)`` and ``noise(t, y, dW)``."""

    def __init__(self, sde, names: Optional[dict]):
        names = dict(names or {})
        unknown = set(names) - {"drift", "diffusion", "drift_and_diffusion", "drift_and_diffusion_prod"}
        if unknown:
            raise ValueError(f"names has unknown keys {sorted(unknown)}")
        for attr in ("noise_type", "sde_type"):
            if not hasattr(sde, attr):
                raise ValueError(f"sde has no attribute {attr!r}; it must follow torchsde's SDE protocol")
        if sde.sde_type != "ito":
            raise ValueError(f"sde.sde_type must be 'ito' for Euler–Maruyama, got {sde.sde_type!r}")
        if sde.noise_type not in ("diagonal", "scalar", "additive", "general"):
            raise ValueError(f"sde.noise_type must be diagonal, scalar, additive or general, got {sde.noise_type!r}")
        self.sde = sde
        self.noise_type = sde.noise_type
        f_name, g_name = names.get("drift", "f"), names.get("diffusion", "g")
        # f_step (the estimate for the true step size) unless a subclass redefines f alone, which then rules
        overrides_f = isinstance(sde, MultilevelSDE) and type(sde).f is not MultilevelSDE.f and (
            type(sde).f_step is MultilevelSDE.f_step)
        self._f_step = getattr(sde, "f_step", None) if not names and not overrides_f else None
        self._f = getattr(sde, f_name, None)
        self._g = getattr(sde, g_name, None)
        self._g_prod = getattr(sde, "g_prod", None) if not names else None
        self._f_and_g_prod = getattr(sde, names.get("drift_and_diffusion_prod", "f_and_g_prod"), None)
        if self._f is None and self._f_and_g_prod is None:
            raise ValueError(f"sde must define {f_name!r} (or f_and_g_prod)")
        if self._g is None and self._g_prod is None and self._f_and_g_prod is None:
            raise ValueError(f"sde must define {g_name!r}, g_prod or f_and_g_prod")
        self.multilevel: Optional[MultilevelDrift] = getattr(sde, "multilevel", None)
        # True when each drift call is exactly one MultilevelDrift.sample (its finiteness checks may be deferred)
        self.samples_multilevel = (self._f_step is not None and type(sde).f_step is MultilevelSDE.f_step
                                   and self.multilevel is not None)
        if self.samples_multilevel:
            self._f_step = self.multilevel.sample  # what MultilevelSDE.f_step calls, without its per-step lookups

    def drift(self, t, y, h):
        if self._f_step is not None:
            return self._f_step(t, y, h)
        if self._f is not None:
            return self._f(t, y)
        return self._f_and_g_prod(t, y, torch.zeros(1))[0]

    def noise(self, t, y, dW):
        try:
            out = self._noise(t, y, dW)
        except RuntimeError as err:  # torch's broadcast or bmm message: say which callable and what it must return
            raise ValueError(f"the SDE's diffusion does not fit the state: {self._expected(y)} "
                             f"(torch: {str(err).splitlines()[0]})") from err
        if out.__class__ is not torch.Tensor or out.shape != y.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the SDE's diffusion times dW has shape {got}, not the state's {tuple(y.shape)}: "
                             f"{self._expected(y)}")
        return out

    def _expected(self, y) -> str:
        b, d = (tuple(y.shape) + (1, 1))[:2]
        shape = {"diagonal": f"({b}, {d}), i.e. (batch, d)", "scalar": f"({b}, {d}, 1), i.e. (batch, d, 1)"}.get(
            self.noise_type, f"({b}, {d}, m), i.e. (batch, d, noise channels)")
        return f"with noise_type={self.noise_type!r} the diffusion g(t, y) must return shape {shape}"

    def _noise(self, t, y, dW):
        if self._g_prod is not None:
            return self._g_prod(t, y, dW)
        if self._g is None:
            return self._f_and_g_prod(t, y, dW)[1]
        g = self._g(t, y)
        if self.noise_type == "diagonal":
            return g * dW
        return torch.bmm(g, dW.unsqueeze(-1)).squeeze(-1)

    def noise_channels(self, t, y) -> int:
        if self.noise_type == "scalar":
            return 1
        if self.noise_type == "diagonal":
            return y.shape[1]
        if hasattr(self.sde, "noise_channels"):
            return self.sde.noise_channels(t, y)
        if self._g is None:
            raise ValueError("cannot infer the number of noise channels: pass bm, or define g")
        return self._g(t, y).shape[-1]


#: a solve of at least this many steps is announced before its set-up (``_announce_long_solve``)
LONG_SOLVE_STEPS = 1_000_000
# what the set-up of one step costs before the first step runs (measured: grid, output plan, step list, path
# index; sdeint also the GridBrownian's spacings), bytes and seconds on a 2-core CPU
_SETUP_BYTES = {"sdeint": 140, "odeint": 60}
_SETUP_SECONDS = {"sdeint": 2e-6, "odeint": 5e-7}


def _announce_long_solve(what: str, steps: float, y0: torch.Tensor) -> None:
    """A warning with the expected memory and time of the set-up before the first step of a very long solve, and
    a ValueError (before anything is allocated) when that memory exceeds the machine's."""
    if not math.isfinite(steps) or steps < LONG_SOLVE_STEPS:
        return
    need = steps * _SETUP_BYTES[what]
    total = None
    with contextlib.suppress(AttributeError, ValueError, OSError):
        import os

        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if total and need > total:
        raise ValueError(f"{what}: {steps:,.0f} steps would need about {need / 2**30:.1f} GiB for the step grid and "
                         f"its bookkeeping, more than this machine's {total / 2**30:.1f} GiB; use a larger step")
    warnings.warn(f"{what}: {steps:,.0f} steps: setting up the step grid and its bookkeeping takes about "
                  f"{need / 2**30:.2f} GiB and {steps * _SETUP_SECONDS[what]:.1f} s before the first step "
                  f"(the state, {y0.numel() * y0.element_size() / 2**20:.3g} MiB, comes on top)", stacklevel=3)


def _check_y0(y0) -> None:
    """``y0`` must be a float32/float64 tensor: an integer state cannot move, and in float16/bfloat16 an Euler
    step's change ``f h`` falls below the state's resolution (a state near 1 moves in steps of 2^-10 or 2^-7), so
    the solution would stall silently -- refused, with what to do instead."""
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a torch.Tensor, got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor (float32 or float64), got dtype {y0.dtype}; "
                        "convert it, e.g. y0.double()")
    if torch.finfo(y0.dtype).bits < 32:
        raise TypeError(f"y0 has dtype {y0.dtype}, too coarse to integrate in: an Euler step changes the state by "
                        f"f*dt, which rounds away below {torch.finfo(y0.dtype).eps:g} of the state, so the solution "
                        "would silently stall; solve in float32 or float64 (y0.float()) -- the levels may still "
                        "compute in low precision inside, e.g. under torch.autocast")


def _resolve_dt(dt, sde_dt, grid) -> Optional[float]:
    if dt is not None and (isinstance(dt, bool) or not isinstance(dt, Number) or not math.isfinite(dt) or dt <= 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    if grid is not None:
        if dt is not None:
            raise ValueError(f"give either dt={dt!r} or grid=, not both")
        return None
    if sde_dt is not None and dt is not None and float(dt) != float(sde_dt):
        raise ValueError(f"dt={dt!r} differs from the SDE's own dt={sde_dt!r}; leave dt out or make them equal")
    chosen = dt if dt is not None else sde_dt
    return float(chosen) if chosen is not None else _TORCHSDE_DEFAULT_DT


def _user_grid(grid, ts_host: np.ndarray, np_dtype) -> np.ndarray:
    arr = validate_grid("grid", grid).astype(np_dtype)
    if arr[0] != ts_host[0] or arr[-1] != ts_host[-1]:
        raise ValueError(f"grid must start at ts[0]={float(ts_host[0])!r} and end at ts[-1]={float(ts_host[-1])!r}, "
                         f"got [{float(arr[0])!r}, {float(arr[-1])!r}]")
    return arr


def _stats_context(multilevel: Optional[MultilevelDrift]):
    return multilevel.track() if multilevel is not None else contextlib.nullcontext(None)


class _PlainCounter:
    """Counts evaluations of a drift that is not multilevel (one 'level')."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.stats = Stats(1)

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.fn(*args)
        self.stats.record_level(0, args[1].shape[0], time.perf_counter() - start)
        self.stats.steps += 1
        self.stats.samples += args[1].shape[0]
        return out


def sdeint(
    sde,
    y0: torch.Tensor,
    ts: Union[torch.Tensor, Sequence[float]],
    bm=None,
    method: str = "euler",
    dt: Optional[float] = None,
    adaptive: bool = False,
    rtol=None,
    atol=None,
    dt_min=None,
    options: Optional[dict] = None,
    names: Optional[dict] = None,
    logqp: bool = False,
    extra: bool = False,
    extra_solver_state=None,
    *,
    grid: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    seed: Optional[int] = None,
    return_stats: bool = False,
    progress: bool = False,
    callback: Optional[Callable] = None,
):
    """Solves an Itô SDE with (multilevel) Euler–Maruyama; torchsde's signature and output.

    Args:
        sde: a ``MultilevelSDE`` or any object with torchsde's protocol (``noise_type``, ``sde_type``,
            ``f``, ``g``; optional ``g_prod``, ``f_and_g_prod``). ``f_step(t, y, dt)`` is used when present.
        y0: ``(batch, d)``.
        ts: output times, strictly increasing (the state at ``ts[0]`` is ``y0``).
        bm: a Brownian motion ``bm(ta, tb)`` of shape ``(batch, m)`` (a ``GridBrownian`` or torchsde's);
            None: a fresh ``GridBrownian`` on the step grid, seeded from ``seed``.
        method: ``"euler"`` (EM / ML-EM) or ``"poisson"`` (the exact dt -> 0 limit of ML-EM: level l jumps
            at rate ``p_l(t, dt) / dt``; needs a MultilevelDrift with independent coins and state-independent noise).
        dt: step size (default: the SDE's ``dt``, else torchsde's 1e-3); steps follow torchsde's
            ``t <- min(t + dt, ts[-1])`` and outputs are interpolated like torchsde's.
        grid: instead of ``dt``, the exact step times (non-uniform allowed, from ``ts[0]`` to ``ts[-1]``).
        seed: seeds the Brownian path (when ``bm`` is None) and re-seeds the drift's coins; None: a fresh path,
            and the coins go on from the drift's own stream. ``stats.seed`` is the seed that reproduces the
            solve, None where no single seed does (``seed=None`` with a MultilevelDrift, or a given ``bm``).
        return_stats: also return a ``Stats`` of the solve.
        progress: tqdm progress bar. callback: ``callback(n, t_{n+1}, y_{n+1})`` after each step.

    Returns:
        ``ys`` of shape ``(len(ts), batch, d)``, or ``(ys, stats)``.
    """
    method = _check_method(method, SDE_METHODS, _MULTI_EVAL_SDE_METHODS, "sdeint")
    if adaptive:
        raise ValueError("adaptive=True is not supported: ML-EM runs on a fixed grid")
    if logqp or extra or extra_solver_state is not None:
        raise ValueError("logqp, extra and extra_solver_state are not supported by mlsde.sdeint")
    if options:
        raise ValueError(f"mlsde.sdeint takes no options, got {options!r}")
    protocol = _SDEProtocol(sde, names)
    _check_y0(y0)
    if y0.dim() != 2:
        raise ValueError(f"y0 must be 2-D (batch, d) for sdeint, got shape {tuple(y0.shape)}")
    ts = as_times("ts", ts, y0.dtype, y0.device)
    step = _resolve_dt(dt, getattr(sde, "dt", None), grid)
    seed = check_seed(seed)
    np_dtype = numpy_dtype(ts.dtype)
    ts_host = ts.detach().cpu().numpy().astype(np_dtype)
    if method == "poisson":
        return _sdeint_poisson(protocol, sde, y0, ts_host, bm, step, grid, seed, return_stats, callback, progress)
    if grid is None:
        _announce_long_solve("sdeint", float(ts_host[-1] - ts_host[0]) / step, y0)
    if grid is not None:
        times_np = _user_grid(grid, ts_host, np_dtype)
    else:
        times_np = uniform_grid(ts_host[0], ts_host[-1], step, np_dtype)
    plan = torchsde_output_plan(times_np, ts_host)
    times = torch.as_tensor(times_np, dtype=ts.dtype).to(ts.device)
    steps = np.diff(times_np).tolist()  # Python floats, as float(h) of each

    _check_bm(protocol, bm, times[0], y0)
    solve_seed, coin_seed, bm_seed = solve_seeds(seed)
    multilevel = protocol.multilevel
    if multilevel is not None and seed is not None:
        multilevel.reseed(coin_seed)
    noise = _noise_source(protocol, bm, times, times_np, y0, bm_seed)

    drift = protocol.drift
    counter = None
    if multilevel is None:
        drift = counter = _PlainCounter(protocol.drift)
    solver = Euler(times, steps, drift, noise, checked=multilevel if protocol.samples_multilevel else None)
    start = time.perf_counter()
    with _stats_context(multilevel) as stats:
        ys = solver.integrate(y0, plan, callback=callback, progress=progress)
    stats = counter.stats if counter is not None else stats
    stats.total_time = time.perf_counter() - start
    stats.seed = solve_seed if seed is not None or (bm is None and multilevel is None) else None
    return (ys, stats) if return_stats else ys


def _sdeint_poisson(protocol: _SDEProtocol, sde, y0, ts_host, bm, dt, grid, seed, return_stats, callback, progress):
    """``method="poisson"``: the jump process of the drift's rates ``p_l(t, dt) / dt`` (solvers/poisson.py)."""
    multilevel = protocol.multilevel
    if multilevel is None:
        raise ValueError("method='poisson' needs a MultilevelSDE whose drift is a MultilevelDrift")
    if not protocol.samples_multilevel:
        raise ValueError(f"method='poisson' simulates the MultilevelDrift itself, but {type(sde).__name__} redefines "
                         "its drift (f or f_step): use method='euler'")
    if not getattr(sde, "state_independent_noise", False):
        raise ValueError("method='poisson' needs state-independent noise: give MultilevelSDE's diffusion as a "
                         "number or a function of t alone, not g(t, y)")
    if grid is not None:
        raise ValueError("method='poisson' runs on the uniform dt grid; pass dt, not grid")
    if not multilevel.coins.poisson_limit:
        raise ValueError(f"method='poisson' is the limit of independent coins; the drift's coins are "
                         f"{multilevel.coins!r}: use coins='independent' or method='euler'")
    if bm is not None and not isinstance(bm, GridBrownian):
        raise TypeError(f"method='poisson' reads a shared path from a GridBrownian only, got {type(bm).__name__}")
    if bm is not None and tuple(bm.shape)[0] != y0.shape[0]:
        raise ValueError(f"bm must have shape (batch={y0.shape[0]}, channels), got {tuple(bm.shape)}")
    solve_seed, coin_seed, noise_seed = solve_seeds(seed)
    if seed is not None:
        multilevel.reseed(coin_seed)
    constant = float(sde.diffusion) if isinstance(sde.diffusion, Number) else None
    sigma0 = sde.sigma(float(ts_host[0]))
    if sde.noise_type in ("additive", "general") and torch.is_tensor(sigma0) and sigma0.dim() > 0:
        raise ValueError(f"method='poisson' takes a scalar sigma(t) with noise_type={sde.noise_type!r} (g = sigma I), "
                         f"got a tensor of shape {tuple(sigma0.shape)}: use method='euler'")
    start = time.perf_counter()
    with multilevel.track() as stats:
        ts = ts_host.astype(np.float64)
        solver = Poisson(multilevel, sde.sigma, constant, sde.noise_type, y0, ts, dt,
                         make_generator(noise_seed, y0.device), bm)
        ys = solver.integrate(y0, solver.output_plan(ts), callback=callback, progress=progress)
    stats.total_time = time.perf_counter() - start
    stats.seed = solve_seed if seed is not None else None  # seed=None: the coins went on from the drift's stream
    return (ys, stats) if return_stats else ys


def _check_bm(protocol: _SDEProtocol, bm, t0, y0: torch.Tensor) -> None:
    """A given Brownian motion must be callable with shape ``(batch, channels)`` matching the noise."""
    if bm is None:
        return
    if not callable(bm):
        raise TypeError(f"bm must be a Brownian motion bm(ta, tb), got {bm!r}")
    shape = tuple(getattr(bm, "shape", ()))
    channels = protocol.noise_channels(t0, y0)
    if len(shape) != 2 or shape[0] != y0.shape[0] or shape[1] != channels:
        raise ValueError(f"bm must have shape (batch={y0.shape[0]}, channels={channels}), got {shape}")


def _noise_source(protocol: _SDEProtocol, bm, times: torch.Tensor, times_np: np.ndarray, y0, bm_seed: int):
    """``noise(n, t, y) = g(t, y) dW_n`` from ``bm`` or from a fresh GridBrownian on the step grid."""
    if bm is None:
        channels = protocol.noise_channels(times[0], y0)
        bm = GridBrownian(times_np.astype(np.float64), size=(y0.shape[0], channels), seed=bm_seed,
                          dtype=y0.dtype, device=y0.device)
    if isinstance(bm, GridBrownian):  # the path's grid indices of the steps, found once for the whole solve
        index = bm.indices_of(times_np).tolist()
        return lambda n, t, y: protocol.noise(t, y, bm.increments(index[n], index[n + 1]))
    return lambda n, t, y: protocol.noise(t, y, bm(times[n], times[n + 1]))


# -- ODEs ------------------------------------------------------------------------------------------
class _Reversed:
    """``dy/ds = -f(-s, y)``: integrates a decreasing ``t`` forward in ``s = -t`` (torchdiffeq's trick)."""

    def __init__(self, drift: Callable):
        self.drift = drift

    def __call__(self, s, y, h):
        return -self.drift(-s, y, h)


def odeint(
    func: Callable,
    y0: torch.Tensor,
    t: torch.Tensor,
    rtol=None,
    atol=None,
    method: str = "euler",
    options: Optional[dict] = None,
    event_fn=None,
    *,
    seed: Optional[int] = None,
    return_stats: bool = False,
    progress: bool = False,
    callback: Optional[Callable] = None,
):
    """Solves ``dy/dt = func(t, y)`` with the (multilevel) Euler method; torchdiffeq's signature and output.

    Args:
        func: a ``MultilevelDrift`` (ML-Euler: one random estimate per step) or any ``func(t, y)``.
        y0: initial state, any shape ``(batch, ...)``.
        t: output times, strictly increasing or strictly decreasing.
        method: ``"euler"``.
        options: ``{"step_size": h}`` (torchdiffeq's grid ``arange(n) * h + t[0]``), or
            ``{"grid": times}`` for exact step times; without either the grid is ``t`` itself.
        seed: re-seeds a MultilevelDrift's coins; None keeps its stream.

    Returns:
        ``(len(t), *y0.shape)``, or ``(solution, stats)`` with ``return_stats=True``.
    """
    method = _check_method(method, ODE_METHODS, ("midpoint", "rk4", "dopri5", "dopri8", "bosh3", "fehlberg2",
                                                 "adaptive_heun", "heun3", "explicit_adams", "implicit_adams",
                                                 "fixed_adams", "scipy_solver"), "odeint")
    if event_fn is not None:
        raise ValueError("event_fn is not supported by mlsde.odeint")
    _check_y0(y0)
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict such as {{'step_size': 0.01}} or {{'grid': times}}, got {options!r}")
    if not callable(func):
        raise TypeError(f"func must be callable func(t, y), got {func!r}")
    if not torch.is_tensor(t) or t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor, got {t!r}")
    host = t.detach().cpu()
    reversed_time = t.numel() > 1 and bool(host[0] > host[1])
    t_fwd = -t if reversed_time else t
    as_times("t", t_fwd, y0.dtype)
    options = dict(options or {})
    step_size, user_grid = options.pop("step_size", None), options.pop("grid", None)
    options.pop("perturb", None)
    if options.pop("interp", "linear") != "linear":
        raise ValueError("mlsde.odeint interpolates linearly (options['interp'] must be 'linear')")
    if options:
        raise ValueError(f"unknown options {sorted(options)}; mlsde.odeint takes step_size or grid")
    if step_size is not None and user_grid is not None:
        raise ValueError("give options step_size or grid, not both")
    t_fwd = t_fwd.to(y0.device)
    if step_size is not None:
        if isinstance(step_size, bool) or not isinstance(step_size, Number) or not 0 < step_size < math.inf:
            raise ValueError(f"options['step_size'] must be a finite number > 0, got {step_size!r}")
        span = t_fwd.detach().cpu()
        _announce_long_solve("odeint", float(span[-1] - span[0]) / step_size, y0)
        grid = torchdiffeq_grid(t_fwd, step_size)
    elif user_grid is not None:
        user = torch.as_tensor(validate_grid("options['grid']", user_grid), dtype=t.dtype)
        grid = -user if reversed_time else user
        if grid[0] != t_fwd[0].cpu() or grid[-1] != t_fwd[-1].cpu():
            raise ValueError("options['grid'] must start at t[0] and end at t[-1]")
    else:
        grid = t_fwd.detach().cpu()
    grid_np = grid.numpy()
    steps = (grid[1:] - grid[:-1]).numpy().tolist()  # Python floats, as float(h) of each
    plan = torchdiffeq_output_plan(grid_np, t_fwd.detach().cpu().numpy())

    multilevel = func if isinstance(func, MultilevelDrift) else None
    seed = check_seed(seed)
    solve_seed, coin_seed, _ = solve_seeds(seed)
    if multilevel is not None:
        if seed is not None:
            multilevel.reseed(coin_seed)
        drift = lambda s, y, h: multilevel.sample(s, y, abs(h))  # noqa: E731
    else:
        drift = lambda s, y, h: func(s, y)  # noqa: E731
    if reversed_time:
        drift = _Reversed(drift)
    counter = None
    if multilevel is None:
        drift = counter = _PlainCounter(drift)
    times = grid.to(device=y0.device, dtype=y0.dtype if y0.is_floating_point() else grid.dtype)
    solver = Euler(times, steps, drift, None, checked=multilevel)
    start = time.perf_counter()
    with _stats_context(multilevel) as stats:
        sol = solver.integrate(y0, plan, callback=callback, progress=progress)
    stats = counter.stats if counter is not None else stats
    stats.total_time = time.perf_counter() - start
    stats.seed = solve_seed if seed is not None else None
    return (sol, stats) if return_stats else sol

