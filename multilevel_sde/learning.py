"""Learned time-dependent probabilities (spec §8, the paper's Section 3.1): the gradient estimator and the fit.

Given a ``LearningProblem`` (a ladder with costs, an SDE around it and a grid) and a ``PathSet`` with a
reference solution, ``fit_probabilities`` fits a ``Sigmoid`` schedule
``p_l(t) = floor + (1 - floor) sigmoid(a_l + b_l t)`` by SGD on the regularised objective (spec §8.2)

    J(a, b) = E ||X_T - X_T^ref||^2  +  lam * sum_n sum_l p_l(t_n) C_l          (per path)

with the combined gradient estimator of spec §8.5: a REINFORCE (score-function) term for the Bernoulli
coins, a forward-mode term (one jvp along a random Gaussian direction, computed in the same forward pass
as the primal solve with ``torch.autograd.forward_ad``, so memory does not depend on the number of steps)
for the path derivative through the ``1/p`` weights with the coins held fixed, and the exact gradient of
the regulariser. While learning, every sample has its own coins (``coupling="sample"``).

This module also re-exports the rest of the learning API: the problem and paths (``learning_problem``),
the schedule's start and shifts (``learning_schedule``) and evaluation, the Delta sweep and best-of-N
(``learning_evaluation``). Everything is generic: any ``MultilevelDrift``, any SDE built around it, any
reference.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from numbers import Number
from typing import Callable, Optional, Union

import torch
import torch.autograd.forward_ad as fwAD

from .random_streams import LearningStream, check_seed, derive_seed, make_generator
from .coins import CoinScheme
from .learning_evaluation import BestOfN, Evaluation, SweepPoint, best_of_n, delta_sweep, evaluate
from .learning_problem import LearningProblem, PathSet, squared_error
from .learning_schedule import check_sigmoid, shifted, sigmoid_from_probabilities
from .probabilities import Schedule, Sigmoid
from .stats import Stats

__all__ = [
    "LearningProblem",
    "PathSet",
    "Evaluation",
    "GradientEstimate",
    "FitResult",
    "SweepPoint",
    "BestOfN",
    "squared_error",
    "sigmoid_from_probabilities",
    "shifted",
    "bernoulli_score",
    "regulariser",
    "regulariser_gradient",
    "JvpPass",
    "path_jvp",
    "estimate_gradient",
    "fit_probabilities",
    "evaluate",
    "delta_sweep",
    "best_of_n",
]

F64 = torch.float64


# -- the coins' score and the regulariser ----------------------------------------------------------
def _sigmoid_terms(schedule: Sigmoid, times: torch.Tensor):
    """``(s, p, tau)`` at ``times`` ``(N,)``: ``s = sigmoid(z)`` and ``p`` of shape ``(N, k)``, ``tau = t * scale``."""
    with torch.no_grad():
        z = schedule.logits(times.to(schedule.a.device)).detach().to("cpu", F64).T  # (N, k)
    s = torch.sigmoid(z)
    p = schedule.floor + (1.0 - schedule.floor) * s
    tau = times.to(F64) * schedule.time_scale
    return s, p, tau


def bernoulli_score(coins: torch.Tensor, p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``d/dz log P(B)`` for ``B ~ Bernoulli(p)``, ``p = floor + (1 - floor) sigmoid(z)``, ``s = sigmoid(z)``.

    Equals ``(B - p) / (p (1 - p)) * dp/dz`` with ``dp/dz = (1 - floor) s (1 - s)`` (spec §8.3), simplified to
    ``(B - p) s / p`` (bounded; ``B - p`` when ``floor = 0``). Shapes broadcast (e.g. ``coins (N, k, M)``,
    ``p, s (N, k, 1)``).
    """
    return (coins.to(p.dtype) - p) * (s / p)


