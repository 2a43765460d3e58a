"""Implicit differentiation: the only custom derivative rule in itergrad."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import PyTree

from ._estimators import AbstractEstimator
from ._loop import run_loop_without_gradient
from ._tree import tree_sub
from .solvers._base import AbstractSolver, State


class Implicit(AbstractEstimator):
    """Implicit differentiation at the last iterate (Algorithm 2).

    The loop runs without gradients to $x_k$; its derivative is then taken from
    the implicit function theorem applied at $x_k$ to a condition
    $G(z, \\theta) = 0$ satisfied by the solution:
    $J^{ID} x_k(\\theta) = -\\big(J_z G(x_k, \\theta)\\big)^{-1} J_\\theta G(x_k, \\theta)$.

    - `condition="fixed_point"`: $G = F(z, \\theta) - z$, giving eq. (3),
      $(I - J_x F(x_k, \\theta))^{-1} J_\\theta F(x_k, \\theta)$.
    - `condition="optimality"` (default): the solver's own optimality condition
      (`solver.optimality`): $\\nabla_x f = 0$ for gradient descent and
      Newton, the KKT conditions for the QP solver. Remark 3 of the paper: for
      Newton this costs $O(n^3)$ instead of $O(n^4)$. For a plain step map
      the two coincide.

    Forward mode is a custom JVP whose tangent is one linear solve; reverse
    mode comes by transposing that solve (Lineax), so `grad`, `jacrev`,
    `jacfwd`, `jvp`, `vmap` and `jit` all work. Cost: one linear solve with
    $J_z G$ per tangent/cotangent; memory $n$ (plus what the linear solver
    materialises). Derivatives with respect to arrays that `F` or the
    objective close over are computed too.

    **Arguments:**

    - `linear_solver`: a Lineax solver for the system in $J_z G$. Default
      `lx.AutoLinearSolver(well_posed=None)` (dense LU on the materialised
      Jacobian). `itergrad.Neumann(k)` gives the paper's inexact automatic
      differentiation (IAD). Matrix-free solvers (`lx.GMRES`, `lx.CG` with the
      right tags) avoid materialising the Jacobian.
    - `condition`: `"optimality"` (default) or `"fixed_point"`.
    - `throw`: raise when the linear solve fails (default `True`); with
      `False` the failed solve's output is returned as it is (often NaN).
    - `tags`: Lineax tags of $J_z G$ (e.g.
      `frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})`), which
      decide what `lx.AutoLinearSolver` picks and are required by `lx.CG`.
      `None` (default) uses the solver's `optimality_tags` with
      `condition="optimality"` (symmetric positive semidefinite for the
      Hessian systems of `GradientDescent` and `Newton`, none otherwise) and
      no tags with `condition="fixed_point"`. Tags are promises: a wrong one
      gives a wrong derivative.

    Only the solver's unknowns $z$ enter the system; its auxiliary state
    (line-search history, quasi-Newton memory, counters) is held at its final
    value, so the system has the size of $z$ whatever the solver carries.

    !!! warning

        The estimate is that of the fixed point: away from convergence its error
        is $O(\\|x_k - \\bar x\\|)$ (eq. 6). Non-invertible $J_z G$ (a degenerate
        solution) makes the solve fail: an error is raised, never a zero
        gradient.
    """

    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=None)
    condition: Literal["optimality", "fixed_point"] = eqx.field(
        static=True, default="optimality"
    )
    throw: bool = eqx.field(static=True, default=True)
    tags: frozenset[object] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.condition not in ("optimality", "fixed_point"):
            raise ValueError(
                "Implicit(condition=...) must be 'optimality' or 'fixed_point', "
                f"got {self.condition!r}."
            )
        if not isinstance(self.linear_solver, lx.AbstractLinearSolver):
            raise TypeError(
                "Implicit(linear_solver=...) must be a Lineax linear solver "
                f"(e.g. lx.LU(), itergrad.Neumann(k)), got {self.linear_solver!r}."
            )

    def run(self, solver, state0, theta, settings):
        out = run_loop_without_gradient(solver, state0, theta, settings)
        # The system is square in the unknowns z only: the auxiliary state is
        # held at its final value, whatever its size or dtype.
        root = jax.lax.stop_gradient(out.state.z)
        aux = jax.lax.stop_gradient(out.state.aux)
        condition_fn = _condition_function(solver, self.condition, aux)
        # Closure conversion turns arrays that the solver or the user's F close
        # over into explicit inputs, so they are differentiated through the
        # custom rule too instead of being silently treated as constants.
        condition_fn = eqx.filter_closure_convert(condition_fn, root, theta)
        live = _implicit_root(
            root, condition_fn, theta, linear_solver=self.linear_solver,
            tags=self._tags(solver), throw=self.throw,
        )
        return State(live, out.state.aux), out

    def _tags(self, solver: AbstractSolver) -> frozenset[object]:
        if self.tags is not None:
            return frozenset(self.tags)
        if self.condition == "optimality":
            return frozenset(solver.optimality_tags)
        return frozenset()


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
    operator = lx.JacobianLinearOperator(
        lambda z, args: condition_fn(z, args), root, theta, tags=tags
    )
    solution = lx.linear_solve(operator, t_residual, linear_solver, throw=throw)
    t_root = jtu.tree_map(lambda t: -t, solution.value)
    return root, t_root
