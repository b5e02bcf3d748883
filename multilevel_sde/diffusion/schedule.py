"""Noise schedules (cosine and linear, float64), respacing, and DDPM/DDIM steps written as (ML-)EM steps.

Convention (spec §1.2, OU): the forward chain ``x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) xi`` is the OU
process ``dY = -Y dt + sqrt(2) dW`` observed at ``tau_t = sum_{s<=t} beta_s / 2``. Sampling runs forward in
*solver time* ``s = tau_T - tau_t``: the fine step from ``t`` to ``t - 1`` has length ``eta_t = beta_t / 2``,
and a respaced step from ``S_i`` to ``S_{i-1}`` spans the fine steps between them (length = their sum). Every
method therefore lives on the same solver-time axis and can share one Brownian path on the fine grid; a
coarse step's standard normal is ``z = (sum of fine increments) / sqrt(span)`` (spec §9.4).

A DDPM or DDIM step is affine in the (clipped) denoised estimate ``x0`` given ``x_t``:
``x_{t-1} = A_t x0 + B_t x_t (+ sigma_t z)``. As an EM step of size ``h`` it reads
``x + h F + g dW`` with ``F = (A_t x0 + (B_t - 1) x) / h`` and ``g = sigma_t / sqrt(h)``, so a ladder of
denoisers becomes a ladder of drifts and ML-EM applies unchanged (the estimate stays unbiased because
``F`` is affine in ``x0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["cosine_alpha_bar", "linear_betas", "NoiseSchedule", "respaced_timesteps", "StepGrid", "same_schedule"]


def cosine_alpha_bar(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: ``alpha_bar_t``, ``t = 0..T`` (``alpha_bar_0 = 1``), with the
    betas clipped at ``max_beta``. float64 ``(T + 1,)``."""
    steps = np.arange(T + 1, dtype=np.float64)
    g = np.cos(((steps / T + s) / (1 + s)) * math.pi / 2) ** 2
    ratio = g[1:] / g[:-1]
    betas = np.minimum(1 - ratio, max_beta)
    return np.concatenate([[1.0], np.cumprod(1 - betas)])


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s linear betas scaled to ``T`` steps, float64 ``(T,)``."""
    scale = 1000.0 / T
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete diffusion: ``alpha_bar[t]`` for ``t = 0..T`` (``alpha_bar[0] = 1``), float64.

    ``kind`` is "cosine" or "linear"; ``betas[t-1] = 1 - alpha_bar[t] / alpha_bar[t-1]``; ``tau[t]`` is the
    continuous OU time ``sum_{s<=t} beta_s / 2`` (so ``sqrt(alpha_bar_t) ~ exp(-tau_t)``).
    """

    alpha_bar: np.ndarray
    kind: str = "cosine"

    @staticmethod
    def cosine(T: int = 1000, s: float = 0.008) -> "NoiseSchedule":
        return NoiseSchedule(cosine_alpha_bar(T, s), "cosine")

    @staticmethod
    def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        return NoiseSchedule(np.concatenate([[1.0], np.cumprod(1 - linear_betas(T, beta_start, beta_end))]), "linear")

    @staticmethod
    def from_alphas_cumprod(alphas_cumprod, kind: str = "custom") -> "NoiseSchedule":
        """From diffusers' ``alphas_cumprod`` (``T`` values for its timesteps ``0..T-1``): the library's
        ``alpha_bar[k]`` is diffusers' ``alphas_cumprod[k - 1]`` (the same noise level, one index later), and
        ``alpha_bar[0] = 1``."""
        if isinstance(alphas_cumprod, torch.Tensor):
            alphas_cumprod = alphas_cumprod.detach().cpu().double().numpy()
        ac = np.asarray(alphas_cumprod, dtype=np.float64).reshape(-1)
        if ac.size < 1 or not np.isfinite(ac).all() or (ac < 0).any() or (ac >= 1).any() or (np.diff(ac) >= 0).any():
            raise ValueError("alphas_cumprod must be a decreasing sequence of values in [0, 1)")
        return NoiseSchedule(np.concatenate([[1.0], ac]), kind)

    @staticmethod
    def from_sigmas(sigmas, kind: str = "k-diffusion") -> "NoiseSchedule":
        """From k-diffusion noise levels ``sigma`` (variance-exploding: ``x = x0 + sigma * noise``), in any order,
        with or without the final 0 (e.g. ``get_sigmas_karras(n, ...)``): ``alpha_bar = 1 / (1 + sigma^2)``, so
        the ``n`` nonzero sigmas become timesteps ``1..n`` and a DDIM run with ``steps=n`` visits exactly them
        (it is k-diffusion's ``sample_euler`` on those sigmas, written in the variance-preserving variables)."""
        if isinstance(sigmas, torch.Tensor):
            sigmas = sigmas.detach().cpu().double().numpy()
        sig = np.unique(np.asarray(sigmas, dtype=np.float64).reshape(-1))  # sorted, increasing
        if sig.size == 0 or not np.isfinite(sig).all() or (sig < 0).any():
            raise ValueError("sigmas must be finite and >= 0")
        sig = sig[sig > 0]
        if sig.size == 0:
            raise ValueError("sigmas must hold at least one positive noise level")
        return NoiseSchedule(np.concatenate([[1.0], 1.0 / (1.0 + sig**2)]), kind)

    @property
    def sigmas(self) -> np.ndarray:
        """k-diffusion's noise level of each t = 0..T: ``sqrt((1 - alpha_bar) / alpha_bar)`` (``sigma_0 = 0``)."""
        with np.errstate(divide="ignore"):
            return np.sqrt((1 - self.alpha_bar) / self.alpha_bar)

    @staticmethod
    def named(kind: str, T: int = 1000) -> "NoiseSchedule":
        if kind == "cosine":
            return NoiseSchedule.cosine(T)
        if kind == "linear":
            return NoiseSchedule.linear(T)
        raise ValueError(f"schedule must be 'cosine' or 'linear', got {kind!r}")

    @property
    def T(self) -> int:
        return len(self.alpha_bar) - 1

    @property
    def betas(self) -> np.ndarray:
        return 1 - self.alpha_bar[1:] / self.alpha_bar[:-1]

    @property
    def tau(self) -> np.ndarray:
        """OU time of each t = 0..T: ``tau_t = sum_{s<=t} beta_s / 2``."""
        return np.concatenate([[0.0], np.cumsum(self.betas / 2)])

    def solver_time(self, t) -> np.ndarray:
        """Solver time ``s = tau_T - tau_t`` (0 at pure noise t = T)."""
        tau = self.tau
        return tau[-1] - tau[np.asarray(t)]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise`` for per-sample timesteps ``t`` (B,)."""
        ab = torch.as_tensor(self.alpha_bar, dtype=torch.float64, device=x0.device)[t].to(x0.dtype)
        ab = ab.reshape(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def same_schedule(a: NoiseSchedule, b: NoiseSchedule, rtol: float = 1e-4) -> bool:
    """Whether two schedules have the same T and ``alpha_bar`` up to ``rtol`` (float32 rounding of a schedule
    read from a library's tensors is far below it; a different schedule is far above)."""
    return a is b or (a.T == b.T and np.allclose(a.alpha_bar, b.alpha_bar, rtol=rtol, atol=0.0))


def respaced_timesteps(T: int, steps: int) -> np.ndarray:
    """``steps + 1`` timesteps from ``T`` down to 0, evenly strided (improved-diffusion's "respacing"):
    the sampler visits ``S_steps = T > ... > S_0 = 0``. Returns a decreasing int array."""
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
    visited = np.round(np.linspace(0, T, steps + 1)).astype(np.int64)
    return visited[::-1].copy()


class StepGrid:
    """The sampler's steps on the solver-time axis, with the affine DDPM/DDIM coefficients of each step.

    Args:
        schedule: the fine schedule (T steps).
        timesteps: decreasing ints ``T = S_n > ... > S_0 = 0`` (``respaced_timesteps``).
        method: "ddpm" (ancestral, ``sigma^2 = beta'``, or ``beta~'`` with ``variance="posterior"``) or
            "ddim" (eta = 0, deterministic).
        variance: DDPM's noise: "beta" (``sigma^2 = beta'``, diffusers' ``fixed_large``) or "posterior"
            (``sigma^2 = beta~' = beta' (1 - alpha_bar_prev) / (1 - alpha_bar_t)``, diffusers' ``fixed_small``).
        final_noise: whether the last DDPM step (to ``t = 0``) adds noise. ``False`` is the reference sampler's
            rule (Ho et al., improved-diffusion, diffusers at ``t = 0``): the last step returns its mean, which is
            the clipped ``x0`` estimate exactly (``A = 1``, ``B = 0`` there). With ``variance="posterior"`` the
            last step's noise is 0 either way.

    Attributes (float64 numpy, one entry per step ``n = 0..N-1`` from ``S_{N-n}`` to ``S_{N-n-1}``):
        ``times``: solver times ``(N + 1,)``; ``h``: step lengths; ``t_from``: timestep at the start of each
        step; ``A``, ``B``: ``x_next = A x0 + B x (+ sigma z)``; ``sigma``: noise scale of each step.
    """

    def __init__(self, schedule: NoiseSchedule, timesteps: Sequence[int], method: str = "ddpm",
                 variance: str = "beta", final_noise: bool = True):
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
        if variance not in ("beta", "posterior"):
            raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
        if not isinstance(final_noise, (bool, np.bool_)):
            raise ValueError(f"final_noise must be True or False, got {final_noise!r}")
        ts = np.asarray(timesteps, dtype=np.int64)
        if ts.ndim != 1 or len(ts) < 2 or ts[0] != schedule.T or ts[-1] != 0 or (np.diff(ts) >= 0).any():
            raise ValueError(f"timesteps must decrease strictly from T={schedule.T} to 0, got {ts.tolist()}")
        self.schedule, self.method, self.variance, self.final_noise = schedule, method, variance, bool(final_noise)
        self.timesteps = ts
        self.times = schedule.solver_time(ts)
        self.h = np.diff(self.times)
        ab = schedule.alpha_bar
        a_t, a_prev = ab[ts[:-1]], ab[ts[1:]]
        beta = 1 - a_t / a_prev  # the respaced beta'
        self.t_from = ts[:-1]
        if method == "ddpm":
            self.A = np.sqrt(a_prev) * beta / (1 - a_t)
            self.B = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
            posterior = beta * (1 - a_prev) / (1 - a_t)
            self.sigma = np.sqrt(posterior if variance == "posterior" else beta)
            if not final_noise:
                self.sigma[-1] = 0.0
        else:
            self.B = np.sqrt(1 - a_prev) / np.sqrt(1 - a_t)
            self.A = np.sqrt(a_prev) - self.B * np.sqrt(a_t)
            self.sigma = np.zeros_like(beta)
        self.sqrt_ab = np.sqrt(a_t)
        self.sqrt_1m_ab = np.sqrt(1 - a_t)
        with np.errstate(divide="ignore"):
            self.ve_sigma = self.sqrt_1m_ab / self.sqrt_ab  # k-diffusion's sigma (inf at zero terminal SNR)

    @property
    def num_steps(self) -> int:
        return len(self.h)

    def tensors(self, device, dtype=torch.float64) -> dict:
        """The per-step coefficients as tensors on ``device`` (gathered by step index inside the levels)."""
        names = ("times", "h", "A", "B", "sigma", "sqrt_ab", "sqrt_1m_ab", "ve_sigma")
        out = {n: torch.as_tensor(getattr(self, n), dtype=dtype, device=device) for n in names}
        out["t_from"] = torch.as_tensor(self.t_from, dtype=torch.long, device=device)
        return out

    def fine_grid(self) -> np.ndarray:
        """The fine (all T steps) solver-time grid the Brownian path lives on."""
        return self.schedule.solver_time(np.arange(self.schedule.T, -1, -1))

