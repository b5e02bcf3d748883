"""sdeint / odeint: torchsde and torchdiffeq equivalence, reduction to EM, path moments (items 3, 4)."""

import numpy as np
import pytest
import torch
import torchdiffeq
import torchsde

import multilevel_sde as mlsde
from multilevel_sde import brownian
from multilevel_sde.random_streams import derive_seed
from helpers import DTYPE, SharedPath, affine_ladder, mean_within, moment_within

D = 3


class PlainSDE(torch.nn.Module):
    """A deterministic-drift SDE in torchsde's protocol."""

    sde_type = "ito"

    def __init__(self, noise_type="diagonal", m=D):
        super().__init__()
        self.noise_type = noise_type
        self.m = m
        self.G = torch.randn(D, m, generator=torch.Generator().manual_seed(0), dtype=DTYPE) * 0.3

    def f(self, t, y):
        return -y + 0.5 * torch.sin(3 * y) + torch.cos(t)

    def g(self, t, y):
        if self.noise_type == "diagonal":
            return 0.4 + 0.1 * torch.cos(y)
        if self.noise_type == "scalar":
            return (0.3 * torch.tanh(y)).unsqueeze(-1)
        return (self.G * (1 + 0.1 * torch.sin(y).unsqueeze(-1))).expand(y.shape[0], D, self.m)


@pytest.mark.parametrize("noise_type,m", [("diagonal", D), ("scalar", 1), ("general", 2)])
@pytest.mark.parametrize("dt,ts", [(0.01, [0.0, 1.0]), (0.03, [0.0, 0.25, 0.5, 1.0]), (0.07, [0.1, 0.33, 0.9])])
def test_sdeint_matches_torchsde_euler(noise_type, m, dt, ts):
    sde = PlainSDE(noise_type, m)
    y0 = torch.randn(4, D, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    ts = torch.tensor(ts, dtype=DTYPE)
    for bm in (
        torchsde.BrownianInterval(t0=ts[0], t1=ts[-1], size=(4, m), dtype=DTYPE, entropy=3),
        mlsde.GridBrownian(t0=float(ts[0]), t1=float(ts[-1]), dt=dt, size=(4, m), seed=2, dtype=DTYPE),
    ):
        ours = mlsde.sdeint(sde, y0, ts, bm=bm, dt=dt)
        theirs = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=dt)
        assert ours.shape == (len(ts), 4, D)
        assert torch.equal(ours, theirs)


def test_sdeint_matches_torchsde_in_float32():
    sde = PlainSDE()
    y0 = torch.randn(4, D, generator=torch.Generator().manual_seed(1)).float()
    sde.G = sde.G.float()
    ts = torch.tensor([0.0, 0.3, 1.0])
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(4, D), entropy=5)
    assert torch.equal(mlsde.sdeint(sde, y0, ts, bm=bm, dt=0.013), torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=0.013))


class StoredDriftSDE(torch.nn.Module):
    """Drift and diffusion returned from stored tensors: the solver must never write into them."""

    sde_type, noise_type = "ito", "diagonal"

    def __init__(self, drift: torch.Tensor, diffusion: torch.Tensor):
        super().__init__()
        self.drift, self.diffusion = drift, diffusion

    def f(self, t, y):
        return self.drift

    def g(self, t, y):
        return self.diffusion


@pytest.mark.parametrize("drift_shape,drift_dtype", [((4, D), DTYPE), ((D,), DTYPE), ((4, D), torch.float32)])
def test_sdeint_leaves_returned_tensors_alone_and_promotes_like_out_of_place_sums(drift_shape, drift_dtype):
    """The step sums in place on its own product f*h only when that changes nothing: a drift of another
    shape (broadcast) or dtype (promotion) gets the out-of-place result, and stored outputs stay."""
    gen = torch.Generator().manual_seed(4)
    drift = torch.randn(drift_shape, generator=gen, dtype=DTYPE).to(drift_dtype)
    diffusion = torch.rand(4, D, generator=gen, dtype=DTYPE)
    kept_drift, kept_diffusion = drift.clone(), diffusion.clone()
    sde = StoredDriftSDE(drift, diffusion)
    y0 = torch.randn(4, D, generator=gen, dtype=DTYPE)
    ts = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)  # on the grid of dt = 1/8: steps 2 and 8
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.125, size=(4, D), seed=3, dtype=DTYPE)
    ours = mlsde.sdeint(sde, y0, ts, bm=bm, dt=0.125)
    y, states = y0, [y0]
    for n in range(bm.num_steps):  # torchsde's Euler step, out of place ((batch, d) drifts only there)
        y = (y + drift * 0.125) + diffusion * bm.increment(n)
        states.append(y)
    assert ours.dtype == DTYPE
    assert torch.equal(ours, torch.stack([states[0], states[2], states[8]]))
    assert torch.equal(drift, kept_drift) and torch.equal(diffusion, kept_diffusion)


