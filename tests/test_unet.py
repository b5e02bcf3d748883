"""The depthwise-separable UNet ladder (spec §9.2): shapes, separable convolutions, presets, FLOPs, precision."""

import pytest
import torch
from torch import nn

from multilevel_sde.diffusion.unet import (PRESETS, SepConv, SeparableUNet, auto_num_downsamples, build_unet,
                                           init_weights, ladder_presets, preset_flops, unet_flops)


def _live(model: SeparableUNet, seed: int = 1) -> SeparableUNet:
    """Give the zero-initialised output layer random weights, so the output depends on everything."""
    gen = torch.Generator().manual_seed(seed)
    init_weights(model.out_conv, gen)
    return model


def _images(b, c, h, w=None, seed=0):
    return torch.randn(b, c, h, w or h, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset,size,channels,n", [("cpu-xs", 16, 3, 3), ("cpu-xs", 32, 1, 4), ("cpu-s", 24, 3, 3),
                                                    ("cpu-m", 8, 3, 2), ("paper-1", 16, 3, 4)])
def test_output_shape_equals_input_shape(preset, size, channels, n):
    model = _live(build_unet(preset, in_channels=channels, image_size=size))
    assert model.num_downsamples == n
    x = _images(3, channels, size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_rectangular_images_and_time_formats():
    model = _live(SeparableUNet(in_channels=2, base_channels=4, num_downsamples=2, time_dim=16))
    x = _images(4, 2, 8, 12)
    with torch.no_grad():
        ref = model(x, torch.full((4,), 7))
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7.0]), torch.full((4, 1), 7)):
            assert torch.equal(model(x, t), ref)
        with pytest.raises(ValueError, match="3 entries"):
            model(x, torch.zeros(3))
        with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
            model(x[:, :1], 7)


def test_fresh_model_predicts_zero_and_samples_are_independent():
    model = build_unet("cpu-s", image_size=16)
    x = _images(3, 3, 16)
    with torch.no_grad():
        assert torch.equal(model(x, 10), torch.zeros_like(x))
        _live(model)
        out = model(x, torch.tensor([1, 2, 3]))
        # no batch statistics: each sample's output depends on that sample only
        assert torch.allclose(out[1:2], model(x[1:2], 2), atol=1e-6)


def test_time_embedding_changes_the_output():
    model = _live(build_unet("cpu-xs", image_size=16))
    x = _images(2, 3, 16)
    with torch.no_grad():
        a, b, c = model(x, 10), model(x, 11), model(x, 900)
    assert (a - b).abs().max() > 1e-6 and (a - c).abs().max() > 1e-3 * a.abs().max()


def test_every_convolution_is_depthwise_3x3_then_1x1():
    model = build_unet("cpu-m", image_size=16)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    seps = [m for m in model.modules() if isinstance(m, SepConv)]
    assert len(convs) == 2 * len(seps) > 0
    for sep in seps:
        dw, pw = sep.depthwise, sep.pointwise
        assert dw.kernel_size == (3, 3) and dw.groups == dw.in_channels == dw.out_channels and dw.bias is None
        assert pw.kernel_size == (1, 1) and pw.groups == 1 and pw.in_channels == dw.out_channels
    # and in the forward pass every 1x1 is applied right after its own depthwise 3x3
    calls = []
    hooks = [c.register_forward_hook(lambda m, i, o: calls.append(m)) for c in convs]
    with torch.no_grad():
        model(_images(1, 3, 16), 3)
    for h in hooks:
        h.remove()
    assert len(calls) == len(convs)
    for dw, pw in zip(calls[::2], calls[1::2]):
        assert any(s.depthwise is dw and s.pointwise is pw for s in seps)


