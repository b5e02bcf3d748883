"""Weight selection: a thinner, shallower UNet initialised from a larger one's evenly spaced channels."""

import pytest
import torch

from multilevel_sde.cli import main
from multilevel_sde.diffusion.train import load_checkpoint
from multilevel_sde.diffusion.unet import SeparableUNet, build_unet, init_weights, timestep_embedding
from multilevel_sde.diffusion.weight_selection import select_weights


def _trained_like(model: SeparableUNet, seed: int) -> SeparableUNet:
    """Random weights everywhere, the zero-initialised output layer included."""
    init_weights(model, torch.Generator().manual_seed(seed))
    return model


def test_a_student_of_the_same_size_is_the_teacher():
    teacher = _trained_like(build_unet("cpu-s", image_size=16, seed=1), 5)
    student = select_weights(build_unet("cpu-s", image_size=16, seed=2), teacher)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(student(x, t), teacher(x, t))


@pytest.mark.parametrize("student_preset", ["cpu-m", "cpu-xs"])
def test_every_channel_axis_keeps_every_rth_channel_and_the_first_blocks(student_preset):
    """cpu-m is half cpu-xl's width (time MLP too); cpu-xs a sixth (its time MLP, 32 wide, a third)."""
    teacher = _trained_like(build_unet("cpu-xl", image_size=16), 3)
    student = select_weights(build_unet(student_preset, image_size=16), teacher)
    t_state = teacher.state_dict()
    # one output axis, one input axis, a depthwise kernel, a norm and the time MLP, in the first blocks
    for name in ("down_levels.1.blocks.0.conv1.pointwise.weight", "bottom.blocks.0.conv2.depthwise.weight",
                 "up_levels.0.blocks.0.norm1.weight", "time_mlp.0.weight", "stem.pointwise.weight",
                 "out_conv.pointwise.weight"):
        expected = t_state[name]
        for axis, (kept, total) in enumerate(zip(student.state_dict()[name].shape, expected.shape)):
            if kept != total:
                assert total % kept == 0
                expected = expected.index_select(axis, torch.arange(0, total, total // kept))
        assert torch.equal(student.state_dict()[name], expected), name


def test_the_thinned_time_embedding_is_the_teachers_at_the_kept_indices():
    """Why the time path carries over: sinusoids of width D / r are the width-D ones at 0, r, 2r, ..."""
    t = torch.tensor([0.0, 17.0, 999.0])
    for width, ratio in ((96, 2), (96, 3)):
        wide, thin = timestep_embedding(t, width), timestep_embedding(t, width // ratio)
        assert torch.allclose(thin, wide[:, ::ratio], atol=1e-5)


def test_a_student_that_does_not_fit_is_refused_and_left_unchanged():
    small, large = build_unet("cpu-xs", image_size=16, seed=1), build_unet("cpu-m", image_size=16, seed=2)
    before = {k: v.clone() for k, v in large.state_dict().items()}
    with pytest.raises(ValueError, match="not a selection of the teacher"):
        select_weights(large, small)  # wider than its teacher
    deeper = SeparableUNet(base_channels=4, num_downsamples=3, bottom_depth=4, seed=3)
    with pytest.raises(ValueError, match="teacher has no 'bottom.blocks.3"):
        select_weights(deeper, build_unet("cpu-xl", image_size=16))
    assert all(torch.equal(large.state_dict()[k], v) for k, v in before.items())


def test_train_init_from_starts_at_the_selected_weights(tmp_path, capsys):
    common = ["--data", "default", "--image-size", "16", "--limit", "64", "--batch-size", "8", "--eval-every", "0",
              "--no-progress"]
    assert main(["train", "--preset", "cpu-s", "--steps", "2", "--out", str(tmp_path / "teacher"), *common]) == 0
    teacher_ckpt = tmp_path / "teacher" / "checkpoint.pt"
    # one step with a negligible learning rate: the raw weights are still the selected ones
    assert main(["train", "--preset", "cpu-xs", "--steps", "1", "--lr", "1e-9", "--init-from", str(teacher_ckpt),
                 "--out", str(tmp_path / "student"), *common]) == 0
    assert '"init_from"' in capsys.readouterr().out
    trained = build_unet("cpu-xs", in_channels=1, image_size=16)
    load_checkpoint(tmp_path / "student" / "checkpoint.pt", trained)
    teacher = build_unet("cpu-s", in_channels=1, image_size=16)
    load_checkpoint(teacher_ckpt, teacher, ema=True)
    expected = select_weights(build_unet("cpu-xs", in_channels=1, image_size=16), teacher)
    for name, value in expected.state_dict().items():
        assert torch.allclose(trained.state_dict()[name], value, atol=1e-6), name
    with pytest.raises(SystemExit, match="--init-from"):
        main(["train", "--preset", "cpu-xs", "--preset", "cpu-s", "--steps", "1", "--init-from", str(teacher_ckpt),
              "--out", str(tmp_path / "ladder"), *common])
