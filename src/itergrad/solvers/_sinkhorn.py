"""Log-domain Sinkhorn for entropic optimal transport between weighted point
clouds: the problem `OTProblem` (the parameters $\\theta$) and the solver
`Sinkhorn` (the unknown is the gauge-fixed dual potential $g$)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, Scalar

from .._solution import Solution
from .._validate import positive_float
from ._base import AbstractSolver

# exp(_LOG_CAP) is finite in float32: the marginal violation of a far-off
# iterate is reported as large instead of overflowing to inf (which the loop
# would read as a divergence).
_LOG_CAP = 50.0


def sqeuclidean(x: Float[Array, " d"], y: Float[Array, " d"]) -> Scalar:
    """The squared Euclidean cost $c(x, y) = \\|x - y\\|^2$ (the default
    `OTProblem(cost_fn=...)`)."""
    return jnp.sum((x - y) ** 2)


@jax.custom_jvp
def softmin_rows(
    logits: Float[Array, "n m"], v: Float[Array, " m"]
) -> Float[Array, " n"]:
    """$-\\log \\sum_j e^{L_{ij} + v_j}$ for each row $i$ (a stable
    log-sum-exp)."""
    return -jax.nn.logsumexp(logits + v[None, :], axis=1)


@softmin_rows.defjvp
def _softmin_rows_jvp(primals, tangents):
    # The tangent written as a matrix-vector product with the row-softmax
    # pi: -pi @ dv - sum_j pi_ij dL_ij. A batch of tangents (a Jacobian
    # materialised by `Implicit`, power iteration) is then one matrix-matrix
    # product instead of an (n, m, batch) temporary.
    logits, v = primals
    d_logits, d_v = tangents
    shifted = logits + v[None, :]
    lse = jax.nn.logsumexp(shifted, axis=1)
    pi = jnp.exp(shifted - lse[:, None])
    return -lse, -(pi @ d_v) - jnp.sum(pi * d_logits, axis=1)


def _is_concrete(value: Any) -> bool:
    return value is not None and not isinstance(value, jax.core.Tracer)


class OTProblem(eqx.Module):
    """An entropic optimal transport problem between two weighted point
    clouds: the parameters $\\theta$ given to `ig.solve(ig.Sinkhorn(...), ...)`.

    The cost matrix is either given, `OTProblem(cost=C)`, or computed from
    point clouds, `OTProblem(x=x, y=y, cost_fn=c)`:
    $C_{ij} = c(x_i, y_j)$. Every floating-point field is differentiable:
    the cost matrix, the points, the weights `a`, `b` and (when given here)
    the regularisation `epsilon`.

    **Arguments** (all keyword except `cost`):

    - `cost`: an `(n, m)` cost matrix $C$; or
    - `x`, `y`: point clouds of shapes `(n, d)` and `(m, d)`, with
      `cost_fn(x_i, y_j) -> scalar` (default `sqeuclidean`,
      $\\|x_i - y_j\\|^2$; a static callable). To normalise the cost (e.g.
      divide by its maximum), do it in `cost_fn` or scale the points.
    - `a`, `b`: positive marginal weights of lengths `n` and `m` with the
      same total mass (balanced transport); default uniform $1/n$, $1/m$.
    - `epsilon`: the entropic regularisation $\\varepsilon > 0$, when it is
      a parameter to differentiate; otherwise give it to `Sinkhorn(epsilon)`
      (exactly one of the two).
    """

    a: Float[Array, " n"]
    b: Float[Array, " m"]
    cost: Float[Array, "n m"] | None
    x: Float[Array, "n d"] | None
    y: Float[Array, "m d"] | None
    epsilon: Float[Array, ""] | float | None
    cost_fn: Callable[[Array, Array], Scalar] = eqx.field(static=True)

    def __init__(
        self,
        cost: Float[Array, "n m"] | None = None,
        *,
        x: Float[Array, "n d"] | None = None,
        y: Float[Array, "m d"] | None = None,
        a: Float[Array, " n"] | None = None,
        b: Float[Array, " m"] | None = None,
        cost_fn: Callable[[Array, Array], Scalar] = sqeuclidean,
        epsilon: Float[Array, ""] | float | None = None,
    ):
        if cost is None and (x is None or y is None):
            raise ValueError(
                "OTProblem needs a cost matrix, OTProblem(cost=C), or two point "
                "clouds, OTProblem(x=x, y=y, cost_fn=...)."
            )
        if cost is not None and (x is not None or y is not None):
            raise ValueError(
                "OTProblem takes either `cost` or the point clouds `x`, `y`, not "
                "both: the cost matrix would be ambiguous."
            )
        if not callable(cost_fn):
            raise TypeError(
                "OTProblem(cost_fn=...) must be a callable cost_fn(x_i, y_j) -> "
                f"scalar, got {type(cost_fn).__name__}."
            )
        if cost is not None:
            cost = jnp.asarray(cost)
            if cost.ndim != 2:
                raise ValueError(
                    f"OTProblem(cost=...) must be an (n, m) matrix, got shape {cost.shape}."
                )
            n, m = cost.shape
            dtype = cost.dtype
        else:
            x, y = jnp.asarray(x), jnp.asarray(y)
            if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
                raise ValueError(
                    "OTProblem(x=..., y=...) must be point clouds of shapes (n, d) "
                    f"and (m, d), got {x.shape} and {y.shape}."
                )
            n, m = x.shape[0], y.shape[0]
            dtype = jnp.result_type(x, y)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                "OTProblem: the cost (or the points) must be floating-point arrays, "
                f"got {dtype}."
            )
        # NumPy for the defaults: no traced value is created inside `jit`, so
        # the concrete checks below stay possible.
        a_given: Any = np.full((n,), 1 / n, dtype) if a is None else a
        b_given: Any = np.full((m,), 1 / m, dtype) if b is None else b
        weights: list[Any] = [
            w if isinstance(w, jax.Array | np.ndarray) else jnp.asarray(w)
            for w in (a_given, b_given)
        ]
        for name, w, size in (("a", weights[0], n), ("b", weights[1], m)):
            if w.shape != (size,):
                raise ValueError(
                    f"OTProblem({name}=...) must have shape ({size},) to match the "
                    f"cost, got {w.shape}."
                )
            if _is_concrete(w) and not bool(np.all(np.asarray(w) > 0)):
                raise ValueError(
                    f"OTProblem({name}=...) must be positive weights (log-domain "
                    f"Sinkhorn takes log {name}); drop zero-weight points instead."
                )
        if _is_concrete(weights[0]) and _is_concrete(weights[1]):
            mass_a, mass_b = (float(np.sum(np.asarray(w))) for w in weights)
            if not np.isclose(mass_a, mass_b, rtol=1e-5, atol=0):
                raise ValueError(
                    "OTProblem: the marginals must have the same total mass "
                    f"(balanced transport), got sum(a)={mass_a} and sum(b)={mass_b}."
                )
        if epsilon is not None:
            epsilon = positive_float(epsilon, "OTProblem(epsilon=...)")
        self.a, self.b = weights
        self.cost, self.x, self.y = cost, x, y
        self.epsilon = epsilon
        self.cost_fn = cost_fn

    def cost_matrix(self) -> Float[Array, "n m"]:
        """$C$: the given matrix, or $C_{ij} = c(x_i, y_j)$."""
        if self.cost is not None:
            return self.cost
        assert self.x is not None and self.y is not None  # checked in __init__
        pairwise = jax.vmap(jax.vmap(self.cost_fn, (None, 0)), (0, None))
        return pairwise(self.x, self.y)


class _SinkhornAux(eqx.Module):
    # ||P^T 1 - b||_1 for the plan of the step's input g: the stopping residual.
    marginal_error: Scalar


class _Prepared(eqx.Module):
    logits: Float[Array, "n m"]  # -C / epsilon
    log_a: Float[Array, " n"]
    log_b: Float[Array, " m"]
    b: Float[Array, " m"]
    epsilon: Scalar


class Sinkhorn(AbstractSolver):
    """Log-domain Sinkhorn iterations for entropic optimal transport.

    For an `OTProblem` $\\theta = (C, a, b, \\varepsilon)$ the regularised
    optimal transport cost is

    $$\\mathrm{OT}_\\varepsilon = \\min_{P \\ge 0,\\ P 1 = a,\\ P^T 1 = b}
    \\langle P, C\\rangle + \\varepsilon\\, \\mathrm{KL}(P \\,\\|\\, a b^T)
    = \\max_{f, g}\\ \\langle f, a\\rangle + \\langle g, b\\rangle
    - \\varepsilon \\sum_{ij} a_i b_j \\big(e^{(f_i + g_j - C_{ij})/\\varepsilon} - 1\\big),$$

    with $\\mathrm{KL}(P\\|Q) = \\sum P \\log(P/Q) - P + Q$, and the optimal
    plan is $P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\\varepsilon}$. The two
    half-steps maximise the dual in $f$, then in $g$, in the log domain
    (stable for small $\\varepsilon$):

    $$f_i = T_a(g)_i = -\\varepsilon \\log \\sum_j b_j e^{(g_j - C_{ij})/\\varepsilon},\\qquad
    \\tilde g_j = T_b(f)_j = -\\varepsilon \\log \\sum_i a_i e^{(f_i - C_{ij})/\\varepsilon}.$$

    **Unknowns: $z = g$ only, gauge-fixed.** $f$ is a function of $g$
    ($f = T_a(g)$, recomputed wherever it is needed), so the unknowns are
    the $m$ entries of $g$ and nothing else. The potentials are defined up
    to a constant, $(f + c, g - c)$: the plain map $g \\mapsto T_b(T_a(g))$
    commutes with adding a constant, so its Jacobian
    $J = D_b^{-1} P^T D_a^{-1} P$ (row-stochastic) has eigenvalue $1$ on
    the null direction $\\mathbf 1$: it is not a contraction, its fixed
    points are not unique and $I - J$ is singular (implicit
    differentiation would fail). The step therefore ends with the gauge fix
    $\\langle b, g\\rangle = 0$:

    $$F(g, \\theta) = \\Pi\\, T_b(T_a(g)),\\qquad
    \\Pi h = h - \\frac{\\langle b, h\\rangle}{\\langle b, \\mathbf 1\\rangle}\\mathbf 1 .$$

    $F(g + t\\mathbf 1) = F(g)$, so $J_g F = \\Pi J$ sends $\\mathbf 1$ to
    $0$ and its other eigenvalues are those of $J$, $\\lambda_2 \\ge \\dots$,
    all in $[0, 1)$ when the plan is positive: $F$ is a contraction with
    factor $\\rho = \\lambda_2$ (in the $b$-weighted norm, where $\\Pi J$ is
    self-adjoint; with uniform $b$ also in the Euclidean norm that
    `ig.diagnose` and `Truncated("auto")` measure), the fixed point is
    unique and $I - J_g F$ is invertible. $\\rho \\to 1$ as
    $\\varepsilon \\to 0$.

    **Optimality** (for `Implicit()`, the default condition): the gradient
    of the negated semi-dual $D(g) = \\langle T_a(g), a\\rangle + \\langle g, b\\rangle$
    plus a gauge term,

    $$G(g, \\theta) = P(g)^T \\mathbf 1 - b + \\frac{\\langle b, g\\rangle}{\\varepsilon \\langle b, \\mathbf 1\\rangle}\\, b,$$

    where $P(g)$ is the plan of $(T_a(g), g)$. Its Jacobian
    $\\frac1\\varepsilon\\big(\\sum_i a_i (\\mathrm{diag}\\,\\pi_i - \\pi_i\\pi_i^T)
    + b b^T / \\langle b, \\mathbf 1\\rangle\\big)$
    ($\\pi_i$ the $i$-th row of $P$ divided by $a_i$) is symmetric
    positive definite: the semi-dual Hessian is singular exactly along
    $\\mathbf 1$ and the gauge term fills that direction. Its zeros are the
    fixed points of $F$ (marginals met and $\\langle b, g\\rangle = 0$).
    `optimality_tags` says so, so `Implicit()` factorises it by Cholesky
    (materialising the $m \\times m$ matrix by $m$ batched JVPs, one
    matrix product each: see `softmin_rows`) and
    `Implicit(linear_solver=lx.CG(rtol, atol))` solves it matrix-free (one
    JVP per CG step; the faster choice beyond a few hundred points).
    `Implicit(condition="fixed_point")` solves with $I - \\Pi J$ instead (the
    same derivative).

    **Outputs.** `sol.value` is $g$. `plan(sol, theta)`,
    `cost(sol, theta)` (the regularised cost $\\mathrm{OT}_\\varepsilon$) and
    `potentials(sol, theta)` are differentiable functions of it, with $f =
    T_a(g)$ (so rows of the plan sum to $a$ exactly). `cost` is the
    semi-dual $\\langle T_a(g), a\\rangle + \\langle g, b\\rangle$: it is
    stationary in $g$ at the solution, so its gradient is the envelope
    gradient $\\sum_{ij} P_{ij} \\nabla_\\theta C_{ij}$ (plus the terms in
    $a$, $b$, $\\varepsilon$) up to the marginal violation times the error
    of $\\partial g / \\partial \\theta$: every estimator gives an accurate
    cost gradient, `OneStep()` at the price of one extra step.

    **Stopping.** `residual_norm` is the column-marginal violation
    $\\|P^T \\mathbf 1 - b\\|_1$ of the plan $(T_a(g_k), g_k)$ of the
    step's input, computed for free from the step
    ($P^T\\mathbf 1 = b\\, e^{(g - \\tilde g)/\\varepsilon}$; the row
    marginals are exact); the loop stops once it is at most
    `atol + rtol * ||g||`. Pass `rtol=0` and `atol` the marginal tolerance
    (e.g. `1e-6`). Rounding puts a floor under the violation of about
    $u \\max_{ij} |C_{ij}| / \\varepsilon$ ($u$ the unit roundoff: `1e-16`
    in float64, `6e-8` in float32), so float32 needs a normalised cost or a
    looser `atol` (e.g. `1e-4` for $\\max C / \\varepsilon = 400$).

    **Arguments:**

    - `epsilon`: the regularisation $\\varepsilon > 0$ (a number), unless
      the `OTProblem` carries it (exactly one of the two).

    `x0` (the initial iterate given to `ig.solve`) is an initial $g$ of
    length $m$ (a warm start), or `None` for $g = 0$.

    **Example:**

    ```python
    solver = ig.Sinkhorn(epsilon=0.1)

    def ot_cost(x, y):
        theta = ig.OTProblem(x=x, y=y)
        # atol: the L1 marginal violation (float32 cannot go much below 1e-6)
        sol = ig.solve(solver, None, theta, rtol=0.0, atol=1e-5, max_steps=1000)
        return solver.cost(sol, theta)

    jax.grad(ot_cost)(x, y)  # OneStep() by default; or estimator=ig.Implicit()
    ```

    !!! warning

        $\\rho \\to 1$ as $\\varepsilon \\to 0$ (for costs normalised to
        $[0, 1]$, $1 - \\rho$ shrinks roughly like $e^{-1/\\varepsilon}$ at
        worst): the forward loop needs more steps, and the derivative of
        $g$ (hence of the plan) from `OneStep()` is biased by up to
        $\\rho L_F / (1 - \\rho)$ (Corollary 1; relative to
        $\\|J_\\theta g\\|$, at most $\\rho$). `Truncated("auto")` or
        `Implicit()` fix it; the cost gradient is accurate with every
        estimator (see above).
    """

    epsilon: float | Array | None = None

    optimality_tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})

    def __check_init__(self):
        if self.epsilon is not None:
            positive_float(self.epsilon, "Sinkhorn(epsilon=...)")

    # -- problem access -------------------------------------------------------

    def _check_theta(self, theta: Any) -> OTProblem:
        if not isinstance(theta, OTProblem):
            raise TypeError(
                "Sinkhorn needs `theta` to be an itergrad.OTProblem "
                "(e.g. ig.OTProblem(x=x, y=y) or ig.OTProblem(cost=C)), got "
                f"{type(theta).__name__}."
            )
        if (theta.epsilon is None) == (self.epsilon is None):
            raise ValueError(
                "Sinkhorn: give the regularisation epsilon exactly once, either "
                "ig.Sinkhorn(epsilon=...) or ig.OTProblem(..., epsilon=...) (the "
                "latter to differentiate with respect to it); got "
                + ("neither." if theta.epsilon is None else "both.")
            )
        return theta

    def _prepare(self, theta: OTProblem) -> _Prepared:
        theta = self._check_theta(theta)
        cost = theta.cost_matrix()
        epsilon = self.epsilon if theta.epsilon is None else theta.epsilon
        dtype = jnp.result_type(cost, theta.a, theta.b)
        epsilon = jnp.asarray(epsilon, dtype)
        return _Prepared(
            logits=-cost.astype(dtype) / epsilon,
            log_a=jnp.log(theta.a.astype(dtype)),
            log_b=jnp.log(theta.b.astype(dtype)),
            b=theta.b.astype(dtype),
            epsilon=epsilon,
        )

    @staticmethod
    def _f_scaled(g_scaled: Array, p: _Prepared) -> Array:
        # f / eps = -log sum_j exp(log b_j + g_j / eps - C_ij / eps)
        return softmin_rows(p.logits, p.log_b + g_scaled)

    @staticmethod
    def _g_scaled(f_scaled: Array, p: _Prepared) -> Array:
        return softmin_rows(p.logits.T, p.log_a + f_scaled)

    def _column_marginal(self, g: Array, p: _Prepared) -> Array:
        """$P^T \\mathbf 1 = b\\, e^{(g - T_b(T_a(g)))/\\varepsilon}$ for the plan
        $(T_a(g), g)$."""
        g_scaled = g / p.epsilon
        g_next = self._g_scaled(self._f_scaled(g_scaled, p), p)
        return p.b * jnp.exp(g_scaled - g_next)

    # -- the solver contract ---------------------------------------------------

    def init(self, x0, theta):
        theta = self._check_theta(theta)
        m = theta.b.shape[0]
        dtype = jnp.result_type(
            jax.eval_shape(theta.cost_matrix).dtype, theta.a, theta.b
        )
        if x0 is None:
            g0 = jnp.zeros((m,), dtype)
        else:
            g0 = jnp.asarray(x0)
            if g0.shape != (m,) or not jnp.issubdtype(g0.dtype, jnp.inexact):
                raise ValueError(
                    f"Sinkhorn: `x0` is an initial potential g, a floating-point "
                    f"array of shape ({m},) (one entry per point of the second "
                    f"cloud), got {g0.dtype} array of shape {g0.shape}; or pass None."
                )
            g0 = g0.astype(dtype)
        return g0, _SinkhornAux(marginal_error=jnp.array(jnp.inf, dtype))

    def step(self, z, aux, theta):
        p = self._prepare(theta)
        g_scaled = z / p.epsilon
        f_scaled = self._f_scaled(g_scaled, p)
        g_next = self._g_scaled(f_scaled, p)
        # Column marginal of the input's plan: b * exp(g - g_next) (scaled).
        log_ratio = jax.lax.stop_gradient(jnp.minimum(g_scaled - g_next, _LOG_CAP))
        marginal_error = jnp.sum(p.b * jnp.abs(jnp.expm1(log_ratio)))
        # The gauge fix <b, g> = 0 (see the class docstring).
        g_next = g_next - jnp.vdot(p.b, g_next) / jnp.sum(p.b)
        new_g = (p.epsilon * g_next).astype(z.dtype)
        return new_g, _SinkhornAux(marginal_error=marginal_error.astype(z.dtype))

    def value(self, z):
        return z

    def optimality(self, z, aux, theta):
        p = self._prepare(theta)
        mass = jnp.sum(p.b)
        gauge = jnp.vdot(p.b, z) / (p.epsilon * mass)
        return (self._column_marginal(z, p) - p.b + gauge * p.b).astype(z.dtype)

    def residual_norm(self, z, new_z, new_aux, theta):
        return new_aux.marginal_error

    # -- outputs -----------------------------------------------------------------

    @staticmethod
    def _g(sol: Solution | Array) -> Array:
        return sol.value if isinstance(sol, Solution) else jnp.asarray(sol)

    def potentials(
        self, sol: Solution | Float[Array, " m"], theta: OTProblem
    ) -> tuple[Float[Array, " n"], Float[Array, " m"]]:
        """The dual potentials $(f, g) = (T_a(g), g)$ of a solution (or of a
        potential $g$), differentiable like `sol.value`."""
        g = self._g(sol)
        p = self._prepare(theta)
        f = p.epsilon * self._f_scaled(g / p.epsilon, p)
        return f.astype(g.dtype), g

    def plan(
        self, sol: Solution | Float[Array, " m"], theta: OTProblem
    ) -> Float[Array, "n m"]:
        """The transport plan $P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\\varepsilon}$
        with $f = T_a(g)$: its rows sum to $a$ exactly, its columns to $b$ up
        to the marginal violation at which the loop stopped."""
        g = self._g(sol)
        p = self._prepare(theta)
        g_scaled = g / p.epsilon
        f_scaled = self._f_scaled(g_scaled, p)
        log_plan = (
            p.logits + (p.log_a + f_scaled)[:, None] + (p.log_b + g_scaled)[None, :]
        )
        return jnp.exp(log_plan).astype(g.dtype)

    def cost(self, sol: Solution | Float[Array, " m"], theta: OTProblem) -> Scalar:
        """The regularised OT cost
        $\\mathrm{OT}_\\varepsilon = \\langle T_a(g), a\\rangle + \\langle g, b\\rangle$
        (the semi-dual at $g$; equal to the primal value
        $\\langle P, C\\rangle + \\varepsilon \\mathrm{KL}(P\\|ab^T)$ at the
        solution). Stationary in $g$ at the solution: see the class
        docstring for why its gradient is accurate with every estimator."""
        g = self._g(sol)
        f, _ = self.potentials(g, theta)
        a = theta.a.astype(g.dtype)
        b = theta.b.astype(g.dtype)
        return jnp.vdot(f, a) + jnp.vdot(g, b)

    def marginal_error(
        self, sol: Solution | Float[Array, " m"], theta: OTProblem
    ) -> Scalar:
        """$\\|P^T \\mathbf 1 - b\\|_1$ for the plan of `plan(sol, theta)`."""
        g = self._g(sol)
        p = self._prepare(theta)
        return jnp.sum(jnp.abs(self._column_marginal(g, p) - p.b))
