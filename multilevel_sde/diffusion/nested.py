"""A ladder built for ML-EM: one slimmable :class:`SeparableUNet` whose widths are the levels.

:class:`NestedUNet` holds the weights of one ``SeparableUNet`` at its largest base width ``widths[-1]``.
Level ``i`` runs the **first** ``widths[i] * 2**s`` channels of every layer at scale ``s`` (the stem, every
separable convolution, every block's time projection and the head), so all levels share their weights and a
small level is the leading corner of every larger one::

    net = NestedUNet(in_channels=1, widths=(4, 6, 8, 12, 16), num_downsamples=3, bottom_depth=2, mid_depth=2)
    levels = net.levels()          # [NestedLevel(net, 0), ..., NestedLevel(net, 4)]: ordinary nn.Modules
    eps = levels[2](x_t, t)        # width 8; the same as net(x_t, t, width=2)
    small = levels[2].export()     # a standalone SeparableUNet(base_channels=8) with the sliced weights

Everything that is not a channel slice is **per width or shared**:

- GroupNorm is *switchable* (Slimmable Networks, Yu et al. 2018): every width has its own affine parameters,
  and each width normalises with ``gcd(groups, channels)`` groups, exactly as a standalone network of that width.
  GroupNorm keeps no running statistics, so nothing else depends on the width.
- The time-embedding MLP (``time_dim`` wide, a few kFLOPs) is shared and run whole by every width.

So ``NestedLevel(net, i)`` computes bit for bit what ``export()`` computes (tested), and its FLOPs are counted
by ``torch.utils.flop_counter`` like any ``SeparableUNet`` (:func:`~multilevel_sde.diffusion.unet.unet_flops`).

**Training** (:func:`nested_loss`, used by ``train.train_level`` when the model is a ``NestedUNet``): every step
runs every width on the same noisy batch (``net(x_t, t, width="all")``: with 4-6 fixed widths this is the
slimmable-networks rule; the sandwich rule of universally slimmable networks samples widths only because it has
infinitely many). The top width regresses the true noise (DDPM's loss); each smaller width regresses the
stop-gradient prediction of the top width (``target="top"``, in-place distillation as in US-Nets / BigNAS) or of
the next larger width (``target="next"``, the rung-to-rung distance ``||eps^l - eps^{l+1}||^2`` that ML-EM's
variance pays for), mixed with the true noise by ``1 - distill_mix``. The smaller widths' losses are weighted
by ``rung_weight``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from .unet import AUTOCAST_DTYPES, SeparableUNet, batch_times, check_int, timestep_embedding

__all__ = ["NestedUNet", "NestedLevel", "nested_loss", "NESTED_PRESETS", "build_nested"]


def _gn(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


class NestedUNet(nn.Module):
    """A slimmable eps-predicting UNet: level ``i`` is the ``SeparableUNet`` of base width ``widths[i]``.

    Args:
        in_channels, num_downsamples, bottom_depth, mid_depth, groups, seed, autocast: as ``SeparableUNet``.
        widths: the base widths of the levels, increasing (level ``i`` has ``widths[i] * 2**s`` channels at
            scale ``s``); the weights are those of ``SeparableUNet(base_channels=widths[-1])``.
        time_dim: width of the shared time-embedding MLP (None: ``max(32, 4 * widths[-1])``).

    ``forward(x (B, C, H, W), t, width=-1)`` returns level ``width``'s eps; ``width="all"`` returns the list of
    every level's eps, smallest first (one call, as training uses it).
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (4, 8, 12, 16, 24), num_downsamples: int = 3,
                 bottom_depth: int = 2, mid_depth: int = 2, time_dim: Optional[int] = None, groups: int = 8,
                 seed: Optional[int] = 0, autocast: Optional[str] = None):
        super().__init__()
        widths = [check_int(w, "widths", 1) for w in widths]
        if len(widths) < 1 or any(b <= a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"widths must be increasing positive integers, got {widths!r}")
        self.net = SeparableUNet(in_channels, widths[-1], num_downsamples, bottom_depth, mid_depth, time_dim,
                                 groups, seed, autocast)
        self.widths = tuple(widths)
        top = self.net
        self.in_channels, self.num_downsamples, self.time_dim = top.in_channels, top.num_downsamples, top.time_dim
        self.autocast = autocast
        self._config = dict(in_channels=top.in_channels, widths=list(widths), num_downsamples=top.num_downsamples,
                            bottom_depth=bottom_depth, mid_depth=mid_depth, time_dim=top.time_dim, groups=groups,
                            seed=top.config["seed"], autocast=autocast)
        # switchable GroupNorm: the top width uses the network's own norms, every smaller width a copy of them
        # at its own channel count (weight 1, bias 0, like a fresh network)
        self.width_norms = nn.ModuleList(
            nn.ModuleList(nn.GroupNorm(math.gcd(groups, n.num_channels * w // widths[-1]),
                                       n.num_channels * w // widths[-1]) for n in self._top_norms())
            for w in widths[:-1])

    # ------------------------------------------------------------------------------------------ config
    @property
    def config(self) -> dict:
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict) -> "NestedUNet":
        return cls(**config)

    def extra_repr(self) -> str:
        return f"widths={list(self.widths)}"

    def levels(self) -> list["NestedLevel"]:
        """One :class:`NestedLevel` per width, smallest first (views sharing this network's weights)."""
        return [NestedLevel(self, i) for i in range(len(self.widths))]

    def _top_norms(self) -> list:
        return [m for m in self.net.modules() if isinstance(m, nn.GroupNorm)]

    def _norms(self, index: int) -> list:
        return self._top_norms() if index == len(self.widths) - 1 else list(self.width_norms[index])

    def _index(self, width) -> int:
        k = len(self.widths)
        if isinstance(width, bool) or not isinstance(width, int) or not -k <= width < k:
            raise ValueError(f"width must be a level index in [{-k}, {k}) or 'all', got {width!r}")
        return width % k

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t, width: Union[int, str] = -1):
        if width == "all":
            return [self(x, t, i) for i in range(len(self.widths))]
        index = self._index(width)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if index == len(self.widths) - 1:  # the top width is the network itself
            return self.net(x, t)
        from .unet import check_image_size

        check_image_size((int(x.shape[2]), int(x.shape[3])), self.num_downsamples)
        if self.autocast is not None and x.device.type != "meta":
            with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.autocast]):
                out = self._sliced(x, t, index)
        else:
            out = self._sliced(x, t, index)
        return out.to(x.dtype).contiguous()

    def _sliced(self, x: torch.Tensor, t, index: int) -> torch.Tensor:
        """``SeparableUNet._forward`` on the first ``widths[index] * 2**s`` channels of every layer."""
        net, d = self.net, self.widths[index]
        norms = iter(self._norms(index))
        weight = net.stem.pointwise.weight
        h = x.to(weight.dtype)
        temb = timestep_embedding(batch_times(t, x.shape[0], x.device), self.time_dim).to(weight.dtype)
        temb = F.silu(net.time_mlp(temb))

        def conv(sep, h, c_out):
            c_in = h.shape[1]
            dw, pw = sep.depthwise, sep.pointwise
            h = F.conv2d(h, dw.weight[:c_in], None, dw.stride, dw.padding, groups=c_in)
            return F.conv2d(h, pw.weight[:c_out, :c_in].contiguous(), pw.bias[:c_out])

        def blocks(level, h):
            c = h.shape[1]
            for block in level.blocks:
                r = conv(block.conv1, F.silu(_gn(next(norms), h)), c)
                r = r + F.linear(temb, block.time_proj.weight[:c], block.time_proj.bias[:c])[:, :, None, None]
                h = h + conv(block.conv2, F.silu(_gn(next(norms), r)), c)
            return h

        h = conv(net.stem, h, d)
        skips = []
        for s, (level, down) in enumerate(zip(net.down_levels, net.downsamples)):
            h = blocks(level, h)
            skips.append(h)
            h = conv(down, h, d * 2 ** (s + 1))
        h = blocks(net.bottom, h)
        for j, (up, level) in enumerate(zip(net.upsamples, net.up_levels)):
            c = d * 2 ** (self.num_downsamples - j - 1)
            h = conv(up.conv, F.interpolate(h, scale_factor=2.0, mode="nearest"), c) + skips.pop()
            h = blocks(level, h)
        return conv(net.out_conv, F.silu(_gn(next(norms), h)), self.in_channels)

    # ------------------------------------------------------------------------------------------ export
    @torch.no_grad()
    def export(self, width: int = -1) -> SeparableUNet:
        """A standalone ``SeparableUNet`` of base width ``widths[width]`` holding this level's sliced weights."""
        index = self._index(width)
        cfg = self.net.config
        small = SeparableUNet(cfg["in_channels"], self.widths[index], cfg["num_downsamples"], cfg["bottom_depth"],
                              cfg["mid_depth"], self.time_dim, cfg["groups"], seed=0, autocast=self.autocast,
                              device=next(self.parameters()).device)
        small_norms = [m for m in small.modules() if isinstance(m, nn.GroupNorm)]
        for mine, theirs in zip(self._norms(index), small_norms):
            theirs.load_state_dict(mine.state_dict())
        big = dict(self.net.named_parameters())
        for name, p in small.named_parameters():
            if ".norm" in name or name.startswith("out_norm"):
                continue
            p.copy_(big[name][tuple(slice(0, s) for s in p.shape)])
        return small.train(self.training)


