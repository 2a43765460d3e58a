"""The derivative of a linear solve, written once.

Solvers inside the step map (Newton's system, the interior-point KKT system)
solve $M u = r$ where both $M$ and $r$ depend on $(x, \\theta)$. The derivative
$du = M^{-1}(dr - dM\\, u)$ needs neither the derivative of a factorisation nor
the derivative of a Krylov loop: only one more solve with the same $M$ (same
factorisation or same Krylov solver) and one product with $dM$. This module is
the one place where that rule lives; every solver calls `linear_solve`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Bool, Int, PyTree

from ._tree import tree_freeze


class SolveOutput(eqx.Module):
    """`value` $\\approx M^{-1} r$; `usable` is false when the solver broke
    down (a Krylov solver reaching its `max_steps` still counts as usable:
    its iterate is the best it has); `steps` is Lineax's `num_steps` (0 for a
    direct solver)."""

    value: PyTree[Array]
    usable: Bool[Array, ""]
    steps: Int[Array, ""]


def linear_solve(
    operator: lx.AbstractLinearOperator,
    vector: PyTree[Array],
    solver: lx.AbstractLinearSolver,
    *,
    state: Any = None,
    derivative_solver: lx.AbstractLinearSolver | None = None,
    refinement_steps: int = 0,
) -> SolveOutput:
    """Solve $M u = r$ with `solver` (reusing a precomputed solver `state`,
    e.g. a factorisation, when given), with the derivative

    $$du = M^{-1}\\big(dr - dM\\, u\\big),$$

    where $dM\\, u$ is the tangent of `operator.mv(u)` with respect to the
    operator's arrays (for a `lx.FunctionLinearOperator` of a Hessian-vector
    product this is one third-order directional derivative, not a derivative
    of the materialised matrix) and $M^{-1}$ is applied with
    `derivative_solver` (default: `solver` with the same `state`). A separate
    `derivative_solver` lets the forward solve be loose (inexact Newton's
    forcing) while derivatives are solved to the user's tolerance. Only the
    arrays that carry a tangent are differentiated: data the operator closes
    over costs nothing.

    Reverse mode comes by transposition (Lineax transposes the solve); higher
    derivatives apply the same rule again, so they are exact too.

    `refinement_steps` steps of iterative refinement,
    $u \\leftarrow u + M^{-1}(r - M u)$, improve the value when $M$ is
    ill-conditioned (the interior-point KKT matrix near the end): each costs
    one product and one solve with the existing factorisation.

    `state` must not depend on anything being differentiated (build it from
    `jax.lax.stop_gradient` inputs): the derivative never goes through it.
    """
    # Solver settings computed from the iterate (a forcing tolerance) are
    # parameters of the algorithm, not quantities to differentiate.
    solver, derivative_solver, state = tree_freeze((solver, derivative_solver, state))
    return _solve(
        operator, vector, state, solver=solver, derivative_solver=derivative_solver,
        refinement_steps=refinement_steps,
    )


def _primal_solve(operator, vector, state, solver, refinement_steps) -> SolveOutput:
    def solve(rhs):
        if state is None:
            return lx.linear_solve(operator, rhs, solver, throw=False)
        return lx.linear_solve(operator, rhs, solver, state=state, throw=False)

    solution = solve(vector)
    value = solution.value
    for _ in range(refinement_steps):
        residual = jtu.tree_map(lambda r, m: r - m, vector, operator.mv(value))
        value = jtu.tree_map(lambda u, d: u + d, value, solve(residual).value)
    usable = (solution.result == lx.RESULTS.successful) | (
        solution.result == lx.RESULTS.max_steps_reached
    )
    steps = jnp.asarray(solution.stats.get("num_steps", 0), jnp.int32)
    return SolveOutput(value, usable, steps)


@eqx.filter_custom_jvp
def _solve(operator, vector, state, *, solver, derivative_solver, refinement_steps=0):
    del derivative_solver
    return _primal_solve(operator, vector, state, solver, refinement_steps)


def _is_none(x: Any) -> bool:
    return x is None


@_solve.def_jvp
def _solve_jvp(primals, tangents, *, solver, derivative_solver, refinement_steps=0):
    operator, vector, state = primals
    t_operator, t_vector, _ = tangents
    # The primal through `_solve` itself (not stopped), so that a second
    # derivative applies this rule again to u and to the solve below.
    out = _solve(
        operator, vector, state, solver=solver, derivative_solver=derivative_solver,
        refinement_steps=refinement_steps,
    )
    u = out.value

    rhs = jtu.tree_map(jnp.zeros_like, u)
    if t_vector is not None:
        rhs = jtu.tree_map(
            lambda r, t: r if t is None else r + t, rhs, t_vector, is_leaf=_is_none
        )
    has_tangent = jtu.tree_map(lambda t: t is not None, t_operator, is_leaf=_is_none)
    if any(jtu.tree_leaves(has_tangent)):
        dynamic, static = eqx.partition(operator, has_tangent)
        t_dynamic = eqx.filter(t_operator, has_tangent, is_leaf=_is_none)
        _, dM_u = jax.jvp(
            lambda dyn: eqx.combine(dyn, static).mv(u), (dynamic,), (t_dynamic,)
        )
        rhs = jtu.tree_map(lambda r, d: r - d, rhs, dM_u)

    if derivative_solver is None:
        t_value = _solve(operator, rhs, state, solver=solver, derivative_solver=None).value
    else:
        t_value = _solve(
            operator, rhs, None, solver=derivative_solver, derivative_solver=None
        ).value
    # Booleans and integers carry no tangent: None in their slots.
    return out, SolveOutput(t_value, None, None)  # pyright: ignore[reportArgumentType]
