"""Anderson acceleration of a fixed-point iteration $x \\mapsto F(x, \\theta)$,
its history kept as auxiliary state."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._tree import tree_sub
from .._validate import in_open_interval, nonnegative_float, positive_int
from ._base import AbstractSolver
from ._gradient import check_iterate


class _AndersonAux(eqx.Module):
    """Anderson's auxiliary state. The unknowns are $z = x$ only: the history
    is a function of past iterates and carries no derivative."""

    # The last `memory` differences dx_i = x_{i+1} - x_i and
    # dg_i = g_{i+1} - g_i, g = F(x) - x, newest in row 0.
    dx: Float[Array, "m n"]
    dg: Float[Array, "m n"]
    # Rows filled so far (at most `memory`); rows `>= count` are masked out of
    # the least-squares problem.
    count: Int[Array, ""]
    # The previous iterate and residual, to form the newest differences.
    x_prev: Float[Array, " n"]
    g_prev: Float[Array, " n"]
    has_prev: Bool[Array, ""]
    # ||F(x_k) - x_k|| at the start of the last step: the stopping residual.
    residual: Scalar


def anderson_coefficients(
    dg: Float[Array, "m n"],
    g: Float[Array, " n"],
    valid: Bool[Array, " m"],
    regularization: float,
) -> Float[Array, " m"]:
    """$\\gamma = \\arg\\min_\\gamma \\|g - \\Delta G^\\top \\gamma\\|^2 +
    \\lambda \\|\\gamma\\|^2$ over the `valid` rows of $\\Delta G$ (the others
    get $\\gamma_i = 0$), with $\\lambda$ = `regularization` times the mean
    squared norm of the valid rows.

    The $m \\times m$ normal equations are solved on rows scaled to unit norm
    (a diagonal preconditioner: the problem is scale-invariant, and the
    regularisation is then relative, so it means the same in float32 and
    float64). Masked rows, zero rows (a stalled iteration) and an empty
    history give $\\gamma = 0$, i.e. a plain step, never a NaN.
    """
    dtype = dg.dtype
    tiny = jnp.finfo(dtype).tiny
    norms = jnp.linalg.norm(dg, axis=1)
    usable = valid & (norms > jnp.sqrt(tiny))
    scale = jnp.where(usable, 1 / jnp.where(usable, norms, 1), 0).astype(dtype)
    u = dg * scale[:, None]
    gram = u @ u.T
    rhs = u @ g
    m = dg.shape[0]
    # Unused slots get a unit diagonal and a zero right-hand side: gamma_i = 0
    # exactly, and the matrix stays invertible whatever the history.
    eye = jnp.eye(m, dtype=dtype)
    diagonal = jnp.where(usable, regularization, 1).astype(dtype)
    system = gram * (usable[:, None] & usable[None, :]) + eye * diagonal
    beta = jnp.linalg.solve(system, jnp.where(usable, rhs, 0))
    beta = jnp.where(jnp.isfinite(beta), beta, 0)
    return beta * scale


class Anderson(AbstractSolver):
    """Anderson acceleration (Anderson 1965; type II in the form of Walker &
    Ni 2011) of the fixed-point iteration $x \\mapsto F(x, \\theta)$.

    With $g_i = F(x_i, \\theta) - x_i$, the differences
    $\\Delta x_i = x_{i+1} - x_i$, $\\Delta g_i = g_{i+1} - g_i$ of the last
    $m$ = `memory` iterates stacked as columns of $\\Delta X$, $\\Delta G$, and
    $\\beta$ = `mixing`, one step is

    $$\\gamma_k = \\arg\\min_\\gamma \\|g_k - \\Delta G\\,\\gamma\\|^2 +
    \\lambda\\|D\\gamma\\|^2, \\qquad
    x_{k+1} = \\underbrace{x_k + \\beta g_k}_{F_\\beta(x_k, \\theta)}
    - (\\Delta X + \\beta \\Delta G)\\,\\gamma_k,$$

    i.e. the plain (damped, Krasnosel'skii–Mann) step
    $F_\\beta(x, \\theta) = (1 - \\beta) x + \\beta F(x, \\theta)$ corrected by
    an extrapolation from the history. It is the equivalent form of
    $x_{k+1} = \\sum_i \\alpha_i \\big((1-\\beta) x_i + \\beta F(x_i)\\big)$ with
    $\\sum_i \\alpha_i = 1$ minimising $\\|\\sum_i \\alpha_i g_i\\|$. The first
    step ($\\gamma$ empty) is the plain step; until $m$ differences are stored
    the missing ones are masked out. $D = \\mathrm{diag}(\\|\\Delta g_i\\|)$ makes
    $\\lambda$ = `regularization` relative to the column scale (the system is
    solved on unit-normalised columns), so that a degenerate history
    (stalled iterates, repeated residuals) gives a bounded $\\gamma$, never a
    NaN, in float32 and float64 alike.

    **Unknowns and auxiliary state.** The unknowns are $z = x$ (any pytree of
    floating-point arrays, ravelled internally). The history
    $(\\Delta X, \\Delta G)$, the previous iterate and residual, a counter and
    the residual norm are auxiliary state: `Implicit` solves a system of the
    size of $x$ whatever `memory` is. Memory cost $2mn + 2n$.

    **Derivatives: the step map seen by the estimators.** The correction
    $(\\Delta X + \\beta\\Delta G)\\gamma_k$ is computed under `stop_gradient`,
    so the derivative of one step (in $x_k$ and in $\\theta$) is that of the
    plain map $F_\\beta$; with the default $\\beta = 1$ that is $F$ itself:

    - `OneStep()` differentiates one step of the plain map at the last
      iterate, $J^{OS} = \\beta J_\\theta F(x_{k-1}, \\theta)$ — the
      Jacobian-free backpropagation of deep equilibrium models — and
      **not** one Anderson update. This is the right choice: the Anderson
      update's derivative with its history held would be
      $\\alpha_{\\mathrm{new}} J_\\theta F$ plus terms in
      $\\partial\\gamma/\\partial\\theta$ whose least-squares system becomes
      singular as the residuals vanish (it has no limit at the solution),
      while the plain map is a $\\rho$-contraction with the same fixed point,
      so Corollary 1 applies to it:
      $\\|J^{OS} - J_\\theta \\bar x\\| \\le \\rho_\\beta L_F/(1 - \\rho_\\beta) +
      L_J\\|x_{k-1} - \\bar x\\|$ with
      $\\rho_\\beta = \\|J_x F_\\beta\\| \\le 1 - \\beta + \\beta\\rho$. At the
      fixed point the bias is exactly $-J_x F_\\beta\\, J_\\theta \\bar x$, a
      relative error of at most $\\rho_\\beta$. Anderson accelerates the
      forward pass, not this bias: it depends on $\\rho$ only. Measured
      (`tests/test_anderson.py`, $F = \\tanh(Wx + U\\theta + b)$, $n = 6$,
      $\\rho = 0.59$ at the fixed point): relative error of `OneStep` 0.16,
      `Truncated(5)` $7 \\cdot 10^{-4}$, `Truncated("auto")` $9 \\cdot 10^{-6}$,
      `Implicit` $2 \\cdot 10^{-16}$; on a slow contraction ($n = 40$,
      spectrum of $W$ in $[0, 0.99]$) Anderson stops after 44 steps where
      plain iteration takes 152.
    - `Truncated(K)` differentiates $K$ plain steps along the Anderson
      iterates (relative bias $\\le \\rho_\\beta^K$ at the fixed point);
      `Truncated("auto")` measures $\\rho_\\beta = \\|J_x F_\\beta\\|$ by power
      iteration and picks $K$.
    - `Unroll()` differentiates all $k$ steps the same way (the piggyback
      recursion of $F_\\beta$ evaluated along the Anderson iterates): its error
      decays like $\\rho_\\beta^k$, not like Anderson's forward error, so it
      needs more steps than the forward pass for the same accuracy.
    - `Implicit()`: `optimality` is the fixed-point residual
      $F(x, \\theta) - x$, so `Implicit()` and
      `Implicit(condition="fixed_point")` both give
      $(I - J_x F)^{-1} J_\\theta F$ at $x_k$ (eq. 3; the factor $\\beta$
      cancels). For network-sized states pass a matrix-free Krylov solver,
      `Implicit(linear_solver=lx.GMRES(rtol, atol))` or `lx.BiCGStab`: each
      iteration costs one Jacobian-vector product of $F$ and the Jacobian is
      never materialised.

    **Arguments:**

    - `F`: the step map `F(x, theta) -> x`, preserving the structure, shapes
      and dtypes of `x`.
    - `memory`: $m$, the number of differences kept, a positive integer
      (default 5). `memory` differences use `memory + 1` iterates.
    - `mixing`: $\\beta \\in (0, 2)$, the damping of the plain step
      (default 1.0: no damping).
    - `regularization`: $\\lambda \\ge 0$, relative Tikhonov regularisation of
      the least-squares problem (default `None`: $10^{-8}$ in float64 and
      $10^{-4}$ in float32, about $\\sqrt{\\varepsilon}$).

    The stopping residual (`residual_norm`) is $\\|F(x_k) - x_k\\|$ at the
    start of the last step, the same quantity plain iteration stops on.

    !!! warning

        Anderson acceleration has no global convergence guarantee: on a
        strongly non-linear $F$ it can stall or diverge where plain iteration
        (`ig.FixedPointIteration`) converges; lower `mixing`, `memory`, or raise
        `regularization`. `OneStep()` is biased by the plain map's contraction
        (above), however fast Anderson converges.
    """

    F: Callable[[PyTree[Array], PyTree[Any]], PyTree[Array]]
    memory: int = eqx.field(static=True, default=5)
    mixing: float | Array = 1.0
    regularization: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not callable(self.F):
            raise TypeError(
                "Anderson(F, ...) needs a callable step map F(x, theta) -> x, got "
                f"{type(self.F).__name__}."
            )
        positive_int(self.memory, "Anderson(memory=...)")
        in_open_interval(self.mixing, "Anderson(mixing=...)", 0.0, 2.0)
        if self.regularization is not None:
            nonnegative_float(self.regularization, "Anderson(regularization=...)")

    def _regularization(self, dtype) -> float:
        if self.regularization is not None:
            return float(self.regularization)
        return 1e-4 if jnp.finfo(dtype).bits <= 32 else 1e-8

    def init(self, x0, theta):
        x0 = check_iterate("Anderson", x0)
        flat, _ = ravel_pytree(x0)
        n, dtype = flat.size, flat.dtype
        aux = _AndersonAux(
            dx=jnp.zeros((self.memory, n), dtype),
            dg=jnp.zeros((self.memory, n), dtype),
            count=jnp.zeros((), jnp.int32),
            x_prev=jnp.zeros((n,), dtype),
            g_prev=jnp.zeros((n,), dtype),
            has_prev=jnp.array(False),
            residual=jnp.array(jnp.inf, dtype),
        )
        return x0, aux

    def _plain(self, z, theta):
        """$F_\\beta(x) = x + \\beta(F(x) - x)$ and $g = F(x) - x$, flat."""
        flat, unravel = ravel_pytree(z)
        f, _ = ravel_pytree(self.F(z, theta))
        g = (f - flat).astype(flat.dtype)
        return flat, g, (flat + self.mixing * g).astype(flat.dtype), unravel

    def step(self, z, aux, theta):
        flat, g, plain, unravel = self._plain(z, theta)
        # The history and the extrapolation carry no derivative: the step's
        # derivative is the plain map's (see the class docstring).
        x_s, g_s = jax.lax.stop_gradient((flat, g))
        new_dx, new_dg = x_s - aux.x_prev, g_s - aux.g_prev
        # A shift register (newest difference in row 0) rather than a ring
        # buffer indexed by the counter: under `vmap` each example has its own
        # counter, and a per-example index turns every write into a scatter.
        dx = jnp.where(
            aux.has_prev, jnp.concatenate([new_dx[None], aux.dx[:-1]]), aux.dx
        )
        dg = jnp.where(
            aux.has_prev, jnp.concatenate([new_dg[None], aux.dg[:-1]]), aux.dg
        )
        count = jnp.minimum(
            aux.count + aux.has_prev.astype(aux.count.dtype), self.memory
        )
        valid = jnp.arange(self.memory) < count
        gamma = anderson_coefficients(dg, g_s, valid, self._regularization(flat.dtype))
        mixing = jax.lax.stop_gradient(self.mixing)
        correction = ((dx + mixing * dg).T @ gamma).astype(flat.dtype)
        new_flat = plain - jax.lax.stop_gradient(correction)
        new_aux = _AndersonAux(
            dx=dx,
            dg=dg,
            count=count,
            x_prev=x_s,
            g_prev=g_s,
            has_prev=jnp.array(True),
            residual=jnp.linalg.norm(g_s),
        )
        return unravel(new_flat), new_aux

    def value(self, z):
        return z

    def optimality(self, z, aux, theta):
        return tree_sub(self.F(z, theta), z)

    def residual_norm(self, z, new_z, new_aux, theta):
        return new_aux.residual
