"""GridBrownian snaps a solver's accumulated times onto its grid (issue #19 item 4).

A path built with ``t0, t1, dt`` accumulates ``t <- min(t + dt, t1)`` as torchsde does, which can leave a sliver
of a last step (S = 2.99, dt = S/4096: 1.8e-13). A float32 solver grid ends at float32(S), 9.5e-9 past the path's
end, and its times drift by float32 ulps; such times must still find their grid points.
"""

import numpy as np
import pytest
import torch

import multilevel_sde as mlsde

S = 2.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divisions", [8, 512, 4096])
def test_a_solve_whose_step_is_a_multiple_of_the_paths_reads_the_whole_path(dtype, divisions):
    bm = mlsde.GridBrownian(t0=0.0, t1=S, dt=S / 4096, size=(3, 2), seed=0, dtype=dtype)
    assert bm.times[-1] - bm.times[-2] < 1e-12  # the sliver the accumulation leaves
    y0 = torch.zeros(3, 2, dtype=dtype)
    ys = mlsde.sdeint(mlsde.MultilevelSDE(lambda t, y: torch.zeros_like(y), 1.0), y0, [0.0, S], bm=bm,
                      dt=S / divisions)
    assert torch.allclose(ys[-1], bm.increments(0, bm.num_steps), rtol=0, atol=1e-5)  # X_T = W(T): every increment


def test_snapping_is_limited_to_a_few_ulps_or_a_quarter_step():
    bm = mlsde.GridBrownian(t0=0.0, t1=S, dt=S / 4096, size=(1, 1), seed=0)
    end = bm.num_steps
    assert bm.index_of(float(np.float32(S))) == end  # float32(S) lies 9.5e-9 past the end
    assert bm.index_of(S + 4 * float(np.spacing(np.float32(S)))) == end
    assert bm.index_of(bm.times[100] + 0.2 * (S / 4096)) == 100
    with pytest.raises(ValueError, match="not on its grid"):
        bm.index_of(S + 1e-5)  # past the end by more than a few float32 ulps (2.4e-7 each)
    with pytest.raises(ValueError, match="not on its grid"):
        bm.index_of(bm.times[100] + 0.3 * (S / 4096))
