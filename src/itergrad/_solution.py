"""The outcome of a solve: `RESULTS` codes and the `Solution` container."""

from typing import Any

import equinox as eqx
from jaxtyping import Array, Int, PyTree, Real


class RESULTS(eqx.Enumeration):
    """Runtime outcomes of `itergrad.iterate` / `itergrad.solve`.

    Each message says what went wrong and what to change. With `throw=True`
    (the default) any outcome other than `successful` raises an
    `equinox.EquinoxRuntimeError` carrying this message.
    """

    successful = ""
    max_steps_reached = (
        "The iteration did not converge within `max_steps`: increase `max_steps`, "
        "loosen `rtol`/`atol`, or check that the step map is a contraction "
        "(`itergrad.diagnose` estimates its contraction factor). Pass `throw=False` "
        "to get the last iterate anyway, flagged in `Solution.result`."
    )
    nonfinite = (
        "A non-finite value (NaN or Inf) appeared in `theta`, `x0` or an iterate. "
        "Check the inputs for NaN/Inf, and lower the step size if the iteration "
        "diverges."
    )
    linear_solve_failed = (
        "A linear solve failed (singular or ill-conditioned system): a Newton "
        "system whose Hessian is not positive definite, or, for the implicit "
        "estimator, an optimality condition that is degenerate at the solution "
        "(e.g. a non-strictly-complementary QP). Try another `linear_solver`, "
        "or `Implicit(condition=...)`."
    )
    linesearch_failed = (
        "The line search could not find an acceptable step: the objective may be "
        "non-smooth, non-convex or badly scaled at the current iterate."
    )
    infeasible = (
        "The problem appears infeasible or unbounded: the interior-point residuals "
        "stopped decreasing while the iterates grew. Check that the constraints "
        "`Ax = b`, `Gx <= h` admit a solution and that `Q` is positive definite "
        "on the feasible set."
    )


class Solution(eqx.Module):
    """What `iterate` and `solve` return.

    **Fields:**

    - `value`: the last iterate $x_k(\\theta)$ (the solver's `value(state)`),
      differentiable in `theta` according to the chosen estimator.
    - `steps`: the number of steps $k$ taken.
    - `residual`: the final residual, $\\|x_k - x_{k-1}\\|$ for a plain step map
      or the solver's own optimality residual.
    - `result`: a `RESULTS` code; `RESULTS.successful` when converged.
    - `state`: the final solver state (for a plain step map, the iterate),
      differentiable like `value`; use it to warm-start a later solve.
    - `stats`: extra information: `"max_steps"`, and for `OneStep` and
      `Truncated` `"differentiated_steps"`, the number of final steps whose
      derivative was taken (the chosen $K$ of `Truncated("auto")`, or fewer
      when the loop took fewer steps).
    """

    value: PyTree[Array]
    steps: Int[Array, ""]
    residual: Real[Array, ""]
    result: RESULTS
    state: PyTree[Any]
    stats: dict[str, Any]
