"""Limited-memory BFGS: the two-loop recursion with a line search, its memory
kept as auxiliary state."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._solution import RESULTS
from .._tree import tree_freeze
from ._base import AbstractSolver
from ._gradient import check_iterate
from ._newton import HESSIAN_TAGS, AbstractLineSearch, Wolfe


class _LBFGSAux(eqx.Module):
    """L-BFGS's auxiliary state. The unknowns are $z = x$ only: the memory is
    a function of past iterates and carries no derivative."""

    # Ring buffer of the last `memory` pairs s_i = x_{i+1} - x_i,
    # y_i = g_{i+1} - g_i and rho_i = 1 / <s_i, y_i> (rho_i = 0 marks an
    # empty or skipped slot, which the two-loop recursion then ignores).
    s: Float[Array, "m n"]
    y: Float[Array, "m n"]
    rho: Float[Array, " m"]
    # Pairs written so far (the next slot is `count % memory`).
    count: Int[Array, ""]
    # The previous iterate and its gradient, so that the pair ending at the
    # current iterate is formed from the gradient the step computes anyway
    # (one gradient per step instead of two).
    x_prev: Float[Array, " n"]
    g_prev: Float[Array, " n"]
    has_prev: Array
    # The objective's value and gradient at the current iterate, computed by
    # the previous step's line search (or by `init`), so that a step
    # evaluates no gradient the line search already has (see
    # `_value_and_grad_at`).
    f: Scalar
    g: Float[Array, " n"]
    result: RESULTS


@eqx.filter_custom_jvp
def _value_and_grad_at(objective, x, theta, cached):
    """`jax.value_and_grad(objective)(x, theta)`, whose value `cached` was
    computed already (by the line search that produced `x`). The forward
    loop runs without derivatives and so reuses it for free; where the step
    is differentiated (`OneStep`, `Truncated`, `Unroll`) the tangent is the
    exact one, $(\\langle g, \\dot x\\rangle + \\partial_\\theta f\\,\\dot\\theta,\\;
    \\nabla^2_{xx} f\\,\\dot x + \\nabla^2_{x\\theta} f\\,\\dot\\theta)$."""
    return cached


@_value_and_grad_at.def_jvp
def _value_and_grad_at_jvp(primals, tangents):
    objective, x, theta, cached = primals
    t_objective, t_x, t_theta, _ = tangents
    _, tangent_out = eqx.filter_jvp(
        lambda o, u, th: jax.value_and_grad(o)(u, th),
        (objective, x, theta),
        (t_objective, t_x, t_theta),
    )
    return cached, tangent_out


def two_loop(
    g: Float[Array, " n"],
    s: Float[Array, "m n"],
    y: Float[Array, "m n"],
    rho: Float[Array, " m"],
    newest: Int[Array, ""],
    gamma: Scalar,
) -> Float[Array, " n"]:
    """$H g$ by the two-loop recursion (Nocedal & Wright, Algorithm 7.4), with
    $H_0 = \\gamma I$ and the pairs of a ring buffer whose newest slot is
    `newest`; slots with $\\rho_i = 0$ are skipped."""
    m = s.shape[0]
    order = (newest - jnp.arange(m)) % m  # newest first

    def first(q, i):
        alpha = rho[i] * jnp.vdot(s[i], q)
        return q - alpha * y[i], alpha

    q, alphas = jax.lax.scan(first, g, order)

    def second(r, i_alpha):
        i, alpha = i_alpha
        beta = rho[i] * jnp.vdot(y[i], r)
        return r + (alpha - beta) * s[i], None

    r, _ = jax.lax.scan(second, gamma * q, (order[::-1], alphas[::-1]))
    return r


class LBFGS(AbstractSolver):
    """Limited-memory BFGS with a line search:
    $x_{k+1} = x_k - t_k H_k \\nabla_x f(x_k, \\theta)$.

    $H_k$ is the L-BFGS approximation of $\\nabla^2_{xx} f^{-1}$ built from
    the last `memory` pairs $s_i = x_{i+1} - x_i$,
    $y_i = \\nabla f(x_{i+1}) - \\nabla f(x_i)$ by the two-loop recursion
    (Nocedal & Wright, Algorithm 7.4) with
    $H_k^0 = \\frac{\\langle s, y\\rangle}{\\langle y, y\\rangle} I$ from the
    newest pair (and $H_0 = I / \\|\\nabla f(x_0)\\|$ before any pair). Pairs
    with $\\langle s, y\\rangle \\le \\varepsilon \\|s\\|\\|y\\|$ are skipped,
    so $H_k$ stays positive definite whatever the line search. The step $t_k$
    comes from `linesearch`.

    **Unknowns and auxiliary state.** The unknowns are $z = x$ (any pytree of
    floating-point arrays). The memory $(s_i, y_i, \\rho_i)$, the previous
    iterate and gradient, the value and gradient at the current iterate and a
    `RESULTS` code are auxiliary state: they never enter
    `Implicit`'s linear system. A step evaluates only the line search's
    trials: the value and gradient at the accepted point are kept for the
    next step (with `Wolfe`, whose trials compute the gradient anyway, one
    value and gradient per step when the unit step is accepted; with
    `Backtracking` one extra gradient at the accepted point).

    **Optimality.** `optimality` is $\\nabla_x f$, tagged symmetric positive
    semidefinite: `Implicit()` differentiates the exact solution,
    $J_\\theta \\bar x = -\\nabla^2_{xx} f^{-1} \\nabla^2_{x\\theta} f$, dense
    (default) or matrix-free with
    `Implicit(linear_solver=lx.CG(rtol, atol))` (Hessian-vector products).
    `Implicit(condition="fixed_point")` solves with $J_x F - I = -t H_k
    \\nabla^2_{xx} f$ (memory held): $t H_k$ cancels and the derivative is the
    same exact one.

    **What `OneStep` differentiates.** The last quasi-Newton step with its
    memory and step length held fixed:
    $J^{OS} = -t_{k-1} H_{k-1} \\nabla^2_{x\\theta} f(x_{k-1}, \\theta)$, the
    exact derivative with $\\nabla^2_{xx} f^{-1}$ replaced by $t H$. We do
    not differentiate the memory: its pairs depend on $\\theta$ through
    gradients, and at the solution every such term is multiplied by
    $\\nabla f(\\bar x) = 0$, so differentiating it would cost more and
    remove none of the bias. That bias is
    $J^{OS} - J_\\theta \\bar x = -J_x F\\, J_\\theta \\bar x$ at the fixed
    point, with $J_x F = I - t H \\nabla^2_{xx} f$: L-BFGS is superlinear in
    neither sense of the paper ($H_k$ matches the inverse Hessian only along
    the recent steps, not on the range of $\\nabla^2_{x\\theta} f$), so the
    error does **not** vanish as $x_k \\to \\bar x$. Measured on a logistic
    regression ($N = 200$, $n = 51$, backtracking): the relative error of
    the OneStep Jacobian stays between 0.5 and 0.9 at every iteration
    (0.62 at $k = 45$, where $\\|x_k - \\bar x\\|/\\|\\bar x\\| = 8.5 \\cdot 10^{-14}$),
    `Truncated(10)`'s between $2 \\cdot 10^{-3}$ and $2.5 \\cdot 10^{-2}$, while
    `Implicit` follows $\\|x_k - \\bar x\\|$ down to $6 \\cdot 10^{-14}$
    (`python benchmarks/lbfgs_lasso.py --only onestep`, figure
    `benchmarks/results/lbfgs_onestep.png`; Newton's OneStep reaches
    $10^{-15}$ in 7 steps on the same problem). `Truncated(K)` multiplies the
    bias by the product of $K$ such $J_x F$ (memory held at each step) and
    decreases slowly with $K$.

    **Arguments:**

    - `objective`: `objective(x, theta) -> scalar`, differentiable in `x`
      (twice for `Implicit`, `OneStep` and `Truncated`).
    - `memory`: the number of pairs kept, a positive integer (default 10).
    - `linesearch`: `Wolfe()` (default; its curvature condition keeps
      $\\langle s, y\\rangle > 0$ on non-convex objectives) or
      `Backtracking()` (cheaper per trial: a value, no gradient; enough for
      strictly convex objectives, where $\\langle s, y\\rangle > 0$ always).

    The stopping residual (`residual_norm`) is $\\|\\nabla_x f(x_k)\\|$ at
    the iterate returned. `status` reports `RESULTS.linesearch_failed`
    when no acceptable step was found; the iterate is then left unchanged.

    !!! warning

        `OneStep()` and `Truncated(K)` are biased at every accuracy with
        L-BFGS (see above); use `Implicit()`, or `Newton` for a one-step
        estimator that is exact at the solution.
    """

    objective: Callable[[PyTree[Array], PyTree[Any]], Scalar]
    memory: int = eqx.field(static=True, default=10)
    linesearch: AbstractLineSearch = Wolfe()

    optimality_tags = HESSIAN_TAGS

    def __check_init__(self):
        if not callable(self.objective):
            raise TypeError(
                "LBFGS(objective, ...) needs a callable objective(x, theta) -> "
                f"scalar, got {type(self.objective).__name__}."
            )
        if (
            not isinstance(self.memory, int)
            or isinstance(self.memory, bool)
            or self.memory < 1
        ):
            raise ValueError(
                f"LBFGS(memory=...) must be a positive integer, got {self.memory!r}."
            )
        if not isinstance(self.linesearch, AbstractLineSearch):
            raise TypeError(
                "LBFGS(linesearch=...) must be an itergrad line search "
                f"(ig.Wolfe(), ig.Backtracking()), got {self.linesearch!r}."
            )

    def _flat_objective(self, z, theta):
        flat, unravel = ravel_pytree(z)
        # Arrays the objective closes over become explicit inputs, so that
        # derivatives reach them through the gradient.
        objective = eqx.filter_closure_convert(
            lambda u, th: self.objective(unravel(u), th), flat, theta
        )
        return flat, unravel, objective

    def init(self, x0, theta):
        x0 = check_iterate("LBFGS", x0)
        flat, _, objective = self._flat_objective(x0, theta)
        n, dtype = flat.size, flat.dtype
        f, g = jax.lax.stop_gradient(jax.value_and_grad(objective)(flat, theta))
        g = g.astype(dtype)
        aux = _LBFGSAux(
            s=jnp.zeros((self.memory, n), dtype),
            y=jnp.zeros((self.memory, n), dtype),
            rho=jnp.zeros((self.memory,), dtype),
            count=jnp.zeros((), jnp.int32),
            x_prev=jnp.zeros((n,), dtype),
            g_prev=jnp.zeros((n,), dtype),
            has_prev=jnp.array(False),
            f=f,
            g=g,
            result=RESULTS.successful,
        )
        return x0, aux

    def step(self, z, aux, theta):
        flat, unravel, objective = self._flat_objective(z, theta)
        dtype = flat.dtype
        f, g = _value_and_grad_at(objective, flat, theta, (aux.f, aux.g))
        g = g.astype(dtype)

        # The pair ending at x_k. The memory is a function of past iterates:
        # it carries no derivative (see the class docstring).
        s_new, y_new = jax.lax.stop_gradient((flat - aux.x_prev, g - aux.g_prev))
        sy = jnp.vdot(s_new, y_new)
        eps = jnp.finfo(dtype).eps
        keep = aux.has_prev & (
            sy > eps * jnp.linalg.norm(s_new) * jnp.linalg.norm(y_new)
        )
        slot = aux.count % self.memory
        s_mem = jnp.where(keep, aux.s.at[slot].set(s_new), aux.s)
        y_mem = jnp.where(keep, aux.y.at[slot].set(y_new), aux.y)
        rho_mem = jnp.where(
            keep, aux.rho.at[slot].set(1 / jnp.where(keep, sy, 1)), aux.rho
        )
        count = aux.count + keep.astype(aux.count.dtype)
        newest = (count - 1) % self.memory

        gradient_norm = jnp.linalg.norm(jax.lax.stop_gradient(g))
        yy = jnp.vdot(y_mem[newest], y_mem[newest])
        gamma = jnp.where(
            count > 0,
            1 / jnp.where(count > 0, rho_mem[newest] * yy, 1),
            1 / jnp.where(gradient_norm > 0, gradient_norm, 1),
        )
        # Linear in g with the memory held: the direction's derivative is
        # -H dg (the quasi-Newton step's).
        direction = -two_loop(g, s_mem, y_mem, rho_mem, newest, gamma)

        frozen_objective, frozen_theta = tree_freeze((objective, theta))
        t, found, f_new, g_new = self.linesearch.search(
            lambda u: frozen_objective(u, frozen_theta),
            *tree_freeze((flat, f, g, direction)),
        )
        new_flat = jnp.where(found, flat + t * direction, flat).astype(dtype)
        f_new, g_new = jax.lax.stop_gradient(
            (jnp.where(found, f_new, f), jnp.where(found, g_new.astype(dtype), g))
        )
        new_aux = _LBFGSAux(
            s=s_mem,
            y=y_mem,
            rho=rho_mem,
            count=count,
            x_prev=jax.lax.stop_gradient(flat),
            g_prev=jax.lax.stop_gradient(g),
            has_prev=jnp.array(True),
            f=f_new,
            g=g_new,
            result=RESULTS.where(found, RESULTS.successful, RESULTS.linesearch_failed),
        )
        return unravel(new_flat), new_aux

    def value(self, z):
        return z

    def optimality(self, z, aux, theta):
        return jax.grad(self.objective)(z, theta)

    def residual_norm(self, z, new_z, new_aux, theta):
        return jnp.linalg.norm(new_aux.g)

    def status(self, aux):
        return aux.result
