"""The implicit function theorem as a custom JVP: the only place the
derivative of a fixed point (rather than of a program that ran) is defined.

Used by `Implicit` and by the Neumann tail of `Truncated("auto")`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import PyTree

from ._tree import tree_sub
from .solvers._base import AbstractSolver, State


def implicit_unknowns(
    solver: AbstractSolver,
    state: State,
    theta: PyTree[Any],
    condition: str,
    linear_solver: lx.AbstractLinearSolver,
    tags: frozenset[object],
    throw: bool,
) -> PyTree[Any]:
    """The final unknowns $z$ (stopped) carrying the implicit derivative
    $\\dot z = -(J_z G)^{-1} J_\\theta G\\, \\dot\\theta$ of the condition
    $G(z, \\theta) = 0$ (`"optimality"`: `solver.optimality`; `"fixed_point"`:
    $F_z(z, a, \\theta) - z$), with the auxiliary state $a$ frozen."""
    root = jax.lax.stop_gradient(state.z)
    aux = jax.lax.stop_gradient(state.aux)
    condition_fn = _condition_function(solver, condition, aux)
    # Closure conversion turns arrays that the solver or the user's F close
    # over into explicit inputs, so they are differentiated through the
    # custom rule too instead of being silently treated as constants.
    condition_fn = eqx.filter_closure_convert(condition_fn, root, theta)
    return _implicit_root(
        root, condition_fn, theta, linear_solver=linear_solver, tags=tags, throw=throw
    )


def _condition_function(
    solver: AbstractSolver, condition: str, aux: PyTree[Any]
) -> Callable[[PyTree[Any], PyTree[Any]], PyTree[Any]]:
    def condition_fn(z, theta):
        if condition == "optimality":
            return solver.optimality(z, aux, theta)
        new_z, _ = solver.step(z, aux, theta)
        return tree_sub(new_z, z)

    return condition_fn


@eqx.filter_custom_jvp
def _implicit_root(root, condition_fn, theta, *, linear_solver, tags, throw):
    del condition_fn, theta, linear_solver, tags, throw
    return root


@_implicit_root.def_jvp
def _implicit_root_jvp(primals, tangents, *, linear_solver, tags, throw):
    root, condition_fn, theta = primals
    _, t_condition_fn, t_theta = tangents
    # Tangent of G(root, .) in the direction of (condition_fn's closed-over
    # arrays, theta); the root itself is held fixed.
    diff_inputs, static_inputs = eqx.partition(
        (condition_fn, theta), eqx.is_inexact_array
    )
    t_inputs = jtu.tree_map(
        lambda t, x: None if x is None else (jnp.zeros_like(x) if t is None else t),
        (t_condition_fn, t_theta),
        diff_inputs,
        is_leaf=lambda t: t is None,
    )

    def g_of_inputs(dyn):
        fn, th = eqx.combine(dyn, static_inputs)
        return fn(root, th)

    _, t_residual = jax.jvp(g_of_inputs, (diff_inputs,), (t_inputs,))
    # Linearised once: a Krylov solver's products then cost one linear
    # application each, not a fresh JVP through the condition.
    operator = lx.linearise(
        lx.JacobianLinearOperator(
            lambda z, args: condition_fn(z, args), root, theta, tags=tags
        )
    )
    solution = lx.linear_solve(operator, t_residual, linear_solver, throw=throw)
    t_root = jtu.tree_map(lambda t: -t, solution.value)
    return root, t_root
