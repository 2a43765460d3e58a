"""Built-in solvers: one algorithm family per module."""

from ._base import AbstractSolver as AbstractSolver
from ._base import FixedPointIteration as FixedPointIteration
from ._gradient import GradientDescent as GradientDescent
from ._gradient import HeavyBall as HeavyBall
from ._newton import AbstractLineSearch as AbstractLineSearch
from ._newton import Backtracking as Backtracking
from ._newton import Newton as Newton
from ._newton import Wolfe as Wolfe

__all__ = ["AbstractSolver", "FixedPointIteration"]
__all__ += [
    "AbstractLineSearch",
    "Backtracking",
    "GradientDescent",
    "HeavyBall",
    "Newton",
    "Wolfe",
]
