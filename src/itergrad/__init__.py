"""itergrad: differentiate iterative algorithms in JAX.

See Bolte, Pauwels, Vaiter, *One-step differentiation of iterative algorithms*
(NeurIPS 2023). The public surface is re-exported here; every other module is
private.
"""

from . import problems as problems
from ._bilevel import (
    History as History,
    hypergradient_descent as hypergradient_descent,
    hypergradient_epsilon as hypergradient_epsilon,
    hypergradient_stepsize as hypergradient_stepsize,
)
from ._diagnose import DiagnoseReport as DiagnoseReport, diagnose as diagnose
from ._estimators import (
    AbstractEstimator as AbstractEstimator,
    OneStep as OneStep,
    Truncated as Truncated,
    Unroll as Unroll,
)
from ._implicit import Implicit as Implicit
from ._iterate import iterate as iterate, solve as solve
from ._neumann import Neumann as Neumann
from ._solution import RESULTS as RESULTS, Solution as Solution
from .solvers import *  # noqa: F403  (each solver module's public names)
from .solvers import __all__ as _solver_names

__all__ = [
    "AbstractEstimator",
    "DiagnoseReport",
    "History",
    "Implicit",
    "Neumann",
    "OneStep",
    "RESULTS",
    "Solution",
    "Truncated",
    "Unroll",
    "diagnose",
    "hypergradient_descent",
    "hypergradient_epsilon",
    "hypergradient_stepsize",
    "iterate",
    "problems",
    "solve",
    *_solver_names,
]
