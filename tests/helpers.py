"""Small ladders and statistical helpers shared by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

DTYPE = torch.float64


def affine_ladder(k: int, d: int, seed: int, scale: float = 1.0):
    """Levels ``f^l(t, y) = y @ A_l.T + b_l + sin(t)`` whose differences shrink like ``2^-l``.

    Returns ``(levels, A, b)`` with ``A`` of shape ``(k, d, d)`` and ``b`` of shape ``(k, d)``.
    """
    gen = torch.Generator().manual_seed(seed)
    A = torch.zeros(k, d, d, dtype=DTYPE)
    b = torch.zeros(k, d, dtype=DTYPE)
    base = -torch.eye(d, dtype=DTYPE)
    for l in range(k):
        A[l] = base + scale * sum(
            2.0**-j * torch.randn(d, d, generator=gen, dtype=DTYPE) / d**0.5 for j in range(1, l + 2)
        )
        b[l] = scale * sum(2.0**-j * torch.randn(d, generator=gen, dtype=DTYPE) for j in range(1, l + 2))
    levels = [(lambda t, y, M=A[l], c=b[l]: y @ M.T + c) for l in range(k)]
    return levels, A, b


def mean_within(samples: torch.Tensor, expected: torch.Tensor, std: torch.Tensor, n_se: float = 5.0) -> None:
    """Asserts ``|mean(samples) - expected| <= n_se * std / sqrt(n)`` entrywise (samples on dim 0)."""
    n = samples.shape[0]
    err = (samples.mean(0) - expected).abs()
    bound = n_se * std / n**0.5 + 1e-12
    assert (err <= bound).all(), f"mean off by {err.max():.4g} (bound {bound[err.argmax() // 1].max():.4g})"


def moment_within(values: torch.Tensor, expected: torch.Tensor, n_se: float = 5.0) -> None:
    """Asserts the sample mean of i.i.d. ``values`` matches ``expected`` within ``n_se`` empirical SEs."""
    n = values.shape[0]
    se = values.std(0) / n**0.5
    err = (values.mean(0) - expected).abs()
    assert (err <= n_se * se + 1e-12).all(), f"moment off by {err.max():.4g}, {n_se} SE = {(n_se * se).max():.4g}"


def mlp(d: int, width: int, seed: int) -> torch.nn.Module:
    """A float64 ``Linear(d, width) - Tanh - Linear(width, d)`` with weights from an explicit generator."""
    net = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, d)).to(DTYPE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=DTYPE) / param.shape[-1] ** 0.5)
    return net


class SharedPath:
    """A Brownian path of batch 1 served to a whole batch (every sample sees the same noise)."""

    def __init__(self, bm, batch):
        self.bm, self.shape, self.dtype, self.device = bm, (batch, bm.shape[1]), bm.dtype, bm.device
        self.levy_area_approximation = "none"

    def __call__(self, ta, tb):
        return self.bm(ta, tb).expand(self.shape)


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:  # as when the script runs: its folder's modules (run_info) are importable
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
