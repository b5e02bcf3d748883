"""The true-error panel (issue #20), quick settings: files, monotone true errors, ML-EM cheaper, reproducible."""

import json
import math

import pytest

from multilevel_sde.true_error import QUICK, format_true_error, run_true_error_panel


def _no_constant(name):
    raise ValueError(f"non-finite constant {name} in the JSON")


def _numbers(obj):
    """The result without timings (the only fields a rerun may change)."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    out = tmp_path_factory.mktemp("true_error")
    return run_true_error_panel(out, seed=0, quick=True), out


def test_json_and_png_are_written_and_parse(panel):
    result, out = panel
    text = (out / "true_error.json").read_text()
    assert json.loads(text, parse_constant=_no_constant) == json.loads(json.dumps(result))
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    png = (out / "true_error.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "true_error.png")).shape[:2] == (540, 720)


def test_true_error_decreases_with_eps_for_both_methods(panel):
    result, _ = panel
    assert [p["eps"] for p in result["points"]] == QUICK.eps
    for method in ("em", "mlem"):
        errors = [p[method]["error"] for p in result["points"]]
        assert all(isinstance(e, float) and e > 0 for e in errors)
        assert all(b < a for a, b in zip(errors, errors[1:])), (method, errors)
        assert errors[-1] < errors[0] / 8  # eps fell 16x: the error follows, it is not a floor
    # the reference is far more accurate than the smallest error it measures
    assert result["reference_error_estimate"] < 0.1 * min(p["em"]["error"] for p in result["points"])


def test_mlem_is_cheaper_at_its_smallest_true_error(panel):
    result, _ = panel
    assert not result["speedup_extrapolated"]
    assert result["mlem_cost_at_min_error"] < result["em_cost_at_min_error"]
    assert result["speedup_at_min_error"] > 1.5
    smallest = min(result["points"], key=lambda p: p["mlem"]["error"])
    assert result["min_error_mlem"] == smallest["mlem"]["error"]
    assert smallest["mlem"]["some_p_below_one"] and smallest["mlem"]["probabilities"][0] == 1.0


def test_exponents_are_finite_with_intervals_and_ml_em_is_lower(panel):
    result, _ = panel
    fits = result["fits"]
    assert result["fit_eps"] == [p["eps"] for p in result["points"] if p["mlem"]["some_p_below_one"]]
    for method in ("em", "mlem"):
        fit = fits[method]
        lo, hi = fit["interval"]
        assert all(math.isfinite(v) for v in (fit["exponent"], lo, hi))
        assert lo < fit["exponent"] < hi and fit["points"] == len(result["fit_eps"]) >= 3
    assert fits["mlem"]["exponent"] < fits["em"]["exponent"]
    assert result["exponent_gap"] == pytest.approx(fits["em"]["exponent"] - fits["mlem"]["exponent"])
    assert set(result["targets"]) >= {"speedup_met", "exponent_gap_met"}


def test_summary_and_caveat(panel):
    result, _ = panel
    text = format_true_error(result)
    assert "EM" in text and "ML-EM" in text and "95%" in text and "targets" in text
    assert f"{result['speedup_at_min_error']:.1f}x" in text
    assert "Delta_1" in result["caveat"] and "not the paper's claim" in result["caveat"]


def test_same_seed_gives_identical_numbers(panel):
    result, _ = panel
    again = run_true_error_panel(seed=0, quick=True)
    assert _numbers(again) == _numbers(result)
