"""Training one level (:func:`train_level`): eps-prediction with Adam and an EMA (the paper's way), distillation from
a larger level, or every width of a ``NestedUNet`` at once; resumable, with held-out losses, under ``torchrun``.

**Objective.** ``t ~ Uniform{1, ..., T}`` per sample, ``noise ~ N(0, I)``, ``x_t = q_sample(x0, t, noise)`` and
the loss is ``MSE(model(x_t, t), target)`` (mean over every element):

- plain training: ``target = noise`` (DDPM's "simple" loss);
- distillation (``teacher`` / ``TrainConfig.distill_from``): ``target = mix * teacher(x_t, t) + (1 - mix) * noise``
  with ``mix = TrainConfig.distill_mix`` (default 1: pure distillation). The teacher runs without gradients, in
  eval mode; a checkpoint path loads its EMA weights. For any ``mix`` this is, up to a constant,
  ``mix * ||f - teacher||^2 + (1 - mix) * ||f - noise||^2``. Regressing a small level on the larger one shrinks
  ``f^l - f^{l-1}``, which drives ML-EM's variance (``level_differences`` measures it);
- a ``NestedUNet``: every width on the same batch, ``nested.nested_loss``.

The log's ``eps_loss`` is always the plain loss against the true noise, so every way is comparable.

**Optimiser.** Adam (``lr``, betas 0.9/0.999, optional ``weight_decay``) whose rate a ``LambdaLR`` sets each step to
:func:`learning_rate` (linear warm-up, constant, optional linear decay over the last ``decay`` steps), gradient-norm
clipping (``grad_clip``), optional bf16 autocast (the loss is taken in float32). The EMA is a
``torch.optim.swa_utils.AveragedModel`` of every parameter (buffers copied) that starts from the initial weights:
``ema <- d ema + (1 - d) w`` with ``d = min(ema_decay, (1 + n) / (10 + n))`` at step ``n`` when ``ema_warmup``,
else ``d = ema_decay``. Sampling uses the EMA weights (``load_level``).

**Resumption.** A checkpoint every ``checkpoint_every`` steps and at the end (``checkpoint.py``); calling
:func:`train_level` again on the same ``out_dir`` resumes from it (and a finished one with ``steps`` raised
continues training). The seed, batch size, schedule and distillation settings must match (``ValueError``
otherwise), the architecture too. A resumed run draws the batches of an uninterrupted one (``inputs.py``) and (on
the CPU, or on a GPU with deterministic kernels) ends with bit-identical weights, EMA, optimiser state and log
(except the wall-clock columns).

**Logs**: ``out_dir/log.csv`` and ``out_dir/log.json`` (``records.py``), ``out_dir/summary.json``.

**Several processes**: see ``processes.py``; ``batch_size`` must be divisible by their number. Only rank 0
evaluates and writes files; the training losses in the log are averaged over the ranks; at the end the ranks check
that their weights are identical (``summary["ranks_in_sync"]``).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ...files import FolderLock, atomic_write_json, check_writable_folder, clean_stale_temporaries
from ..nested import NestedUNet, nested_loss
from ..schedule import NoiseSchedule
from . import processes
from .checkpoint import CHECKPOINT_NAME, check_architecture, load_checkpoint, load_level, save_checkpoint
from .config import TrainConfig, describe_teacher, model_config, plain, unwrap_ddp
from .inputs import Batches, HeldOut, as_images, eps, q_sample
from .processes import TrainingInterrupted, autocast
from .records import check_resume, refuse_foreign_files, summary_from, write_logs

__all__ = ["train_level", "learning_rate", "lr_scheduler", "ema_model"]

PathLike = Union[str, os.PathLike]


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (from 0): linear warm-up over ``warmup`` steps, constant,
    then a linear decay over the last ``decay`` steps (factor ``(steps - step) / (decay + 1)``: each one lower,
    none 0)."""
    lr = config.lr
    if config.warmup:
        lr *= min(1.0, (step + 1) / config.warmup)
    if config.decay:
        lr *= min(1.0, (config.steps - step) / (config.decay + 1))
    return lr


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, start_step: int = 0) -> LambdaLR:
    """A ``LambdaLR`` that gives step ``n`` the rate :func:`learning_rate` ``(config, n)``, starting at
    ``start_step``. Its base rate is 1 and its lambda returns the rate itself, so the optimiser sees exactly
    ``learning_rate``'s float (``lr * factor`` would round otherwise where warm-up and decay overlap); nothing of it
    needs saving: a resumed run rebuilds it from its step."""
    for group in optimizer.param_groups:
        group["initial_lr"] = 1.0
    return LambdaLR(optimizer, functools.partial(learning_rate, config), last_epoch=start_step - 1)


