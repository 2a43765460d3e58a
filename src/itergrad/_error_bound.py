r"""An estimate of the relative error of the derivative an estimator returned,
from the paper's bounds and matrix-free estimates at the final unknowns.

With $A(z) = J_z F(z, \theta)$, $B(z) = J_\theta F(z, \theta)$, the fixed
point $\bar z$ and its Jacobian $\bar J = (I - A(\bar z))^{-1} B(\bar z)$:

- $\rho = \|A(z_k)\|$ (power iteration, corrected upwards by the
  residual of its eigenpair), $L_F = \|B(z_k)\|$ (power iteration);
- $L_B$, $L_A$: the rates of change of $B$ and $A$ along the last step
  direction (second-order directional derivatives, power iteration); local
  stand-ins for the Lipschitz constants $L_J$ of the paper;
- $\|\bar J\| \ge L_F / (1 + \rho)$, since $B = (I - A)\bar J$;
- powers: $\|A^K\|$ is bounded by $\pi(K) = \min\big(\rho^K,
  \|A^j\|^{\lfloor K/j \rfloor} \rho^{K \bmod j},
  \|A^{16}\|^{\lfloor K/16 \rfloor} \rho^{K \bmod 16}\big)$, $j = \min(K, 32)$,
  with $\|A^j\|$ estimated by power iteration on $A^j$ (upper-corrected):
  for a non-normal $A$ (most step maps) $\|A^K\|$ decays like the spectral
  radius, far below $\rho^K$;
- the resolvent $R = \min\big(1/(1 - \rho),\ \sum_{r<16} \rho^r / (1 -
  \|A^{16}\|)\big) \ge \|(I - A)^{-1}\|$, finite whenever $A^{16}$
  contracts (heavy ball's phase-space map has $\rho > 1$ but a finite $R$);
- $d_k = R\, \|F(z_k) - z_k\| \ge \|z_k - \bar z\|$ (Lemma 1).

A Jacobian evaluated at a point $z$ at distance $d$ from $\bar z$ deviates
from its value at $\bar z$ by about $(L_B + L_A \|\bar J\|) d$; through
$(I - A)^{-1}$ this costs at most $(L_B/\|\bar J\| + L_A)\, R\, d$
of relative error. Then, relative to $\|\bar J\|$:

- `OneStep`, `Truncated(K)` (Corollary 1 with $\rho^K$; Corollary 3 when
  $\rho \approx 0$):
  $\pi(K) + \big(L_B/\|\bar J\| + L_A (1 + \rho) R\big)\, S$,
  $S = \sum_{i<K} \pi_i (\|z_{k-1-i} - z_k\| + d_k)$, $\pi_i =
  \min(\rho^i, \|A^{16}\|^{\lfloor i/16 \rfloor} \rho^{i \bmod 16})
  \ge \|A^i\|$: the Jacobians of
  the $i$-th step back, evaluated off the solution, are damped by $i$ later
  contractions. With the Neumann tail of `Truncated("auto")` the Jacobians
  are frozen at $z_k$ ($S = d_k$).
- `Implicit` (eq. 6): $(L_B/\|\bar J\| + L_A)\, R\, d_k$; with
  `Neumann(m)` add $\pi(m)$.
- `Auto`: the bound of the branch it took.
- `Unroll` (burn-in): $\pi(k) + k (L_B/\|\bar J\| + L_A)\, R\, d_k$:
  the initial derivative (zero) is forgotten like $\|A^k\|$, and every
  step's Jacobian error enters once.

A rounding floor $10\sqrt{n}\,\epsilon\, R$ is added. When $R$ is infinite
(neither $A$ nor $A^{16}$ contracts) the bound is $+\infty$: the theory
does not apply; so it is when an estimate is not finite (a tangent of the
step overflowed), and for solvers marked `error_estimate_needs_float64`
(`InteriorPointQP`) with unknowns below float64.
Cost: about $4 \times 30$ Jacobian-vector products for
$\rho$, $L_F$, $L_B$, $L_A$, plus $2 \times 10 \times (16 + \min(K, 32))$
for the two power norms.

These are estimates, not certificates: power iteration approaches $L_F$,
$L_A$, $L_B$ from below (only $\rho$ is corrected upwards), $\rho$ is measured at $z_k$ rather than as a sup over a region, and
$L_A$, $L_B$ are sampled along one direction.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Real

from ._auto import IMPLICIT, Auto
from ._estimators import AbstractEstimator, OneStep, Truncated, Unroll
from ._implicit import Implicit
from ._loop import LoopOutput
from ._neumann import Neumann
from ._spectral import (
    DEFAULT_POWER_ITERATIONS,
    DIRECT_POWER_MAX,
    POWER_BLOCK,
    flat_step,
    local_constants,
)
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
    if solver.error_estimate_needs_float64 and jnp.finfo(f.x.dtype).bits < 64:
        return jnp.full((), jnp.inf, f.x.dtype)
    q = local_constants(f, iterations, with_L_A=True, power=_power(estimator, out))
    L_A, power_norms = q.L_A, q.power_norms
    assert L_A is not None and power_norms is not None
    norm_p, norm_block = power_norms
    dtype = f.x.dtype
    one = jnp.ones((), dtype)
    # ||(I - A)^{-1}|| <= sum_i ||A^i|| <= min(1/(1 - rho), S_B/(1 - ||A^B||))
    # with S_B = sum_{r<B} rho^r: the second is finite for any map whose B-th
    # power contracts, and much smaller for non-normal A (spectral radius <<
    # ||A||), e.g. heavy ball's phase-space map, where ||A|| > 1.
    powers_B = q.rho ** jnp.arange(POWER_BLOCK, dtype=dtype)
    by_norm = jnp.where(q.rho < 1, one / jnp.where(q.rho < 1, one - q.rho, one), jnp.inf)
    by_block = jnp.where(
        norm_block < 1,
        jnp.sum(powers_B) / jnp.where(norm_block < 1, one - norm_block, one),
        jnp.inf,
    )
    resolvent = jnp.minimum(by_norm, by_block)
    contracting = jnp.isfinite(resolvent)
    resolvent = jnp.where(contracting, resolvent, one)

    def decay(K):
        # ||A^K|| <= ||A^j||^(K // j) rho^(K mod j), j = min(K, 2B) (the j
        # the power norm was estimated for), and <= rho^K.
        K = jnp.asarray(K, dtype)
        j = jnp.clip(K, 1, DIRECT_POWER_MAX)
        blocked = norm_p ** jnp.floor(K / j) * q.rho ** jnp.mod(K, j)
        # The same with blocks of B, whose remainder (< B) costs less where
        # rho > 1 (heavy ball: rho^31 against rho^15).
        by_B = norm_block ** jnp.floor(K / POWER_BLOCK) * q.rho ** jnp.mod(K, POWER_BLOCK)
        return jnp.minimum(jnp.minimum(q.rho**K, blocked), by_B)

    def _powers_bound(size):
        # ||A^i|| <= min(rho^i, ||A^B||^(i // B) rho^(i mod B)), i < size.
        i = jnp.arange(size, dtype=dtype)
        blocked = norm_block ** jnp.floor(i / POWER_BLOCK) * q.rho ** jnp.mod(i, POWER_BLOCK)
        return jnp.minimum(q.rho**i, blocked)

    J_lower = q.L_F / (1 + q.rho)
    safe_J = jnp.where(J_lower > 0, J_lower, one)
    # relative error per unit distance of the Jacobians' evaluation point
    sensitivity = (q.L_B / safe_J + L_A) * resolvent
    distance = q.step * resolvent  # >= ||z_k - z_bar|| (Lemma 1)
    # Rounding: a Jacobian computed in this dtype by any method (the reference
    # included) is off by a few eps times the conditioning R.
    floor = 10 * jnp.sqrt(jnp.asarray(f.x.size, dtype)) * jnp.finfo(dtype).eps * resolvent

    def truncated_bound():
        K = out.differentiated_steps
        K = jnp.asarray(1 if K is None else K, dtype)
        # S = sum_i rho^i ||z_{k-1-i} - z_bar||: the Jacobian of the i-th step
        # back is damped by i later contractions.
        if out.replay_gaps is None:
            weighted = distance
        else:
            gaps = out.replay_gaps.astype(dtype)
            powers = _powers_bound(gaps.size)
            weighted = jnp.sum(jnp.where(gaps > 0, powers * (gaps + distance), 0.0))
            weighted = jnp.maximum(weighted, distance)
        per_distance = q.L_B / safe_J + L_A * (1 + q.rho) * resolvent
        return decay(K) + per_distance * weighted

    def implicit_bound(linear_solver):
        bound = sensitivity * distance
        if isinstance(linear_solver, Neumann):
            bound = bound + decay(linear_solver.k)
        return bound

    if isinstance(estimator, OneStep | Truncated):
        bound = truncated_bound()
    elif isinstance(estimator, Implicit):
        bound = implicit_bound(estimator.linear_solver)
    elif isinstance(estimator, Auto):
        # The bound of the branch Auto took (per instance under vmap).
        assert out.estimator is not None
        chose_implicit = out.estimator == IMPLICIT
        bound = jnp.where(
            chose_implicit, implicit_bound(estimator.linear_solver), truncated_bound()
        )
    elif isinstance(estimator, Unroll):
        k = jnp.asarray(out.steps, dtype)
        bound = decay(k) + k * sensitivity * distance
    else:
        raise TypeError(
            f"No error estimate for the estimator {type(estimator).__name__}; "
            "call `itergrad.solve(..., error_estimate=False)`."
        )
    bound = bound + floor
    # NaN: an estimate could not be formed (a tangent overflowed, e.g. a
    # float32 interior-point step near its boundary): no bound, +inf.
    return jnp.where(contracting & (J_lower > 0) & ~jnp.isnan(bound), bound, jnp.inf)


def _power(estimator: AbstractEstimator, out: LoopOutput) -> Any:
    """The power of $J_z F$ whose norm the estimator's bound needs: the
    differentiated steps (OneStep, Truncated, Auto), the Neumann terms, or
    the steps taken (Unroll)."""
    if isinstance(estimator, OneStep | Truncated | Auto):
        return 1 if out.differentiated_steps is None else jnp.maximum(
            out.differentiated_steps, 1)
    if isinstance(estimator, Implicit) and isinstance(estimator.linear_solver, Neumann):
        return estimator.linear_solver.k
    return jnp.maximum(out.steps, 1)
