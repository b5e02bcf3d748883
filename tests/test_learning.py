"""Learned probabilities (spec §8, §9.6; §12 items 12-14, 18-20): the gradient estimator and its parts against
exact values, the Delta sweep, best-of-N and the fit, on analytic problems (OU and HTMC ladders)."""

import itertools
import math

import pytest
import torch

import multilevel_sde as mlsde
from helpers import DTYPE
from multilevel_sde import learning as L
from multilevel_sde.random_streams import derive_seed
from multilevel_sde.problems import OrnsteinUhlenbeck, htmc_ladder, perturbed_ladder

N_SE = 5.0


# -- a tiny problem: OU in 1-D, k = 2 levels, N = 3 steps ---------------------------------------------
def _tiny(floor=0.05, lam=0.02, paths=4, seed=3):
    ou = OrnsteinUhlenbeck(theta=1.0, mu=0.3, sigma=0.6, d=1)
    ladder = perturbed_ladder(ou, 2, kind="sine", eps=[0.8, 0.4], costs=[1.0, 4.0], seed=seed)
    drift = ladder.drift([1.0, 1.0])
    T, dt = 0.75, 0.25
    problem = L.LearningProblem(drift, lambda d: ou.sde(d), t1=T, dt=dt)
    gen = torch.Generator().manual_seed(seed)
    y0 = 1.5 * torch.randn(paths, 1, generator=gen, dtype=DTYPE)
    bm = mlsde.GridBrownian(t0=0.0, t1=T, dt=dt, size=(paths, 1), seed=seed, dtype=DTYPE)
    ref = ou.strong_solution(y0, [T], bm)[-1]  # the exact solution: the loss includes the EM error
    schedule = mlsde.Sigmoid([0.4, -0.6], [0.8, -1.1], floor=floor, time_scale=1 / T)
    return problem, L.PathSet(y0, bm, ref), schedule, lam


def _patterns(N, k):
    for bits in itertools.product([False, True], repeat=N * k):
        yield torch.tensor(bits).reshape(N, k)


def _exact_gradients(problem, paths, schedule, lam):
    """By enumeration of the 2^(kN) coin patterns (each replayed for every path): the exact gradients of
    E[mean loss] split into the score part (sum_P grad P(P) l(P)) and the path part (sum_P P(P) grad l(P)),
    and of the regulariser; autograd per pattern."""
    times = problem.step_times()
    parts = {"score": 0.0, "path": 0.0}
    params = (schedule.a, schedule.b)
    for pattern in _patterns(problem.num_steps, problem.num_levels):
        x, _, _ = problem.solve(schedule, paths, coupling="sample", coins=mlsde.Replay(pattern))
        loss = problem.loss(x, paths.reference).mean()
        p = schedule(times, None, None).T  # (N, k)
        prob = torch.where(pattern, p, 1 - p).prod()
        g_score = torch.autograd.grad(prob * loss.detach(), params)
        g_path = torch.autograd.grad(prob.detach() * loss, params)
        parts["score"] = parts["score"] + torch.cat(g_score)
        parts["path"] = parts["path"] + torch.cat(g_path)
    reg = L.regulariser(schedule, times, problem.costs, lam)
    parts["regulariser"] = torch.cat(torch.autograd.grad(reg, params))
    parts["total"] = parts["score"] + parts["path"] + parts["regulariser"]
    return {name: value.detach() for name, value in parts.items()}


