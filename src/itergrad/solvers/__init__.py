"""Built-in solvers: one algorithm family per module."""

from ._base import AbstractSolver as AbstractSolver
from ._base import FixedPointIteration as FixedPointIteration

__all__ = ["AbstractSolver", "FixedPointIteration"]