def test_torchsde_runs_a_multilevel_sde():
    """torchsde.sdeint(method="euler") drives ML-EM; with every p = 1 it is EM with the top level."""
    levels, _, _ = affine_ladder(3, D, 0)
    y0 = torch.randn(5, D, dtype=DTYPE)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.01, size=(5, D), seed=0, dtype=DTYPE)
    top = mlsde.MultilevelSDE(levels[-1], 0.5, dt=0.01)
    ml = mlsde.MultilevelSDE(mlsde.MultilevelDrift(levels, [1.0, 1.0, 1.0], costs=[1, 2, 4]), 0.5, dt=0.01)
    reference = torchsde.sdeint(top, y0, ts, bm=bm, method="euler", dt=0.01)
    assert torch.equal(torchsde.sdeint(ml, y0, ts, bm=bm, method="euler", dt=0.01), reference)
    assert torch.equal(mlsde.sdeint(ml, y0, ts, bm=bm), reference)

    thin = mlsde.MultilevelDrift(levels, [1.0, 0.3, 0.1], costs=[1, 2, 4], seed=1)
    out = torchsde.sdeint(mlsde.MultilevelSDE(thin, 0.5, dt=0.01), y0, ts, bm=bm, method="euler", dt=0.01)
    assert torch.isfinite(out).all() and thin.stats.steps >= 100
    assert thin.stats.evaluations[2] < thin.stats.evaluations[0]


@pytest.mark.parametrize("coupling", ["batch", "sample"])
def test_all_ones_ml_em_is_em_bitwise_and_seeds_repeat(coupling):
    levels, _, _ = affine_ladder(4, D, 1)
    y0 = torch.randn(6, D, dtype=DTYPE)
    ts = torch.linspace(0, 1, 5, dtype=DTYPE)
    em = mlsde.sdeint(mlsde.MultilevelSDE(levels[-1], 0.7, dt=0.02), y0, ts, seed=4)
    ones = mlsde.MultilevelDrift(levels, [1.0] * 4, costs=[1, 2, 4, 8], coupling=coupling)
    assert torch.equal(mlsde.sdeint(mlsde.MultilevelSDE(ones, 0.7, dt=0.02), y0, ts, seed=4), em)
    # k = 1, p = 1 is plain EM
    single = mlsde.MultilevelDrift(levels[-1:], [1.0], costs=[1.0], coupling=coupling)
    assert torch.equal(mlsde.sdeint(mlsde.MultilevelSDE(single, 0.7, dt=0.02), y0, ts, seed=4), em)
    # identical seeds: identical ML-EM; different seeds differ
    thin = mlsde.MultilevelDrift(levels, [1.0, 0.5, 0.2, 0.1], costs=[1, 2, 4, 8], coupling=coupling)
    sde = mlsde.MultilevelSDE(thin, 0.7, dt=0.02)
    a, sa = mlsde.sdeint(sde, y0, ts, seed=11, return_stats=True)
    b, sb = mlsde.sdeint(sde, y0, ts, seed=11, return_stats=True)
    c = mlsde.sdeint(sde, y0, ts, seed=12)
    assert torch.equal(a, b) and sa.evaluations == sb.evaluations and sa.seed == 11
    assert not torch.equal(a, c)


def test_ml_euler_ode_reduces_to_euler_and_matches_torchdiffeq():
    levels, _, _ = affine_ladder(3, D, 2)
    y0 = torch.randn(4, D, dtype=DTYPE)
    for t in (torch.linspace(0, 1, 4, dtype=DTYPE), torch.tensor([1.0, 0.6, 0.0], dtype=DTYPE)):
        theirs = torchdiffeq.odeint(levels[-1], y0, t, method="euler", options={"step_size": 0.03})
        assert torch.equal(mlsde.odeint(levels[-1], y0, t, options={"step_size": 0.03}), theirs)
        ones = mlsde.MultilevelDrift(levels, [1.0, 1.0, 1.0], costs=[1, 2, 4])
        assert torch.equal(mlsde.odeint(ones, y0, t, options={"step_size": 0.03}), theirs)
        # no step_size: the grid is t itself, as in torchdiffeq
        assert torch.equal(mlsde.odeint(levels[-1], y0, t), torchdiffeq.odeint(levels[-1], y0, t, method="euler"))
    # sigma = 0 SDE is the Euler method
    t = torch.linspace(0, 1, 3, dtype=DTYPE)
    sde = mlsde.MultilevelSDE(levels[-1], 0.0, dt=0.05)
    ode = mlsde.odeint(levels[-1], y0, t, options={"grid": torch.linspace(0, 1, 21, dtype=DTYPE)})
    assert torch.allclose(mlsde.sdeint(sde, y0, t, seed=0), ode, rtol=0, atol=1e-14)


