"""The steppers: a shared loop (``base.Solver``) and one class per method."""

from .base import CHECK_EVERY, Solver
from .euler import Euler
from .poisson import Poisson

__all__ = ["Solver", "Euler", "Poisson", "CHECK_EVERY"]