def ema_model(model: nn.Module, config: TrainConfig, start_step: int = 0) -> AveragedModel:
    """The EMA of ``model``'s parameters (module docstring), its buffers copied, frozen and in eval mode: an
    ``AveragedModel`` that counts the initial weights as its first average, so its ``n_averaged`` is the next
    step plus 1 (a resumed run sets it to ``start_step + 1`` and loads the EMA weights into its ``module``)."""
    def update(averaged, current, num_averaged):
        step = int(num_averaged) - 1
        decay = min(config.ema_decay, (1 + step) / (10 + step)) if config.ema_warmup else config.ema_decay
        get_ema_multi_avg_fn(decay)(averaged, current, num_averaged)

    ema = AveragedModel(model, multi_avg_fn=update)
    ema.n_averaged.fill_(start_step + 1)
    ema.eval()
    ema.requires_grad_(False)
    return ema


def train_level(model: nn.Module, train_data, heldout_data=None, config: Optional[TrainConfig] = None,
                out_dir: Optional[PathLike] = None, teacher=None, *, model_factory: Optional[Callable] = None,
                callback: Optional[Callable[[int], None]] = None, resume: bool = True) -> dict:
    """Train one level (in place: ``model`` ends with the raw weights; the EMA is in the checkpoint).

    Args:
        model: an eps-predictor ``model(x_t, t) -> eps`` (``t`` integer timesteps ``(B,)``), ideally with a
            ``config`` dict (recorded and checked on resume; ``SeparableUNet`` has one).
        train_data, heldout_data: data sets with ``.images`` (N, C, H, W), tensors, or sequences of images;
            ``heldout_data=None`` skips the held-out losses.
        config: a :class:`TrainConfig` (default: its defaults).
        out_dir: folder of ``checkpoint.pt``, ``log.csv``, ``log.json``, ``summary.json`` (required). If it holds
            a checkpoint (and ``resume``), training continues from it.
        teacher: distil from this model or checkpoint path (overrides ``config.distill_from``).
        model_factory: rebuilds a teacher given as a checkpoint of a class other than ``SeparableUNet``.
        callback: ``callback(step)`` after each step (after any checkpoint of that step).

    Returns a summary dict: ``final_loss``, ``final_eps_loss``, ``final_heldout_loss``, ``heldout_history``
    (``[step, loss]`` pairs), ``loss_history``, ``seconds`` (training wall time, all segments), ``steps``,
    ``start_step``, ``skipped`` (the checkpoint was already finished), ``checkpoint``, ``out_dir``,
    ``distilled``, ``world_size``, ``ranks_in_sync``, ``num_parameters``, ``model_class``, ``model_config``.

    Files (docs/architecture.md, "Guarantees"): the first process takes ``out_dir``'s lock (a second writer gets
    ``files.FolderLockedError``) and removes temporaries left by killed saves; every file is written atomically.
    On SIGINT/SIGTERM (main thread) the step in progress finishes, a checkpoint is saved and
    :class:`TrainingInterrupted` is raised (a ``KeyboardInterrupt``); calling again resumes bit-identically.
    """
    config = (config or TrainConfig()).validate()
    if out_dir is None:
        raise ValueError("out_dir is required (the checkpoint and the logs are written there)")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    out_dir = Path(out_dir)
    run = functools.partial(_train_level, model, train_data, heldout_data, config, out_dir, teacher, model_factory,
                            callback, resume)
    if processes.launch_rank() != 0:  # only the first process writes files
        return run()
    check_writable_folder(out_dir, "output folder")
    with FolderLock(out_dir, f"training {type(model).__name__}"):
        clean_stale_temporaries(out_dir)
        refuse_foreign_files(out_dir)
        return run()