def test_non_uniform_grid_steps_exactly_on_the_grid():
    grid = torch.tensor([0.0, 0.1, 0.15, 0.4, 0.41, 1.0], dtype=DTYPE)
    levels, _, _ = affine_ladder(2, D, 3)
    drift = mlsde.MultilevelDrift(levels, mlsde.Theorem1(eps=0.25, gamma=3.0), costs=[1, 8])
    seen = []
    y0 = torch.randn(3, D, dtype=DTYPE)
    ys, stats = mlsde.sdeint(mlsde.MultilevelSDE(drift, 1.0), y0, [0.0, 0.4, 1.0], grid=grid, seed=0,
                             callback=lambda n, t, y: seen.append(float(t)), return_stats=True)
    assert seen == grid[1:].tolist() and stats.steps == 5 and ys.shape == (3, 3, D)
    # the step size handed to the schedule is each step's own (Theorem1: p proportional to dt)
    drift.record_coins()
    mlsde.sdeint(mlsde.MultilevelSDE(drift, 1.0), y0, [0.0, 1.0], grid=grid, seed=0)
    dts = [r.dt for r in drift.recorded]
    assert dts == pytest.approx(torch.diff(grid).tolist(), rel=1e-12)


def test_conditional_mean_and_covariance_of_a_linear_ladder():
    """For an affine ladder, E_B[X_N] is EM with f^k on the same noise, and Cov_B[X_N] follows
    Sigma_{n+1} = (I + h A_k) Sigma_n (I + h A_k)^T + h^2 sum_l (1/p_l - 1) E[Delta_l Delta_l^T] (item 4)."""
    k, h, n_steps, sigma, batch = 3, 0.05, 20, 0.6, 20000
    levels, A, b = affine_ladder(k, D, 5)
    p = torch.tensor([0.9, 0.4, 0.2], dtype=DTYPE)
    drift = mlsde.MultilevelDrift(levels, p.tolist(), costs=[1, 2, 4], coupling="sample", seed=0)
    x0 = torch.randn(1, D, generator=torch.Generator().manual_seed(8), dtype=DTYPE)
    noise = mlsde.GridBrownian(t0=0.0, t1=h * n_steps, dt=h, size=(1, D), seed=3, dtype=DTYPE)
    shared = SharedPath(noise, batch)  # one Brownian path for every sample: only the coins vary
    ts = torch.tensor([0.0, h * n_steps], dtype=DTYPE)
    XN = mlsde.sdeint(mlsde.MultilevelSDE(drift, sigma, dt=h), x0.expand(batch, D), ts, bm=shared)[-1]

    m, S = x0[0].clone(), torch.zeros(D, D, dtype=DTYPE)
    dA = [A[0]] + [A[l] - A[l - 1] for l in range(1, k)]
    db = [b[0]] + [b[l] - b[l - 1] for l in range(1, k)]
    I = torch.eye(D, dtype=DTYPE)
    for n in range(n_steps):
        second = S + torch.outer(m, m)
        extra = sum(
            (1 / p[l] - 1)
            * (dA[l] @ second @ dA[l].T + torch.outer(dA[l] @ m, db[l]) + torch.outer(db[l], dA[l] @ m)
               + torch.outer(db[l], db[l]))
            for l in range(k)
        )
        S = (I + h * A[-1]) @ S @ (I + h * A[-1]).T + h**2 * extra
        m = m + h * (A[-1] @ m + b[-1]) + sigma * noise.increment(n)[0]
    mean_within(XN, m, S.diagonal().sqrt())
    centred = XN - m
    moment_within((centred.unsqueeze(2) * centred.unsqueeze(1)).reshape(batch, -1), S.reshape(-1))




