"""itergrad: differentiate iterative algorithms in JAX.

See Bolte, Pauwels, Vaiter, *One-step differentiation of iterative algorithms*
(NeurIPS 2023). The public surface is re-exported here; every other module is
private.
"""

from . import nn as nn, problems as problems, prox as prox, solvers as solvers
from ._auto import Auto as Auto
from ._bilevel import (
    History as History,
    HypergradientDescent as HypergradientDescent,
    HypergradientInfo as HypergradientInfo,
    HypergradientState as HypergradientState,
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
from ._sharding import sharded_vmap as sharded_vmap
from ._solution import (
    RESULTS as RESULTS,
    Solution as Solution,
    result_name as result_name,
)
from .problems import QP as QP
from .solvers import *  # noqa: F403  (each solver module's public names)

__all__ = [
    "AbstractEstimator",
    "Auto",
    "DiagnoseReport",
    "History",
    "HypergradientDescent",
    "HypergradientInfo",
    "HypergradientState",
    "Implicit",
    "Neumann",
    "OneStep",
    "QP",
    "RESULTS",
    "Solution",
    "Truncated",
    "Unroll",
    "diagnose",
    "hypergradient_descent",
    "hypergradient_epsilon",
    "hypergradient_stepsize",
    "iterate",
    "nn",
    "problems",
    "prox",
    "result_name",
    "sharded_vmap",
    "solve",
    "solvers",
]
__all__ += solvers.__all__
