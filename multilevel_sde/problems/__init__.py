"""Analytic SDEs with exact solutions (OU, GBM, linear systems) and synthetic ladders over them.

    import multilevel_sde as mlsde
    from multilevel_sde.problems import OrnsteinUhlenbeck, perturbed_ladder
    ou = OrnsteinUhlenbeck(theta=1.0, mu=0.5, sigma=0.8, d=2)
    ladder = perturbed_ladder(ou, k=4, kind="sine")
    sde = ou.sde(ladder.drift(mlsde.InverseCost(c=2.0)), dt=1e-2)
"""

from .gaussian_diffusion import GaussianMixtureDiffusion, diffusion_ladder
from .htmc import htmc_drift, htmc_ladder, htmc_reference
from .ladders import KINDS, Ladder, perturbed_ladder
from .linear import GeometricBrownianMotion, LinearSDE, OrnsteinUhlenbeck

__all__ = ["OrnsteinUhlenbeck", "GeometricBrownianMotion", "LinearSDE", "Ladder", "perturbed_ladder", "KINDS",
           "htmc_drift", "htmc_ladder", "htmc_reference", "GaussianMixtureDiffusion", "diffusion_ladder"]