def test_grid_brownian_statistics_and_sharing():
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.01, size=(4000, 2), seed=0, dtype=DTYPE)
    W1 = bm(0.0, 1.0)
    moment_within(W1**2, torch.ones(2, dtype=DTYPE))
    assert torch.equal(bm(0.0, 1.0), W1)  # the same path on every query
    assert torch.allclose(bm(0.0, 0.5) + bm(0.5, 1.0), W1, atol=1e-12)
    assert torch.equal(bm(0.3, 0.31), bm.increment(30))
    again = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.01, size=(4000, 2), seed=0, dtype=DTYPE)
    assert torch.equal(again(0.0, 1.0), W1)
    other = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.01, size=(4000, 2), seed=1, dtype=DTYPE)
    assert not torch.equal(other(0.0, 1.0), W1)


def test_grid_brownian_small_chunks_give_one_path_in_any_query_order():
    """With many chunks (7 steps each: 15 chunks for 100 steps) and one kept in memory at a time, a chunk that
    was dropped is drawn again identically: random access in any order, sums over several chunks and a twin
    queried in another order all see one path, whose chunks are independent (W(1) has variance 1)."""
    def small_chunks():
        bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.01, size=(4000, 2), seed=0, dtype=DTYPE)
        bm.chunk_steps = 7  # before any query
        return bm

    bm, twin = small_chunks(), small_chunks()
    order = (50, 3, 50, 99, 0, 98, 3)
    first = [bm.increment(i).clone() for i in order]
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], first[6])
    assert all(torch.equal(twin.increment(i), x) for i, x in reversed(list(zip(order, first))))
    W1 = bm(0.0, 1.0)
    assert torch.allclose(W1, sum(twin.increment(i) for i in range(100)), atol=1e-12)
    assert torch.equal(bm.increments(3, 51), twin.increments(3, 51))
    moment_within(W1**2, torch.ones(2, dtype=DTYPE))  # 15 copies of one chunk would give a variance near 14


def test_grid_brownian_cache_all_keeps_the_same_path_in_memory(monkeypatch):
    """cache="all" gives the increments of the default one-chunk cache; predraw() draws every chunk up front
    (ceil(100 / 7) = 15 generators), after which every query is served from memory (views of the kept chunks,
    no generator made), while cache="chunk" draws lazily and draws a dropped chunk again."""
    drawn = []  # the chunk seeds of the generators made: one per chunk drawn
    make_generator = brownian.make_generator
    monkeypatch.setattr(brownian, "make_generator", lambda seed, device: drawn.append(seed)
                        or make_generator(seed, device))

    def small_chunks(cache):
        bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.01, size=(3, 2), seed=4, dtype=DTYPE, cache=cache)
        bm.chunk_steps = 7
        return bm

    one = small_chunks("chunk")
    assert drawn == []  # nothing is drawn before a query
    kept = small_chunks("all").predraw()
    assert len(drawn) == len(set(drawn)) == 15
    drawn.clear()
    pointers = [kept.increment(i).data_ptr() for i in range(100)]
    for i in (99, 0, 50, 6, 7, 50):
        assert torch.equal(kept.increment(i), one.increment(i))
    # the one-chunk cache drew chunk j (seeded derive_seed(seed, j)) whenever another chunk than the last was asked
    assert drawn == [derive_seed(4, j) for j in (14, 0, 7, 0, 1, 7)]
    drawn.clear()
    assert torch.equal(kept(0.0, 1.0), one(0.0, 1.0))
    assert [kept.increment(i).data_ptr() for i in range(100)] == pointers  # nothing redrawn
    assert len(drawn) == 15  # all by the one-chunk cache (kept's path is in memory)
    drawn.clear()
    held = one.increment(99)  # the last chunk queried (14), kept: a view of its buffer, which it keeps alive
    assert one.increment(98).data_ptr() == held.data_ptr() - held.element_size() * held.numel() and drawn == []
    one.increment(0)
    again = one.increment(99)  # chunk 14 was dropped for chunk 0: drawn again, identically, in a new buffer
    assert torch.equal(again, held) and again.data_ptr() != held.data_ptr()
    assert "cache='all'" in repr(kept)


