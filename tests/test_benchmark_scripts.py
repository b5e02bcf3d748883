"""The guard-rail benchmarks (``benchmarks/overhead.py``, ``benchmarks/dt_independence.py``) run end to end on tiny
sizes, write their results, and measure what they say they measure. No assertion is about speed."""

import ast
import json
import math
from pathlib import Path

import pytest

from helpers import load_benchmark

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_OVERHEAD = {"a_batch": 8, "a_dim": 4, "a_t1": 0.02, "b_batch": 8, "b_dim": 4, "b_t1": 0.02,
                 "widths": [4, 8, 8, 16], "a_rounds": 2, "b_rounds": 3, "min_run_time": 0.001}
TINY_DT = {"batch": 8, "dt_exponents": [10, 11], "seeds": 2, "rounds": 2, "min_run_time": 0.001}


@pytest.mark.parametrize("name", ["overhead", "dt_independence"])
def test_uses_public_names_only(name):
    tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("multilevel_sde"):
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), ast.dump(node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mlsde":
            assert not node.attr.startswith("_") or node.attr == "__version__", node.attr


def test_overhead_guard_rails_are_measured(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    res = load_benchmark("overhead").main(["--out", str(out)], cfg=TINY_OVERHEAD)
    assert json.loads(out.read_text())["settings"]["widths"] == TINY_OVERHEAD["widths"]
    a, b = res["part_a"], res["part_b"]
    assert a["bit_identical_shared_path"] and a["max_abs_difference_shared_path"] == 0.0
    assert a["steps"] == 20
    for key in ("speedup_default_noise", "speedup_shared_path"):
        assert a[key]["ratio"] > 0 and len(a[key]["per_round"]) == TINY_OVERHEAD["a_rounds"]
    steps, batch = 20, TINY_OVERHEAD["b_batch"]
    for coupling, c in b["configs"].items():
        assert all(c["checks"].values()) and c["steps"] == steps
        # p_1 = 1: level 1 runs on every sample at every step, whatever the coins
        assert c["calls"][0] == steps and c["evaluations"][0] == steps * batch
        for key in ("bookkeeping_frac", "bookkeeping_frac_levels_alone", "outside_levels_frac",
                    "bookkeeping_frac_zero_levels", "levels_slower_in_a_solve_frac"):
            assert math.isfinite(c[key]) and c[key] < 1
        # R holds the level calls and E's loop, so taking it out leaves less than T - L; so does T - L - E
        assert c["bookkeeping_frac"] < c["outside_levels_frac"]
        assert c["bookkeeping_frac_levels_alone"] < c["outside_levels_frac"]
        assert len(c["bookkeeping_frac_per_round"]) == TINY_OVERHEAD["b_rounds"]
    batch_coins = b["configs"]["batch"]
    assert all(e == n * batch for e, n in zip(batch_coins["evaluations"], batch_coins["calls"]))
    printed = capsys.readouterr().out
    assert "bit-identical on the shared path: True" in printed and "bookkeeping (T - R) / T" in printed


def test_logged_calls_match_the_solve():
    import torch

    import multilevel_sde as mlsde

    overhead = load_benchmark("overhead")
    levels = [overhead.MLP(3, 5, m).requires_grad_(False) for m in range(3)]
    drift = mlsde.MultilevelDrift(levels, [1.0, 0.5, 0.25], costs=[1, 2, 4], coupling="sample", seed=0)
    sde = mlsde.MultilevelSDE(drift, 1.0, dt=0.1)
    y0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    calls, stats = overhead.logged_calls(levels, lambda **kw: mlsde.sdeint(sde, y0, [0.0, 1.0], seed=3, **kw))
    assert [sum(1 for m, _, _ in calls if m == j) for j in range(3)] == stats.calls
    assert [sum(b for m, b, _ in calls if m == j) for j in range(3)] == stats.evaluations
    assert any(b < 6 for _, b, _ in calls)  # per-sample coins: sub-batches
    assert all(lvl.log is None for lvl in levels)  # logging switched off afterwards

    # the control R: plain EM whose drift makes the same calls, step by step, on the live state
    same_calls = overhead.SameCalls(levels, overhead.calls_by_step(calls))
    em = mlsde.MultilevelSDE(same_calls, 1.0, dt=0.1)
    replayed, _ = overhead.logged_calls(levels, lambda **kw: mlsde.sdeint(em, y0, [0.0, 1.0], seed=3, **kw))
    assert [(m, b) for m, b, _ in replayed] == [(m, b) for m, b, _ in calls] and same_calls.n == stats.steps


def test_dt_independence_measures_flat_ml_em_and_growing_em(tmp_path):
    out = tmp_path / "dt.json"
    res = load_benchmark("dt_independence").main(["--out", str(out)], cfg=TINY_DT)
    assert json.loads(out.read_text())["benchmark"] == "dt_independence" and out.with_suffix(".png").stat().st_size
    s, methods = res["summary"], res["methods"]
    assert max(res["p_at_largest_dt"]) <= 1
    # EM pays every step: halving dt doubles its cost exactly
    assert s["em_top"]["cost_spread"] == pytest.approx(2.0) and s["em_top"]["cost_slope"] == pytest.approx(-1.0)
    # ML-EM's expected cost (the library's, independent of the coins) is flat; the Poisson solver's jumps do not
    # depend on dt at all
    assert s["mlem[sample]"]["cost_flat"] and s["mlem[batch]"]["cost_flat"]
    assert s["poisson"]["evaluations_identical_over_dt"] and s["poisson"]["cost_spread"] == 1.0
    for m in ("mlem[sample]", "mlem[batch]", "poisson", "em_top"):
        rows = methods[m]["rows"]
        assert [r["steps"] for r in rows] == [1024, 2048]
        assert all(math.isfinite(r["rms_error"]) and r["wall_s"] > 0 for r in rows)
    assert all(r["rms_coin_error"] == 0 for r in methods["em_top"]["rows"])


def test_dt_independence_refuses_clipped_probabilities():
    module = load_benchmark("dt_independence")
    with pytest.raises(ValueError, match="clipped"):
        module.Problem({**module.settings(True), "dt_exponents": [5, 10]})