# -- item 12: Bernoulli identities -------------------------------------------------------------------
@pytest.mark.parametrize("floor", [0.0, 1e-3, 0.2])
def test_bernoulli_score_identities_by_enumeration(floor):
    """E[g(B)(B-p)/(p(1-p))] = g(1) - g(0); E[g(B) score_z] = (1-floor) sig'(z) (g(1) - g(0)) and the b-version
    carries tau; the score is d/dz log P(B)."""
    g = {0: 0.7, 1: -1.9}
    for z in (-4.0, -0.3, 0.0, 1.2, 6.0):
        z_t = torch.tensor(z, dtype=DTYPE, requires_grad=True)
        s = torch.sigmoid(z_t)
        p = floor + (1 - floor) * s
        pd = p.detach()
        expect_p = sum(g[b] * (b - pd) / (pd * (1 - pd)) * (pd if b else 1 - pd) for b in (0, 1))
        assert float(expect_p) == pytest.approx(g[1] - g[0], rel=1e-12)
        score = {b: L.bernoulli_score(torch.tensor(bool(b)), p.detach(), s.detach()) for b in (0, 1)}
        expect_z = sum(g[b] * score[b] * (pd if b else 1 - pd) for b in (0, 1))
        dp_dz = (1 - floor) * s.detach() * (1 - s.detach())
        assert float(expect_z) == pytest.approx(float(dp_dz * (g[1] - g[0])), rel=1e-10, abs=1e-15)
        for b in (0, 1):  # the score is the derivative of the log-probability
            (dlog,) = torch.autograd.grad(torch.log(p if b else 1 - p), z_t, retain_graph=True)
            assert float(score[b]) == pytest.approx(float(dlog), rel=1e-10, abs=1e-15)
        if floor == 0.0:  # the paper's form: score = B - p
            assert float(score[1]) == pytest.approx(1 - float(pd)) and float(score[0]) == pytest.approx(-float(pd))
        # b-version: z = a + b tau, d/db E[g] = tau (1-floor) sig'(z) (g(1) - g(0)) = E[g(B) score tau]
        a, b_par, tau = torch.tensor(0.3, dtype=DTYPE), torch.tensor(z, dtype=DTYPE, requires_grad=True), 0.6
        pb = floor + (1 - floor) * torch.sigmoid(a + b_par * tau)
        (d_b,) = torch.autograd.grad(pb * g[1] + (1 - pb) * g[0], b_par)
        sb = torch.sigmoid(a + z * tau)
        pbv = floor + (1 - floor) * sb
        est = sum(g[bb] * L.bernoulli_score(torch.tensor(bool(bb)), pbv, sb) * tau * (pbv if bb else 1 - pbv)
                  for bb in (0, 1))
        assert float(est) == pytest.approx(float(d_b), rel=1e-10, abs=1e-15)


# -- item 20: regulariser ------------------------------------------------------------------------------
@pytest.mark.parametrize("floor", [0.0, 0.01])
def test_regulariser_gradient_matches_autograd_and_the_closed_form(floor):
    schedule = mlsde.Sigmoid([1.0, -0.5, -2.0], [0.5, -1.0, 2.0], floor=floor, time_scale=0.5)
    times = torch.linspace(0.0, 2.0, 9, dtype=DTYPE)[:-1]
    costs, lam = torch.tensor([1.0, 8.0, 64.0], dtype=DTYPE), 0.37
    reg = L.regulariser(schedule, times, costs, lam)
    auto_a, auto_b = torch.autograd.grad(reg, (schedule.a, schedule.b))
    grad_a, grad_b = L.regulariser_gradient(schedule, times, costs, lam)
    assert torch.allclose(grad_a, auto_a, rtol=1e-12) and torch.allclose(grad_b, auto_b, rtol=1e-12)
    tau = times * 0.5
    z = schedule.a.detach()[:, None] + schedule.b.detach()[:, None] * tau
    sig = torch.sigmoid(z)
    dp = (1 - floor) * sig * (1 - sig)  # p(1-p) when floor = 0 (spec §12 item 20)
    if floor == 0.0:
        p = sig
        assert torch.allclose(dp, p * (1 - p))
    assert torch.allclose(grad_a, lam * costs * dp.sum(1), rtol=1e-12)
    assert torch.allclose(grad_b, lam * costs * (dp * tau).sum(1), rtol=1e-12)
    value = lam * (schedule(times, None, costs) * costs[:, None]).sum()
    assert float(reg.detach()) == pytest.approx(float(value.detach()))


