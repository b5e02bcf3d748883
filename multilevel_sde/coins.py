"""How the Bernoulli coins ``B_l ~ Bernoulli(p_l)`` of ML-EM are drawn, recorded and replayed.

Coins live on the CPU (``k`` or ``k x batch`` booleans a step): the decision of which levels to evaluate
is then known on the host without synchronising an accelerator, and the same seed gives the same coins
on every device. A coin scheme is reset at the start of each solve and asked once per step.

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

__all__ = ["CoinScheme", "IndependentCoins", "StratifiedCoins", "ComonotoneCoins", "Replay", "CoinRecord", "UniformStream",
           "as_coin_scheme", "register_coin_scheme"]


class UniformStream:
    """Float64 uniforms on ``[0, 1)`` from a CPU generator, drawn ``block`` at a time and handed out in order.

    A request for ``n`` values returns exactly what ``torch.rand(n, generator=generator, dtype=float64)``
    would have returned at that point of the stream (the CPU generator fills uniforms one after another),
    so buffering changes no coin; it only spares one small random call per step. ``reset()`` drops the
    buffer (call it after re-seeding the generator).
    """

    def __init__(self, generator: torch.Generator, block: int = 1 << 14):
        self.generator, self.block = generator, int(block)
        self.reset()

    def reset(self) -> None:
        self._buffer: Optional[torch.Tensor] = None
        self._array: Optional[np.ndarray] = None  # the buffer's memory seen by numpy (slicing it is cheaper)
        self._pos = 0
        self._codes: Optional[_CodeBlock] = None
        self.generation = getattr(self, "generation", -1) + 1  # changes whenever the buffer is replaced

    def _ensure(self, n: int) -> None:
        left = 0 if self._buffer is None else self._buffer.numel() - self._pos
        if left >= n and self._buffer is not None:
            return
        fresh = torch.rand(max(self.block, n - left), generator=self.generator, dtype=torch.float64)
        self._buffer = fresh if left == 0 else torch.cat([self._buffer[self._pos:], fresh])
        self._array, self._pos, self._codes = self._buffer.numpy(), 0, None
        self.generation += 1

    def _take(self, n: int) -> slice:
        """Where the next ``n`` uniforms lie in the buffer (refilled when needed); advances past them."""
        self._ensure(n)
        self._pos += n
        return slice(self._pos - n, self._pos)

    def tensor(self, n: int) -> torch.Tensor:
        """The next ``n`` uniforms, a float64 CPU tensor ``(n,)`` (a view of the buffer: do not modify)."""
        where = self._take(n)  # first: it may refill the buffer
        return self._buffer[where]

    def numpy(self, n: int) -> np.ndarray:
        """The next ``n`` uniforms as a float64 numpy array (a view of the buffer: do not modify)."""
        where = self._take(n)  # first: it may refill the buffer
        return self._array[where]

    def lookahead(self, width: int, max_rows: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The next uniforms in whole rows of ``width``, float64 ``(rows, width)`` with ``1 <= rows <= max_rows``
        (as many as the buffer holds, refilled first when it holds less than one row), without advancing; and
        the stream's ``position()``. ``advance(width)`` then consumes one row, exactly as ``numpy(width)``
        would; the rows still ahead are valid while ``position()`` is where the last advance left it."""
        self._ensure(width)
        rows = max(1, min(max_rows, (self._buffer.numel() - self._pos) // width))
        return self._array[self._pos:self._pos + rows * width].reshape(rows, width), self.position()

    def position(self) -> tuple[int, int]:
        """Where the stream stands: ``(generation of the buffer, offset in it)``."""
        return self.generation, self._pos

    def advance(self, n: int) -> None:
        """Consumes the next ``n`` uniforms, which a ``lookahead`` has shown."""
        self._pos += n

    def next_code(self, key: object, thresholds: np.ndarray, bits: np.ndarray, base: int) -> int:
        """The next ``n = len(thresholds)`` uniforms ``u`` compared with ``thresholds``, as one integer:
        ``base + sum(bits[i] for i with u_i < thresholds[i])``. The comparisons for the rest of the buffer are
        made at once (one numpy call) and handed out step by step while the same ``key`` asks for codes back
        to back; any other request in between, or another key, starts a fresh block. The stream advances
        exactly as ``numpy(n)`` would."""
        block = self._codes
        if block is not None and block.key is key and block.pos == self._pos and block.next < len(block.codes):
            code = block.codes[block.next]
            block.next += 1
            block.pos = self._pos = self._pos + block.width
            return code
        n = len(thresholds)
        self._ensure(n)
        steps = (self._buffer.numel() - self._pos) // n
        window = self._array[self._pos:self._pos + steps * n].reshape(steps, n)
        codes = ((window < thresholds) @ bits + base).tolist()
        self._codes = _CodeBlock(key, n, codes, next=1, pos=self._pos + n)
        self._pos += n
        return codes[0]


@dataclass
class _CodeBlock:
    """Codes precomputed by ``UniformStream.next_code`` for one key, and where the stream must be to use them."""

    key: object
    width: int  # uniforms per code
    codes: list
    next: int  # index of the next code to hand out
    pos: int  # stream position at which codes[next] starts


class CoinScheme:
    """Draws the coins of one step.

    ``draw(p, batch, generator, step)``: ``p`` is a float64 CPU tensor ``(k,)`` (or ``(k, batch)``);
    ``batch`` is None for one coin per level shared by the batch, else the number of samples.
    Returns a bool CPU tensor ``(k,)`` or ``(k, batch)`` with ``P(B_l = 1) = p_l`` at every step.
    """

    name = "scheme"

    def reset(self) -> None:
        """Called at the start of every solve."""

    def draw(self, p: torch.Tensor, batch: Optional[int], generator: torch.Generator, step: int) -> torch.Tensor:
        raise NotImplementedError

    def evaluation_probabilities(self, p: torch.Tensor) -> torch.Tensor:
        """``P(f^m evaluated) = P(B_m = 1 or B_{m+1} = 1)`` for each level from ``p`` ``(k, ...)`` (``p_k`` for the
        top level): the union rule ``1 - (1 - p_m)(1 - p_{m+1})`` of coins independent across levels."""
        q = 1 - p
        q[:-1] = q[:-1] * (1 - p[1:])
        return 1 - q


class IndependentCoins(CoinScheme):
    """Independent coins over levels, steps (and samples): the paper's scheme.

    A ``MultilevelDrift`` draws these coins itself, as ``u < p`` from its buffered ``UniformStream``, and gives
    a level whose ``p`` is 1 its (certain) coin without consuming a uniform.
    """

    name = "independent"

    def draw(self, p: torch.Tensor, batch: Optional[int], generator: torch.Generator, step: int) -> torch.Tensor:
        shape = p.shape if batch is None or p.dim() == 2 else (p.shape[0], batch)
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        return u < (p if p.dim() == len(shape) else p.unsqueeze(-1))

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
        self._phase: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self._phase = None

    def draw(self, p: torch.Tensor, batch: Optional[int], generator: torch.Generator, step: int) -> torch.Tensor:
        shape = p.shape if batch is None or p.dim() == 2 else (p.shape[0], batch)
        if self._phase is None or self._phase.shape != shape:
            self._phase = torch.rand(shape, generator=generator, dtype=torch.float64)
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

    def draw(self, p: torch.Tensor, batch: Optional[int], generator: torch.Generator, step: int) -> torch.Tensor:
        if batch is None and p.dim() == 1:
            return torch.rand((), generator=generator, dtype=torch.float64) < p
        width = p.shape[1] if p.dim() == 2 else batch
        u = torch.rand(1, width, generator=generator, dtype=torch.float64)
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

    def draw(self, p: torch.Tensor, batch: Optional[int], generator: torch.Generator, step: int) -> torch.Tensor:
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
