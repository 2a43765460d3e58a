"""Matrix-free spectral estimates of the step map's Jacobians.

Shared by `diagnose` and `Truncated("auto")`. Everything works on flattened
floating-point leaves of the solver state and of `theta`, through JVPs and
VJPs only: no dense Jacobian is ever formed.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree, Real, Scalar

from .solvers._base import AbstractSolver, State

# One set of defaults for every estimate of this module's kind, shared by
# `Truncated("auto")` and `diagnose`.
DEFAULT_MAX_K = 100
"""The largest K considered for truncation (`Truncated("auto")`'s ring buffer)."""
DEFAULT_MAX_TAIL = 20_000
"""The most terms of `Truncated("auto")`'s Neumann tail beyond `max_K`
(enough for a relative target of 1e-4 at rho = 0.9995)."""
DEFAULT_POWER_ITERATIONS = 30
"""Power-iteration steps per operator norm: the estimate approaches the norm
from below like $(\\sigma_2/\\sigma_1)^{60}$."""


class FlatStep(eqx.Module):
    """The step map of `solver` on its unknowns, $z \\mapsto F_z(z, a, \\theta)$,
    as a function of two flat vectors $(x, \\theta)$: the unknowns and the
    floating-point leaves of `theta`. The auxiliary state $a$ (memory,
    counters, flags) is held at its value at the point of evaluation: it is
    not an unknown, so it is no dimension of any Jacobian estimated here."""

    solver: AbstractSolver
    x: Float[Array, " n"]
    theta: Float[Array, " m"]
    unravel_x: Callable = eqx.field(static=True)
    unravel_theta: Callable = eqx.field(static=True)
    aux: PyTree[Any]
    theta_static: PyTree[Any]

    def __call__(self, x: Float[Array, " n"], theta: Float[Array, " m"]):
        th = eqx.combine(self.unravel_theta(theta), self.theta_static)
        new_z, _ = self.solver.step(self.unravel_x(x), self.aux, th)
        new_x, _ = ravel_pytree(new_z)
        return new_x.astype(x.dtype)


def flat_step(solver: AbstractSolver, state: State, theta: PyTree[Any]) -> FlatStep:
    theta_dyn, theta_static = eqx.partition(theta, eqx.is_inexact_array)
    x, unravel_x = ravel_pytree(state.z)
    t, unravel_theta = ravel_pytree(theta_dyn)
    # Estimates are taken at a point, never differentiated through.
    x, t, aux = jax.lax.stop_gradient((x, t, state.aux))
    return FlatStep(solver, x, t, unravel_x, unravel_theta, aux, theta_static)


def _safe_normalize(v: Array) -> tuple[Array, Scalar]:
    """$(v / \\|v\\|, \\|v\\|)$; a zero $v$ stays zero, and a $v$ whose norm
    overflows gives NaN (not $v/\\infty = 0$, which would make a power
    iteration on a fast-growing power report a norm of 0)."""
    norm = jnp.linalg.norm(v)
    safe = jnp.where(norm > 0, norm, 1.0)
    return jnp.where(jnp.isfinite(norm), v / safe, jnp.nan), norm


def _transpose_or_nan(matvec: Callable[[Array], Array], v0: Array) -> Callable[[Array], Array]:
    """$w \\mapsto J^T w$ (`jax.linear_transpose` of `matvec`), NaN where $w$
    is not finite. Lineax transposes its linear solves with `throw=True`
    unconditionally, so a non-finite cotangent (an interior-point tangent that
    overflowed in float32) would raise at run time even under `throw=False`;
    zeros are transposed instead and the NaN carried on: an estimate built on
    it is NaN, which the error bound turns into $+\\infty$ (no estimate)."""
    transpose = jax.linear_transpose(matvec, v0)

    def apply(w):
        finite = jnp.all(jnp.isfinite(w))
        out = transpose(jnp.where(finite, w, 0))[0]
        return jnp.where(finite, out, jnp.nan)

    return apply


def linear_operator_norm(
    matvec: Callable[[Array], Array], v0: Float[Array, " d"], iterations: int
) -> Real[Array, ""]:
    """$\\|J\\|_{op}$ for a linear map `matvec` $= v \\mapsto Jv$, by `iterations`
    steps of power iteration on $J^T J$ from `v0` (the transpose comes from
    `jax.linear_transpose`, so one JVP and one VJP per step).

    The result $\\|J v\\|$ with $\\|v\\| = 1$ is a lower bound of the true norm
    that converges like $(\\sigma_2/\\sigma_1)^{2\\,\\text{iterations}}$.
    """
    transpose = _transpose_or_nan(matvec, v0)

    def body(_, v):
        w = transpose(matvec(v))
        w, _ = _safe_normalize(w)
        return w

    v, _ = _safe_normalize(v0)
    v = jax.lax.fori_loop(0, iterations, body, v)
    return jnp.linalg.norm(matvec(v))


def _upper_power_iteration(
    forward: Callable[[Array], Array],
    backward: Callable[[Array], Array],
    v0: Float[Array, " d"],
    iterations: int,
) -> Real[Array, ""]:
    """$\\|M\\|_{op}$ for $M$ = `forward` (with $M^T$ = `backward`) by
    `iterations` steps of power iteration on $M^T M$, corrected upwards by the
    residual of the final eigenpair: with $w = M^T M v$, $\\lambda = v^T w$,
    some eigenvalue lies within $\\|w - \\lambda v\\|$ of $\\lambda$, so
    $\\sqrt{\\lambda + \\|w - \\lambda v\\|}$ over-estimates the norm once
    power iteration has found the top eigenvector's neighbourhood."""

    def body(_, v):
        w, _ = _safe_normalize(backward(forward(v)))
        return w

    v, _ = _safe_normalize(v0)
    v = jax.lax.fori_loop(0, iterations, body, v)
    w = backward(forward(v))
    eigenvalue = jnp.vdot(v, w)
    residual = jnp.linalg.norm(w - eigenvalue * v)
    return jnp.sqrt(jnp.maximum(eigenvalue + residual, 0.0))


def linear_operator_norm_upper(
    matvec: Callable[[Array], Array], v0: Float[Array, " d"], iterations: int
) -> Real[Array, ""]:
    """Like `linear_operator_norm`, but corrected upwards by the residual of
    the final eigenpair of $J^T J$ (`_upper_power_iteration`): it is used
    where an under-estimate would make a bound too small."""
    return _upper_power_iteration(matvec, _transpose_or_nan(matvec, v0), v0, iterations)


POWER_BLOCK = 16
"""The first block length $B$ whose power $\\|A^B\\|$ is estimated directly
(`estimate_power_norms`): longer products are bounded by
$\\|A^B\\|^{\\lfloor K/B \\rfloor} \\|A\\|^{K \\bmod B}$."""

DIRECT_POWER_MAX = 4096
"""The largest power $p$ whose norm $\\|A^p\\|$ is estimated directly when a
bound needs it ($2 \\times 10 \\times p$ products: `Unroll`'s $p$ is the
number of steps, `Truncated(K)`'s K); beyond it, or beyond $2B$ when the
block $B$ is longer, through $\\|A^B\\|^{(p - j)/B} \\|A^j\\|$,
$j = B + (p \\bmod B)$, which loses the transient growth of every block
(measured: 1e-5 against 3e-12 for heavy ball at condition number 3000)."""

MAX_POWER_BLOCK = 1024
"""The longest block `estimate_power_norms` tries before it gives up: a map whose
1024-th power does not contract gets no bound (for heavy ball on a quadratic,
$\\|A^B\\| < 1$ needs $B \\approx$ 64 at condition number 300 and 256 at
3000)."""


def _repeated_norm_upper(
    matvec: Callable[[Array], Array],
    v0: Float[Array, " d"],
    power: Int[Array, ""] | int,
    iterations: int,
    summed: bool,
) -> Real[Array, ""]:
    """$\\|M\\|_{op}$ (`_upper_power_iteration`) for $M = J^p$, or
    $M = \\sum_{r<p} J^r$ when `summed`, $p$ = `power` (may be traced):
    p JVPs and p VJPs per iteration either way."""

    def repeat(apply):
        def run(v):
            if not summed:
                return jax.lax.fori_loop(0, power, lambda _, w: apply(w), v)
            _, total = jax.lax.fori_loop(
                0, power, lambda _, c: (apply(c[0]), c[1] + c[0]), (v, jnp.zeros_like(v)))
            return total

        return run

    return _upper_power_iteration(
        repeat(matvec), repeat(_transpose_or_nan(matvec, v0)), v0, iterations
    )


def power_norm_upper(
    matvec: Callable[[Array], Array],
    v0: Float[Array, " d"],
    power: Int[Array, ""] | int,
    iterations: int,
) -> Real[Array, ""]:
    """$\\|J^p\\|_{op}$, $p$ = `power` (may be traced, $p \\ge 1$), by power
    iteration on $(J^p)^T J^p$ (p JVPs and p VJPs per step), corrected upwards
    by the final eigenpair's residual (`_upper_power_iteration`).

    For a non-normal $J$ (most step maps) $\\|J^p\\|$ can be far below
    $\\|J\\|^p$: it decays like the spectral radius, which is what the
    iteration and the truncated sums actually see."""
    return _repeated_norm_upper(matvec, v0, power, iterations, summed=False)


def power_sum_norm_upper(
    matvec: Callable[[Array], Array],
    v0: Float[Array, " d"],
    power: Int[Array, ""] | int,
    iterations: int,
) -> Real[Array, ""]:
    """$\\|\\sum_{r<p} J^r\\|_{op}$, $p$ = `power`, by power iteration
    (upper-corrected), p JVPs and p VJPs per step.

    With it the resolvent is bounded without summing norms:
    $(I - J)^{-1} = \\big(\\sum_{r<p} J^r\\big)(I - J^p)^{-1}$, so
    $\\|(I - J)^{-1}\\| \\le \\|\\sum_{r<p} J^r\\| / (1 - \\|J^p\\|)$ whenever
    $\\|J^p\\| < 1$: within a factor $(1 + \\|J^p\\|)/(1 - \\|J^p\\|)$ of the
    truth, where $\\sum_{r<p} \\|J^r\\|$ can be orders of magnitude larger
    (heavy ball: $\\|J^r\\|$ grows to 6 before it decays)."""
    return _repeated_norm_upper(matvec, v0, power, iterations, summed=True)


class PowerNorms(eqx.Module):
    """Norms of powers of $A = J_x F$ (all upper-corrected power iterations),
    see `estimate_power_norms`."""

    direct_power: Int[Array, ""]
    """$j$: $p$ itself when $p \\le \\max(2B,$ `DIRECT_POWER_MAX`$)$, else
    $B + (p \\bmod B)$ (so that $\\|A^p\\| \\le \\|A^B\\|^{(p - j)/B}
    \\|A^j\\|$), for the power $p$ a bound asked for."""
    direct: Real[Array, ""]
    """$\\|A^j\\|$."""
    first_block: Real[Array, ""]
    """$\\|A^{B_0}\\|$, $B_0$ = `POWER_BLOCK`."""
    block: Int[Array, ""]
    """$B$: the first of $B_0, 4B_0, 16B_0, \\dots \\le$ `MAX_POWER_BLOCK`
    with $\\|A^B\\| < 1$ (the last tried when none is)."""
    block_norm: Real[Array, ""]
    """$\\|A^B\\|$."""
    block_sum: Real[Array, ""]
    """$\\|\\sum_{r<B} A^r\\|$."""


def estimate_power_norms(
    matvec: Callable[[Array], Array],
    v0: Float[Array, " d"],
    power: Int[Array, ""] | int,
    iterations: int,
) -> PowerNorms:
    """The `PowerNorms` of `matvec` for a bound that needs $\\|A^p\\|$,
    $p$ = `power` $\\ge 1$. The block grows by 4 while its power does not
    contract: the cost, $2 \\times$ `iterations` $\\times 2B$ products per
    block tried, is paid only by maps with transient growth (heavy ball);
    the direct power $p$ costs $2 \\times$ `iterations` $\\times p$, at most
    `DIRECT_POWER_MAX` or two blocks."""

    def more(carry):
        block, norm, _, _ = carry
        return (block < POWER_BLOCK) | ((norm >= 1) & (block < MAX_POWER_BLOCK))

    def longer(carry):
        # One trace of each power iteration (compile time), the first pass
        # (block 16) included: the loop starts at block 4, "not contracting".
        block, _, _, first = carry
        block = 4 * block
        norm = power_norm_upper(matvec, v0, block, iterations)
        total = power_sum_norm_upper(matvec, v0, block, iterations)
        return block, norm, total, jnp.where(block == POWER_BLOCK, norm, first)

    dtype = v0.dtype
    inf = jnp.full((), jnp.inf, dtype)
    block, block_norm, block_sum, first = jax.lax.while_loop(
        more, longer, (jnp.asarray(POWER_BLOCK // 4), inf, inf, inf)
    )
    power = jnp.maximum(jnp.asarray(power), 1)
    direct_power = jnp.where(power <= jnp.maximum(2 * block, DIRECT_POWER_MAX), power,
                             block + jnp.mod(power, block))
    return PowerNorms(
        direct_power=direct_power,
        direct=power_norm_upper(matvec, v0, direct_power, iterations),
        first_block=first, block=block, block_norm=block_norm, block_sum=block_sum,
    )


class LocalConstants(eqx.Module):
    """The constants of the paper's bounds at a point $x$ of the step map $F$
    (see `local_constants`)."""

    rho: Real[Array, ""]
    """$\\|J_x F(x, \\theta)\\|_{op}$, over-estimated (upper-corrected power
    iteration): every bound grows with it, most like $1/(1 - \\rho)$."""
    L_F: Real[Array, ""]
    """$\\|J_\\theta F(x, \\theta)\\|_{op}$ (power iteration, from below)."""
    L_B: Real[Array, ""]
    """The rate of change of $J_\\theta F$ along the unit step direction $u$:
    $\\|\\partial_x (J_\\theta F)(x)[u]\\|_{op}$, a local stand-in for the
    paper's Lipschitz constant $L_J$ (the given value when one was passed)."""
    L_A: Real[Array, ""] | None
    """The rate of change of $J_x F$ along $u$,
    $\\|\\partial_x (J_x F)(x)[u]\\|_{op}$; `None` unless asked for."""
    step: Real[Array, ""]
    """$\\|F(x, \\theta) - x\\|$, the length of one more step."""
    power_norms: PowerNorms | None = None
    """Norms of powers of $A = J_x F$ for the `power` asked for
    (`estimate_power_norms`); `None` unless asked for."""


def local_constants(
    f: FlatStep,
    iterations: int,
    *,
    theta_start: Float[Array, " m"] | None = None,
    L_B: Real[Array, ""] | None = None,
    with_L_A: bool = False,
    power: Int[Array, ""] | int | None = None,
    power_iterations: int = 10,
) -> LocalConstants:
    """Estimate, at the point `f.x`, the constants the paper's bounds are made
    of (one definition for `diagnose` and for `derivative_error_bound`).

    $\\rho$ is found by power iteration started from the direction $u$ of one
    more step $F(x) - x$ (mixed with a generic vector): the last step of a
    linearly converging iteration is dominated by its slowest mode, so this
    start is already close to the top singular vector where a random start
    would need thousands of iterations when $\\rho \\to 1$. It is then
    corrected upwards by the eigenpair's residual (`linear_operator_norm_upper`):
    an under-estimated $\\rho$ would make every bound too small. The second
    derivatives ($L_B$, $L_A$) are exact second-order JVPs along $u$ (a limit of
    finite differences of the Jacobians along the last step); `theta_start`
    (default a generic vector) starts the power iterations over $\\theta$.
    With `power` $= p$, also the norms of powers of $J_x F$ a bound of
    $\\|A^p\\|$ and of the resolvent needs (`estimate_power_norms`,
    `power_iterations` steps each).
    """
    x, theta = f.x, f.theta
    generic_x = generic_vector(x.size, x.dtype)
    delta = f(x, theta) - x
    u, step = _safe_normalize(delta)
    u = jnp.where(step > 0, u, generic_x)
    start_x = u + 0.1 * generic_x
    if theta_start is None:
        theta_start = generic_vector(theta.size, theta.dtype)
    _, jvp_x = jax.linearize(lambda z: f(z, theta), x)
    _, jvp_t = jax.linearize(lambda t: f(x, t), theta)
    rho = linear_operator_norm_upper(jvp_x, start_x, iterations)
    L_F = linear_operator_norm(jvp_t, theta_start, iterations)

    if L_B is None:

        def theta_jacobian_change(t):
            def theta_jvp(z):
                return jax.jvp(lambda s: f(z, s), (theta,), (t,))[1]

            return jax.jvp(theta_jvp, (x,), (u,))[1]

        L_B = linear_operator_norm(theta_jacobian_change, theta_start, iterations)
    L_A = None
    if with_L_A:

        def x_jacobian_change(v):
            def x_jvp(z):
                return jax.jvp(lambda w: f(w, theta), (z,), (v,))[1]

            return jax.jvp(x_jvp, (x,), (u,))[1]

        L_A = linear_operator_norm(x_jacobian_change, start_x, iterations)
    return LocalConstants(
        rho=rho, L_F=L_F, L_B=jnp.asarray(L_B, x.dtype), L_A=L_A, step=step,
        power_norms=None if power is None else estimate_power_norms(
            jvp_x, start_x, power, power_iterations),
    )


def needed_truncation(rho: Real[Array, ""], target: float, cap: int) -> Int[Array, ""]:
    """The smallest $K \\ge 1$ with $\\rho^K / (1 - \\rho^K) \\le$ `target`,
    i.e. $K = \\lceil \\log(t/(1+t)) / \\log \\rho \\rceil$; `cap + 1` when
    it exceeds `cap` or when $\\rho \\ge 1$ (no K is enough)."""
    rho = jnp.asarray(rho)
    safe_rho = jnp.clip(rho, jnp.finfo(rho.dtype).tiny, 1 - jnp.finfo(rho.dtype).eps)
    K = jnp.ceil(jnp.log(target / (1 + target)) / jnp.log(safe_rho))
    K = jnp.where((rho >= 1) | ~jnp.isfinite(K), cap + 1, K)
    return jnp.clip(K, 1, cap + 1).astype(jnp.int32)


def generic_vector(size: int, dtype: Any) -> Array:
    """A fixed unit vector with entries $\\propto \\sin(2\\pi\\varphi i + 1)$,
    $\\varphi$ the golden ratio: deterministic, yet with no structure a
    problem could be orthogonal to (a power-iteration start that needs no
    random key)."""
    v = jnp.sin(2 * jnp.pi * 0.6180339887498949 * jnp.arange(size) + 1.0)
    return (v / jnp.linalg.norm(v)).astype(dtype)


def solver_contraction(
    solver: AbstractSolver,
    state: State,
    theta: PyTree[Any],
    iterations: int,
    *,
    start: PyTree[Array],
) -> Real[Array, ""]:
    """$\\rho$ at `state`: the operator norm of $J_z F_z$, by power iteration
    from `start` (a pytree shaped like the unknowns, typically the last step
    $z_k - z_{k-1}$) mixed with a fixed generic vector.

    The last step of a linearly converging iteration is dominated by its
    slowest mode, so power iteration starts close to the answer; the generic
    component (entries $\\sin(2\\pi\\varphi i + 1)$, $\\varphi$ the golden
    ratio: no structure that a problem could be orthogonal to) keeps every
    direction present, e.g. when the iterate started converged in the slowest
    mode. No random key is involved: the estimate is deterministic."""
    f = flat_step(solver, state, theta)
    step = ravel_pytree(start)[0].astype(f.x.dtype)
    generic = generic_vector(step.size, f.x.dtype)
    step_norm = jnp.linalg.norm(step)
    step = jnp.where(step_norm > 0, step / jnp.where(step_norm > 0, step_norm, 1), 0)
    _, jvp = jax.linearize(lambda x: f(x, f.theta), f.x)
    # Corrected upwards (as for the error estimate): K = log(t)/log(rho)
    # must not come out too small from an under-estimated rho.
    return linear_operator_norm_upper(jvp, step + 0.1 * generic, iterations)