# -- item 13: forward gradient -----------------------------------------------------------------------
def test_forward_mode_jvp_is_the_autograd_path_derivative_and_keeps_no_graph():
    """With the coins held fixed, the jvp of each sample's loss along its own direction equals autograd's
    path gradient dotted with the direction (to rounding), and the pass saves no tensor for backward (its
    memory does not grow with the number of steps)."""
    problem, paths, schedule, _ = _tiny(paths=5)
    k, N, M = 2, problem.num_steps, len(paths)
    pattern = torch.rand(N, k, M, generator=torch.Generator().manual_seed(1)) < 0.6
    v = torch.randn(2, k, M, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        run = L.path_jvp(problem, schedule, paths, v, coins=mlsde.Replay(pattern))
    assert not saved
    assert torch.equal(run.coins, pattern)
    x, _, _ = problem.solve(schedule, paths, coupling="sample", coins=mlsde.Replay(pattern))
    losses = problem.loss(x, paths.reference)
    assert torch.allclose(run.losses, losses.detach(), rtol=1e-12)
    for m in range(M):
        ga, gb = torch.autograd.grad(losses[m], (schedule.a, schedule.b), retain_graph=True)
        expected = (ga * v[0, :, m]).sum() + (gb * v[1, :, m]).sum()
        assert float(run.jvp[m]) == pytest.approx(float(expected), rel=1e-9, abs=1e-12)


def test_forward_gradient_is_unbiased_for_the_autograd_gradient():
    """E_v[(grad l . v) v] = grad l: many directions on copies of one path with one coin pattern."""
    problem, paths, schedule, _ = _tiny(paths=1)
    copies = 4000
    tiled = paths.subset(torch.zeros(copies, dtype=torch.long))
    pattern = torch.tensor([[True, False], [True, True], [False, True]])
    v = torch.randn(2, 2, copies, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    run = L.path_jvp(problem, schedule, tiled, v, coins=mlsde.Replay(pattern))
    x, _, _ = problem.solve(schedule, paths, coupling="sample", coins=mlsde.Replay(pattern))
    grad = torch.cat(torch.autograd.grad(problem.loss(x, paths.reference).sum(), (schedule.a, schedule.b)))
    samples = run.jvp[:, None] * v.reshape(4, copies).T  # (copies, 2k)
    se = samples.std(0) / math.sqrt(copies)
    assert ((samples.mean(0) - grad).abs() <= N_SE * se).all(), (samples.mean(0), grad, se)
    assert (grad.abs() > 3 * se).any()  # the check has power


# -- item 14: the combined estimator against the exact gradient ---------------------------------------
@pytest.mark.parametrize("baseline, direction", [(False, "sample"), (True, "sample"), (False, "batch")])
def test_combined_estimator_is_unbiased_against_enumeration(baseline, direction):
    """k = 2, N = 3, 1-D: the mean of many draws of the estimator (and of its REINFORCE and path parts)
    matches the exact gradient from all 2^6 coin patterns, within 5 standard errors of the draws."""
    problem, paths, schedule, lam = _tiny()
    exact = _exact_gradients(problem, paths, schedule, lam)
    assert exact["score"].abs().max() > 0.05 and exact["path"].abs().max() > 0.05  # both parts matter
    copies = 200
    tiled = paths.subset(torch.arange(len(paths)).repeat(copies))
    draws = 20 if direction == "sample" else 60
    parts = {"total": [], "score": [], "path": []}
    for i in range(draws):
        est = L.estimate_gradient(problem, schedule, tiled, lam, baseline=baseline, direction=direction, seed=i)
        parts["total"].append(est.grad)
        parts["score"].append(torch.cat(est.reinforce))
        parts["path"].append(torch.cat(est.path))
        reg = torch.cat(est.regulariser_grad)
        assert torch.allclose(reg, exact["regulariser"], rtol=1e-10)
    for name, values in parts.items():
        values = torch.stack(values)
        se = values.std(0) / math.sqrt(draws)
        err = (values.mean(0) - exact[name]).abs()
        assert (err <= N_SE * se).all(), (name, values.mean(0), exact[name], se)


def test_baseline_reduces_the_reinforce_variance_when_losses_share_a_mean():
    problem, paths, schedule, lam = _tiny()
    tiled = paths.subset(torch.arange(len(paths)).repeat(100))
    est = L.estimate_gradient(problem, schedule, tiled, lam, seed=0)
    assert est.reinforce_variance_baseline < est.reinforce_variance
    assert est.error == pytest.approx(float(est.losses.mean()))
    assert est.objective == pytest.approx(est.error + est.regulariser)


# -- problems for the sweep, best-of-N and the fit -----------------------------------------------------
def _htmc(k=3, steps=16, learn=200, heldout=400):
    ladder = htmc_ladder(k, gamma=3.0, d=2, seed=0)
    drift = ladder.drift([1.0] * k)
    problem = L.LearningProblem(drift, mlsde.MultilevelSDE(drift, 1.0), t1=1.0, dt=1 / steps)

    def make(M, seed):
        gen = torch.Generator().manual_seed(seed)
        y0 = torch.randn(M, 2, generator=gen, dtype=DTYPE)
        bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=1 / steps, size=(M, 2), seed=seed, dtype=DTYPE)
        return problem.paths(y0, bm)

    return problem, ladder, make(learn, 1), make(heldout, 2)


def test_reference_is_top_level_em_and_a_path_set_splits():
    problem, ladder, learn, _ = _htmc(learn=50)
    x = mlsde.sdeint(mlsde.MultilevelSDE(ladder.levels[-1], 1.0), learn.y0, [0.0, 1.0], bm=learn.bm, dt=1 / 16)[-1]
    assert torch.equal(learn.reference, x)
    index = torch.tensor([3, 1, 3, 40])
    sub = learn.subset(index)
    assert torch.equal(sub.y0, learn.y0[index]) and torch.equal(sub.reference, learn.reference[index])
    assert torch.equal(sub.bm(0.25, 0.5), learn.bm(0.25, 0.5)[index])
    assert torch.equal(problem.reference(sub.y0, sub.bm), sub.reference)


# -- item 19: Delta sweep ----------------------------------------------------------------------------
def test_delta_sweep_cost_is_monotone_in_delta():
    problem, ladder, learn, heldout = _htmc()
    schedule = mlsde.Sigmoid([1.0, -1.5, -3.0], [0.5, -1.0, 1.5], floor=1e-3)
    deltas = [-3.0, -1.5, -0.5, 0.0, 0.5, 1.5, 3.0]
    points = L.delta_sweep(schedule, deltas, lambda s: L.evaluate(problem, s, heldout, seed=7))
    assert [pt.delta for pt in points] == deltas
    expected = [pt.evaluation.expected_cost for pt in points]
    theory = [pt.evaluation.theory_cost for pt in points]
    realised = [pt.evaluation.cost for pt in points]
    assert all(x < y for x, y in zip(expected, expected[1:]))
    assert all(x < y for x, y in zip(theory, theory[1:]))
    assert all(x <= y for x, y in zip(realised, realised[1:]))  # same coin stream: u < p with the same u
    assert points[-1].evaluation.error < points[0].evaluation.error
    assert torch.allclose(points[0].schedule.a, schedule.a - 3.0) and torch.equal(points[0].schedule.b, schedule.b)
    times = problem.step_times()
    # theory cost per path = sum_n sum_l p_l(t_n) C_l (the regulariser with lam = 1)
    assert theory[3] == pytest.approx(float(L.regulariser(schedule, times, problem.costs, 1.0).detach()), rel=1e-9)


# -- item 18: best-of-N --------------------------------------------------------------------------------
def test_best_of_n_selects_the_minimal_error_deterministically():
    problem, ladder, learn, heldout = _htmc()
    schedule = mlsde.Sigmoid([0.0, -1.5, -2.5], floor=1e-3)
    best = L.best_of_n(problem, schedule, learn, n=15, seed=11)
    assert len(best.errors) == 15 and best.errors[best.index] == min(best.errors)
    assert len(set(best.errors)) > 1  # the draws differ
    assert best.pattern.shape == (problem.num_steps, 3) and best.pattern.dtype == torch.bool
    again = L.best_of_n(problem, schedule, learn, n=15, seed=11)
    assert torch.equal(again.pattern, best.pattern) and again.errors == best.errors
    # replaying the pattern on the selection set gives the selected error and cost back
    replay = L.evaluate(problem, schedule, learn, coupling="batch", coins=best.replay())
    assert replay.error == pytest.approx(best.errors[best.index], rel=1e-12)
    assert replay.cost == pytest.approx(best.costs[best.index])
    # n = 1 is a plain draw: the first draw of the same seed
    one = L.best_of_n(problem, schedule, learn, n=1, seed=11)
    _, _, drift = problem.solve(schedule, learn, coupling="batch", seed=derive_seed(11, 0), record=True)
    assert one.index == 0 and torch.equal(one.pattern, drift.recorded_coins())
    assert one.errors == best.errors[:1]
    # the pattern applies to other paths (held-out) with the batch coupling
    held = L.evaluate(problem, schedule, heldout, coupling="batch", coins=best.pattern)
    assert held.cost == pytest.approx(replay.cost)  # the cost is a function of the pattern


# -- the fit -------------------------------------------------------------------------------------------
def test_fit_lowers_the_held_out_objective_and_leaves_the_start_untouched():
    problem, ladder, learn, heldout = _htmc()
    start = L.sigmoid_from_probabilities([0.9, 0.9, 0.9], floor=1e-3)  # far too much compute for this lam
    lam = 2e-5
    result = L.fit_probabilities(problem, start, learn, lam=lam, steps=12, batch=100, seed=0)
    assert torch.allclose(start.a.detach(), L.sigmoid_from_probabilities([0.9] * 3).a.detach())
    assert len(result.history) == 12 and {"error", "cost", "grad_norm", "a", "b"} <= set(result.history[0])

    def objective(s):
        ev = L.evaluate(problem, s, heldout, seed=5)
        return ev.error + lam * ev.theory_cost, ev

    before, ev0 = objective(start)
    after, ev1 = objective(result.schedule)
    assert after < 0.8 * before and ev1.cost < ev0.cost
    again = L.fit_probabilities(problem, start, learn, lam=lam, steps=12, batch=100, seed=0)
    assert torch.equal(again.schedule.a, result.schedule.a) and torch.equal(again.schedule.b, result.schedule.b)


def test_fit_without_regulariser_moves_toward_less_error():
    problem, ladder, learn, heldout = _htmc()
    start = L.sigmoid_from_probabilities([0.5, 0.05, 0.01], floor=1e-3)
    result = L.fit_probabilities(problem, start, learn, lam=0.0, steps=8, batch=200, lr=1.0, baseline=True,
                                 optimizer="adam", seed=1)
    e0 = L.evaluate(problem, start, heldout, seed=5).error
    e1 = L.evaluate(problem, result.schedule, heldout, seed=5).error
    assert e1 < e0


def test_sigmoid_from_probabilities_and_validation():
    s = L.sigmoid_from_probabilities([1.0, 0.25, 0.01], floor=1e-3, time_scale=0.5)
    p = s(0.0, None, None).detach()
    assert p[0] > 0.999 and p[1:].tolist() == pytest.approx([0.25, 0.01], rel=1e-12)
    assert s.time_scale == 0.5 and torch.equal(s.b.detach(), torch.zeros(3, dtype=DTYPE))
    inv = L.sigmoid_from_probabilities(mlsde.InverseCost(4.0), costs=[2.0, 8.0, 32.0])
    assert inv(0.0, None, None).detach().tolist() == pytest.approx([1.0, 0.5, 0.125], abs=1e-5)
    problem, paths, schedule, lam = _tiny()
    with pytest.raises(TypeError, match="Sigmoid"):
        L.estimate_gradient(problem, mlsde.Constant([0.5, 0.5]), paths, lam)
    with pytest.raises(ValueError, match="direction"):
        L.estimate_gradient(problem, schedule, paths, lam, direction="level")
    with pytest.raises(ValueError, match="lam"):
        L.fit_probabilities(problem, schedule, paths, lam=-1.0)
    with pytest.raises(ValueError, match="n must be"):
        L.best_of_n(problem, schedule, paths, n=0)
    with pytest.raises(ValueError, match="costs"):
        L.LearningProblem(mlsde.MultilevelDrift([lambda t, y: -y], [1.0]), lambda d: mlsde.MultilevelSDE(d, 1.0),
                          t1=1.0, dt=0.1)
    with pytest.raises(ValueError, match="directions"):
        L.path_jvp(problem, schedule, paths, torch.zeros(2, 2, 1))


def test_fit_options_average_the_tail_and_freeze_b():
    problem, paths, schedule, lam = _tiny()
    seen = []
    result = L.fit_probabilities(problem, schedule, paths, lam=lam, steps=4, batch=10, optimizer="sgd", lr=0.2,
                                 average=0.5, lr_decay="linear", learn_b=False, seed=2,
                                 callback=lambda i, r: seen.append(r["a"]))
    assert len(seen) == 4 and result.settings["average"] == 0.5
    after = [torch.tensor(a, dtype=DTYPE) for a in seen[1:]]  # the iterates after steps 0..2
    # the last two iterates are those after steps 2 and 3; the one after step 3 is not in the history, so
    # rerun without averaging to get it
    last = L.fit_probabilities(problem, schedule, paths, lam=lam, steps=4, batch=10, optimizer="sgd", lr=0.2,
                               lr_decay="linear", learn_b=False, seed=2).schedule.a.detach()
    assert torch.allclose(result.schedule.a.detach(), (after[-1] + last) / 2, rtol=1e-12)
    assert torch.equal(result.schedule.b, schedule.b)  # frozen
    assert not torch.equal(last, schedule.a.detach())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_max_step_caps_every_update_whatever_the_optimiser(optimizer):
    """Adam rescales a shrunken gradient back up; the cap holds on the update actually taken."""
    problem, paths, schedule, lam = _tiny()
    seen = []
    result = L.fit_probabilities(problem, schedule, paths, lam=lam, steps=4, batch=10, optimizer=optimizer, lr=0.3,
                                 max_step=1e-3, seed=2, callback=lambda i, r: seen.append(r["a"] + r["b"]))
    final = torch.cat([result.schedule.a.detach(), result.schedule.b.detach()])
    iterates = [torch.tensor(v, dtype=DTYPE) for v in seen] + [final]
    steps = [float((b - a).norm()) for a, b in zip(iterates, iterates[1:])]
    assert max(steps) <= 1e-3 * (1 + 1e-9) and min(steps) > 0.5e-3  # capped, and still moving
    free = L.fit_probabilities(problem, schedule, paths, lam=lam, steps=1, batch=10, optimizer=optimizer, lr=0.3,
                               seed=2).schedule
    assert float((torch.cat([free.a, free.b]).detach() - iterates[0]).norm()) > 1e-2  # the cap is what held it


def test_sigmoid_from_probabilities_warns_where_it_cannot_start_below_its_floor():
    with pytest.warns(UserWarning, match=r"floor=0\.001 are raised to it: \(level, p\) \[\(3, 0\.0002\)\]"):
        start = L.sigmoid_from_probabilities([1.0, 0.3, 0.0002])
    p = start(torch.tensor(0.0, dtype=DTYPE), 1.0, torch.ones(3, dtype=DTYPE)).detach()
    assert float(p[2]) >= 0.001 and float(p[1]) == pytest.approx(0.3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.sigmoid_from_probabilities([1.0, 0.3, 0.0002], floor=1e-4)
