"""Inexact Newton: a forcing sequence that decides how accurately each Newton
system is solved by a Krylov method. (The derivative of the direction is that
of the exact Newton direction whatever accuracy the forward solve used: see
`itergrad._linear_solve`.)"""

import math

import equinox as eqx
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Scalar

from .._validate import in_open_interval

# The Lineax solvers whose stopping test is
# `norm(residual / (atol + rtol |b|)) <= 1`, which a forcing term can drive
# (LSMR's tolerances mean something else; direct solvers have none).
_FORCEABLE = (lx.CG, lx.GMRES, lx.BiCGStab)


def is_forceable(solver: lx.AbstractLinearSolver) -> bool:
    """Whether a forcing term can set `solver`'s stopping tolerance."""
    return isinstance(solver, _FORCEABLE)


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
        in_open_interval(self.eta_max, "EisenstatWalker(eta_max=...)", 0, 1)

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