class NestedLevel(nn.Module):
    """Level ``index`` of a :class:`NestedUNet` as an ordinary eps-predictor ``(x, t) -> eps`` (shares weights)."""

    def __init__(self, nested: NestedUNet, index: int):
        super().__init__()
        self.nested = nested
        self.index = nested._index(index)
        self.in_channels = nested.in_channels

    @property
    def base_channels(self) -> int:
        return self.nested.widths[self.index]

    @property
    def noise_schedule(self):
        """The schedule its network was trained with (set by ``load_level`` / ``load_pretrained``), or None."""
        return getattr(self.nested, "noise_schedule", None)

    @property
    def checkpoint_path(self) -> Optional[str]:
        """The file its network was loaded from, or None."""
        return getattr(self.nested, "checkpoint_path", None)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.nested(x, t, self.index)

    def export(self) -> SeparableUNet:
        return self.nested.export(self.index)

    @property
    def num_parameters(self) -> int:
        """Parameters this level reads (its slices and its own norms), as its standalone network has."""
        return self.export().num_parameters

    def extra_repr(self) -> str:
        return f"width {self.base_channels} (level {self.index} of {len(self.nested.widths)})"


def nested_loss(outputs: Sequence[torch.Tensor], noise: torch.Tensor, target: str = "top",
                distill_mix: float = 1.0, rung_weight: float = 1.0) -> tuple[torch.Tensor, list]:
    """The joint loss of every width (module docstring) and the per-width losses (floats, smallest first).

    ``outputs``: every width's eps, smallest first (``net(x_t, t, width="all")``); ``noise``: the true noise.
    """
    if target not in ("top", "next"):
        raise ValueError(f"target must be 'top' or 'next', got {target!r}")
    outputs = [o.float() for o in outputs]
    top = F.mse_loss(outputs[-1], noise)
    losses, total = [], top
    for i, out in enumerate(outputs[:-1]):
        teacher = (outputs[-1] if target == "top" else outputs[i + 1]).detach()
        goal = teacher if distill_mix == 1 else distill_mix * teacher + (1 - distill_mix) * noise
        loss = F.mse_loss(out, goal)
        losses.append(loss)
        total = total + rung_weight * loss
    return total, [*losses, top]


#: Nested ladders (widths and depths): ``cpu`` for 16x16 on a CPU, ``paper`` for 64x64 on a GPU.
NESTED_PRESETS: dict[str, dict] = {
    "nested-cpu": dict(widths=(3, 6, 10, 16, 24), bottom_depth=2, mid_depth=2),
    "nested-paper": dict(widths=(16, 24, 32, 48, 64, 96), bottom_depth=4, mid_depth=2),
}


def build_nested(preset: str = "nested-cpu", in_channels: int = 3, image_size=16, seed: int = 0,
                 **overrides) -> NestedUNet:
    """A :class:`NestedUNet` of a named preset for ``image_size`` images (downsamplings as the ``cpu`` presets)."""
    from .unet import auto_num_downsamples

    if preset not in NESTED_PRESETS:
        raise ValueError(f"unknown nested preset {preset!r}; known: {', '.join(NESTED_PRESETS)}")
    kwargs = dict(NESTED_PRESETS[preset], num_downsamples=auto_num_downsamples(image_size))
    kwargs.update(overrides)
    return NestedUNet(in_channels=in_channels, seed=seed, **kwargs)
