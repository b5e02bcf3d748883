"""The paper's experiment (spec §9): EM against ML-EM on a trained ladder, measured honestly.

For each sampler (DDPM, DDIM):
- the reference is the largest network with ``reference_steps`` (1000) steps; every method shares its initial
  noise and Brownian path (sample.py's streams), chunk by chunk;
- EM: every network at every step count of ``em_steps`` (the paper's protocol {250, ..., 1000} plus 50, 100);
- ML-EM with three networks, on several respaced grids, with the paper's strategies swept into cost–error curves:
  inverse cost (``p_l = min(1, c / C_l)``, alpha = gamma), the theory exponent (``p_l ∝ C_l^(-alpha/gamma)``,
  alpha = 1 + gamma/2 with the ladder's measured gamma), learned ``p_l(t)`` (spec §8, a Delta sweep), and
  stratified coins;
- T-Stitch: the small network first, the large one last, swept over the switch point.
Learning uses a selection set of noises and paths; every reported point comes from the held-out set.

Compute is measured three ways per sample: FLOPs (realised, by the core's exact rule), network evaluations,
and wall time. ``frontier.summarise`` turns the points into speedups; ``report.write_all`` writes the report.
What to run is an :class:`ExperimentConfig` (experiment_config.py); the gamma fits, the notes and ``rescore``
are in experiment_results.py. This module measures the points.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..random_streams import EXPERIMENT_SELECTION, derive_seed
from ..files import (DamagedFileError, append_line, atomic_write_json, atomic_write_text, check_writable_folder,
                     clean_stale_temporaries, read_json)
from ..learning import LearningProblem, PathSet, evaluate, fit_probabilities, shifted, sigmoid_from_probabilities
from ..probabilities import Adaptive, Constant, Sigmoid
from ..sde import MultilevelSDE
from .grids import save_image_grid
from .experiment_config import PROTOCOL_STEPS, STRATEGIES, ExperimentConfig, fixed_probabilities, network_flops
from .experiment_results import drift_gamma, ladder_gamma, rescore, run_notes, unthresholded_notes
from .levels import DenoiserLevel
from .sample import diffusion_of, brownian_path, build_drift, initial_noise, sample
from .schedule import NoiseSchedule, StepGrid, respaced_timesteps
from .stitch import stitch_sample

__all__ = ["ExperimentConfig", "Experiment", "run_experiment", "rescore", "network_flops", "fixed_probabilities",
           "PROTOCOL_STEPS", "STRATEGIES"]


@dataclass
class _Run:
    images: torch.Tensor
    flops: float
    calls: float
    seconds: float


class Experiment:
    """Runs the experiment on ``models`` (cheapest first, >= 2) for ``(C, H, W)`` images.

    ``out_dir`` receives ``points.jsonl`` as points are measured (a rerun with the same settings reuses them),
    then ``results.json``, ``report.md`` and the figures. ``names``: one per network (default ``net0``...).
    """

    def __init__(self, models: Sequence[nn.Module], image_shape: Sequence[int], config: ExperimentConfig,
                 out_dir, names: Optional[Sequence[str]] = None, device=None, progress: bool = True):
        self.models = list(models)
        if len(self.models) < 2:
            raise ValueError(f"the experiment needs a ladder of at least 2 networks, got {len(self.models)}")
        config = config.validate()
        self.schedule = _experiment_schedule(self.models, config)
        self.config = config = replace(config, schedule=self.schedule.kind, T=self.schedule.T)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.names = list(names) if names is not None else [f"net{i}" for i in range(len(self.models))]
        if len(self.names) != len(self.models):
            raise ValueError(f"names must have one entry per network ({len(self.models)}), got {self.names!r}")
        self.out = check_writable_folder(out_dir, "output folder")
        clean_stale_temporaries(self.out)  # left by a kill during an earlier run's writes
        _refuse_foreign_results(self.out / "results.json")
        self.device = torch.device(device) if device is not None else next(self.models[-1].parameters()).device
        self.flops = [network_flops(m, self.image_shape) for m in self.models]
        k = len(self.models)
        nets = config.mlem_networks or ((0, k // 2, k - 1) if k >= 3 else tuple(range(k)))
        if any(not 0 <= i < k for i in nets) or list(nets) != sorted(set(nets)):
            raise ValueError(f"mlem_networks must be increasing indices in [0, {k}), got {nets!r}")
        self.mlem_networks = tuple(nets)
        self.progress = progress
        self.key = self.config.key(self.models)
        self.points: list = []
        self.grids: dict = {}
        self._cache = self._load_cache()
        self.cached_points = len(self._cache)  # measured by an earlier run with the same key, reused
        self._bar = None
        self.expected_points = self.planned_points()

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _load_cache(self) -> dict:
        path = self.out / "points.jsonl"
        cache = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted write: measure it again
                    continue
                if row.get("config_key") == self.key:
                    cache[(row["sampler"], row["label"])] = row
        return cache

    def _record(self, point: dict, images: Optional[torch.Tensor] = None) -> None:
        point["config_key"] = self.key
        self.points.append(point)
        if images is not None:
            self.grids[(point["sampler"], point["label"])] = images[: self.config.grid_images].cpu()
        # fsync'ed line by line: a kill leaves whole lines and at most a cut last one (skipped on reading)
        append_line(self.out / "points.jsonl", json.dumps(point))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{point['sampler']} {point['label']}"[:60])

    def chunk_seeds(self, n: int, seed: int, batch: Optional[int] = None) -> list[tuple[int, int]]:
        """The ``(size, seed)`` of each chunk of an ``n``-image set drawn from ``seed`` (chunks of ``batch`` images;
        None: the configured batch): the noise of every sampled image is reproducible from these."""
        b = self.config.batch if batch is None else batch
        return [(min(b, n - i), derive_seed(seed, i // b)) for i in range(0, n, b)]

    def _run(self, run_one: Callable, n: int, seed: int, batch: Optional[int] = None) -> _Run:
        """Runs ``run_one(batch, seed) -> SampleResult`` over the chunks of an ``n``-image set (chunks of
        ``batch`` images; None: the configured batch)."""
        images, flops, calls, seconds = [], 0.0, 0.0, 0.0
        for size, chunk_seed in self.chunk_seeds(n, seed, batch):
            res = run_one(size, chunk_seed)
            images.append(res.images)
            flops += res.stats.cost if math.isnan(res.flops) else res.flops  # costs are given in FLOPs
            calls += float(sum(res.stats.evaluations))
            seconds += res.seconds
        return _Run(torch.cat(images), flops / n, calls / n, seconds / n)

    def _sample_fn(self, sampler: str, networks: Sequence[int], steps: int, **kwargs) -> Callable:
        models = [self.models[i] for i in networks]
        costs = [self.flops[i] for i in networks]

        def run_one(batch, seed):
            return sample(models, self.image_shape, batch=batch, method=sampler, steps=steps, schedule=self.schedule,
                          costs=costs, seed=seed, device=self.device, **kwargs)
        return run_one

    def measure(self, sampler: str, family: str, curve: str, label: str, run_one: Callable, reference, **info) -> None:
        """One point of a curve: ``run_one(batch, seed) -> SampleResult`` over the held-out chunks, its MSE to
        ``reference`` with a standard error (between coin patterns when a batch shares its coins), cost and time,
        recorded (and appended to ``points.jsonl``); a point already cached under ``(sampler, label)`` is reused."""
        cached = self._cache.get((sampler, label))
        if cached is not None:
            self.points.append(cached)
            if self._bar is not None:
                self._bar.update(1)
            return
        run = self._run(run_one, self.config.heldout, self.config.seed)
        err = (run.images - reference).pow(2).flatten(1).mean(1).double()
        if family == "mlem" and self.config.coupling == "batch":
            # the images of a batch share one coin pattern: the spread that matters is between patterns
            sizes = [size for size, _ in self.chunk_seeds(self.config.heldout, self.config.seed)]
            info["coin_patterns"] = len(sizes)
            err_se = _standard_error(torch.stack([chunk.mean() for chunk in err.split(sizes)]))
        else:
            err_se = _standard_error(err)
        point = dict(sampler=sampler, family=family, curve=curve, label=label, mse=float(err.mean()), mse_se=err_se,
                     flops=run.flops, calls=run.calls, seconds=run.seconds, **info)
        self._record(point, run.images)

    # -- the stages -----------------------------------------------------------------------------------
    def reference(self, sampler: str, n: int, seed: int) -> torch.Tensor:
        top = len(self.models) - 1
        run = self._run(self._sample_fn(sampler, [top], self.config.reference_steps), n, seed)
        return run.images

    def em(self, sampler: str, reference: torch.Tensor) -> None:
        for i, name in enumerate(self.names):
            curve = "EM top network" if i == len(self.models) - 1 else f"EM {name}"
            for steps in self.config.em_steps:
                self.measure(sampler, "em", curve, f"EM {name} {steps}", self._sample_fn(sampler, [i], steps),
                              reference, steps=steps, networks=[i], protocol=steps in PROTOCOL_STEPS)

    def threshold(self, sampler: str) -> float:
        given = (self.config.threshold or {}).get(sampler)
        if given is not None:
            return float(given)
        label = f"EM {self.names[-2]} {self.config.reference_steps}"
        for p in self.points:
            if p["sampler"] == sampler and p["label"] == label:
                return p["mse"]
        return float("nan")

    def gamma(self, sampler: str = "ddpm") -> Optional[dict]:
        """gamma from the 1000-step sample MSE of every network but the top against the top's (spec §9.7;
        ``experiment_results.ladder_gamma``)."""
        return ladder_gamma(self.points, self.names, self.config.reference_steps, sampler)

    def gamma_drift(self, differences: dict) -> Optional[dict]:
        """gamma from each network's distance to the top network's ``x0`` estimate along the reference trajectory
        (``experiment_results.drift_gamma``)."""
        return drift_gamma(differences, self.flops)

    def fixed(self, sampler: str, reference: torch.Tensor, gamma: Optional[float]) -> None:
        nets = self.mlem_networks
        costs = [self.flops[i] for i in nets]
        ratios = {}
        if "inverse-cost" in self.config.strategies:
            ratios["inverse-cost"] = 1.0
        if "theory" in self.config.strategies:
            if gamma is not None and math.isfinite(gamma) and gamma > 0:
                ratios["theory"] = (1.0 + gamma / 2.0) / gamma
            else:  # no gamma, no theory exponent: these points will not come
                self._skip(len(self.config.mlem_steps) * len(self.config.p_top) * len(self._coin_schemes("theory")))
        strategies = [(name + suffix, ratio, coins) for name, ratio in ratios.items()
                      for suffix, coins in self._coin_schemes(name)]
        for steps in self.config.mlem_steps:
            for name, ratio, coins in strategies:
                for p_top in self.config.p_top:
                    p = fixed_probabilities(costs, p_top, ratio)
                    fn = self._sample_fn(sampler, nets, steps, probabilities=Constant(p),
                                         coupling=self.config.coupling, coins=coins)
                    self.measure(sampler, "mlem", f"ML-EM {name} {steps}", f"ML-EM {name} {steps} p_top={p_top}",
                                  fn, reference, steps=steps, networks=list(nets), param=p_top, probabilities=p,
                                  coins=coins)

    def learned(self, sampler: str, reference: torch.Tensor) -> dict:
        """Learns ``p_l(t)`` on the selection set (spec §8; the fit is kept in ``learned_<sampler>.json`` and
        reused by a rerun with the same settings and weights), then sweeps Delta on the held-out set."""
        cfg, nets = self.config, self.mlem_networks
        saved = self.out / f"learned_{sampler}.json"
        info = None
        if saved.exists():
            try:
                info = read_json(saved, "learned probabilities")
            except DamagedFileError as err:  # a fit is cheap to redo: re-fit, do not fail
                warnings.warn(f"{err}; fitting the probabilities again", stacklevel=2)
            if not isinstance(info, dict) or not all(k in info for k in ("a", "b", "floor", "time_scale")):
                info = None
        if info is None or info.get("config_key") != self.key:
            info = self.fit(sampler)
            atomic_write_json(saved, info, indent=1)
        schedule = Sigmoid(info["a"], info["b"], floor=info["floor"], time_scale=info["time_scale"])
        for steps in cfg.mlem_steps:
            for suffix, coins in self._coin_schemes("learned"):
                for delta in cfg.deltas:
                    fn = self._sample_fn(sampler, nets, steps, probabilities=shifted(schedule, delta),
                                         coupling=cfg.coupling, coins=coins)
                    self.measure(sampler, "mlem", f"ML-EM learned{suffix} {steps}",
                                  f"ML-EM learned{suffix} {steps} delta={delta:+g}", fn, reference, steps=steps,
                                  networks=list(nets), param=delta, coins=coins)
        return info

    def adaptive(self, sampler: str, reference: torch.Tensor) -> dict:
        """Giles' variance-optimal probabilities (``mlsde.Adaptive``, ``p_l(t) = min(1, c h sqrt(V_l(t)/C_l))``):
        on each ML-EM grid a pilot -- the top network's EM on the selection set's noise and path -- measures every
        level difference's variance ``V_l(t)``; ``c`` is then set so that the expected cost per path equals the
        inverse-cost strategy's at each ``p_top``, so the two curves are compared at the same nominal costs. Every
        reported point comes from the held-out set. Returns the pilots' variances and each point's ``c``."""
        cfg, nets = self.config, self.mlem_networks
        costs = [self.flops[i] for i in nets]
        chunk_seed, x_T = self._selection_noise()
        x_T = x_T.reshape(x_T.shape[0], -1)
        info = {}
        for steps in cfg.mlem_steps:
            grid = StepGrid(self.schedule, respaced_timesteps(self.schedule.T, steps), sampler)
            levels = [DenoiserLevel(self.models[i], grid, self.image_shape, device=self.device) for i in nets]
            diffusion = diffusion_of(grid, self.device) if sampler == "ddpm" else 0.0
            pilot = Adaptive.pilot(levels, x_T, float(grid.times[0]), float(grid.times[-1]), None, diffusion,
                                   seed=chunk_seed, grid=grid.times)
            scales = []
            for p_top in cfg.p_top:
                budget = steps * sum(p * c for p, c in zip(fixed_probabilities(costs, p_top), costs))
                schedule = pilot.scaled(None, costs, cost=budget, grid=grid.times)
                scales.append(schedule.c)
                for suffix, coins in self._coin_schemes("adaptive"):
                    fn = self._sample_fn(sampler, nets, steps, probabilities=schedule, coupling=cfg.coupling,
                                         coins=coins)
                    self.measure(sampler, "mlem", f"ML-EM adaptive{suffix} {steps}",
                                  f"ML-EM adaptive{suffix} {steps} p_top={p_top}", fn, reference, steps=steps,
                                  networks=list(nets), param=p_top, coins=coins)
            info[str(steps)] = dict(times=grid.times[:-1].tolist(), variances=pilot.variances.tolist(),
                                    c=scales, p_top=list(cfg.p_top))
        return info

    def _coin_schemes(self, strategy: str) -> list:
        """``(curve-name suffix, coins)`` pairs a strategy runs with: independent coins, and stratified or
        comonotone ones when the config asks for them."""
        return ([("", "independent")] + ([(" stratified", "stratified")] if strategy in self.config.stratified else [])
                + ([(" comonotone", "comonotone")] if strategy in self.config.comonotone else []))

    def _selection_noise(self) -> tuple:
        """``(seed, x_T (select, C, H, W))`` of the selection set: one chunk whatever the held-out batch (learning
        and the adaptive pilot run on the whole set at once), so its noise and path come from that chunk's seed,
        as in its reference."""
        n = self.config.select
        chunk_seed = self.chunk_seeds(n, derive_seed(self.config.seed, EXPERIMENT_SELECTION), batch=n)[0][1]
        return chunk_seed, initial_noise((n, *self.image_shape), chunk_seed, self.device)

    def fit(self, sampler: str) -> dict:
        """Fits a ``Sigmoid`` schedule on the selection set, from inverse cost at the median ``p_top``, with the
        regulariser weighing as much as the error at the start (spec §8.2); the Delta sweep sets the cost."""
        cfg, nets = self.config, self.mlem_networks
        costs = [self.flops[i] for i in nets]
        sel_seed = derive_seed(cfg.seed, EXPERIMENT_SELECTION)
        grid = StepGrid(self.schedule, respaced_timesteps(self.schedule.T, cfg.learn_grid), sampler)
        start_p = fixed_probabilities(costs, float(np.median(cfg.p_top)))
        drift = build_drift([self.models[i] for i in nets], grid, self.image_shape, Constant(start_p), costs,
                            "sample", device=self.device, seed=sel_seed)
        problem = LearningProblem(drift, MultilevelSDE(drift, diffusion_of(grid, self.device)), grid=grid.times)
        n = cfg.select
        # learning runs on the whole selection set at once, so the set is one chunk whatever the held-out batch:
        # its noise and path come from that chunk's seed, as in its reference
        ref = self._run(self._sample_fn(sampler, [len(self.models) - 1], cfg.reference_steps), n, sel_seed,
                        batch=n).images
        chunk_seed, x_T = self._selection_noise()
        bm = brownian_path(grid, n, int(np.prod(self.image_shape)), chunk_seed, self.device, x_T.dtype)
        paths = PathSet(x_T.reshape(n, -1), bm, ref.reshape(n, -1).to(x_T.device))
        init = sigmoid_from_probabilities(start_p, time_scale=1.0 / float(grid.times[-1]))
        before = evaluate(problem, init, paths, seed=sel_seed)
        lam = before.error / max(before.theory_cost, 1e-30)
        start = time.perf_counter()
        fit = fit_probabilities(problem, init, paths, lam=lam, steps=cfg.learn_steps,
                                batch=min(cfg.learn_batch, n), seed=sel_seed, progress=self.progress)
        seconds = time.perf_counter() - start
        after = evaluate(problem, fit.schedule, paths, seed=sel_seed)
        return dict(a=fit.schedule.a.tolist(), b=fit.schedule.b.tolist(), floor=fit.schedule.floor,
                    time_scale=fit.schedule.time_scale, lam=lam, grid_steps=cfg.learn_grid, select=n,
                    sgd_steps=cfg.learn_steps, seconds=seconds, start_probabilities=start_p,
                    selection_error_before=before.error, selection_error_after=after.error,
                    selection_cost_before=before.cost, selection_cost_after=after.cost, config_key=self.key)

    def tstitch(self, sampler: str, reference: torch.Tensor) -> None:
        small, large = self.mlem_networks[0], len(self.models) - 1
        costs = [self.flops[small], self.flops[large]]
        for steps in self.config.tstitch_steps:
            for frac in self.config.tstitch_fractions:
                switch = int(round(frac * steps))

                def run_one(batch, seed, steps=steps, switch=switch):
                    return stitch_sample(self.models[small], self.models[large], self.image_shape, switch,
                                         batch=batch, method=sampler, steps=steps, costs=costs,
                                         schedule=self.schedule, seed=seed, device=self.device)
                self.measure(sampler, "tstitch", f"T-Stitch {steps}", f"T-Stitch {steps} small={frac:g}", run_one,
                              reference, steps=steps, networks=[small, large], param=frac)

    def level_differences(self, sampler: str = "ddpm", n: int = 16, checkpoints: int = 10) -> dict:
        """RMS of the clipped ``x0`` estimates' differences between networks along the reference trajectory
        (first ``n`` held-out images), at ``checkpoints`` timesteps; and of each network to the top."""
        steps = self.config.reference_steps
        grid = StepGrid(self.schedule, respaced_timesteps(self.schedule.T, steps), sampler)
        keep = set(np.linspace(0, steps - 2, checkpoints).round().astype(int).tolist())
        states = {}
        seed = self.chunk_seeds(self.config.heldout, self.config.seed)[0][1]
        top = self.models[-1]
        sample(top, self.image_shape, batch=min(n, self.config.batch), method=sampler, steps=steps,
               schedule=self.schedule, seed=seed, device=self.device,
               callback=lambda i, x: states.__setitem__(i, x.clone()) if i in keep else None)
        levels = [DenoiserLevel(m, grid, self.image_shape, device=self.device) for m in self.models]
        timesteps, adjacent, to_top = [], [], []
        with torch.no_grad():  # the state after step i lies at times[i + 1]
            for i in sorted(states):
                s = torch.as_tensor(grid.times[i + 1], dtype=torch.float64)
                x = states[i]
                x0 = [lvl.denoised(s, x) for lvl in levels]
                timesteps.append(int(grid.timesteps[i + 1]))
                adjacent.append([float((b - a).pow(2).mean().sqrt()) for a, b in zip(x0, x0[1:])])
                to_top.append([float((a - x0[-1]).pow(2).mean().sqrt()) for a in x0[:-1]])
        pairs = [f"{a} → {b}" for a, b in zip(self.names, self.names[1:])]
        return dict(timesteps=timesteps, pairs=pairs, rms=np.asarray(adjacent).T.tolist(),
                    to_top=np.asarray(to_top).T.tolist(), quantity="RMS of clipped x0 estimates (pixels in [-1, 1])")

    def _skip(self, count: int) -> None:
        self.expected_points -= count
        if self._bar is not None:
            self._bar.total = self.expected_points
            self._bar.refresh()

    # -- the whole run --------------------------------------------------------------------------------
    def planned_points(self) -> int:
        """The number of points the configuration plans (``expected_points`` starts here and drops by the skipped
        ones, e.g. theory points when γ is not identified)."""
        cfg = self.config
        fixed = len(cfg.p_top) * sum(len(self._coin_schemes(s)) for s in ("inverse-cost", "theory", "adaptive")
                                     if s in cfg.strategies)
        learned = len(cfg.deltas) * len(self._coin_schemes("learned")) * ("learned" in cfg.strategies)
        per = (len(self.models) * len(cfg.em_steps) + len(cfg.mlem_steps) * (fixed + learned)
               + len(cfg.tstitch_steps) * len(cfg.tstitch_fractions))
        return per * len(cfg.samplers)

    def run(self, title: str = "EM vs ML-EM", command: str = "") -> dict:
        from tqdm.auto import tqdm

        from .frontier import summarise
        from .report import write_all

        cfg = self.config
        started = time.perf_counter()
        self.expected_points = self.planned_points()
        self._bar = tqdm(total=self.expected_points, desc="experiment", disable=not self.progress)
        thresholds, learned, adaptive, gamma, gamma_drift, differences = {}, {}, {}, None, None, None
        try:
            for sampler in cfg.samplers:
                self._bar.set_postfix_str(f"{sampler} reference")
                reference = self.reference(sampler, cfg.heldout, cfg.seed)
                self.grids[(sampler, "reference")] = reference[: cfg.grid_images].cpu()
                self.em(sampler, reference)
                thresholds[sampler] = self.threshold(sampler)
                if gamma is None:
                    gamma = self.gamma(sampler)
                    differences = self.level_differences(sampler)
                    gamma_drift = self.gamma_drift(differences)
                self.fixed(sampler, reference, None if gamma is None else gamma["gamma"])
                if "learned" in cfg.strategies:
                    learned[sampler] = self.learned(sampler, reference)
                if "adaptive" in cfg.strategies:
                    adaptive[sampler] = self.adaptive(sampler, reference)
                self.tstitch(sampler, reference)
        finally:
            self._bar.close()
        summary = summarise(self.points, thresholds)
        unthresholded = summarise(self.points, {sampler: 0.0 for sampler in thresholds})
        results = dict(title=title, command=command, config=asdict(cfg), image_shape=list(self.image_shape),
                       networks=[dict(name=n, flops=f, params=_num_parameters(m))
                                 for n, f, m in zip(self.names, self.flops, self.models)],
                       mlem_networks=[self.names[i] for i in self.mlem_networks], thresholds=thresholds,
                       gamma=gamma, gamma_drift=gamma_drift, learned=learned, adaptive=adaptive,
                       level_differences=differences,
                       points=self.points, summary=summary, summary_no_threshold=unthresholded,
                       notes=run_notes(gamma, gamma_drift) + unthresholded_notes(unthresholded), figures=[],
                       seconds=time.perf_counter() - started)
        results["figures"] += self.save_grids(summary)
        write_all(results, self.out)
        atomic_write_json(self.out / "results.json", results, indent=1, default=float)
        return results

    def save_grids(self, summary: dict) -> list:
        """PNG rows per sampler: the reference; the most accurate point of the best ML-EM curve (of any ML-EM
        curve when none has a speedup); EM with the top network at the nearest FLOPs."""
        from .frontier import best_curve

        names = []
        for sampler in self.config.samplers:
            ref = self.grids.get((sampler, "reference"))
            best = best_curve(summary, sampler, family="mlem") if sampler in summary else None  # None: no speedup
            mlem = [p for p in self.points if p["sampler"] == sampler and p["family"] == "mlem"
                    and (best is None or p["curve"] == best)]
            em = [p for p in self.points if p["sampler"] == sampler and p["curve"] == "EM top network"]
            if ref is None or not mlem or not em:
                continue
            chosen = min(mlem, key=lambda p: p["mse"])
            twin = min(em, key=lambda p: abs(math.log(p["flops"] / chosen["flops"])))
            rows = [self.grids.get((sampler, p["label"])) for p in (twin, chosen)]
            if any(r is None for r in rows):  # points reused from a cache have no images
                continue
            name = f"samples_{sampler}.png"
            save_image_grid(torch.cat([ref, *rows]), self.out / name, nrow=ref.shape[0],
                            scale=max(1, 96 // self.image_shape[-1]))
            atomic_write_text(self.out / f"samples_{sampler}.txt",
                f"rows: reference ({self.config.reference_steps} steps, top network); {twin['label']} "
                f"({twin['flops']:.3g} FLOPs, MSE {twin['mse']:.3g}); {chosen['label']} "
                f"({chosen['flops']:.3g} FLOPs, MSE {chosen['mse']:.3g})\n")
            names.append(name)
        return names


def run_experiment(models: Sequence[nn.Module], image_shape: Sequence[int], out_dir,
                   config: Optional[ExperimentConfig] = None, **kwargs) -> dict:
    """``Experiment(models, image_shape, config, out_dir, **kwargs).run()``; see :class:`Experiment`."""
    run_kwargs = {k: kwargs.pop(k) for k in ("title", "command") if k in kwargs}
    return Experiment(models, image_shape, config or ExperimentConfig(), out_dir, **kwargs).run(**run_kwargs)


def _experiment_schedule(models: Sequence[nn.Module], config: ExperimentConfig) -> NoiseSchedule:
    """The schedule the experiment samples with: the one the networks were trained with (recorded by
    ``load_level``), unless ``config.schedule``/``config.T`` say otherwise -- which is refused when it differs."""
    from .schedule import same_schedule
    from .train import trained_schedule

    trained = trained_schedule(models)  # a ladder mixing schedules is refused here, naming the files
    if trained is None:
        schedule = NoiseSchedule.named(config.schedule or "cosine", config.T or 1000)
    else:
        schedule = NoiseSchedule.named(config.schedule or trained.kind, config.T or trained.T)
        if not same_schedule(schedule, trained):
            raise ValueError(f"the experiment's schedule ({schedule.kind}, T={schedule.T}) is not the one the "
                             f"networks were trained with ({trained.kind}, T={trained.T}); leave "
                             "ExperimentConfig.schedule and T as None to sample with it")
    for name in ("reference_steps", "learn_grid"):
        if getattr(config, name) > schedule.T:
            raise ValueError(f"{name}={getattr(config, name)} exceeds the {schedule.T} steps of the noise schedule "
                             f"({schedule.kind}, T={schedule.T}); lower it to at most {schedule.T}")
    return schedule


def _refuse_foreign_results(path: Path) -> None:
    """An experiment replaces its own ``results.json`` only: a readable one that is not an experiment's is kept
    (a damaged one is rebuilt: the measured points are cached in ``points.jsonl``)."""
    if not path.exists():
        return
    try:
        existing = read_json(path)
    except DamagedFileError:
        return
    if not (isinstance(existing, dict) and "points" in existing):
        raise ValueError(f"{os.fspath(path)!r} exists and is not an experiment's results.json; it will not be "
                         "overwritten: choose another output folder")


def _standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of ``values`` (NaN for a single value: its spread is unknown)."""
    n = values.numel()
    return float(values.std() / math.sqrt(n)) if n > 1 else float("nan")


def _num_parameters(model: nn.Module) -> int:
    """The parameters a level reads (a nested level's own slices, not the whole shared network)."""
    count = getattr(model, "num_parameters", None)
    return int(count) if count is not None else sum(p.numel() for p in model.parameters())