def _load_teacher(teacher, device, model_factory) -> Optional[nn.Module]:
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_level(teacher, device=device, model_factory=model_factory)
    elif not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be None, a checkpoint path or a model; got {type(teacher).__name__}")
    else:
        teacher = copy.deepcopy(unwrap_ddp(teacher)).to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class _Run:
    """One training run's state (what a checkpoint holds) and its parts: the raw network, its EMA, the optimiser
    and its schedule, the batches, the held-out set, the log rows and the running sums of the current log row."""

    def __init__(self, model: nn.Module, images: torch.Tensor, held: Optional[torch.Tensor], config: TrainConfig,
                 out_dir: Path, teacher, model_factory):
        self.config, self.out_dir, self.images = config, out_dir, images
        self.checkpoint = out_dir / CHECKPOINT_NAME
        if config.batch_size > images.shape[0]:
            raise ValueError(f"TrainConfig.batch_size={config.batch_size} is larger than the training set "
                             f"({images.shape[0]} images)")
        self.rank, self.world = processes.distributed_context(config.device)
        if config.batch_size % self.world:
            raise ValueError(f"TrainConfig.batch_size={config.batch_size} is not divisible by the number of "
                             f"processes ({self.world})")
        self.device = device = processes.resolve_device(config.device, model, self.world)
        self.raw = model.to(device)
        teacher = teacher if teacher is not None else config.distill_from
        self.distilled, self.nested = teacher is not None, isinstance(model, NestedUNet)
        if self.nested and self.distilled:
            raise ValueError("a NestedUNet distils its smaller widths from its own top width; it takes no teacher "
                             f"(got {describe_teacher(teacher)!r})")
        self.teacher_desc = describe_teacher(teacher)
        self.teacher = _load_teacher(teacher, device, model_factory)
        self.alpha_bar = torch.as_tensor(NoiseSchedule.named(config.schedule, config.T).alpha_bar,
                                         dtype=torch.float64, device=device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.batches = Batches(images, config, self.rank, self.world, device)
        self.step, self.rows, self.seconds_before, self.eval_seconds = 0, [], 0.0, 0.0
        self.model_config = model_config(model)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, eps_loss, grad_norm since the last row
        self.count = 0
        self.ema = ema_model(model, config)
        self.heldout = None
        if held is not None and config.eval_size > 0:
            self.heldout = HeldOut(held, config, self.alpha_bar, device, self.teacher if self.rank == 0 else None)

    def resume(self) -> None:
        """Continue from the checkpoint in ``out_dir`` (checked against the model, the settings and the data)."""
        ckpt = load_checkpoint(self.checkpoint, map_location=self.device)
        check_architecture(self.raw, ckpt, self.checkpoint)
        check_resume(ckpt, self.config, self.distilled, self.images, self.checkpoint)
        self.raw.load_state_dict(ckpt["model"])
        self.step = int(ckpt["step"])
        self.ema.module.load_state_dict(ckpt["ema"])
        self.ema.n_averaged.fill_(self.step + 1)  # the initial weights, then one average per step
        if ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.model_config = ckpt.get("model_config") or self.model_config
        self.batches.restore(ckpt["rng"], ckpt["rng_device"], self.step)
        self.rows = list(ckpt.get("log") or [])
        self.seconds_before = float(ckpt.get("seconds", 0.0))
        self.eval_seconds = float(ckpt.get("eval_seconds", 0.0))
        sums = ckpt.get("accum") or {}
        if sums:
            self.sums = sums["sums"].to(device=self.device, dtype=torch.float64).clone()
            self.count = int(sums["count"])

    def meta(self) -> dict:
        return {"model_class": type(self.raw).__name__, "model_config": self.model_config,
                "train_config": self.config.to_dict(), "teacher": self.teacher_desc, "distilled": self.distilled,
                "world_size": self.world}

    def base_summary(self, start_step: int) -> dict:
        return dict(out_dir=os.fspath(self.out_dir), checkpoint=os.fspath(self.checkpoint), steps=self.config.steps,
                    start_step=start_step, distilled=self.distilled, teacher=self.teacher_desc,
                    world_size=self.world, num_parameters=sum(p.numel() for p in self.raw.parameters()),
                    model_class=type(self.raw).__name__, model_config=self.model_config)

    def save(self, seconds: float) -> None:
        """Write the checkpoint of the current step (rank 0; every rank takes part in averaging the sums)."""
        sums = processes.mean_over_ranks(self.sums, self.world)
        if self.rank != 0:
            return
        save_checkpoint(self.checkpoint, self.raw, self.ema, self.optimizer, self.step, self.batches.generators,
                        self.config, model_config=self.model_config, extra={
                            "log": self.rows, "seconds": seconds, "eval_seconds": self.eval_seconds,
                            "accum": {"sums": sums.detach().cpu(), "count": self.count},
                            "distilled": self.distilled, "teacher": self.teacher_desc,
                            "data": {"shape": [int(s) for s in self.images.shape],
                                     "checksum": float(self.images.sum(dtype=torch.float64))},
                            "finished": self.step >= self.config.steps})


def _train_level(model: nn.Module, train_data, heldout_data, config: TrainConfig, out_dir: Path, teacher,
                 model_factory: Optional[Callable], callback: Optional[Callable[[int], None]], resume: bool) -> dict:
    """:func:`train_level` once its folder is locked (first process) or without files (the others)."""
    images = as_images(train_data, "train_data")
    held = as_images(heldout_data, "heldout_data", allow_none=True)
    if held is not None and tuple(held.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"heldout_data images have shape {tuple(held.shape[1:])}, train_data "
                         f"{tuple(images.shape[1:])}")
    run = _Run(model, images, held, config, out_dir, teacher, model_factory)
    if resume and run.checkpoint.is_file():
        run.resume()
    elif resume and run.rank == 0 and (out_dir / "log.csv").exists():
        # logs without a checkpoint: from a run killed before its first checkpoint
        warnings.warn(f"{os.fspath(out_dir)!r} holds logs but no checkpoint; starting afresh", stacklevel=3)
    start_step = run.step
    if start_step >= config.steps:  # finished already: reuse
        return summary_from(run.rows, seconds=run.seconds_before, eval_seconds=run.eval_seconds,
                            seconds_this_run=0.0, skipped=True, ranks_in_sync=None, **run.base_summary(start_step))
    t_start = time.perf_counter()
    stop = _loop(run, callback)
    seconds_run = time.perf_counter() - t_start
    in_sync, signatures = processes.ranks_in_sync(run.raw, run.world)
    if in_sync is False:
        warnings.warn(f"DDP ranks ended with different weights: {signatures}", stacklevel=3)
    summary = summary_from(run.rows, seconds=run.seconds_before + seconds_run, eval_seconds=run.eval_seconds,
                           seconds_this_run=seconds_run, skipped=False, ranks_in_sync=in_sync,
                           **run.base_summary(start_step))
    if run.rank == 0:
        atomic_write_json(out_dir / "summary.json", plain(summary), indent=1)
    if stop.signum is not None:  # the signal came during the last step: the run is complete, but stop here
        raise TrainingInterrupted(stop.signum, run.step, config.steps, run.checkpoint)
    return summary


def _loop(run: _Run, callback) -> processes.StopSignals:
    """Train from ``run.step`` to ``config.steps``: a step, then a log row, a checkpoint, the callback and a
    signal check where due. Returns the signal handler (its ``signum``: a signal came during the last step)."""
    from tqdm.auto import tqdm

    config = run.config
    bar = tqdm(total=config.steps, initial=run.step, disable=not config.progress or run.rank != 0,
               desc=f"train {run.out_dir.name} ({type(run.raw).__name__})", dynamic_ncols=True)
    net = run.raw
    if run.world > 1:
        net = nn.parallel.DistributedDataParallel(
            run.raw, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    scheduler = lr_scheduler(run.optimizer, config, run.step)
    net.train()
    t_start = time.perf_counter()
    elapsed = lambda: run.seconds_before + time.perf_counter() - t_start  # noqa: E731  (all segments)
    stop = processes.StopSignals()
    try:
        stop.__enter__()
        while run.step < config.steps:
            lr = _train_step(run, net, scheduler)
            bar.update(1)
            final = run.step == config.steps
            due = lambda every: every is not None and run.step % every == 0  # noqa: E731
            evaluate = run.heldout is not None and (final or due(config.eval_every))
            if final or due(config.log_every) or evaluate:
                row = _log_row(run, lr, evaluate, elapsed)
                bar.set_postfix(loss=f"{row['loss']:.4g}", **({} if row["heldout_loss"] is None else
                                                              {"heldout": f"{row['heldout_loss']:.4g}"}))
            if final or due(config.checkpoint_every):
                run.save(elapsed())
            if callback is not None:
                callback(run.step)
            if run.step < config.steps and stop.requested(run.world, run.device):  # save where we are, then stop
                run.save(elapsed())
                raise TrainingInterrupted(stop.signum, run.step, config.steps, run.checkpoint)
    finally:
        stop.restore()
        bar.close()
    return stop


def _train_step(run: _Run, net: nn.Module, scheduler: LambdaLR) -> float:
    """One optimiser step on the step's batch: loss, gradient (clipped), Adam at the scheduled rate, EMA; adds the
    loss, eps-loss and gradient norm to the running sums. Returns the rate it used."""
    config = run.config
    x0, t, noise = run.batches.draw(run.step)
    x_t = q_sample(run.alpha_bar, x0.to(torch.float32), t, noise)
    loss, eps_loss = _loss(run, net, x_t, t, noise)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = config.grad_clip if config.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    scheduler.step()
    run.ema.update_parameters(run.raw)
    run.sums += torch.stack([loss.detach(), eps_loss, grad_norm.detach()]).to(torch.float64)
    run.count += 1
    run.step += 1
    return lr


def _loss(run: _Run, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
          noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective of one batch (module docstring) and its plain eps-loss against the true noise (detached)."""
    config, teacher = run.config, run.teacher
    with autocast(run.device, config.autocast):
        if run.nested:  # every width on the same batch; the smaller ones regress the larger (nested.py)
            outputs = net(x_t, t, width="all")
            pred = outputs[-1]
        else:
            pred = eps(net, x_t, t)
            target = noise
            if teacher is not None:
                with torch.no_grad():
                    target = eps(teacher, x_t, t).float()
                if config.distill_mix < 1:
                    target = config.distill_mix * target + (1 - config.distill_mix) * noise
    pred = pred.float()
    if pred.shape != noise.shape:
        raise ValueError(f"the model returned shape {tuple(pred.shape)} for inputs of shape {tuple(x_t.shape)}; an "
                         "eps-predictor must return the input's shape")
    if run.nested:
        loss, _ = nested_loss(outputs, noise, config.nested_target, config.distill_mix, config.rung_weight)
    else:
        loss = F.mse_loss(pred, target)
    plain_loss = loss.detach() if teacher is None and not run.nested else F.mse_loss(pred.detach(), noise)
    return loss, plain_loss


def _log_row(run: _Run, lr: float, evaluate: bool, elapsed: Callable[[], float]) -> dict:
    """Close the current log row: the means since the last row (over the ranks), the held-out losses (rank 0,
    when ``evaluate``); rank 0 rewrites the logs. A non-finite mean stops the run (``FloatingPointError``)."""
    means = (processes.mean_over_ranks(run.sums, run.world) / max(run.count, 1)).tolist()
    if not all(math.isfinite(v) for v in means):
        raise FloatingPointError(f"training diverged at step {run.step} (mean loss {means[0]}); lower "
                                 f"TrainConfig.lr (now {run.config.lr}) or set grad_clip")
    row = {"step": run.step, "loss": means[0], "eps_loss": means[1], "grad_norm": means[2], "lr": lr,
           "heldout_loss": None, "heldout_loss_raw": None, "heldout_distill": None}
    if evaluate and run.rank == 0:
        e0 = time.perf_counter()
        row["heldout_loss"], row["heldout_distill"] = run.heldout.losses(run.ema.module)
        row["heldout_loss_raw"], _ = run.heldout.losses(run.raw)
        if run.nested:
            row["heldout_levels"] = [run.heldout.losses(level)[0] for level in run.ema.module.levels()]
        run.eval_seconds += time.perf_counter() - e0
    row["seconds"] = elapsed()
    run.rows.append(row)
    run.sums.zero_()
    run.count = 0
    if run.rank == 0:
        write_logs(run.out_dir, run.rows, run.meta())
    return row
