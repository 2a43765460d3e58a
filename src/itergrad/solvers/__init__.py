"""Built-in solvers: one algorithm family per module."""

from ._anderson import Anderson as Anderson
from ._base import (
    AbstractSolver as AbstractSolver,
    FixedPointIteration as FixedPointIteration,
)
from ._forcing import EisenstatWalker as EisenstatWalker
from ._gradient import GradientDescent as GradientDescent, HeavyBall as HeavyBall
from ._interior_point import InteriorPointQP as InteriorPointQP
from ._lbfgs import LBFGS as LBFGS
from ._newton import (
    AbstractLineSearch as AbstractLineSearch,
    Backtracking as Backtracking,
    Newton as Newton,
    Wolfe as Wolfe,
)
from ._proximal import ProximalGradient as ProximalGradient
from ._sinkhorn import (
    OTProblem as OTProblem,
    Sinkhorn as Sinkhorn,
    sqeuclidean as sqeuclidean,
)

__all__ = ["AbstractSolver", "FixedPointIteration"]
__all__ += [
    "AbstractLineSearch",
    "Backtracking",
    "EisenstatWalker",
    "GradientDescent",
    "HeavyBall",
    "Newton",
    "Wolfe",
]
__all__ += ["InteriorPointQP"]
__all__ += ["LBFGS", "ProximalGradient"]
__all__ += ["Anderson"]
__all__ += ["OTProblem", "Sinkhorn"]
