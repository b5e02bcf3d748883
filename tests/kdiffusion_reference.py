"""k-diffusion's Euler sampler and discrete denoiser wrapper, to test the library against.

:func:`load` returns k-diffusion's own ``sampling`` and ``external`` modules when the package is installed. The
package's ``__init__`` imports all of it (wandb, clip, kornia, torchvision, ...), so a full install is heavy; its
``sampling.py`` and ``external.py`` need only torch, scipy, torchsde, torchdiffeq and tqdm (the library's own
dependencies) plus ``utils.py``, whose torchvision import serves only its PIL helpers. So ``pip install --no-deps
k-diffusion`` is enough: the two modules are loaded from the installed files without running the package's
``__init__`` (torchvision stubbed for ``utils.py`` alone when it is absent).

Without k-diffusion, :func:`load` returns the faithful copy below (``real = False``) of the functions the tests
use, from k-diffusion 0.1.1.post1 (https://github.com/crowsonkb/k-diffusion, ``k_diffusion/sampling.py``,
``external.py``, ``utils.py``; progress bar dropped), under its MIT licence:

    Copyright (c) 2022 Katherine Crowson

    Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
    associated documentation files (the "Software"), to deal in the Software without restriction, including
    without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
    following conditions:

    The above copyright notice and this permission notice shall be included in all copies or substantial
    portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
    LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
    EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
    IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE
    USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn


# ---- the copy (k-diffusion 0.1.1.post1) ---------------------------------------------------------------------

def append_dims(x, target_dims):
    """Appends dimensions to the end of a tensor until it has target_dims dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f'input has {x.ndim} dims but target_dims is {target_dims}, which is less')
    return x[(...,) + (None,) * dims_to_append]


def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """Constructs the noise schedule of Karras et al. (2022)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def to_d(x, sigma, denoised):
    """Converts a denoiser output to a Karras ODE derivative."""
    return (x - denoised) / append_dims(sigma, x.ndim)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        eps = torch.randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigma_hat, 'denoised': denoised})
        dt = sigmas[i + 1] - sigma_hat
        # Euler method
        x = x + d * dt
    return x


class DiscreteSchedule(nn.Module):
    """A mapping between continuous noise levels (sigmas) and a list of discrete noise
    levels."""

    def __init__(self, sigmas, quantize):
        super().__init__()
        self.register_buffer('sigmas', sigmas)
        self.register_buffer('log_sigmas', sigmas.log())
        self.quantize = quantize

    def sigma_to_t(self, sigma, quantize=None):
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = (low - log_sigma) / (low - high)
        w = w.clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)


class DiscreteEpsDDPMDenoiser(DiscreteSchedule):
    """A wrapper for discrete schedule DDPM models that output eps (the predicted
    noise)."""

    def __init__(self, model, alphas_cumprod, quantize):
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize)
        self.inner_model = model
        self.sigma_data = 1.

    def get_scalings(self, sigma):
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return c_out, c_in

    def get_eps(self, *args, **kwargs):
        return self.inner_model(*args, **kwargs)

    def forward(self, input, sigma, **kwargs):
        c_out, c_in = [append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out


# ---- the real package, without its heavy imports -------------------------------------------------------------

def _load_real():
    """``(sampling, external)`` of the installed k-diffusion, or None when it is not installed."""
    try:  # a full install
        import k_diffusion

        return k_diffusion.sampling, k_diffusion.external
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        del sys.modules[name]  # what the failed import left
    spec = importlib.util.find_spec("k_diffusion")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:  # utils.py imports it for its PIL helpers only
        stubs = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                                   "torchvision.transforms.functional")}
        stubs["torchvision"].transforms = stubs["torchvision.transforms"]
        stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    saved = dict(sys.modules)
    try:
        sys.modules.update(stubs)
        sys.modules["k_diffusion"] = package
        loaded = {}
        for name in ("utils", "sampling", "external"):
            sub = importlib.util.spec_from_file_location(f"k_diffusion.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(sub)
            sys.modules[sub.name] = module
            sub.loader.exec_module(module)
            setattr(package, name, module)
            loaded[name] = module
        return loaded["sampling"], loaded["external"]
    except (ImportError, OSError):  # a partial or broken install: use the copy
        return None
    finally:  # leave sys.modules as it was: the modules live on in what is returned
        for name in list(sys.modules):
            if name not in saved:
                del sys.modules[name]


def load():
    """A namespace with ``get_sigmas_karras``, ``sample_euler``, ``to_d``, ``DiscreteEpsDDPMDenoiser`` and ``real``
    (True: k-diffusion's own code; False: the copy above)."""
    real = _load_real()
    if real is None:
        return types.SimpleNamespace(get_sigmas_karras=get_sigmas_karras, sample_euler=sample_euler, to_d=to_d,
                                     DiscreteEpsDDPMDenoiser=DiscreteEpsDDPMDenoiser, real=False)
    sampling, external = real
    return types.SimpleNamespace(get_sigmas_karras=sampling.get_sigmas_karras, sample_euler=sampling.sample_euler,
                                 to_d=sampling.to_d, DiscreteEpsDDPMDenoiser=external.DiscreteEpsDDPMDenoiser,
                                 real=True)
