"""The experiment runner: shared noise, exact costs, T-Stitch, learning on a separate set, caching, outputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from multilevel_sde.diffusion.experiment import Experiment, ExperimentConfig, fixed_probabilities, network_flops
from multilevel_sde.diffusion.sample import sample
from multilevel_sde.diffusion.stitch import stitch_sample
from multilevel_sde.diffusion.unet import build_unet
from multilevel_sde.random_streams import EXPERIMENT_SELECTION, derive_seed

SHAPE = (1, 8, 8)


def tiny_ladder() -> list:
    """Three untrained UNets whose outputs differ (their zero-initialised output layers are perturbed)."""
    gen = torch.Generator().manual_seed(0)
    models = []
    for i, preset in enumerate(("cpu-xs", "cpu-s", "cpu-m")):
        m = build_unet(preset, in_channels=1, image_size=8, seed=i).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        models.append(m)
    return models


@pytest.fixture(scope="module")
def ladder():
    return tiny_ladder()


TINY = ExperimentConfig(heldout=6, select=4, batch=4, samplers=("ddpm",), em_steps=(5, 10, 20), reference_steps=20,
                        mlem_steps=(20,), p_top=(0.5, 0.2), learn_steps=1, learn_batch=4, learn_grid=10,
                        deltas=(0.0, 1.0), tstitch_fractions=(0.5,), tstitch_steps=(10,), grid_images=2)


def test_fixed_probabilities_inverse_cost_and_theory_exponent():
    costs = [1.0, 4.0, 16.0]
    assert fixed_probabilities(costs, 0.1) == pytest.approx([1.0, 0.4, 0.1])
    p = fixed_probabilities(costs, 0.1, alpha_over_gamma=0.5)
    assert p == pytest.approx([1.0, 0.2, 0.1])
    assert fixed_probabilities(costs, 0.9)[1] == 1.0  # capped at 1


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="heldout"):
        ExperimentConfig(heldout=0).validate()
    with pytest.raises(ValueError, match="strategies"):
        ExperimentConfig(strategies=("magic",)).validate()
    with pytest.raises(ValueError, match="em_steps"):
        ExperimentConfig(em_steps=(2000,)).validate()
    with pytest.raises(ValueError, match="p_top"):
        ExperimentConfig(p_top=(1.5,)).validate()


def test_stitch_endpoints_are_plain_em_and_costs_are_exact(ladder):
    small, large = ladder[0], ladder[2]
    costs = [network_flops(small, SHAPE), network_flops(large, SHAPE)]
    kw = dict(batch=3, steps=10, seed=5)
    for switch, alone in ((0, large), (10, small)):
        res = stitch_sample(small, large, SHAPE, switch, costs=costs, **kw)
        em = sample(alone, SHAPE, **kw)
        assert torch.equal(res.images, em.images)
    res = stitch_sample(small, large, SHAPE, 4, costs=costs, **kw)
    assert res.settings["evaluations"] == [4 * 3, 6 * 3]
    assert res.flops == pytest.approx(3 * (4 * costs[0] + 6 * costs[1]))
    mixed = (res.images - sample(large, SHAPE, **kw).images).abs().max()
    assert mixed > 0  # the small network's steps change the sample
    with pytest.raises(ValueError, match="switch"):
        stitch_sample(small, large, SHAPE, 11, costs=costs, **kw)


@pytest.mark.parametrize("batch", [TINY.batch, 2])
def test_learning_set_reproduces_the_samplers_noise(ladder, tmp_path, batch):
    """With every p = 1 the learning problem's solve is EM with the top network on the learning grid: the
    selection set's x_T and Brownian path must be the ones ``sample`` uses for the same seed, also when the
    held-out batch is smaller than the selection set (which is one chunk)."""
    from multilevel_sde.diffusion import experiment as ex_mod

    ex = Experiment(ladder, SHAPE, dataclasses.replace(TINY, batch=batch), tmp_path, progress=False)
    captured = {}
    original = ex_mod.fit_probabilities

    def spy(problem, schedule, paths, **kwargs):
        captured["problem"], captured["paths"] = problem, paths
        return original(problem, schedule, paths, **kwargs)

    ex_mod.fit_probabilities = spy
    try:
        ref = ex.reference("ddpm", TINY.heldout, TINY.seed)
        info = ex.learned("ddpm", ref)
    finally:
        ex_mod.fit_probabilities = original
    problem, paths = captured["problem"], captured["paths"]
    from multilevel_sde.probabilities import Constant

    x, _, _ = problem.solve(Constant([1.0, 1.0, 1.0]), paths, coupling="batch")
    seed = ex.chunk_seeds(TINY.select, derive_seed(TINY.seed, EXPERIMENT_SELECTION), batch=TINY.select)[0][1]
    em = sample(ladder[-1], SHAPE, batch=TINY.select, steps=TINY.learn_grid, seed=seed)
    assert torch.allclose(x.reshape(em.images.shape), em.images, atol=1e-5)
    assert info["select"] == TINY.select and len(info["a"]) == 3
    assert info["lam"] > 0 and info["selection_error_before"] > 0


def test_run_writes_every_point_and_reuses_them(ladder, tmp_path, monkeypatch):
    ex = Experiment(ladder, SHAPE, TINY, tmp_path, names=["a", "b", "c"], progress=False)
    results = ex.run(title="tiny", command="test")
    points = results["points"]
    assert len(points) == ex.expected_points == ex.planned_points() - 2  # no gamma (random networks): no theory points
    em_top = {p["steps"]: p for p in points if p["curve"] == "EM top network"}
    assert em_top[20]["mse"] == 0.0 and em_top[5]["mse"] > 0  # the reference is EM top at 20 steps, same noise
    for p in points:
        assert p["flops"] > 0 and p["calls"] > 0 and p["seconds"] > 0
    em_a = next(p for p in points if p["label"] == "EM a 10")
    assert em_a["flops"] == pytest.approx(10 * network_flops(ladder[0], SHAPE))  # exact rule: steps x C
    assert em_a["calls"] == 10
    for p in points:
        if p["family"] == "mlem":  # realised cost never exceeds paying every network at every step
            assert p["calls"] <= 20 * 3 and p["calls"] >= 20
    assert results["thresholds"]["ddpm"] == next(p["mse"] for p in points if p["label"] == "EM b 20")
    for name in ("results.json", "report.md", "error_flops_ddpm.png", "samples_ddpm.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["learned"]["ddpm"]["sgd_steps"] == 1 and saved["mlem_networks"] == ["a", "b", "c"]

    lines = (tmp_path / "points.jsonl").read_text().splitlines()
    again = Experiment(ladder, SHAPE, TINY, tmp_path, names=["a", "b", "c"], progress=False)
    for key in ("em", "fixed", "tstitch"):  # cached points are not measured again
        getattr(again, key)("ddpm", torch.zeros(1), *([None] if key == "fixed" else []))
    from multilevel_sde.diffusion import experiment as ex_mod

    def no_fit(*args, **kwargs):
        raise AssertionError("the saved fit should have been reused")

    monkeypatch.setattr(ex_mod, "fit_probabilities", no_fit)
    assert again.learned("ddpm", torch.zeros(1))["a"] == saved["learned"]["ddpm"]["a"]
    assert (tmp_path / "points.jsonl").read_text().splitlines() == lines
    assert saved["gamma_drift"]["error"] and len(saved["gamma_drift"]["error"]) == 2
    changed = tiny_ladder()
    with torch.no_grad():
        next(changed[0].parameters()).add_(1.0)
    assert Experiment(changed, SHAPE, TINY, tmp_path, progress=False).key != again.key  # new weights: new key
    from dataclasses import replace

    extended = replace(TINY, em_steps=(2,) + TINY.em_steps, p_top=(0.9,) + TINY.p_top + (0.01,))
    assert extended.key(ladder) == again.key  # a longer sweep reuses the points already measured
    assert replace(TINY, heldout=7).key(ladder) != again.key

    # rescore: the speedups recomputed from the stored points, the rest of the results kept, notes not repeated
    from multilevel_sde.cli import main
    from multilevel_sde.diffusion import experiment_results
    from multilevel_sde.diffusion.frontier import summarise

    stale = dict(saved, summary={}, notes=saved["notes"] + ["DDPM" + experiment_results.UNTHRESHOLDED_NOTE + " stale."])
    (tmp_path / "results.json").write_text(json.dumps(stale))
    (tmp_path / "report.md").unlink()
    assert main(["rescore", str(tmp_path)]) == 0
    rescored = json.loads((tmp_path / "results.json").read_text())
    expected = json.loads(json.dumps(summarise(saved["points"], saved["thresholds"]), default=float))
    assert rescored["summary"] == expected and rescored["points"] == saved["points"]
    assert rescored["notes"] == saved["notes"] and (tmp_path / "report.md").exists()
    assert main(["rescore", str(tmp_path / "nowhere")]) == 2


def test_strategies_can_also_run_with_comonotone_coins(ladder, tmp_path):
    from dataclasses import replace

    config = replace(TINY, comonotone=("inverse-cost",), stratified=(), p_top=(0.3,))
    ex = Experiment(ladder, SHAPE, config, tmp_path, progress=False)
    ex.fixed("ddpm", ex.reference("ddpm", config.heldout, config.seed), None)
    by_curve = {p["curve"]: p for p in ex.points}
    assert set(by_curve) == {"ML-EM inverse-cost 20", "ML-EM inverse-cost comonotone 20"}
    assert by_curve["ML-EM inverse-cost comonotone 20"]["coins"] == "comonotone"
    same = ("probabilities", "steps", "networks", "param")  # the same strategy, only the coins differ
    assert all(by_curve["ML-EM inverse-cost comonotone 20"][k] == by_curve["ML-EM inverse-cost 20"][k] for k in same)
    with pytest.raises(ValueError, match="comonotone"):
        ExperimentConfig(comonotone=("magic",)).validate()


def test_every_strategy_can_also_run_with_stratified_coins(ladder, tmp_path):
    from dataclasses import replace

    config = replace(TINY, stratified=("inverse-cost", "theory", "learned"), p_top=(0.3,), deltas=(0.0,))
    ex = Experiment(ladder, SHAPE, config, tmp_path, progress=False)
    reference = ex.reference("ddpm", config.heldout, config.seed)
    ex.fixed("ddpm", reference, 2.0)  # a gamma: the theory exponent runs
    ex.learned("ddpm", reference)
    by_curve = {p["curve"]: p for p in ex.points}
    names = ("inverse-cost", "theory", "learned")
    assert set(by_curve) == {f"ML-EM {n}{s} 20" for n in names for s in ("", " stratified")}
    for name in names:
        plain, stratified = by_curve[f"ML-EM {name} 20"], by_curve[f"ML-EM {name} stratified 20"]
        assert plain["coins"] == "independent" and stratified["coins"] == "stratified"
        assert stratified["mse"] != plain["mse"]  # other coins, other samples
    assert ex.planned_points() == 3 * len(config.em_steps) + len(ex.points) + 1  # EM, these 6 ML-EM points, T-Stitch
    assert ExperimentConfig(stratified=True).validate().stratified == ("inverse-cost",)  # the older flag
    assert ExperimentConfig(stratified=False).validate().stratified == ()
    with pytest.raises(ValueError, match="stratified"):
        ExperimentConfig(stratified=("magic",)).validate()


def test_batch_coupled_points_give_the_spread_between_coin_patterns(ladder, tmp_path):
    """With coins shared by a batch, the images of a batch are one draw of the coin pattern: an ML-EM point's
    standard error is taken between patterns (NaN with a single one), and the report says so; points without
    coins keep the spread between images."""
    from dataclasses import replace
    from types import SimpleNamespace

    from multilevel_sde.diffusion.report import points_section

    def runner(values):
        values = iter(values)

        def run_one(batch, seed):  # every image of a chunk at the chunk's offset from a zero reference
            return SimpleNamespace(images=torch.full((batch, *SHAPE), next(values)), flops=1.0, seconds=0.0,
                                   stats=SimpleNamespace(evaluations=[batch]))
        return run_one

    reference = torch.zeros(6, *SHAPE)
    ex = Experiment(ladder, SHAPE, replace(TINY, coupling="batch", heldout=6, batch=2), tmp_path / "b2", progress=False)
    ex.measure("ddpm", "mlem", "ML-EM x 20", "ML-EM x 20 a", runner([1.0, 2.0, 4.0]), reference)
    ex.measure("ddpm", "em", "EM x", "EM x 20", runner([1.0, 2.0, 4.0]), reference)
    patterns = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)  # squared offsets: each chunk's MSE
    images = patterns.repeat_interleave(2)
    mlem, em = ex.points
    assert mlem["coin_patterns"] == 3 and "coin_patterns" not in em
    assert mlem["mse"] == pytest.approx(float(patterns.mean())) == em["mse"]
    assert mlem["mse_se"] == pytest.approx(float(patterns.std() / 3 ** 0.5))
    assert em["mse_se"] == pytest.approx(float(images.std() / 6 ** 0.5))
    text = "\n".join(points_section(ex.points))
    assert "averages 3 coin pattern(s)" in text and "(3 patterns)" in text

    one = Experiment(ladder, SHAPE, replace(TINY, coupling="batch", heldout=6, batch=6), tmp_path / "b6", progress=False)
    one.measure("ddpm", "mlem", "ML-EM x 20", "ML-EM x 20 a", runner([3.0]), reference)
    assert one.points[0]["coin_patterns"] == 1 and one.points[0]["mse_se"] != one.points[0]["mse_se"]  # NaN


def test_adaptive_strategy_is_scaled_to_the_inverse_cost_budgets(ladder, tmp_path):
    from dataclasses import replace

    config = replace(TINY, strategies=("inverse-cost", "adaptive"), comonotone=("adaptive",), stratified=())
    ex = Experiment(ladder, SHAPE, config, tmp_path, progress=False)
    reference = ex.reference("ddpm", config.heldout, config.seed)
    info = ex.adaptive("ddpm", reference)["20"]
    by_label = {p["label"]: p for p in ex.points}
    assert set(by_label) == {f"ML-EM adaptive{s} 20 p_top={p}" for s in ("", " comonotone") for p in config.p_top}
    assert all(p["steps"] == 20 and p["networks"] == [0, 1, 2] for p in ex.points)
    variances = torch.tensor(info["variances"])
    assert variances.shape == (3, 20) and (variances > 0).all()  # one pilot variance per level and step
    assert info["c"][0] > info["c"][1]  # the smaller budget (p_top 0.2) needs a smaller scale
    costs = [ex.flops[i] for i in ex.mlem_networks]
    for point in ex.points:  # every step runs the smallest network; no step runs more than all three
        assert 20 * costs[0] <= point["flops"] <= 20 * sum(costs) + 1e-6
    # EM; inverse cost (independent coins); adaptive (independent and comonotone); T-Stitch
    assert ex.planned_points() == 3 * len(config.em_steps) + len(config.p_top) + 2 * len(config.p_top) + 1
