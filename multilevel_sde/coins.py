"""How the Bernoulli coins ``B_l ~ Bernoulli(p_l)`` of ML-EM are drawn, recorded and replayed.

A coin scheme is a strategy that owns its random stream: ``seed(seed)`` starts it (the drift calls it at
construction and on ``reseed``), ``draw(p, batch)`` gives the coins of one step, ``get_state()`` /
``set_state()`` rewind it (the solvers replay a few steps when their state turns NaN). Coins live on the CPU
(``k`` or ``k x batch`` booleans a step): which levels to evaluate is then known on the host without
synchronising an accelerator, and the same seed gives the same coins on every device.

Schemes and what they keep (``tests/test_coin_bias.py`` measures the path bias of each on a linear ladder):

- ``independent`` (the paper's): every path unbiased (``E[X_N]`` = EM with ``f^k`` on a linear ladder);
- ``comonotone``: one uniform per step shared by the levels; every path unbiased, cheaper, and lower
  variance when the levels' errors are not aligned;
- ``stratified``: systematic in time; each step unbiased at a fixed state, but the PATH is biased (the
  coins depend on the earlier ones, which the state depends on); much lower variance.

Coupling coins across the samples of a batch within a step (stratified or antithetic across samples) leaves
each path's law exactly that of independent coins: no change in any per-sample error, only in batch averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .random_streams import make_generator

__all__ = ["CoinScheme", "IndependentCoins", "StratifiedCoins", "ComonotoneCoins", "Replay", "CoinRecord",
           "as_coin_scheme", "register_coin_scheme"]


class CoinScheme:
    """Draws the coins of one step from its own stream (a CPU ``torch.Generator``, ``self.generator``).

    Subclasses implement ``draw(p, batch)``: ``p`` is a float64 CPU tensor ``(k,)`` (or ``(k, batch)``); ``batch``
    is None for one coin per level shared by the batch, else the number of samples. It returns a bool CPU tensor
    ``(k,)`` or ``(k, batch)`` with ``P(B_l = 1) = p_l``. ``reset()`` clears what the scheme keeps between steps
    (called by ``seed``). ``get_state()`` is the generator's state and a shallow copy of the scheme's attributes,
    so a scheme must replace, not modify in place, the tensors it keeps. ``poisson_limit``: whether the scheme's
    ``dt -> 0`` limit is independent Poisson clocks, the jump process ``sdeint(method="poisson")`` simulates
    from the scheme's stream instead of calling ``draw``.
    """

    name = "scheme"
    poisson_limit = False
    generator: Optional[torch.Generator] = None

    def seed(self, seed: int) -> None:
        """Starts the stream afresh from ``seed`` and resets the scheme."""
        self.generator = make_generator(seed)
        self.reset()

    def reset(self) -> None:
        """Clears what the scheme keeps between steps."""

    def draw(self, p: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
        raise NotImplementedError

    def get_state(self) -> tuple:
        """Where the stream stands, for ``set_state``."""
        fields = {name: value for name, value in vars(self).items() if name != "generator"}
        return self.generator.get_state(), fields

    def set_state(self, state: tuple) -> None:
        generator_state, fields = state
        self.generator.set_state(generator_state)
        vars(self).update(fields)

    def evaluation_probabilities(self, p: torch.Tensor) -> torch.Tensor:
        """``P(f^m evaluated) = P(B_m = 1 or B_{m+1} = 1)`` for each level from ``p`` ``(k, ...)`` (``p_k`` for the
        top level): the union rule ``1 - (1 - p_m)(1 - p_{m+1})`` of coins independent across levels."""
        q = 1 - p
        q[:-1] = q[:-1] * (1 - p[1:])
        return 1 - q


class IndependentCoins(CoinScheme):
    """Independent coins over levels, steps (and samples): the paper's scheme.

    A step's coins are ``u < p`` for fresh uniforms ``u``, ``width`` (1, or the batch) per level, in level order;
    a level whose ``p`` is 1 (for every sample) is certain and takes no uniform.
    """

    name = "independent"
    poisson_limit = True

    def draw(self, p: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
        if batch is None and p.dim() == 1:  # one coin per level: the same draws, on k numbers as Python floats
            probs = p.tolist()
            u = iter(torch.rand(sum(q < 1 for q in probs), generator=self.generator, dtype=torch.float64).tolist())
            return torch.from_numpy(np.array([q >= 1 or next(u) < q for q in probs]))
        rows = p.numpy().reshape(len(p), -1)  # (k, 1) or (k, batch)
        width = rows.shape[1] if batch is None else batch
        uncertain = (rows < 1).any(1)
        coins = np.ones((len(p), width), dtype=bool)
        n = np.count_nonzero(uncertain)
        if n:
            u = torch.rand(n, width, generator=self.generator, dtype=torch.float64).numpy()
            coins[uncertain] = u < rows[uncertain]
        return torch.from_numpy(coins)

    def __repr__(self) -> str:
        return "IndependentCoins()"


class StratifiedCoins(CoinScheme):
    """Systematic sampling in time: each level (and sample) keeps a phase ``u <- u + p_l(t_n)``, started at a
    uniform random offset; the coin comes up whenever the phase crosses an integer.

    Every step's marginal is exact, ``P(B_{l,n} = 1) = p_l(t_n)`` (the phase is uniform at every step), so the
    estimate of one step at a FIXED state is unbiased; and the evaluations of a level are spread evenly in time
    (over any window their count is within one of ``sum_n p_l(t_n)``), which removes most of the variance that
    independent coins add by bunching. But the path is biased: a level's coins are dependent from step to step
    (at ``p = 0.3`` a coin never follows a coin) and the state ``x_n`` depends on the earlier ones, so
    ``E[(B_n / p) Delta(x_n)] != E[Delta(x_n)]`` and ``E[X_N]`` differs from EM with ``f^k`` even on a linear
    ladder, where independent coins are exact. The bias does not vanish as ``dt -> 0`` with ``p = lambda dt``
    (``tests/test_coin_bias.py``). Its RMS error is still far lower, so error comparisons that include the bias
    (MSE to a reference) are honest; claims of unbiasedness are not. Coins of different levels and samples are
    independent (beyond the paper).
    """

    name = "stratified"

    def __init__(self):
        self._phase: Optional[torch.Tensor] = None  # replaced every step, never modified in place (get_state)

    def reset(self) -> None:
        self._phase = None

    def draw(self, p: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
        shape = p.shape if batch is None or p.dim() == 2 else (p.shape[0], batch)
        if self._phase is None or self._phase.shape != shape:
            self._phase = torch.rand(shape, generator=self.generator, dtype=torch.float64)
        phase = self._phase + (p if p.dim() == len(shape) else p.unsqueeze(-1))
        coins = phase >= 1.0
        self._phase = torch.where(coins, phase - 1.0, phase)
        return coins

    def __repr__(self) -> str:
        return "StratifiedCoins()"


class ComonotoneCoins(CoinScheme):
    """One uniform ``u`` per step (and sample) shared by every level: ``B_l = [u < p_l]``.

    Each coin is Bernoulli(``p_l``) and a step's coins are independent of every other step's, so, as with
    independent coins, each path is unbiased (``E[X_N]`` is EM with ``f^k`` on a linear ladder). Within a step
    the levels are coupled: with ``p`` non-increasing in ``l`` the drawn levels are ``1..L`` for a random ``L``
    (Rhee and Glynn's randomised truncation). Two consequences, at the same ``p``:

    - cost: ``f^m`` is evaluated with probability ``max(p_m, p_{m+1})`` instead of the union
      ``1 - (1 - p_m)(1 - p_{m+1})`` (never more expensive);
    - variance of one step: ``sum_l (1/p_l - 1)(|e_{l-1}|^2 - |e_l|^2)`` with ``e_l = f^l - f^k`` (``e_0 = -f^k``,
      p non-increasing), against ``sum_l (1/p_l - 1)|e_{l-1} - e_l|^2`` for independent coins. It is lower when
      the levels' errors are not aligned (``e_{l-1} . e_l < |e_l|^2``: e.g. independent errors; on the HTMC
      ladders 27-45 % lower per step, 17-24 % at the end of the path for gamma = 2.5-3, nothing for gamma = 4,
      where the top level's term, the same for both, dominates) and higher when they point the same way
      (``e_{l-1} = 2 e_l``).

    Learning probabilities needs independent coins (its score-function gradient assumes them).
    """

    name = "comonotone"

    def draw(self, p: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
        if batch is None and p.dim() == 1:
            return torch.rand((), generator=self.generator, dtype=torch.float64) < p
        width = p.shape[1] if p.dim() == 2 else batch
        u = torch.rand(1, width, generator=self.generator, dtype=torch.float64)
        return u < (p if p.dim() == 2 else p.unsqueeze(-1))

    def evaluation_probabilities(self, p: torch.Tensor) -> torch.Tensor:
        q = p.clone()
        q[:-1] = torch.maximum(p[:-1], p[1:])
        return q

    def __repr__(self) -> str:
        return "ComonotoneCoins()"


class Replay(CoinScheme):
    """Replays a given coin pattern: bool ``(steps, k)`` (one coin per level per step) or ``(steps, k, batch)``.

    A ``(steps, k)`` pattern replayed with per-sample coupling gives every sample the same coins. Asking
    for more steps than the pattern has is an error.
    """

    name = "replay"

    def __init__(self, pattern: torch.Tensor):
        pattern = torch.as_tensor(pattern)
        if pattern.dim() not in (2, 3):
            raise ValueError(f"pattern must have shape (steps, k) or (steps, k, batch), got {tuple(pattern.shape)}")
        if pattern.dtype != torch.bool:
            if not ((pattern == 0) | (pattern == 1)).all():
                raise ValueError("pattern must hold booleans (or 0/1 values)")
            pattern = pattern.bool()
        self.pattern = pattern.detach().cpu()
        self.step = 0  # the next step of the pattern

    def reset(self) -> None:
        self.step = 0

    def draw(self, p: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
        coins = self._coins(self.step, p, batch)
        self.step += 1
        return coins

    def _coins(self, step: int, p: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
        if step >= self.pattern.shape[0]:
            raise ValueError(f"Replay pattern has {self.pattern.shape[0]} steps, but step {step + 1} was asked for")
        if self.pattern.shape[1] != p.shape[0]:
            raise ValueError(f"Replay pattern has {self.pattern.shape[1]} levels, the ladder has {p.shape[0]}")
        coins = self.pattern[step]
        if batch is None:
            if coins.dim() != 1:
                raise ValueError("a per-sample pattern (steps, k, batch) cannot be replayed with coupling='batch'")
            return coins
        if coins.dim() == 1:
            return coins.unsqueeze(-1).expand(-1, batch)
        if coins.shape[1] != batch:
            raise ValueError(f"Replay pattern has batch {coins.shape[1]}, the state has batch {batch}")
        return coins

    def __repr__(self) -> str:
        return f"Replay(pattern of shape {tuple(self.pattern.shape)})"


@dataclass
class CoinRecord:
    """What one step drew: the time, step size, probabilities (float64 ``(k,)``) and coins (bool)."""

    t: float
    dt: float
    probabilities: torch.Tensor
    coins: torch.Tensor


_SCHEMES = {"independent": IndependentCoins, "stratified": StratifiedCoins, "comonotone": ComonotoneCoins}


def register_coin_scheme(name: str, cls) -> None:
    """Makes ``coins=name`` available to ``MultilevelDrift`` (for schemes defined elsewhere)."""
    _SCHEMES[name] = cls


def as_coin_scheme(coins: Union[str, CoinScheme, torch.Tensor]) -> CoinScheme:
    if isinstance(coins, CoinScheme):
        return coins
    if isinstance(coins, torch.Tensor):
        return Replay(coins)
    if isinstance(coins, str) and coins in _SCHEMES:
        return _SCHEMES[coins]()
    raise ValueError(f"coins must be one of {sorted(_SCHEMES)}, a CoinScheme or a bool pattern tensor, got {coins!r}")
