"""The nested (slimmable) UNet: each width is a standalone network, FLOPs grow along the ladder, joint training."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig, network_flops
from multilevel_sde.diffusion.nested import NESTED_PRESETS, NestedLevel, NestedUNet, build_nested, nested_loss
from multilevel_sde.diffusion.train import TrainConfig, load_ladder, load_level, train_level
from multilevel_sde.diffusion.unet import SeparableUNet, unet_flops

WIDTHS = (2, 4, 6, 8)


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter moved off its initial value (the zero head would make every output 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


def small_net(**kw) -> NestedUNet:
    return NestedUNet(in_channels=1, widths=WIDTHS, num_downsamples=2, bottom_depth=1, mid_depth=1, seed=0, **kw)


def test_each_width_equals_a_standalone_network_of_the_sliced_weights():
    net = perturbed(small_net())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 500, 999])
    for level in net.levels():
        standalone = level.export()
        assert isinstance(standalone, SeparableUNet)
        assert standalone.config["base_channels"] == WIDTHS[level.index]
        assert torch.equal(level(x, t), standalone(x, t))
        assert torch.equal(net(x, t, width=level.index), level(x, t))
    outputs = net(x, t, width="all")
    assert len(outputs) == len(WIDTHS)
    assert all(torch.equal(o, level(x, t)) for o, level in zip(outputs, net.levels()))
    # the widths really differ (nothing is silently the top network)
    assert all(not torch.equal(a, b) for a, b in zip(outputs, outputs[1:]))


def test_small_widths_have_their_own_norms_and_share_every_other_weight():
    net = perturbed(small_net())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 20])
    before = [level(x, t) for level in net.levels()]
    with torch.no_grad():  # a norm of width 0 changes only width 0
        net.width_norms[0][0].weight.add_(1.0)
    after = [level(x, t) for level in net.levels()]
    assert not torch.equal(before[0], after[0])
    assert all(torch.equal(a, b) for a, b in zip(before[1:], after[1:]))
    with torch.no_grad():  # the first channel of the stem is shared by every width
        net.net.stem.pointwise.weight[0].add_(1.0)
    assert all(not torch.equal(a, level(x, t)) for a, level in zip(after, net.levels()))
    counts = [level.num_parameters for level in net.levels()]
    assert counts == sorted(counts) and counts[-1] == net.net.num_parameters


def test_flops_per_width_match_the_flop_counter_and_grow_geometrically():
    net = small_net()
    for level in net.levels():
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            level.export()(torch.zeros(1, 1, 8, 8), torch.zeros(1))
        assert unet_flops(level, 8, 1) == counter.get_total_flops()
        assert network_flops(level, (1, 8, 8)) == counter.get_total_flops()
    for name in NESTED_PRESETS:
        flops = [unet_flops(level, 16, 3) for level in build_nested(name, in_channels=3, image_size=16).levels()]
        ratios = [b / a for a, b in zip(flops, flops[1:])]
        assert len(flops) >= 4 and all(1.5 <= r <= 4 for r in ratios), (name, ratios)


def test_bad_widths_and_indices_are_clear_errors():
    with pytest.raises(ValueError, match="widths"):
        NestedUNet(widths=(4, 4, 8))
    with pytest.raises(ValueError, match="widths"):
        NestedUNet(widths=(4, 0))
    net = small_net()
    with pytest.raises(ValueError, match="width"):
        net(torch.zeros(1, 1, 8, 8), 1, width=len(WIDTHS))
    with pytest.raises(ValueError, match="nested preset"):
        build_nested("nested-huge")
    with pytest.raises(ValueError, match="target"):
        nested_loss([torch.zeros(1)], torch.zeros(1), target="middle")


def test_nested_loss_is_the_top_loss_plus_weighted_distances():
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    noise = torch.randn(4, 3, generator=gen)
    mse = lambda a, b: ((a - b) ** 2).mean()
    total, parts = nested_loss(outs, noise, "top", 1.0, 0.5)
    assert parts[-1] == pytest.approx(mse(outs[2], noise).item())
    assert parts[0] == pytest.approx(mse(outs[0], outs[2]).item())
    assert total.item() == pytest.approx(parts[2] + 0.5 * (parts[0] + parts[1]))
    _, parts = nested_loss(outs, noise, "next", 0.5, 1.0)
    assert parts[0] == pytest.approx(mse(outs[0], 0.5 * outs[1] + 0.5 * noise).item())


def _data(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.linspace(-1, 1, 8)
    images = (base[None, None, :, None] * base[None, None, None, :]).expand(n, 1, 8, 8).clone()
    return images + 0.1 * torch.randn(n, 1, 8, 8, generator=gen)


def _eps_losses(net: NestedUNet) -> list:
    from multilevel_sde.diffusion.schedule import NoiseSchedule

    gen = torch.Generator().manual_seed(7)
    x0 = _data(16, seed=3)
    t = torch.randint(1, 1001, (16,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ab = torch.as_tensor(NoiseSchedule.cosine().alpha_bar, dtype=torch.float32)[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        return [float(((o - noise) ** 2).mean()) for o in net(x_t, t, width="all")]


def _config(**kw) -> TrainConfig:
    base = dict(steps=30, batch_size=16, lr=3e-3, warmup=2, eval_every=10, eval_size=16, checkpoint_every=10,
                log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def test_joint_training_lowers_every_width_and_logs_each(tmp_path):
    net = small_net()
    before = _eps_losses(net)
    summary = train_level(net, _data(), _data(16, seed=1), _config(), tmp_path / "run")
    assert isinstance(load_level(tmp_path / "run"), NestedUNet)
    after = _eps_losses(net)  # the raw weights (the EMA lags on a run this short); same images, t and noise
    assert all(a < b - 0.05 for a, b in zip(after, before)), (before, after)
    import json

    rows = json.loads((tmp_path / "run" / "log.json").read_text())["rows"]
    held = [r["heldout_levels"] for r in rows if r.get("heldout_levels")]
    assert held and len(held[-1]) == len(WIDTHS)
    assert held[-1][-1] == pytest.approx(summary["final_heldout_loss"])
    assert summary["model_class"] == "NestedUNet"


def test_nested_run_resumes_bit_identically(tmp_path):
    cfg = _config(steps=12, checkpoint_every=4)
    train_level(small_net(), _data(), _data(16, seed=1), cfg, tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train_level(small_net(), _data(), _data(16, seed=1), cfg, tmp_path / "cut", callback=kill_at)
    other_init = NestedUNet(in_channels=1, widths=WIDTHS, num_downsamples=2, bottom_depth=1, mid_depth=1, seed=9)
    train_level(other_init, _data(), _data(16, seed=1), cfg, tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    with pytest.raises(ValueError, match="rung_weight"):  # the objective of a run cannot change on resume
        train_level(small_net(), _data(), _data(16, seed=1), cfg.replace(steps=16, rung_weight=2.0),
                    tmp_path / "full")
    with pytest.raises(ValueError, match="teacher"):
        train_level(small_net(), _data(), None, cfg, tmp_path / "t", teacher=small_net())


def test_a_nested_checkpoint_is_a_whole_ladder_through_the_experiment(tmp_path):
    train_level(small_net(), _data(), _data(16, seed=1), _config(steps=20), tmp_path / "nested")
    models, names, shape = load_ladder(tmp_path / "nested")
    assert shape == (1, 8, 8) and len(models) == len(WIDTHS)
    assert names == [f"width {w}" for w in WIDTHS]
    assert all(isinstance(m, NestedLevel) for m in models)
    config = ExperimentConfig(heldout=4, select=4, batch=4, samplers=("ddpm",), em_steps=(5, 10), reference_steps=10,
                              mlem_steps=(10,), p_top=(0.5,), strategies=("inverse-cost",), stratified=(),
                              learn_steps=1, learn_batch=4, learn_grid=5, deltas=(0.0,), tstitch_fractions=(0.5,),
                              tstitch_steps=(10,), grid_images=2)
    results = Experiment(models, shape, config, tmp_path / "exp", names=names, progress=False).run(title="nested")
    flops = [n["flops"] for n in results["networks"]]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    params = [n["params"] for n in results["networks"]]
    assert params == [m.num_parameters for m in models] and params == sorted(params)
    assert any(p["family"] == "mlem" for p in results["points"])
    assert (tmp_path / "exp" / "report.md").exists()
