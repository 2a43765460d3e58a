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
  \|A^j\|^{\lfloor K/j \rfloor} \rho^{K \bmod j},\
  \|A^B\|^{(K - j)/B} \|A^j\|,\ b(K),\
  \|A^B\|^{\lfloor K/B \rfloor} b(K \bmod B)\big)$, $b(r) = \min(\rho^r,
  \|A^{16}\|^{\lfloor r/16 \rfloor} \rho^{r \bmod 16})$, with $\|A^j\|$,
  $\|A^{16}\|$, $\|A^B\|$ estimated by power iteration on the powers
  (upper-corrected): for a non-normal $A$ (most step maps) $\|A^K\|$ decays
  like the spectral radius, far below $\rho^K$. $B$ is the first of 16, 64,
  256, 1024 with $\|A^B\| < 1$; $j = K$ for $K \le \max(2B, 4096)$, else
  $B + (K \bmod B)$ (the third term applies to that $K$);
- the resolvent $R = \min\big(1/(1 - \rho),\ \|\sum_{r<B} A^r\| / (1 -
  \|A^B\|)\big) \ge \|(I - A)^{-1}\|$, since $(I - A)^{-1} = (\sum_{r<B}
  A^r)(I - A^B)^{-1}$: finite whenever a power of $A$ contracts (heavy
  ball's phase-space map has $\rho = \|A\| > 1$ and $\|A^r\|$ growing to 6
  at condition number 300 before it decays, yet a finite $R$, at most
  $(1 + \|A^B\|)/(1 - \|A^B\|)$ times the true resolvent norm: within
  10 % in the tests);
- $d_k = R\, \|F(z_k) - z_k\| \ge \|z_k - \bar z\|$ (Lemma 1).

A Jacobian evaluated at a point $z$ at distance $d$ from $\bar z$ deviates
from its value at $\bar z$ by about $(L_B + L_A \|\bar J\|) d$; through
$(I - A)^{-1}$ this costs at most $(L_B/\|\bar J\| + L_A)\, R\, d$
of relative error. Then, relative to $\|\bar J\|$:

- `OneStep`, `Truncated(K)` (Corollary 1 with $\rho^K$; Corollary 3 when
  $\rho \approx 0$):
  $\pi(K) + \big(L_B/\|\bar J\| + L_A (1 + \rho) R\big)\, S$,
  $S = \sum_{i<K} \pi_i (\|z_{k-1-i} - z_k\| + d_k)$, $\pi_i \ge
  \|A^i\|$ as above: the Jacobians of
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
(neither $A$ nor $A^{1024}$ contracts) the bound is $+\infty$: the theory
does not apply; so it is when an estimate is not finite (a tangent of the
step overflowed), and for solvers marked `error_estimate_needs_float64`
(`InteriorPointQP`) with unknowns below float64.
Cost: about $4 \times 30$ Jacobian-vector products for
$\rho$, $L_F$, $L_B$, $L_A$, plus $2 \times 10 \times (2 \times 16 +
j)$ for the power norms when $A^{16}$ contracts ($j = K$: 1 for `OneStep`,
the steps for `Unroll`, at most 4096); each longer block tried adds
$2 \times 10 \times 2B$ (`MAX_POWER_BLOCK`).

These are estimates, not certificates: power iteration approaches $L_F$,
$L_A$, $L_B$ from below (only $\rho$ is corrected upwards), $\rho$ is measured at $z_k$ rather than as a sup over a region, and
$L_A$, $L_B$ are sampled along one direction.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, PyTree, Real

from ._auto import IMPLICIT, Auto
from ._estimators import AbstractEstimator, OneStep, Truncated, Unroll
from ._implicit import Implicit
from ._loop import LoopOutput
from ._neumann import Neumann
from ._spectral import (
    DEFAULT_POWER_ITERATIONS,
    POWER_BLOCK,
    flat_step,
    local_constants,
)
from .solvers._base import AbstractSolver


class ErrorEstimate(NamedTuple):
    bound: Real[Array, ""]
    """The estimated relative error of the derivative ($+\\infty$: none)."""
    theory_fails: Bool[Array, ""]
    """The estimator sums powers of $J_z F$ (`OneStep`, `Truncated(K)`,
    `Neumann`) and no power of it up to `MAX_POWER_BLOCK` contracts, while
    $\\|J_z F\\| \\ge 1$: its derivative is meaningless there (a repelling
    fixed point), and `solve` reports `RESULTS.not_contracting`."""