def test_sdeint_reads_a_grid_brownian_by_index(monkeypatch):
    """Steps on the path's grid read its increments by index, found once per solve, also when the solver's
    float32 grid was accumulated differently from the path's float64 one; a coarser grid sums increments;
    a grid off the path's is refused before any step is taken. Results equal torchsde's queries bm(ta, tb)."""
    sde = PlainSDE()
    sde.G = sde.G.float()
    y0 = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    ts = torch.tensor([0.0, 0.45, 1.0])
    bm = mlsde.GridBrownian(t0=0.0, t1=1.0, dt=0.01, size=(4, D), seed=6)
    assert not np.array_equal(mlsde.grid.uniform_grid(0.0, 1.0, 0.01, np.float32).astype(np.float64), bm.times)
    for dt in (0.01, 0.03):
        theirs = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=dt)
        queries = []
        original = mlsde.GridBrownian.index_of
        monkeypatch.setattr(mlsde.GridBrownian, "index_of", lambda self, t: queries.append(t) or original(self, t))
        ours = mlsde.sdeint(sde, y0, ts, bm=bm, dt=dt)
        monkeypatch.undo()
        assert torch.equal(ours, theirs) and queries == []
    with pytest.raises(ValueError, match=r"GridBrownian queried at t=0\.00499\d*, which is not on its grid"):
        mlsde.sdeint(sde, y0, ts, bm=bm, dt=0.005)


def test_sdeint_default_noise_is_seeded():
    sde = PlainSDE()
    y0 = torch.zeros(3, D, dtype=DTYPE)
    a, stats = mlsde.sdeint(sde, y0, [0.0, 1.0], dt=0.125, seed=5, return_stats=True)
    assert torch.equal(a, mlsde.sdeint(sde, y0, [0.0, 1.0], dt=0.125, seed=5))
    assert not torch.equal(a, mlsde.sdeint(sde, y0, [0.0, 1.0], dt=0.125, seed=6))
    assert stats.steps == 8 and stats.evaluations == [24] and stats.seed == 5
    # like torchsde, steps accumulate t + dt in floating point: 10 * 0.1 < 1 leaves an 11th, tiny step
    assert mlsde.sdeint(sde, y0, [0.0, 1.0], dt=0.1, seed=5, return_stats=True)[1].steps == 11
    fresh = mlsde.sdeint(sde, y0, [0.0, 1.0], dt=0.1, return_stats=True)[1]
    assert isinstance(fresh.seed, int)
    assert np.isfinite(stats.total_time)


def test_stats_seed_reproduces_the_solve_or_is_none():
    """``stats.seed`` replays a solve exactly; where no single seed does (seed=None with a MultilevelDrift: the
    coins go on from the drift's own stream) it is None rather than a seed the coins never used."""
    levels, _, _ = affine_ladder(3, D, 4)
    y0 = torch.ones(16, D, dtype=DTYPE)

    def sde():
        return mlsde.MultilevelSDE(mlsde.MultilevelDrift(levels, [1.0, 0.5, 0.25], costs=[1, 2, 4], seed=0), 0.3)

    for method in ("euler", "poisson"):
        ys, stats = mlsde.sdeint(sde(), y0, [0.0, 1.0], dt=0.05, method=method, return_stats=True)
        assert stats.seed is None
        ys, stats = mlsde.sdeint(sde(), y0, [0.0, 1.0], dt=0.05, method=method, seed=7, return_stats=True)
        assert stats.seed == 7
        assert torch.equal(ys, mlsde.sdeint(sde(), y0, [0.0, 1.0], dt=0.05, method=method, seed=stats.seed))
    plain = PlainSDE()
    ys, stats = mlsde.sdeint(plain, y0, [0.0, 1.0], dt=0.05, return_stats=True)  # a fresh path, and no coins
    assert torch.equal(ys, mlsde.sdeint(plain, y0, [0.0, 1.0], dt=0.05, seed=stats.seed))


def test_a_multilevel_sde_subclass_that_redefines_f_is_solved_with_its_f():
    levels, _, _ = affine_ladder(2, D, 5)

    class Shifted(mlsde.MultilevelSDE):
        def f(self, t, y):
            return super().f(t, y) + 10.0

    y0 = torch.zeros(4, D, dtype=DTYPE)
    drift = mlsde.MultilevelDrift(levels, [1.0, 1.0], costs=[1, 2])
    sde = Shifted(drift, 0.0, dt=0.1)
    ours = mlsde.sdeint(sde, y0, [0.0, 1.0], dt=0.1, seed=0)
    theirs = torchsde.sdeint(sde, y0, torch.tensor([0.0, 1.0], dtype=DTYPE), dt=0.1, method="euler")
    torch.testing.assert_close(ours, theirs)
    unshifted = mlsde.sdeint(mlsde.MultilevelSDE(drift, 0.0, dt=0.1), y0, [0.0, 1.0], dt=0.1, seed=0)
    assert float((ours - unshifted)[-1].min()) > 1  # the +10 drift acted
    with pytest.raises(ValueError, match="Shifted redefines its drift.*method='euler'"):
        mlsde.sdeint(sde, y0, [0.0, 1.0], dt=0.1, method="poisson")
