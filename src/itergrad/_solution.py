"""The outcome of a solve: `RESULTS` codes and the `Solution` container."""

from typing import Any

import equinox as eqx
import numpy as np
from jaxtyping import Array, Int, PyTree, Real


class RESULTS(eqx.Enumeration):
    """Runtime outcomes of `itergrad.iterate` / `itergrad.solve`.

    Each message starts with the outcome's name (so that a `RESULTS` value
    prints as e.g. `RESULTS<successful>`; equinox prints an enumeration item
    by its message) and says what went wrong and what to change. With `throw=True`
    (the default) any outcome other than `successful` raises an
    `equinox.EquinoxRuntimeError` carrying this message.

    `RESULTS[result]` is the message of a concrete `result`;
    `itergrad.result_name(result)` its name (e.g. `"successful"`), which is
    also what `Solution`'s repr shows. Compare results with `==`, also under
    `jit`: `sol.result == ig.RESULTS.successful`.
    """

    successful = "successful"
    max_steps_reached = (
        "max_steps_reached: The iteration did not converge within `max_steps`: increase `max_steps`, "
        "loosen `rtol`/`atol`, or check that the step map is a contraction "
        "(`itergrad.diagnose` estimates its contraction factor). Pass `throw=False` "
        "to get the last iterate anyway, flagged in `Solution.result`."
    )
    nonfinite = (
        "nonfinite: A non-finite value (NaN or Inf) appeared in `theta`, `x0` or an iterate. "
        "Check the inputs for NaN/Inf, and lower the step size if the iteration "
        "diverges."
    )
    linear_solve_failed = (
        "linear_solve_failed: A linear solve failed (singular or ill-conditioned system): a Newton "
        "system whose Hessian is not positive definite, or, for the implicit "
        "estimator, an optimality condition that is degenerate at the solution "
        "(e.g. a non-strictly-complementary QP). Try another `linear_solver`, "
        "or `Implicit(condition=...)`."
    )
    linesearch_failed = (
        "linesearch_failed: The line search could not find an acceptable step: the objective may be "
        "non-smooth, non-convex or badly scaled at the current iterate."
    )
    infeasible = (
        "infeasible: The problem appears infeasible or unbounded: the interior-point residuals "
        "stopped decreasing while the iterates grew. Check that the constraints "
        "`Ax = b`, `Gx <= h` admit a solution and that `Q` is positive definite "
        "on the feasible set."
    )
    nonconvex = (
        "nonconvex: The problem is not convex where the solver needs it to be: the Hessian "
        "of the objective (`Newton`) or `Q` on the feasible set (`InteriorPointQP`) "
        "has negative curvature (it is indefinite, not positive semidefinite), so a "
        "stationary point found there may be a saddle, not a minimum. These solvers "
        "minimise convex objectives only: check the sign and the symmetric part of "
        "`Q` / the objective's Hessian, add a convex regulariser, or use a method for "
        "non-convex problems."
    )
    stalled = (
        "stalled: The solver stopped making progress: its residual (`Solution.residual`) "
        "has not decreased for several steps, at a level close to the rounding floor of "
        "the data's precision (in float32 about 1e-4 for QPs with a few hundred "
        "variables), above the requested tolerance. Loosen `atol`/`rtol` to above "
        "`Solution.residual`, or solve in float64. With `throw=False` the last iterate "
        "is returned, flagged."
    )
    not_contracting = (
        "not_contracting: The step map is not a contraction at the solution: its estimated "
        "contraction factor ||J_z F|| is >= 1 (`sol.stats['contraction']`; with "
        "`error_estimate=True`: no power of J_z F up to the 1024th contracts). One-step, "
        "truncated and Neumann derivatives do not converge there. Use "
        "`Implicit()` (valid when I - J_z F is invertible), or check the solver "
        "(step size, momentum)."
    )
    truncation_target_unreachable = (
        "truncation_target_unreachable: `Truncated('auto', target)` cannot meet its target: the estimated "
        "contraction factor (`sol.stats['contraction']`) needs more differentiated "
        "steps (`sol.stats['differentiated_steps']`) than `max_K + max_tail`. Use "
        "`Implicit()` or `Auto(target)` (which switches to it), raise `max_tail`, "
        "or loosen `target`."
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

    def __repr__(self) -> str:
        # Equinox prints an enumeration item as `RESULTS<message>`, which is
        # long for a failure; show the item's name alone.
        if not isinstance(self.result, RESULTS) or self.result.is_traced():
            return eqx.tree_pformat(self)
        named = _Named(f"RESULTS.{result_name(self.result)}")
        return eqx.tree_pformat(eqx.tree_at(lambda s: s.result, self, named))


class _Named:
    """Prints as the given text (a stand-in in `Solution.__repr__`)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def result_name(result: RESULTS) -> str:
    """The name of a `RESULTS` value: `result_name(ig.RESULTS.successful)` is
    `"successful"`.

    Equinox prints an enumeration item by its message (the name followed by
    a paragraph for a failure); this gives the short name alone, e.g. for
    logs and tables: `result_name(sol.result)`.

    **Arguments:**

    - `result`: a `RESULTS` item, concrete (outside `jit`, or returned from a
      jitted function). Under `jax.vmap` it holds one code per batch element.

    **Returns:** the name as a string; for a batch of results, NumPy's string
    of the array of names, e.g. `"['successful' 'max_steps_reached']"`.

    **Raises:** `ValueError` when `result` is traced (inside `jit`, `vmap`,
    ...): its value is not known yet. Branch on it with
    `result == ig.RESULTS.successful` instead, or return it and name it outside.
    """
    if not isinstance(result, RESULTS):
        raise TypeError(
            f"`result` must be an `itergrad.RESULTS` item, got {type(result).__name__}."
        )
    if result.is_traced():
        raise ValueError(
            "`result_name` needs a concrete result, but this one is traced (inside "
            "`jit`, `vmap`, `grad`, ...). Return it from the transformed function "
            "and name it outside, or compare it: `result == ig.RESULTS.successful`."
        )
    shape = np.shape(np.asarray(result == RESULTS.successful))
    names = np.full(shape, "", dtype=object)
    for name, item in RESULTS._name_to_item.items():
        names = np.where(np.asarray(result == item), name, names)
    return str(names.item()) if names.shape == () else str(names)