def derivative_error_bound(
    estimator: AbstractEstimator,
    solver: AbstractSolver,
    out: LoopOutput,
    theta: PyTree[Any],
    iterations: int = DEFAULT_POWER_ITERATIONS,
) -> ErrorEstimate:
    """The estimated relative error of `estimator`'s derivative of the final
    unknowns (see the module docstring for the formulas), and whether the
    estimator's theory fails at them."""
    f = flat_step(solver, jax.lax.stop_gradient(out.state), jax.lax.stop_gradient(theta))
    if solver.error_estimate_needs_float64 and jnp.finfo(f.x.dtype).bits < 64:
        return ErrorEstimate(jnp.full((), jnp.inf, f.x.dtype), jnp.zeros((), bool))
    q = local_constants(f, iterations, with_L_A=True, power=_power(estimator, out))
    L_A, norms = q.L_A, q.power_norms
    assert L_A is not None and norms is not None
    dtype = f.x.dtype
    one = jnp.ones((), dtype)
    # ||(I - A)^{-1}|| <= min(1/(1 - rho), ||S_B|| / (1 - ||A^B||)) with
    # S_B = sum_{r<B} A^r, since (I - A)^{-1} = S_B (I - A^B)^{-1}: the second
    # is finite for any map some power of which contracts, and much smaller
    # for non-normal A (spectral radius << ||A||), e.g. heavy ball's
    # phase-space map, where ||A|| > 1 and ||A^r|| grows before it decays.
    by_norm = jnp.where(q.rho < 1, one / jnp.where(q.rho < 1, one - q.rho, one), jnp.inf)
    block_contracts = norms.block_norm < 1
    by_block = jnp.where(
        block_contracts,
        norms.block_sum / jnp.where(block_contracts, one - norms.block_norm, one),
        jnp.inf,
    )
    resolvent = jnp.minimum(by_norm, by_block)
    contracting = jnp.isfinite(resolvent)
    resolvent = jnp.where(contracting, resolvent, one)
    block = norms.block.astype(dtype)

    def power_bound(i):
        # ||A^i|| <= min(rho^i, ||A^B0||^(i // B0) rho^(i mod B0)) =: b(i), and
        # <= ||A^B||^(i // B) b(i mod B) with the block B that contracts.
        def within_first(r):
            blocked = norms.first_block ** jnp.floor(r / POWER_BLOCK) * q.rho ** jnp.mod(
                r, POWER_BLOCK)
            return jnp.minimum(q.rho**r, blocked)

        by_long_block = norms.block_norm ** jnp.floor(i / block) * within_first(
            jnp.mod(i, block))
        return jnp.minimum(within_first(i), by_long_block)

    def decay(K):
        # ||A^K|| <= ||A^j||^(K // j) rho^(K mod j) with the j the direct norm
        # was estimated for, <= ||A^B||^((K - j) / B) ||A^j|| where B divides
        # K - j (the K the norms were asked for), and <= power_bound(K).
        K = jnp.asarray(K, dtype)
        j = norms.direct_power.astype(dtype)
        direct = norms.direct ** jnp.floor(K / j) * q.rho ** jnp.mod(K, j)
        aligned = (K >= j) & (jnp.mod(K - j, block) == 0)
        by_blocks = jnp.where(
            aligned, norms.direct * norms.block_norm ** jnp.floor((K - j) / block), jnp.inf)
        return jnp.minimum(jnp.minimum(direct, by_blocks), power_bound(K))

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
            powers = power_bound(jnp.arange(gaps.size, dtype=dtype))
            weighted = jnp.sum(jnp.where(gaps > 0, powers * (gaps + distance), 0.0))
            weighted = jnp.maximum(weighted, distance)
        per_distance = q.L_B / safe_J + L_A * (1 + q.rho) * resolvent
        return decay(K) + per_distance * weighted

    def implicit_bound(linear_solver):
        bound = sensitivity * distance
        if isinstance(linear_solver, Neumann):
            bound = bound + decay(linear_solver.k)
        return bound

    sums_powers = isinstance(estimator, Implicit | Auto) and isinstance(
        estimator.linear_solver, Neumann)
    if isinstance(estimator, OneStep | Truncated):
        bound = truncated_bound()
        sums_powers = True
    elif isinstance(estimator, Implicit):
        bound = implicit_bound(estimator.linear_solver)
    elif isinstance(estimator, Auto):
        # The bound of the branch Auto took (per instance under vmap).
        assert out.estimator is not None
        chose_implicit = out.estimator == IMPLICIT
        bound = jnp.where(
            chose_implicit, implicit_bound(estimator.linear_solver), truncated_bound()
        )
        sums_powers = sums_powers | ~chose_implicit
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
    bound = jnp.where(contracting & (J_lower > 0) & ~jnp.isnan(bound), bound, jnp.inf)
    # Not contracting: ||A|| >= 1 and ||A^B|| >= 1 for every block tried (an
    # overflowed power, NaN, grew past 1e150: not contracting either).
    repelling = (q.rho >= 1) & ~(norms.block_norm < 1)
    return ErrorEstimate(bound, jnp.asarray(sums_powers) & repelling)


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
