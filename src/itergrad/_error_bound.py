"""An estimate of the relative error of the derivative an estimator returned,
from the paper's bounds and matrix-free estimates at the final unknowns.

With $A(z) = J_z F(z, \\theta)$, $B(z) = J_\\theta F(z, \\theta)$, the fixed
point $\\bar z$ and its Jacobian $\\bar J = (I - A(\\bar z))^{-1} B(\\bar z)$:

- $\\rho = \\|A(z_k)\\|$ (power iteration, corrected upwards by the
  residual of its eigenpair), $L_F = \\|B(z_k)\\|$ (power iteration);
- $L_B$, $L_A$: the rates of change of $B$ and $A$ along the last step
  direction (second-order directional derivatives, power iteration); local
  stand-ins for the Lipschitz constants $L_J$ of the paper;
- $d_k = \\|F(z_k) - z_k\\| / (1 - \\rho) \\ge \\|z_k - \\bar z\\|$ (Lemma 1);
- $\\|\\bar J\\| \\ge L_F / (1 + \\rho)$, since $B = (I - A)\\bar J$.

A Jacobian evaluated at a point $z$ at distance $d$ from $\\bar z$ deviates
from its value at $\\bar z$ by about $(L_B + L_A \\|\\bar J\\|) d$; through
$(I - A)^{-1}$ this costs at most $(L_B/\\|\\bar J\\| + L_A)\\, d / (1 - \\rho)$
of relative error. Then, relative to $\\|\\bar J\\|$:

- `OneStep`, `Truncated(K)` (Corollary 1 with $\\rho^K$; Corollary 3 when
  $\\rho \\approx 0$):
  $\\rho^K + \\big(L_B/\\|\\bar J\\| + L_A (1 + \\rho)/(1 - \\rho)\\big)\\, S$,
  $S = \\sum_{i<K} \\rho^i (\\|z_{k-1-i} - z_k\\| + d_k)$: the Jacobians of
  the $i$-th step back, evaluated off the solution, are damped by $i$ later
  contractions. With the Neumann tail of `Truncated("auto")` the Jacobians
  are frozen at $z_k$ ($S = d_k$).
- `Implicit` (eq. 6): $(L_B/\\|\\bar J\\| + L_A)\\, d_k/(1 - \\rho)$; with
  `Neumann(m)` add $\\rho^m$.
- `Unroll` (burn-in): $\\rho^k + k (L_B/\\|\\bar J\\| + L_A)\\, d_k / (1 - \\rho)$:
  the initial derivative (zero) is forgotten like $\\rho^k$, and every step's
  Jacobian error enters once.

A rounding floor $\\sqrt{n}\\,\\epsilon / (1 - \\rho)$ is added. When
$\\rho \\ge 1$ the bound is $+\\infty$: the theory does not apply.

These are estimates, not certificates: power iteration approaches $L_F$,
$L_A$, $L_B$ from below (only $\\rho$ is corrected upwards), $\\rho$ is measured at $z_k$ rather than as a sup over a region, and
$L_A$, $L_B$ are sampled along one direction.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Real

from ._estimators import AbstractEstimator, OneStep, Truncated, Unroll
from ._implicit import Implicit
from ._loop import LoopOutput
from ._neumann import Neumann
from ._spectral import DEFAULT_POWER_ITERATIONS, flat_step, local_constants
from .solvers._base import AbstractSolver


def derivative_error_bound(
    estimator: AbstractEstimator,
    solver: AbstractSolver,
    out: LoopOutput,
    theta: PyTree[Any],
    iterations: int = DEFAULT_POWER_ITERATIONS,
) -> Real[Array, ""]:
    """The estimated relative error of `estimator`'s derivative of the final
    unknowns (see the module docstring for the formulas)."""
    f = flat_step(solver, jax.lax.stop_gradient(out.state), jax.lax.stop_gradient(theta))
    q = local_constants(f, iterations, with_L_A=True)
    assert q.L_A is not None
    dtype = f.x.dtype
    one = jnp.ones((), dtype)
    contracting = q.rho < 1
    gap = jnp.where(contracting, one - q.rho, one)
    J_lower = q.L_F / (1 + q.rho)
    safe_J = jnp.where(J_lower > 0, J_lower, one)
    sensitivity = (q.L_B / safe_J + q.L_A) / gap  # relative error per unit distance
    distance = q.step / gap  # >= ||z_k - z_bar|| for a rho-contraction
    floor = jnp.sqrt(jnp.asarray(f.x.size, dtype)) * jnp.finfo(dtype).eps / gap

    if isinstance(estimator, OneStep | Truncated):
        K = out.differentiated_steps
        K = jnp.asarray(1 if K is None else K, dtype)
        # S = sum_i rho^i ||z_{k-1-i} - z_bar||: the Jacobian of the i-th step
        # back is damped by i later contractions.
        if out.replay_gaps is None:
            weighted = distance
        else:
            gaps = out.replay_gaps.astype(dtype)
            powers = q.rho ** jnp.arange(gaps.size, dtype=dtype)
            weighted = jnp.sum(jnp.where(gaps > 0, powers * (gaps + distance), 0.0))
            weighted = jnp.maximum(weighted, distance)
        per_distance = q.L_B / safe_J + q.L_A * (1 + q.rho) / gap
        bound = q.rho**K + per_distance * weighted
    elif isinstance(estimator, Implicit):
        bound = sensitivity * distance
        if isinstance(estimator.linear_solver, Neumann):
            bound = bound + q.rho ** jnp.asarray(estimator.linear_solver.k, dtype)
    elif isinstance(estimator, Unroll):
        k = jnp.asarray(out.steps, dtype)
        bound = q.rho**k + k * sensitivity * distance
    else:
        raise TypeError(
            f"No error estimate for the estimator {type(estimator).__name__}; "
            "call `itergrad.solve(..., error_estimate=False)`."
        )
    bound = bound + floor
    return jnp.where(contracting & (J_lower > 0), bound, jnp.inf)