def test_flop_count_includes_depthwise_convolutions():
    model = build_unet("cpu-s", image_size=16)
    expected = []

    def conv_hook(m, inp, out):
        expected.append(2 * out.numel() * m.weight[0].numel())  # (C_in / groups) * kh * kw per output

    def linear_hook(m, inp, out):
        expected.append(2 * out.numel() * m.in_features)

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    flops = unet_flops(model, 16)
    for h in hooks:
        h.remove()
    depthwise = sum(2 * 9 * m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    assert flops == sum(expected) and depthwise > 0
    meta = build_unet("cpu-s", image_size=16, device="meta")
    assert unet_flops(meta, 16) == flops and preset_flops("cpu-s", 16) == flops
    with pytest.raises(ValueError, match="in_channels"):
        unet_flops(model, 16, in_channels=1)


@pytest.mark.parametrize("family,size", [("cpu", 16), ("cpu", 32), ("paper", 64)])
def test_flops_grow_geometrically_along_each_family(family, size):
    names = ladder_presets(family)
    assert len(names) >= 4 and all(PRESETS[n]["family"] == family for n in names)
    flops = [preset_flops(name, size) for name in names]
    ratios = [b / a for a, b in zip(flops, flops[1:])]
    assert all(r > 1.3 for r in ratios), ratios
    params = [build_unet(n, image_size=size, device="meta").num_parameters for n in names]
    assert params == sorted(params)


def test_config_round_trip():
    model = build_unet("cpu-m", in_channels=1, image_size=16, seed=3)
    assert model.config == dict(in_channels=1, base_channels=12, num_downsamples=3, bottom_depth=2, mid_depth=1,
                                time_dim=48, groups=8, seed=3, autocast=None)
    twin = SeparableUNet.from_config(model.config)
    assert repr(twin) == repr(model) and twin.config == model.config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)  # same seed: same initial weights
    _live(model)
    twin.load_state_dict(model.state_dict())
    x = _images(2, 1, 16)
    with torch.no_grad():
        assert torch.equal(twin(x, torch.tensor([3, 700])), model(x, torch.tensor([3, 700])))
    with pytest.raises(ValueError, match="unknown SeparableUNet config keys"):
        SeparableUNet.from_config({**model.config, "width": 3})


def test_seeded_initialisation_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_unet("cpu-xs", image_size=16, seed=5), build_unet("cpu-xs", image_size=16, seed=5)
    c = build_unet("cpu-xs", image_size=16, seed=6)
    d = build_unet("cpu-xs", image_size=16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc, wd = (m.stem.pointwise.weight for m in (a, b, c, d))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and torch.equal(wa, wd)
    assert d.config["seed"] is None
    fresh = SeparableUNet(base_channels=4, num_downsamples=1, seed=None)
    assert isinstance(fresh.config["seed"], int)


def test_bad_image_sizes_and_names_raise_clear_errors():
    with pytest.raises(ValueError, match="40x40"):
        build_unet("paper-1", image_size=40)
    with pytest.raises(ValueError, match="15"):
        build_unet("cpu-s", image_size=15)
    with pytest.raises(ValueError, match="20x20"):
        build_unet("cpu-s", image_size=16, num_downsamples=3)(torch.zeros(1, 3, 20, 20), 0)
    with pytest.raises(ValueError, match="cpu-xs.*paper-5"):
        build_unet("cpu-huge")
    with pytest.raises(ValueError, match="'cpu'"):
        ladder_presets("gpu")
    with pytest.raises(ValueError, match="base_channels"):
        SeparableUNet(base_channels=0)
    with pytest.raises(ValueError, match="autocast"):
        SeparableUNet(autocast="int8")
    assert [auto_num_downsamples(s) for s in (4, 8, 16, 28, 32, 48, 64, 128)] == [1, 2, 3, 2, 4, 4, 4, 4]


def test_bf16_autocast_forward_on_cpu():
    model = _live(build_unet("cpu-s", image_size=16))
    x = _images(2, 3, 16)
    with torch.no_grad():
        ref = model(x, 100)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outer = model(x, 100)
        model.autocast = "bf16"
        inner = model(x, 100)
    for out in (outer, inner):
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert (out - ref).norm() < 0.1 * ref.norm()
    assert torch.equal(outer, inner)


def test_channels_last_gives_the_same_output():
    model = _live(build_unet("cpu-s", image_size=16))
    cl = _live(build_unet("cpu-s", image_size=16, channels_last=True))
    assert cl.is_channels_last and cl.stem.depthwise.weight.is_contiguous(memory_format=torch.channels_last)
    x = _images(3, 3, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([1, 50, 500]))
        b = cl(x, torch.tensor([1, 50, 500]))
    assert b.is_contiguous() and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter():
    model = build_unet("cpu-xs", image_size=16)
    x = _images(2, 3, 16)
    # a fresh model's zero output layer still learns (its gradient is not zero)
    loss = (model(x, torch.tensor([3, 400])) - x).pow(2).mean()
    loss.backward()
    assert model.out_conv.pointwise.weight.grad.abs().sum() > 0
    model.zero_grad()
    _live(model)
    (model(x, torch.tensor([3, 400])) - x).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
