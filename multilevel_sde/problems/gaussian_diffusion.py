"""An exact-score diffusion problem: Gaussian-mixture data noised by the OU process of spec §1.2.

Convention (spec §1.2, the "OU" one; the VP variant ``dY = -Y/2 dt + dW`` is the same process run at
half speed):

    forward   dY_t = -Y_t dt + sqrt(2) dW_t,      Y_t | Y_0 ~ N(a_t Y_0, (1 - a_t^2) I),   a_t = e^{-t}
    data      p_0 = sum_k w_k N(mu_k, diag(s_k^2))
    marginal  p_t = sum_k w_k N(a_t mu_k, diag(a_t^2 s_k^2 + 1 - a_t^2))          (again a mixture)

so the score ``grad log p_t(x) = -sum_k r_k(t, x) (x - a_t mu_k) / v_k(t)`` is closed form, with the
responsibilities ``r_k`` a softmax of ``log w_k + log N_k(x)`` (logsumexp-stable, computed in float64).

The reverse process runs in *solver time* ``s = T - t`` (spec §1.1-1.3), from ``s = 0`` (``t = T``, the prior)
to ``s = T - t_min`` (``t = t_min > 0``; the score of a narrow component grows like ``1 / v_k(t)``, so the
end is kept off ``t = 0``):

    reverse SDE        dX = f(s, X) ds + sqrt(2) dW,   f(s, x) = x + 2 grad log p_{T-s}(x)
    probability flow   dX = g(s, X) ds,                g(s, x) = x +   grad log p_{T-s}(x)

Started from ``p_T`` (``sample_prior``, exact by default) the exact reverse process has law ``p_{t_min}``
at ``s = T - t_min``, whose mean and covariance are ``marginal_mean(t_min)``, ``marginal_covariance(t_min)``;
they differ from ``data_mean()``, ``data_covariance()`` by ``O(t_min)``. The drift is stiff near the end:
its Jacobian reaches about ``2 / min_k v_k(t_min) - 1``, so EM needs ``dt`` well below ``min_k v_k(t_min)``.

``diffusion_ladder`` wraps the true reverse drift into a synthetic ladder of "denoisers" whose score
errors are bounded sines of size ``eps_l`` (spec §2.1), with costs ``(c / eps_l)^gamma``. Unlike a ladder of
networks, every level carries the same exact (stiff, time-dependent) drift: with ``f^0 = 0`` the first
difference ``Delta_1 = f^1`` holds all of it, and the other differences ``Delta_l = f^l - f^{l-1}`` are only
the small, time-independent sines (size ~``2^-l``). Such a ladder demonstrates the theory (Theorem 1's rate
against an exact law), not the behaviour of neural-network ladders, whose differences change with time.

    import torch
    import multilevel_sde as mlsde
    from multilevel_sde.problems import GaussianMixtureDiffusion, diffusion_ladder
    gm = GaussianMixtureDiffusion(means=[[-2.0, 0.0], [2.0, 1.0]], stds=[0.5, 0.8], weights=[0.3, 0.7])
    ladder = diffusion_ladder(gm, k=4, gamma=3.0)
    sde = gm.sde(ladder.drift(mlsde.Theorem1(eps=2**-4, gamma=3.0)), dt=1e-2)
    x0 = gm.sample_prior(1000, torch.Generator().manual_seed(0))
    xs = mlsde.sdeint(sde, x0, gm.solver_times(), seed=0)[-1]      # approximately ~ p_{t_min}
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..sde import MultilevelSDE
from .ladders import Ladder
from .linear import as_number

__all__ = ["GaussianMixtureDiffusion", "diffusion_ladder"]

F64 = torch.float64
TimeLike = Union[float, torch.Tensor]
_LOG_2PI = math.log(2 * math.pi)


def _array(name: str, value) -> torch.Tensor:
    try:
        out = torch.as_tensor(np.asarray(value.detach().cpu() if torch.is_tensor(value) else value, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be an array of numbers, got {value!r}") from err
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} must be finite, got {out.tolist()}")
    return out.to(F64).clone()


class GaussianMixtureDiffusion:
    """Gaussian-mixture data under the OU forward process ``dY = -Y dt + sqrt(2) dW`` (spec §1.2).

    Args:
        means: ``(K, d)`` component means (a ``(d,)`` vector is one component).
        stds: component standard deviations, ``> 0``: a number (all components, isotropic), ``(K,)``
            (isotropic per component) or ``(K, d)`` (diagonal per component).
        weights: ``(K,)`` non-negative mixture weights (normalised here); None: uniform.
        T: diffusion horizon; the reverse process starts at ``t = T`` (solver time ``s = 0``).
        t_min: the diffusion time where the reverse process stops (``s = T - t_min``), ``0 < t_min < T``.

    Attributes: ``d``, ``K``, ``means`` ``(K, d)``, ``stds`` ``(K, d)``, ``weights`` ``(K,)`` (float64),
    ``T``, ``t_min``, ``diffusion = sqrt(2)`` and ``noise_type = "diagonal"`` (for ``MultilevelSDE``).

    Times: ``score``, ``log_prob``, ``marginal_*`` take *diffusion* time ``t``; ``reverse_drift`` and
    ``flow_drift`` take *solver* time ``s = T - t``. Both may be numbers, 0-d tensors or ``(batch,)`` tensors
    (one time per sample). Results come back in ``x``'s dtype and device (computed in float64).
    """

    noise_type = "diagonal"

    def __init__(self, means, stds, weights=None, T: float = 5.0, t_min: float = 1e-3):
        means = _array("means", means)
        if means.dim() == 1:
            means = means.unsqueeze(0)
        if means.dim() != 2 or 0 in means.shape:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        K, d = means.shape
        stds = _array("stds", stds)
        if stds.dim() == 0:
            stds = stds.expand(K, d)
        elif stds.dim() == 1 and stds.shape[0] == K:
            stds = stds.unsqueeze(1).expand(K, d)
        elif stds.shape == (1, d) or (stds.dim() == 1 and K == 1 and stds.shape[0] == d):
            stds = stds.reshape(1, d).expand(K, d)
        if stds.shape != (K, d):
            raise ValueError(f"stds must be a number, (K,) = ({K},) or (K, d) = ({K}, {d}); got {tuple(stds.shape)}")
        if not (stds > 0).all():
            raise ValueError(f"stds must be > 0, got {stds.tolist()}")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=F64)
        else:
            weights = _array("weights", weights).reshape(-1)
            if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"weights must be {K} non-negative numbers with a positive sum, got {weights.tolist()}")
            weights = weights / weights.sum()
        self.T = as_number("T", T, positive=True)
        self.t_min = as_number("t_min", t_min, positive=True)
        if not self.t_min < self.T:
            raise ValueError(f"need 0 < t_min < T, got t_min={t_min!r}, T={T!r}")
        self.means, self.stds, self.weights = means, stds.clone(), weights
        self.K, self.d = int(K), int(d)
        self.diffusion = math.sqrt(2.0)
        self._log_weights = torch.log(weights)  # -inf for a zero weight: that component never contributes

    def __repr__(self) -> str:
        return f"GaussianMixtureDiffusion(K={self.K}, d={self.d}, T={self.T}, t_min={self.t_min})"

    @property
    def noise_channels(self) -> int:
        return self.d

    @property
    def s_end(self) -> float:
        """Solver time at which the reverse process stops: ``T - t_min``."""
        return self.T - self.t_min

    def solver_times(self, dtype: torch.dtype = F64) -> torch.Tensor:
        """``[0, T - t_min]``: the ``ts`` to pass to ``sdeint``/``odeint`` for the reverse process."""
        return torch.tensor([0.0, self.s_end], dtype=dtype)

    # -- the noised marginals -----------------------------------------------------------------------
    @staticmethod
    def _decay(t: TimeLike, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_t = e^{-t}`` and ``1 - a_t^2`` as float64 tensors shaped to broadcast against ``(batch, K, d)``."""
        tt = torch.as_tensor(t, dtype=F64, device=x.device).detach()
        if tt.dim() == 1 and tt.shape[0] == x.shape[0]:
            tt = tt.reshape(-1, 1, 1)
        elif tt.numel() == 1:
            tt = tt.reshape(())
        else:
            raise ValueError(f"t must be a number or a (batch,) tensor, got shape {tuple(tt.shape)} for x {tuple(x.shape)}")
        if not bool((tt >= 0).all()):
            raise ValueError(f"diffusion time t must be >= 0, got {tt.flatten()[:5].tolist()}")
        return torch.exp(-tt), -torch.expm1(-2.0 * tt)

    def _components(self, t: TimeLike, x: torch.Tensor):
        """``(x - a_t mu_k)`` ``(batch, K, d)``, the variances ``v_k(t)`` and the log-joint ``log w_k + log N_k``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must be a tensor of shape (batch, {self.d}), got {getattr(x, 'shape', x)!r}")
        a, one_minus = self._decay(t, x)
        dev = x.device
        means, var0 = self.means.to(dev), (self.stds**2).to(dev)
        var = a**2 * var0 + one_minus  # (K, d) or (batch, K, d)
        diff = x.to(F64).unsqueeze(1) - a * means  # (batch, K, d)
        log_normal = -0.5 * ((diff**2 / var) + torch.log(var) + _LOG_2PI).sum(-1)  # (batch, K)
        return diff, var, self._log_weights.to(dev) + log_normal

    @staticmethod
    def _shifted(joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(max_k joint, exp(joint - max))``: the logsumexp shift by hand (torch's float64 softmax and
        logsumexp are ~10x slower on CPU for a short last dimension)."""
        top = joint.amax(-1, keepdim=True).detach()
        return top, torch.exp(joint - top)

    def log_prob(self, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """``log p_t(x)`` ``(batch,)``, differentiable in ``x`` (float64 inside)."""
        _, _, joint = self._components(t, x)
        top, expo = self._shifted(joint)
        return (top.squeeze(-1) + torch.log(expo.sum(-1))).to(x.dtype)

    def responsibilities(self, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """``r_k(t, x) = P(component k | Y_t = x)`` ``(batch, K)`` float64."""
        _, _, joint = self._components(t, x)
        _, expo = self._shifted(joint)
        return expo / expo.sum(-1, keepdim=True)

    def score(self, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """``grad_x log p_t(x)`` ``(batch, d)`` at diffusion time ``t`` (closed form, logsumexp-stable)."""
        diff, var, joint = self._components(t, x)
        if self.K == 1:
            return -(diff / var).squeeze(1).to(x.dtype)
        _, expo = self._shifted(joint)
        resp = (expo / expo.sum(-1, keepdim=True)).unsqueeze(-1)  # (batch, K, 1)
        return -(resp * diff / var).sum(1).to(x.dtype)

    def denoiser(self, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """Tweedie's ``E[Y_0 | Y_t = x] = (x + (1 - a_t^2) score) / a_t`` ``(batch, d)`` (spec §1.4)."""
        a, one_minus = (v.reshape(-1, 1) if v.dim() else v for v in self._decay(t, x))  # () or (batch, 1)
        return ((x.to(F64) + one_minus * self.score(t, x).to(F64)) / a).to(x.dtype)

    def data_mean(self) -> torch.Tensor:
        """``E[Y_0]`` ``(d,)`` float64."""
        return self.weights @ self.means

    def data_covariance(self) -> torch.Tensor:
        """``Cov[Y_0]`` ``(d, d)`` float64: ``sum_k w_k (diag(s_k^2) + mu_k mu_k^T) - m m^T``."""
        m = self.data_mean()
        second = torch.diag(self.weights @ self.stds**2) + (self.weights[:, None] * self.means).T @ self.means
        return second - torch.outer(m, m)

    def marginal_mean(self, t: float) -> torch.Tensor:
        """``E[Y_t] = a_t E[Y_0]`` ``(d,)`` float64."""
        return math.exp(-as_number("t", t)) * self.data_mean()

    def marginal_covariance(self, t: float) -> torch.Tensor:
        """``Cov[Y_t] = a_t^2 Cov[Y_0] + (1 - a_t^2) I`` ``(d, d)`` float64."""
        t = as_number("t", t)
        return math.exp(-2 * t) * self.data_covariance() - math.expm1(-2 * t) * torch.eye(self.d, dtype=F64)

    # -- sampling -----------------------------------------------------------------------------------
    def sample_marginal(self, t: float, n: int, generator: Optional[torch.Generator] = None,
                        dtype: torch.dtype = F64) -> torch.Tensor:
        """``n`` exact samples of ``p_t`` ``(n, d)`` (``t = 0``: the data)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        t = as_number("t", t)
        if t < 0:
            raise ValueError(f"t must be >= 0, got {t!r}")
        a = math.exp(-t)
        comp = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        z = torch.randn(int(n), self.d, generator=generator, dtype=F64)
        std = torch.sqrt(a**2 * self.stds**2 - math.expm1(-2 * t))
        return (a * self.means[comp] + std[comp] * z).to(dtype)

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = F64) -> torch.Tensor:
        """``n`` samples of the data mixture ``p_0`` ``(n, d)``."""
        return self.sample_marginal(0.0, n, generator, dtype)

    def sample_prior(self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = F64,
                     exact: bool = True) -> torch.Tensor:
        """``n`` starting points of the reverse process ``(n, d)``.

        ``exact=True`` (default): exact samples of ``p_T`` (a mixture), so the reverse process has no prior
        mismatch; ``exact=False``: the usual ``N(0, I)``, whose mismatch with ``p_T`` is ``O(e^{-T})``.
        """
        if exact:
            return self.sample_marginal(self.T, n, generator, dtype)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        return torch.randn(int(n), self.d, generator=generator, dtype=F64).to(dtype)

    # -- the reverse process in solver time s = T - t -----------------------------------------------
    def _diffusion_time(self, s: TimeLike) -> TimeLike:
        return self.T - s

    def reverse_drift(self, s: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """``f(s, x) = x + 2 grad log p_{T-s}(x)``: the reverse SDE's drift in solver time (spec §1.2)."""
        return x + 2 * self.score(self._diffusion_time(s), x)

    def flow_drift(self, s: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """``g(s, x) = x + grad log p_{T-s}(x)``: the probability-flow ODE's drift (spec §1.3)."""
        return x + self.score(self._diffusion_time(s), x)

    drift = reverse_drift  # the name perturbed_ladder and the other problems use

    def sde(self, drift: Optional[Callable] = None, dt: Optional[float] = None) -> MultilevelSDE:
        """The reverse SDE ``dX = f ds + sqrt(2) dW`` with ``drift`` (a ``MultilevelDrift`` or any ``f(s, x)``;
        default the true ``reverse_drift``). Integrate it over ``solver_times()`` from ``sample_prior``."""
        return MultilevelSDE(self.reverse_drift if drift is None else drift, self.diffusion, self.noise_type, dt=dt)


# -- the ladder ------------------------------------------------------------------------------------
class _DenoiserLevel:
    """``f^l(s, x) = base(s, x) + weight * eps * scale * sin(x W^T + phase) / sqrt(d)``: a score error of
    size ``<= eps * scale`` (Euclidean, per sample) entering the drift with the factor ``weight``."""

    def __init__(self, base: Callable, eps: float, scale: float, weight: float, W: torch.Tensor,
                 phase: torch.Tensor, level: int):
        self.base, self.eps, self.scale, self.weight = base, eps, scale, weight
        self.W, self.phase, self.__name__ = W, phase, f"diffusion_level_{level}"
        self._amplitude = weight * eps * scale / math.sqrt(W.shape[0])

    def score_error(self, x: torch.Tensor) -> torch.Tensor:
        """The perturbation of the score, ``eps * scale * sin(x W^T + phase) / sqrt(d)`` ``(batch, d)``."""
        x64 = x.to(F64)
        return (self.eps * self.scale / math.sqrt(self.W.shape[0])
                * torch.sin(x64 @ self.W.to(x.device).T + self.phase.to(x.device))).to(x.dtype)

    def __call__(self, s: TimeLike, x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(F64)
        bump = self._amplitude * torch.sin(x64 @ self.W.to(x.device).T + self.phase.to(x.device))
        return self.base(s, x) + bump.to(x.dtype)

    def __repr__(self) -> str:
        return f"{self.__name__}(eps={self.eps:g})"


def diffusion_ladder(problem: GaussianMixtureDiffusion, k: int, gamma: float, c: float = 1.0,
                     eps: Optional[Sequence[float]] = None, seed: int = 0, scale: float = 0.5,
                     ode: bool = False) -> Ladder:
    """A ladder of imperfect "denoisers" over ``problem``'s exact reverse drift (spec §2.1).

    Level ``l`` uses the score ``grad log p_t + eps_l * scale * h_l(x)`` with
    ``h_l(x) = sin(W_l x + phi_l) / sqrt(d)`` (``||W_l||_2 = 1``, seeded; ``||h_l(x)|| <= 1`` for every
    ``x`` and ``h_l`` is 1-Lipschitz), i.e. a bounded, smooth, level-specific denoiser error.

    What the level differences hold: ``Delta_1 = f^1`` (with ``f^0 = 0``) is the whole stiff reverse drift
    ``x + 2 grad log p_t(x)`` plus the first sine, so ML-EM must evaluate it at every step (``p_1 = 1``, as
    Theorem 1 gives here); ``Delta_l`` for ``l >= 2`` is ``weight * scale * (eps_l h_l - eps_{l-1} h_{l-1})``: a
    time-independent sine of size ~``2^-l``, unrelated to the score. The costs are synthetic. Results on this
    ladder test the theory, not the claim on neural-network ladders.

    Args:
        problem: a ``GaussianMixtureDiffusion``.
        k: number of levels (>= 1); gamma: cost exponent (> 0); c: cost constant (> 0).
        eps: ``k`` positive accuracies (default ``2^-l``); costs are ``(c / eps_l)^gamma``.
        seed: seeds ``W_l`` and ``phi_l ~ U[0, 2 pi)^d`` (same seed, same ladder).
        scale: size of the score error per unit ``eps`` (> 0). The score enters the reverse drift with
            the factor 2 (1 for the flow ODE), so the drift error is ``||f^l - f|| <= 2 scale eps_l``
            (``scale eps_l`` with ``ode=True``); the default ``scale = 1/2`` gives the spec's normalisation
            ``||f^l - f|| <= eps_l`` for the reverse SDE.
        ode: levels over ``flow_drift`` (the probability-flow ODE, run with ``mlsde.odeint``) instead of
            ``reverse_drift``.

    Returns:
        a ``Ladder`` whose ``eps`` are the *drift* error bounds ``2 scale eps_l`` (``scale eps_l`` for
        ``ode=True``) and whose ``costs`` are ``(c / eps_l)^gamma``; ``ladder.drift(probabilities, ...)``
        builds the ``MultilevelDrift``. Each level also has ``score_error(x)``.
    """
    if not isinstance(problem, GaussianMixtureDiffusion):
        raise TypeError(f"problem must be a GaussianMixtureDiffusion, got {problem!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    gamma = as_number("gamma", gamma, positive=True)
    c = as_number("c", c, positive=True)
    scale = as_number("scale", scale, positive=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    eps_list = [2.0**-l for l in range(1, k + 1)] if eps is None else [float(e) for e in eps]
    if len(eps_list) != k or not all(math.isfinite(e) and e > 0 for e in eps_list):
        raise ValueError(f"eps must hold {k} finite accuracies > 0, got {eps!r}")
    base, weight = (problem.flow_drift, 1.0) if ode else (problem.reverse_drift, 2.0)
    gen, d = torch.Generator().manual_seed(int(seed)), problem.d
    levels = []
    for l, e in enumerate(eps_list, start=1):
        W = torch.randn(d, d, generator=gen, dtype=F64)
        W = W / torch.linalg.matrix_norm(W, ord=2)
        phase = 2 * math.pi * torch.rand(d, generator=gen, dtype=F64)
        levels.append(_DenoiserLevel(base, e, scale, weight, W, phase, l))
    costs = [(c / e) ** gamma for e in eps_list]
    return Ladder(levels=levels, costs=costs, eps=[weight * scale * e for e in eps_list])
