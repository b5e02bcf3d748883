"""What the paper's experiment runs (:class:`ExperimentConfig`, whose ``key`` names the cached points it may
reuse), and two rules it uses: :func:`network_flops` (a network's price) and :func:`fixed_probabilities` (the
inverse-cost and theory strategies' ``p_l``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from torch import nn

from .unet import unet_flops

__all__ = ["ExperimentConfig", "PROTOCOL_STEPS", "STRATEGIES", "network_flops", "fixed_probabilities"]

PROTOCOL_STEPS = (250, 500, 750, 900, 1000)
STRATEGIES = ("inverse-cost", "theory", "learned", "adaptive")
_KEY_FIELDS = ("heldout", "select", "batch", "reference_steps", "mlem_networks", "coupling", "learn_steps",
               "learn_batch", "learn_grid", "schedule", "seed")


def _option(value, help: str, **cli):
    """A field (default ``value``) that is an option of ``mlsde experiment``: its help and argparse settings
    (``cli``, see ``cli.add_dataclass_options``: e.g. ``choices``; ``items``, the type of a tuple's items;
    ``off``, the option's value that means None; ``keep_empty``, keep empty names for validation to refuse)."""
    return field(default=value, metadata={"help": help, "cli": cli})


@dataclass
class ExperimentConfig:
    """What to run. Sizes are numbers of images; ``heldout`` images give every reported point.

    Attributes:
        heldout, select: images in the held-out (reported) and selection (learning) sets.
        batch: images per sampling call (the held-out set runs in chunks of this size; the selection set is
            always one chunk of ``select`` images).
        samplers: ``("ddpm", "ddim")`` or a subset.
        em_steps: EM step counts (every network); ``reference_steps`` the reference's. The paper's protocol is
            {250, ..., 1000}; the default adds 10 to 100 steps, so that EM's frontier is measured where ML-EM's
            cheap points lie (interpolating across a gap in it would credit ML-EM with a speedup EM has).
        mlem_networks: indices of the three ML-EM networks, cheapest first (None: smallest, middle, largest).
        mlem_steps: the grids ML-EM runs on.
        p_top: the sweep of the fixed strategies, by the top network's probability.
        strategies: any of "inverse-cost", "theory", "learned", "adaptive" (Giles' variance-optimal rule,
            ``mlsde.Adaptive``: a pilot on the selection set, scaled to the inverse-cost points' nominal costs).
        stratified: the strategies also run with stratified coins (``StratifiedCoins``, the same probabilities;
            a learned schedule is fitted with independent coins and only evaluated with stratified ones).
        comonotone: the strategies also run with comonotone coins (``ComonotoneCoins``: one uniform per step
            shared by the levels; unbiased like independent coins), evaluated like ``stratified``.
        coupling: ML-EM coins per sample ("sample": the measured MSE is the mean over coin draws) or shared by
            a batch ("batch", the paper's GPU batching).
        learn_steps, learn_batch, learn_grid, deltas: the learned strategy: SGD steps, paths per step, the
            grid it learns on, and the Delta sweep.
        tstitch_fractions, tstitch_steps: T-Stitch switch points (fraction of steps on the small network).
        threshold: MSE threshold per sampler (None: top vs second-largest network at ``reference_steps``).
        schedule, T: the noise schedule to sample with ("cosine" or "linear") and its steps. None: the one the
            networks were trained with (``load_level`` records it from the checkpoint), else cosine and 1000. A
            schedule given that differs from the recorded one is refused (``Experiment`` raises ValueError).
        seed: the held-out set's seed (the selection set's is derived from it).

    A field with a ``metadata["help"]`` is an option of ``mlsde experiment`` (``cli.add_dataclass_options``: a
    tuple is a comma-separated list), with that help and the field's default.
    """

    heldout: int = _option(64, "held-out images: every reported point is measured on them")
    select: int = _option(32, "selection images: the learned probabilities are fitted on them")
    batch: int = _option(64, "images per sampling call (the held-out set runs in chunks of this size)")
    samplers: tuple = _option(("ddpm", "ddim"), "comma-separated samplers: ddpm, ddim", keep_empty=True)
    em_steps: tuple = _option((10, 25, 50, 100) + PROTOCOL_STEPS, "comma-separated step counts of EM with every "
                                                                  "network")
    reference_steps: int = _option(1000, "steps of the reference (EM with the top network) that every MSE is "
                                         "measured against")
    mlem_networks: Optional[tuple] = _option(None, "comma-separated ladder indices of the ML-EM networks, cheapest "
                                                   "first, e.g. 0,2,4 (default: smallest, middle, largest)",
                                             items=int, off="")
    mlem_steps: tuple = _option((1000, 500, 250), "comma-separated step counts of the grids ML-EM runs on")
    p_top: tuple = _option((0.5, 0.25, 0.1, 0.05, 0.02), "comma-separated sweep of the fixed strategies, by the top "
                                                         "network's probability")
    strategies: tuple = _option(("inverse-cost", "theory", "learned"), "comma-separated ML-EM strategies: any of "
                                "inverse-cost, theory, learned, adaptive (the variance-optimal rule from a pilot)",
                                keep_empty=True)
    stratified: tuple = _option(("inverse-cost",), "comma-separated strategies also run with stratified coins "
                                                   "(default: %(default)s)")
    comonotone: tuple = _option((), "comma-separated strategies also run with comonotone coins (one uniform per step "
                                    "shared by the levels; unbiased)", items=str)
    coupling: str = _option("sample", "ML-EM coins drawn per sample, or shared by a batch (the paper's GPU batching)",
                            choices=["sample", "batch"])
    learn_steps: int = _option(20, "SGD steps of the learned strategy")
    learn_batch: int = _option(32, "paths per SGD step of the learned strategy")
    learn_grid: int = _option(250, "steps of the grid the learned strategy is fitted on")
    deltas: tuple = _option((-2.0, -1.0, 0.0, 1.0, 2.0), "comma-separated shifts Delta of the learned logits (a_l + "
                                                         "Delta): its cost-error curve")
    tstitch_fractions: tuple = _option((0.2, 0.4, 0.6, 0.8), "comma-separated T-Stitch switch points: fraction of the "
                                                             "steps on the small network")
    tstitch_steps: tuple = _option((1000, 250), "comma-separated step counts of the T-Stitch runs")
    threshold: Optional[dict] = None  # mlsde experiment --threshold-ddpm/--threshold-ddim (cli.py)
    schedule: Optional[str] = None
    seed: int = _option(0, "seed of the held-out set (the selection set's is derived from it)")
    grid_images: int = 8
    T: Optional[int] = None

    def validate(self) -> "ExperimentConfig":
        """Checks every field (a ValueError names the bad one) and returns ``self``; an older boolean
        ``stratified`` becomes the tuple it meant."""
        if self.schedule not in (None, "cosine", "linear"):
            raise ValueError(f"schedule must be None, 'cosine' or 'linear', got {self.schedule!r}")
        if self.T is not None and (isinstance(self.T, bool) or not isinstance(self.T, int) or self.T < 1):
            raise ValueError(f"T must be None or a positive integer, got {self.T!r}")
        for name in ("heldout", "select", "batch", "learn_steps", "learn_batch", "reference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        bad = set(self.samplers) - {"ddpm", "ddim"}
        if bad or not self.samplers:
            raise ValueError(f"samplers must be a non-empty subset of ('ddpm', 'ddim'), got {self.samplers!r}")
        if isinstance(self.stratified, bool):  # the older flag: inverse cost with stratified coins, or nothing
            self.stratified = ("inverse-cost",) if self.stratified else ()
        for name in ("strategies", "stratified", "comonotone"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a tuple of strategy names, got the string {getattr(self, name)!r}")
            bad = set(getattr(self, name)) - set(STRATEGIES)
            if bad:
                raise ValueError(f"unknown {name} {sorted(bad)}; known: {', '.join(STRATEGIES)}")
        for name in ("em_steps", "mlem_steps", "tstitch_steps"):
            for s in getattr(self, name):
                if not isinstance(s, int) or not 1 <= s <= self.reference_steps:
                    raise ValueError(f"{name} must hold integers in [1, {self.reference_steps}], got {s!r}")
        for p in self.p_top:
            if not 0 < p <= 1:
                raise ValueError(f"p_top values must lie in (0, 1], got {p!r}")
        for f in self.tstitch_fractions:
            if not 0 <= f <= 1:
                raise ValueError(f"tstitch_fractions must lie in [0, 1], got {f!r}")
        if self.coupling not in ("sample", "batch"):
            raise ValueError(f"coupling must be 'sample' or 'batch', got {self.coupling!r}")
        nets = self.mlem_networks
        if nets is not None and (not nets or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in nets)
                                 or list(nets) != sorted(set(nets))):
            raise ValueError(f"mlem_networks must be increasing indices >= 0, got {nets!r}")
        return self

    def key(self, models: Sequence[nn.Module] = ()) -> str:
        """A short hash of what a point's value depends on besides its label: the held-out set, the reference,
        the coins' coupling, the ML-EM networks, the learning settings, and the networks' weights. A cached
        point is reused only under the same key, so sweeps can be extended (more step counts, more ``p_top``)
        without measuring the old points again."""
        fields = {name: getattr(self, name) for name in _KEY_FIELDS}
        if fields["schedule"] is None:  # the default, cosine (keys of earlier runs stay valid)
            fields["schedule"] = "cosine"
        if self.T not in (None, 1000):
            fields["T"] = self.T
        fields["learn_start"] = float(np.median(self.p_top))  # the learned fit starts from it
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode())
        for model in models:
            for name, tensor in model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]


def network_flops(model: nn.Module, image_shape: Sequence[int]) -> float:
    """FLOPs per sample of one forward of ``model`` on ``(C, H, W)`` images (``unet.unet_flops``)."""
    channels, height, width = image_shape
    return unet_flops(model, (int(height), int(width)), int(channels))


def fixed_probabilities(costs: Sequence[float], p_top: float, alpha_over_gamma: float = 1.0) -> list:
    """``p_l = min(1, p_top (C_top / C_l)^(alpha/gamma))``, with ``p = 1`` for the cheapest network (it is the
    base of the telescoping sum and is paid every step anyway). ``alpha/gamma = 1`` is inverse cost."""
    top = costs[-1]
    p = [min(1.0, p_top * (top / c) ** alpha_over_gamma) for c in costs]
    p[0] = 1.0
    return p