def regulariser(schedule: Sigmoid, times: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * sum_n sum_l p_l(t_n) C_l`` (per path), differentiable in ``a``, ``b``."""
    p = schedule(times.to(schedule.a.device), None, costs)  # (k, N)
    return lam * (p * costs.to(p).reshape(-1, 1)).sum()


def regulariser_gradient(schedule: Sigmoid, times: torch.Tensor, costs: torch.Tensor, lam: float):
    """The exact gradient of ``regulariser``: ``lam C_l sum_n (1 - floor) s (1 - s) (1, tau_n)`` (spec §12
    item 20), as ``(grad_a (k,), grad_b (k,))`` float64."""
    s, _, tau = _sigmoid_terms(check_sigmoid(schedule), times)
    dp = (1.0 - schedule.floor) * s * (1 - s)  # (N, k)
    c = lam * costs.to("cpu", F64)
    return c * dp.sum(0), c * (dp * tau[:, None]).sum(0)


# -- the gradient estimator ------------------------------------------------------------------------
class _DualSigmoid(Schedule):
    """The Sigmoid with per-sample dual parameters ``a, b`` of shape ``(k, M)``: ``p`` is ``(k, M)``,
    carrying the tangent ``dp/dtheta . v_m`` of each sample's own direction ``v_m``."""

    def __init__(self, floor: float, time_scale: float, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.floor, self.time_scale = floor, time_scale
        self._a, self._b = a, b

    def num_levels(self) -> int:
        return self._a.shape[0]

    def forward(self, t, dt, costs):
        tt = torch.as_tensor(t, dtype=self._a.dtype, device=self._a.device) * self.time_scale
        if tt.dim() != 0:
            raise ValueError("learning needs one time per step (a scalar t), got a tensor of times")
        return self.floor + (1.0 - self.floor) * torch.sigmoid(self._a + self._b * tt)


@dataclass
class GradientEstimate:
    """One draw of the combined estimator of ``grad J`` (spec §8.5), and what the pass measured.

    ``grad_a``, ``grad_b``: the estimate ``(k,)`` (= ``reinforce + path + regulariser``, each a pair
    ``(a-part, b-part)``). ``losses``: ``(M,)`` per-path errors. ``error``: their mean. ``regulariser``:
    ``lam sum p C`` per path. ``objective``: ``error + regulariser``. ``cost``: realised cost per path (exact
    rule); ``expected_cost``, ``theory_cost``: per path. ``reinforce_variance`` and
    ``reinforce_variance_baseline``: the estimated variance (trace) of the REINFORCE term without and with
    the leave-one-out baseline, both measured on this pass whichever was used. ``per_sample``: ``(M, 2k)``
    per-sample contributions of the REINFORCE and path terms (their mean is the estimate less the
    regulariser).
    """

    grad_a: torch.Tensor
    grad_b: torch.Tensor
    reinforce: tuple
    path: tuple
    regulariser_grad: tuple
    losses: torch.Tensor
    error: float
    regulariser: float
    objective: float
    cost: float
    expected_cost: float
    theory_cost: float
    reinforce_variance: float
    reinforce_variance_baseline: float
    per_sample: torch.Tensor

    @property
    def grad(self) -> torch.Tensor:
        """``(2k,)``: ``grad_a`` then ``grad_b``."""
        return torch.cat([self.grad_a, self.grad_b])


def _variance_of_mean(contrib: torch.Tensor) -> float:
    """Trace of the covariance of the mean of the rows of ``contrib`` ``(M, q)``."""
    m = contrib.shape[0]
    return float(contrib.var(0, unbiased=True).sum() / m) if m > 1 else float("nan")


@dataclass
class JvpPass:
    """One forward-mode solve (``path_jvp``): ``losses`` ``(M,)``; ``jvp`` ``(M,)``, the tangent ``u_m`` of
    ``l_m`` along sample ``m``'s direction; ``coins`` bool ``(N, k, M)`` and ``times`` ``(N,)`` of the steps;
    ``stats`` of the solve."""

    losses: torch.Tensor
    jvp: torch.Tensor
    coins: torch.Tensor
    times: torch.Tensor
    stats: Stats


def path_jvp(problem: LearningProblem, schedule: Sigmoid, paths: PathSet, directions: torch.Tensor, *,
             coins: Union[str, CoinScheme, torch.Tensor] = "independent", seed: int = 0) -> JvpPass:
    """Per-sample losses and their jvp along per-sample directions, in one forward pass (spec §8.4).

    Sample ``m`` gets its own copy of ``(a, b)`` carrying the tangent ``directions[:, :, m]``
    (``directions`` is ``(2, k, M)``: ``v_a`` then ``v_b``), so ``jvp[m] = grad_theta l_m . v_m`` with the
    coins held fixed (the derivative through the ``1/p`` weights). Forward-mode AD under ``no_grad``: no
    graph is kept, so memory does not depend on the number of steps. Coins are per sample
    (``coupling="sample"``), drawn from ``seed`` or replayed from a pattern (``coins=``).
    """
    check_sigmoid(schedule)
    k, M = problem.num_levels, len(paths)
    directions = torch.as_tensor(directions, dtype=F64)
    if tuple(directions.shape) != (2, k, M):
        raise ValueError(f"directions must have shape (2, k={k}, M={M}), got {tuple(directions.shape)}")
    a0, b0 = schedule.a.detach(), schedule.b.detach()
    dev, dtype = a0.device, a0.dtype
    with torch.no_grad(), fwAD.dual_level():
        a = fwAD.make_dual(a0.reshape(k, 1).expand(k, M).contiguous(), directions[0].to(dev, dtype).contiguous())
        b = fwAD.make_dual(b0.reshape(k, 1).expand(k, M).contiguous(), directions[1].to(dev, dtype).contiguous())
        dual = _DualSigmoid(schedule.floor, schedule.time_scale, a, b)
        x, stats, drift = problem.solve(dual, paths, coupling="sample", coins=coins, seed=seed, record=True)
        primal, tangent = fwAD.unpack_dual(problem.loss(x, paths.reference))
        losses = primal.detach().to("cpu", F64).reshape(M)
        u = torch.zeros(M, dtype=F64) if tangent is None else tangent.detach().to("cpu", F64).reshape(M)
    recorded = drift.recorded_coins()
    if recorded.dim() == 2:
        recorded = recorded.unsqueeze(-1).expand(-1, -1, M)
    times = torch.tensor([r.t for r in drift.recorded], dtype=F64)
    return JvpPass(losses, u, recorded, times, stats)


def estimate_gradient(problem: LearningProblem, schedule: Sigmoid, paths: PathSet, lam: float = 0.0, *,
                      baseline: bool = False, direction: str = "sample", seed: int = 0) -> GradientEstimate:
    """One draw of the combined estimator of ``grad_{a,b} J`` on ``paths`` (spec §8.5).

    ``g = (1/M) sum_m [ (l_m - beta_m) S_m + u_m v_m ] + lam grad sum_n sum_l p_l(t_n) C_l`` where

    - ``S_m = sum_n sum_l d/dtheta log P(B^m_{l,n})``: the REINFORCE score of sample ``m``'s own coins
      (``bernoulli_score`` times ``(1, tau_n)``, ``tau_n = t_n * time_scale``);
    - ``u_m``: the jvp of ``l_m`` along ``v_m ~ N(0, I_2k)`` with the coins held fixed (the path derivative
      through the ``1/p`` weights), computed by forward-mode AD in the same pass as ``l_m`` (``path_jvp``):
      memory does not depend on the number of steps. ``direction="sample"``: one ``v_m`` per path (spec
      §8.5); ``"batch"``: one ``v`` shared by the batch;
    - ``beta_m``: 0, or with ``baseline=True`` the leave-one-out mean ``(sum_j l_j - l_m) / (M - 1)``
      (independent of sample ``m``'s coins, so the estimate stays unbiased);
    - the regulariser's gradient is exact (``regulariser_gradient``).

    ``seed`` fixes the coins and directions of this draw.
    """
    check_sigmoid(schedule)
    if direction not in ("sample", "batch"):
        raise ValueError(f"direction must be 'sample' or 'batch', got {direction!r}")
    seed = check_seed(seed)
    if seed is None:
        raise ValueError("seed must be a non-negative integer")
    k, M = problem.num_levels, len(paths)
    if baseline and M < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 paths")
    gen = make_generator(derive_seed(seed, LearningStream.DIRECTIONS))
    v = torch.randn(2, k, M if direction == "sample" else 1, generator=gen, dtype=F64).expand(2, k, M)
    run = path_jvp(problem, schedule, paths, v, seed=derive_seed(seed, LearningStream.COINS))
    losses, u, coins, times, stats = run.losses, run.jvp, run.coins, run.times, run.stats
    s, p, tau = _sigmoid_terms(schedule, times)
    score = bernoulli_score(coins, p.unsqueeze(-1), s.unsqueeze(-1))  # (N, k, M)
    S = torch.cat([score.sum(0), (score * tau.reshape(-1, 1, 1)).sum(0)]).T  # (M, 2k)
    if M > 1:
        loo = (losses.sum() - losses) / (M - 1)
    else:
        loo = torch.zeros_like(losses)
    weight = losses - loo if baseline else losses
    reinforce_contrib = weight[:, None] * S
    path_contrib = u[:, None] * v.reshape(2 * k, M).T
    reinforce = reinforce_contrib.mean(0)
    path = path_contrib.mean(0)
    costs = problem.costs
    reg_a, reg_b = regulariser_gradient(schedule, times, costs, lam)
    reg_value = float(regulariser(schedule, times, costs, lam).detach())
    grad_a = reinforce[:k] + path[:k] + reg_a
    grad_b = reinforce[k:] + path[k:] + reg_b
    error = float(losses.mean())
    return GradientEstimate(
        grad_a=grad_a, grad_b=grad_b,
        reinforce=(reinforce[:k], reinforce[k:]), path=(path[:k], path[k:]), regulariser_grad=(reg_a, reg_b),
        losses=losses, error=error, regulariser=reg_value, objective=error + reg_value,
        cost=stats.cost / M, expected_cost=stats.expected_cost / M, theory_cost=stats.theory_cost / M,
        reinforce_variance=_variance_of_mean(losses[:, None] * S),
        reinforce_variance_baseline=_variance_of_mean((losses - loo)[:, None] * S),
        per_sample=reinforce_contrib + path_contrib,
    )


# -- fitting ---------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """``schedule``: the fitted ``Sigmoid`` (a copy; the initial one is untouched). ``history``: one dict
    per SGD step, measured on that step's minibatch before the update: ``step``, ``error``, ``regulariser``,
    ``objective``, ``cost`` (realised per path, exact rule), ``expected_cost``, ``theory_cost``,
    ``grad_norm`` and its parts ``reinforce_norm``, ``path_norm``, ``regulariser_norm``,
    ``reinforce_variance`` and ``reinforce_variance_baseline``, and ``a``, ``b`` before the step.
    ``settings``: the arguments."""

    schedule: Sigmoid
    history: list
    settings: dict = field(default_factory=dict)


def _make_optimizer(optimizer, params, lr: float):
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if callable(optimizer):
        return optimizer(params)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable(params) -> torch.optim.Optimizer, "
                     f"got {optimizer!r}")


def _cap_update(schedule: Sigmoid, before: torch.Tensor, max_step: float) -> None:
    """Scales the update just taken, ``(a, b) - before``, back to the norm ``max_step`` if it is longer."""
    with torch.no_grad():
        after = torch.cat([schedule.a, schedule.b])
        norm = float((after - before).norm())
        if norm > max_step:
            capped = before + (after - before) * (max_step / norm)
            schedule.a.copy_(capped[: schedule.a.numel()])
            schedule.b.copy_(capped[schedule.a.numel():])


def fit_probabilities(problem: LearningProblem, schedule: Sigmoid, paths: PathSet, *, lam: float,
                      steps: int = 50, batch: int = 300, lr: float = 0.3, optimizer="adam",
                      normalize: bool = True, baseline: bool = False, direction: str = "sample",
                      learn_b: bool = True, max_step: Optional[float] = None, lr_decay: str = "none",
                      average: float = 0.0, seed: int = 0,
                      callback: Optional[Callable] = None, progress: bool = False) -> FitResult:
    """Fits ``schedule``'s ``a, b`` by SGD on ``J = E loss + lam sum_n sum_l p_l(t_n) C_l`` (spec §8.2, §8.5).

    Args:
        problem: the ladder, SDE and grid. schedule: the initial ``Sigmoid`` (not modified; e.g. from
            ``sigmoid_from_probabilities``). paths: the learning set (keep a separate held-out set for
            every reported number).
        lam: the weight of the compute regulariser, in units of the loss per unit of the drift's costs.
        steps, batch: SGD steps and paths per step (the paper: 50 and 300). Each step draws ``batch``
            paths from ``paths`` without replacement (all of them when ``batch >= len(paths)``), fresh
            coins and fresh directions.
        lr, optimizer: ``"adam"`` (default) with ``lr = 0.3`` in logit units; ``"sgd"`` is the paper's literal
            ``theta <- theta - lr g`` (with ``normalize``, ``lr`` of order 0.5); or ``callable(params) -> Optimizer``.
            Adam's per-coordinate scaling suits the very different gradient sizes of cheap and expensive
            levels (on the benchmark it went further in 50 steps than plain SGD; docs/learning.md).
        normalize: divide the gradient by the first step's objective estimate (a constant: the same
            minimiser, but ``lr`` becomes scale-free across problems whose errors and costs differ by orders
            of magnitude). False: raw gradient.
        baseline: use the leave-one-out baseline in the REINFORCE term (off by default, as in the paper).
        direction: ``"sample"`` (one forward-gradient direction per path) or ``"batch"``.
        learn_b: False keeps ``b`` fixed (time-independent probabilities).
        max_step: cap on the Euclidean norm of one update of ``(a, b)``, whatever the optimiser (a longer step
            is scaled back to it after it is taken; None: no cap).
        lr_decay: ``"none"``, ``"linear"`` (to 0 at the last step) or ``"cosine"``.
        average: return the average of the iterates over this final fraction of the steps (Polyak-Ruppert
            averaging; 0: the last iterate, as in the paper).
        seed: fixes the minibatches, coins and directions of every step.
        callback: ``callback(step, record)`` after each step. progress: a tqdm bar.
    """
    check_sigmoid(schedule)
    for name, value in (("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(lam, Number) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if lr_decay not in ("none", "linear", "cosine"):
        raise ValueError(f"lr_decay must be 'none', 'linear' or 'cosine', got {lr_decay!r}")
    if not (isinstance(average, Number) and 0.0 <= average <= 1.0):
        raise ValueError(f"average must lie in [0, 1], got {average!r}")
    seed = check_seed(seed)
    if seed is None:
        raise ValueError("seed must be a non-negative integer")
    fitted = copy.deepcopy(schedule)
    fitted.a.requires_grad_(True)
    fitted.b.requires_grad_(learn_b)
    params = [fitted.a] + ([fitted.b] if learn_b else [])
    opt = _make_optimizer(optimizer, params, lr)
    if lr_decay == "linear":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    elif lr_decay == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
    else:
        sched = None
    tail = max(1, math.ceil(average * steps)) if average > 0 else 0
    sum_a, sum_b = torch.zeros_like(fitted.a.detach()), torch.zeros_like(fitted.b.detach())
    total = len(paths)
    scale = 1.0
    history = []
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, disable=not progress, desc="fit p_l(t)", leave=False)
    for step in range(steps):
        step_seed = derive_seed(seed, step)
        if batch >= total:
            subset = paths
        else:
            gen = make_generator(derive_seed(step_seed, LearningStream.MINIBATCH))
            subset = paths.subset(torch.randperm(total, generator=gen)[:batch].sort().values)
        est = estimate_gradient(problem, fitted, subset, lam, baseline=baseline, direction=direction, seed=step_seed)
        if step == 0 and normalize:
            scale = 1.0 / est.objective if est.objective > 0 else 1.0
        grad_a, grad_b = est.grad_a * scale, est.grad_b * scale
        if not learn_b:
            grad_b = torch.zeros_like(grad_b)
        record = {
            "step": step, "error": est.error, "regulariser": est.regulariser, "objective": est.objective,
            "cost": est.cost, "expected_cost": est.expected_cost, "theory_cost": est.theory_cost,
            "grad_norm": float(est.grad.norm()),
            "reinforce_norm": float(torch.cat(est.reinforce).norm()),
            "path_norm": float(torch.cat(est.path).norm()),
            "regulariser_norm": float(torch.cat(est.regulariser_grad).norm()),
            "reinforce_variance": est.reinforce_variance,
            "reinforce_variance_baseline": est.reinforce_variance_baseline,
            "a": fitted.a.detach().cpu().tolist(), "b": fitted.b.detach().cpu().tolist(),
        }
        opt.zero_grad(set_to_none=True)
        fitted.a.grad = grad_a.to(fitted.a)
        if learn_b:
            fitted.b.grad = grad_b.to(fitted.b)
        before = torch.cat([fitted.a.detach(), fitted.b.detach()])
        opt.step()
        if max_step is not None:
            _cap_update(fitted, before, max_step)
        if sched is not None:
            sched.step()
        if tail and step >= steps - tail:
            sum_a += fitted.a.detach()
            sum_b += fitted.b.detach()
        history.append(record)
        if callback is not None:
            callback(step, record)
        bar.update(1)
    bar.close()
    if tail:
        with torch.no_grad():
            fitted.a.copy_(sum_a / tail)
            fitted.b.copy_(sum_b / tail)
    fitted.a.requires_grad_(schedule.a.requires_grad)
    fitted.b.requires_grad_(schedule.b.requires_grad)
    settings = {"lam": lam, "steps": steps, "batch": batch, "lr": lr,
                "optimizer": optimizer if isinstance(optimizer, str) else repr(optimizer),
                "normalize": normalize, "objective_scale": scale, "baseline": baseline, "direction": direction,
                "learn_b": learn_b, "max_step": max_step, "lr_decay": lr_decay, "average": average, "seed": seed,
                "paths": total}
    return FitResult(fitted, history, settings)
