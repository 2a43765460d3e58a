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
import jax.random as jr
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree, Real, Scalar

from .solvers._base import AbstractSolver


class FlatStep(eqx.Module):
    """The step map $F$ of `solver` as a function of two flat vectors
    $(x, \\theta)$: the floating-point leaves of the state and of `theta`.
    Integer/boolean leaves (counters, flags) are held fixed."""

    solver: AbstractSolver
    x: Float[Array, " n"]
    theta: Float[Array, " m"]
    unravel_x: Callable = eqx.field(static=True)
    unravel_theta: Callable = eqx.field(static=True)
    state_static: PyTree[Any]
    theta_static: PyTree[Any]

    def __call__(self, x: Float[Array, " n"], theta: Float[Array, " m"]):
        state = eqx.combine(self.unravel_x(x), self.state_static)
        th = eqx.combine(self.unravel_theta(theta), self.theta_static)
        new_state = self.solver.step(state, th)
        new_x, _ = ravel_pytree(eqx.filter(new_state, eqx.is_inexact_array))
        return new_x.astype(x.dtype)


def flat_step(
    solver: AbstractSolver, state: PyTree[Any], theta: PyTree[Any]
) -> FlatStep:
    state_dyn, state_static = eqx.partition(state, eqx.is_inexact_array)
    theta_dyn, theta_static = eqx.partition(theta, eqx.is_inexact_array)
    x, unravel_x = ravel_pytree(state_dyn)
    t, unravel_theta = ravel_pytree(theta_dyn)
    # Estimates are taken at a point, never differentiated through.
    x, t = jax.lax.stop_gradient((x, t))
    return FlatStep(solver, x, t, unravel_x, unravel_theta, state_static, theta_static)


def _safe_normalize(v: Array) -> tuple[Array, Scalar]:
    norm = jnp.linalg.norm(v)
    safe = jnp.where(norm > 0, norm, 1.0)
    return v / safe, norm


def linear_operator_norm(
    matvec: Callable[[Array], Array], v0: Float[Array, " d"], iterations: int
) -> Real[Array, ""]:
    """$\\|J\\|_{op}$ for a linear map `matvec` $= v \\mapsto Jv$, by `iterations`
    steps of power iteration on $J^T J$ from `v0` (the transpose comes from
    `jax.linear_transpose`, so one JVP and one VJP per step).

    The result $\\|J v\\|$ with $\\|v\\| = 1$ is a lower bound of the true norm
    that converges like $(\\sigma_2/\\sigma_1)^{2\\,\\text{iterations}}$.
    """
    transpose = jax.linear_transpose(matvec, v0)

    def body(_, v):
        w = transpose(matvec(v))[0]
        w, _ = _safe_normalize(w)
        return w

    v, _ = _safe_normalize(v0)
    v = jax.lax.fori_loop(0, iterations, body, v)
    return jnp.linalg.norm(matvec(v))


def jacobian_x_norm(f: FlatStep, key: Array, iterations: int) -> Real[Array, ""]:
    """$\\rho \\approx \\|J_x F(x, \\theta)\\|_{op}$, matrix-free."""
    _, jvp = jax.linearize(lambda x: f(x, f.theta), f.x)
    v0 = jr.normal(key, f.x.shape, f.x.dtype)
    return linear_operator_norm(jvp, v0, iterations)


def jacobian_theta_norm(f: FlatStep, key: Array, iterations: int) -> Real[Array, ""]:
    """$L_F \\approx \\|J_\\theta F(x, \\theta)\\|_{op}$, matrix-free."""
    _, jvp = jax.linearize(lambda t: f(f.x, t), f.theta)
    v0 = jr.normal(key, f.theta.shape, f.theta.dtype)
    return linear_operator_norm(jvp, v0, iterations)


def auto_truncation(rho: Real[Array, ""], target: float, max_K: int) -> Int[Array, ""]:
    """The smallest $K \\ge 1$ with $\\rho^K / (1 - \\rho^K) \\le$ `target`,
    i.e. $K = \\lceil \\log(t/(1+t)) / \\log \\rho \\rceil$, clipped to
    `[1, max_K]` ($K = 1$ for $\\rho = 0$, `max_K` for $\\rho \\ge 1$)."""
    rho = jnp.asarray(rho)
    safe_rho = jnp.clip(rho, jnp.finfo(rho.dtype).tiny, 1 - jnp.finfo(rho.dtype).eps)
    K = jnp.ceil(jnp.log(target / (1 + target)) / jnp.log(safe_rho))
    K = jnp.where(rho >= 1, max_K, K)
    K = jnp.where(jnp.isfinite(K), K, max_K)
    return jnp.clip(K, 1, max_K).astype(jnp.int32)


def solver_contraction(
    solver: AbstractSolver,
    state: PyTree[Any],
    theta: PyTree[Any],
    iterations: int,
    key: Array | None = None,
) -> Real[Array, ""]:
    """$\\rho$ at `state`: the operator norm of the step map's state Jacobian."""
    if key is None:
        # A fixed start: the estimate is deterministic and needs no user key.
        key = jr.key(0)
    return jacobian_x_norm(flat_step(solver, state, theta), key, iterations)
