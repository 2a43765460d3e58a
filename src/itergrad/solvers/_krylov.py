"""Inexact (matrix-free) Newton directions: a forcing sequence that decides how
accurately each Newton system is solved, and a direction whose derivative is
that of the exact Newton direction whatever accuracy the forward solve used."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

# Lineax solvers that only need operator-vector products: with these, Newton
# never materialises the Hessian and uses Hessian-vector products instead.
MATRIX_FREE = (lx.CG, lx.GMRES, lx.BiCGStab, lx.LSMR)
# The ones whose stopping test is `norm(residual / (atol + rtol |b|)) <= 1`,
# which a forcing term can drive (LSMR's tolerances mean something else).
_FORCEABLE = (lx.CG, lx.GMRES, lx.BiCGStab)
HESSIAN_TAGS = (lx.symmetric_tag, lx.positive_semidefinite_tag)


class EisenstatWalker(eqx.Module):
    """The forcing sequence of Eisenstat and Walker (1996, "choice 2") for
    inexact Newton: the Newton system of step $k$ is solved only until
    $\\|\\nabla^2 f\\, d_k + g_k\\|_2 \\le \\eta_k \\|g_k\\|_2$, with

    $$\\eta_k = \\min\\big(\\eta_{\\max},\\ \\gamma\\,(\\|g_k\\| / \\|g_{k-1}\\|)^{\\alpha}\\big),
    \\qquad \\eta_0 = \\eta_{\\max},$$

    safeguarded by $\\eta_k \\ge \\gamma \\eta_{k-1}^{\\alpha}$ whenever
    $\\gamma \\eta_{k-1}^{\\alpha} > 0.1$ (so that $\\eta$ cannot collapse after
    one lucky step). Far from the solution a few Krylov iterations suffice;
    near it $\\eta_k \\to 0$ and Newton keeps its superlinear rate (order
    $\\alpha$). This spends far fewer Hessian-vector products than solving
    every system to a fixed tight tolerance.

    **Arguments:**

    - `gamma`: $\\gamma \\in (0, 1]$ (default `0.9`).
    - `alpha`: $\\alpha \\in (1, 2]$ (default the golden ratio, 1.618...).
    - `eta_max`: $\\eta_{\\max} \\in (0, 1)$ (default `0.9`).
    """

    gamma: float = 0.9
    alpha: float = (1 + math.sqrt(5)) / 2
    eta_max: float = 0.9

    def __check_init__(self):
        if not 0 < self.gamma <= 1:
            raise ValueError(f"EisenstatWalker(gamma=...) must lie in (0, 1], got {self.gamma}.")
        if not 1 < self.alpha <= 2:
            raise ValueError(f"EisenstatWalker(alpha=...) must lie in (1, 2], got {self.alpha}.")
        if not 0 < self.eta_max < 1:
            raise ValueError(
                f"EisenstatWalker(eta_max=...) must lie in (0, 1), got {self.eta_max}."
            )

    def __call__(
        self, gradient_norm: Scalar, previous_gradient_norm: Scalar, previous_eta: Scalar
    ) -> Scalar:
        """$\\eta_k$ from $\\|g_k\\|$, $\\|g_{k-1}\\|$ and $\\eta_{k-1}$; a previous
        gradient norm of zero means "first step" and gives $\\eta_{\\max}$."""
        first = previous_gradient_norm <= 0
        ratio = gradient_norm / jnp.where(first, 1, previous_gradient_norm)
        eta = self.gamma * ratio**self.alpha
        floor = self.gamma * previous_eta**self.alpha
        eta = jnp.where(floor > 0.1, jnp.maximum(eta, floor), eta)
        return jnp.where(first | ~jnp.isfinite(eta), self.eta_max, jnp.minimum(eta, self.eta_max))


def forced_solver(
    solver: lx.AbstractLinearSolver, eta: Scalar, gradient_norm: Scalar
) -> lx.AbstractLinearSolver:
    """`solver` with its stopping test replaced by the inexact Newton condition
    $\\|H d + g\\|_2 \\le \\max(\\eta, \\mathrm{rtol})\\, \\|g\\|_2 + \\mathrm{atol}$:
    the user's `rtol` and `atol` stay floors, so the forcing never asks for
    more accuracy than the solver was configured with (and `atol` stops
    oversolving once the gradient itself is at the noise level)."""
    if not isinstance(solver, _FORCEABLE):
        return solver
    tolerance = solver.atol + jnp.maximum(eta, solver.rtol) * gradient_norm
    # rtol = 0 and a scalar atol turn Lineax's elementwise test into a test on
    # the 2-norm of the residual (it also requires the last update to be below
    # the same number, which can only make the solve more accurate).
    return eqx.tree_at(
        lambda s: (s.rtol, s.atol, s.norm), solver, (0.0, tolerance, jnp.linalg.norm)
    )


@eqx.filter_custom_jvp
def newton_direction(
    flat: Float[Array, " n"],
    objective: Callable[[Float[Array, " n"], PyTree[Any]], Scalar],
    theta: PyTree[Any],
    *,
    primal_solver: lx.AbstractLinearSolver,
    tangent_solver: lx.AbstractLinearSolver,
) -> tuple[Float[Array, " n"], Bool[Array, ""], Int[Array, ""]]:
    """$d \\approx -H^{-1} g$ at `flat` by Hessian-vector products, solved with
    `primal_solver`; returns `(d, usable, krylov_steps)` where `usable` is
    false when the Krylov solver broke down (reaching its `max_steps` still
    gives a descent direction and counts as usable).

    The derivative is that of the *exact* Newton direction,
    $\\dot d = H^{-1}(-\\dot g - \\dot H d)$ (one Hessian-vector product and its
    tangent, then one solve with `tangent_solver`), however loosely the
    forward system was solved: the forcing term changes the iterates, never
    the accuracy of the estimators' derivatives. `objective(flat, theta)` must
    be closure-converted so that the arrays it closes over are inputs here.
    """
    del tangent_solver
    return _solve_newton_system(*_gradient_and_hessian(objective, flat, theta), primal_solver)


def _gradient_and_hessian(
    objective, flat, theta
) -> tuple[Float[Array, " n"], lx.FunctionLinearOperator]:
    """$g = \\nabla f(x)$ and the Hessian as a Lineax operator
    $v \\mapsto \\nabla^2 f(x) v$ (by `jax.linearize`, so each product costs
    about one gradient)."""
    gradient, hvp = jax.linearize(lambda z: jax.grad(objective)(z, theta), flat)
    operator = lx.FunctionLinearOperator(
        hvp, jax.ShapeDtypeStruct(flat.shape, flat.dtype), HESSIAN_TAGS
    )
    return gradient, operator


def _solve_newton_system(gradient, operator, solver):
    """`(d, usable, krylov_steps)` for $H d = -g$; see `newton_direction`."""
    solution = lx.linear_solve(operator, -gradient, solver, throw=False)
    usable = (solution.result == lx.RESULTS.successful) | (
        solution.result == lx.RESULTS.max_steps_reached
    )
    steps = jnp.asarray(solution.stats.get("num_steps", 0), jnp.int32)
    return solution.value, usable, steps


def _is_none(x: Any) -> bool:
    return x is None


@newton_direction.def_jvp
def _newton_direction_jvp(primals, tangents, *, primal_solver, tangent_solver):
    flat, objective, theta = primals
    # One linearisation serves the primal solve and the tangent solve.
    gradient, operator = _gradient_and_hessian(objective, flat, theta)
    direction, usable, steps = _solve_newton_system(gradient, operator, primal_solver)
    d_hat = jax.lax.stop_gradient(direction)
    # Differentiate only along the inputs that carry a tangent: the others
    # (typically the data the objective closes over) are constants here.
    has_tangent = jtu.tree_map(lambda t: t is not None, tangents, is_leaf=_is_none)
    diff, static = eqx.partition((flat, objective, theta), has_tangent)
    t_diff = eqx.filter(tangents, has_tangent, is_leaf=_is_none)

    def newton_residual(dyn):
        # g(x, theta) + H(x, theta) d at the fixed direction d: its tangent is
        # dg + dH d.
        z, fn, th = eqx.combine(dyn, static)
        g, hd = jax.jvp(lambda u: jax.grad(fn)(u, th), (z,), (d_hat,))
        return g + hd

    _, t_residual = jax.jvp(newton_residual, (diff,), (t_diff,))
    t_direction = lx.linear_solve(operator, -t_residual, tangent_solver).value
    return (direction, usable, steps), (t_direction, None, None)
