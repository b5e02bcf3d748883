"""multilevel_sde: the Multilevel Euler–Maruyama method (ML-EM) for SDEs and ODEs whose drift is a
ladder of approximators of increasing accuracy and cost.

    import multilevel_sde as mlsde
    drift = mlsde.MultilevelDrift([small, medium, large], mlsde.InverseCost(c=1.0), costs=[1, 8, 64])
    sde = mlsde.MultilevelSDE(drift, diffusion=1.0, dt=1e-2)
    ys, stats = mlsde.sdeint(sde, y0, ts, seed=0, return_stats=True)
"""

from . import problems
from .brownian import GridBrownian
from .coins import CoinScheme, ComonotoneCoins, IndependentCoins, Replay, StratifiedCoins
from .cost import flops_per_sample, measure_costs, seconds_per_sample
from .checks import NonFiniteError
from .drift import MultilevelDrift
from .integrate import odeint, sdeint
from . import learning
from .probabilities import Adaptive, Constant, InverseCost, PowerLaw, Schedule, Sigmoid, Theorem1
from .scaling import GammaEstimate, PowerLawFit, cost_exponent, estimate_gamma, fit_power_law
from .sde import MultilevelSDE
from .stats import Stats

__version__ = "0.1.0"

__all__ = [
    "problems",
    "learning",
    "MultilevelDrift",
    "MultilevelSDE",
    "NonFiniteError",
    "sdeint",
    "odeint",
    "GridBrownian",
    "Schedule",
    "Constant",
    "InverseCost",
    "PowerLaw",
    "Theorem1",
    "Sigmoid",
    "Adaptive",
    "CoinScheme",
    "IndependentCoins",
    "StratifiedCoins",
    "ComonotoneCoins",
    "Replay",
    "Stats",
    "flops_per_sample",
    "seconds_per_sample",
    "measure_costs",
    "estimate_gamma",
    "cost_exponent",
    "fit_power_law",
    "GammaEstimate",
    "PowerLawFit",
    "__version__",
]
