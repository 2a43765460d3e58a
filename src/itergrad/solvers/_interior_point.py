"""A primal-dual interior point method for convex quadratic programs (§4)."""

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._solution import RESULTS
from ..problems._qp import QP, check_qp
from ._base import AbstractSolver


class _InteriorPointState(eqx.Module):
    """Primal `x`, slacks `s` of $Gx + s = h$, inequality duals `z >= 0`,
    equality duals `y`; `result` is bookkeeping (not an unknown of the
    implicit function theorem)."""

    x: Float[Array, " n"]
    s: Float[Array, " p"]
    z: Float[Array, " p"]
    y: Float[Array, " m"]
    result: RESULTS


def _amax(v: Array) -> Scalar:
    """max |v|, 0 for an empty array (no equality or inequality constraints)."""
    return jnp.max(jnp.abs(v)) if v.size else jnp.zeros((), v.dtype)


def _symmetric(Q: Array) -> Array:
    # ½xᵀQx only sees the symmetric part of Q; using it everywhere keeps the
    # step, the optimality condition and their derivatives with respect to an
    # arbitrary (non-symmetric) perturbation of Q consistent with the objective.
    return 0.5 * (Q + Q.T)


def _max_step(v: Array, dv: Array) -> Scalar:
    """The largest $\\alpha$ with $v + \\alpha\\, dv \\ge 0$ ($+\\infty$ if none)."""
    decreasing = dv < 0
    # Divide by a safe value off the decreasing entries: a 0/0 in the branch
    # that `where` discards would still poison the derivative with NaN.
    ratio = -v / jnp.where(decreasing, dv, -1.0)
    return jnp.min(jnp.where(decreasing, ratio, jnp.inf))


def _kkt_solver(
    Qs: Array, A: Array, G: Array, s: Array, z: Array, regularisation: float
) -> Callable[[Array, Array, Array], tuple[Array, Array, Array]]:
    """Factorise once and return `solve(a1, a2, a3) -> (dx, dy, dz)` for the
    augmented Newton system (with $\\Delta s$ eliminated)

    $$Q\\,dx + A^\\top dy + G^\\top dz = a_1,\\quad A\\,dx = a_2,\\quad
    G\\,dx - \\mathrm{diag}(s/z)\\,dz = a_3.$$

    The inequality rows and columns are scaled by $c = \\min(1, \\sqrt{z/s})$
    ($dz = c\\,\\tilde{dz}$), so that the matrix
    $\\begin{pmatrix} Q & A^\\top & G^\\top C \\\\ A & 0 & 0 \\\\ C G & 0 & -\\min(1, s/z)\\end{pmatrix}$
    stays well conditioned as the gap closes (active rows tend to equality
    constraints, inactive ones decouple). The normal equations
    $Q + G^\\top \\mathrm{diag}(z/s) G$ would not: their condition number grows
    like $1/\\mu$, which costs the derivative of the last step about
    $\\epsilon/\\mu$ of relative accuracy. One LU factorisation serves every
    right-hand side, and differentiating the solves reuses it (triangular
    solves only; see `solve`).
    """
    n, m, p = Qs.shape[0], A.shape[0], G.shape[0]
    dtype = Qs.dtype
    ratio = s / z
    c = jnp.sqrt(jnp.minimum(1.0, 1.0 / ratio))
    cG = c[:, None] * G
    # A tiny static shift (quasi-definite regularisation) keeps the system
    # solvable for a semidefinite Q or dependent rows of A: the iterates then
    # drift along a Farkas certificate, which `status` reports, instead of
    # turning into NaN. Its scale is a constant safeguard, not part of the model.
    delta_x = regularisation * jax.lax.stop_gradient(1 + jnp.max(jnp.abs(jnp.diag(Qs))))
    delta_y = regularisation * jax.lax.stop_gradient(1 + _amax(A) ** 2)
    M = jnp.concatenate(
        [
            jnp.concatenate([Qs + delta_x * jnp.eye(n, dtype=dtype), A.T, cG.T], axis=1),
            jnp.concatenate(
                [A, -delta_y * jnp.eye(m, dtype=dtype), jnp.zeros((m, p), dtype)], axis=1
            ),
            jnp.concatenate(
                [cG, jnp.zeros((p, m), dtype), -jnp.diag(jnp.minimum(1.0, ratio))], axis=1
            ),
        ],
        axis=0,
    )
    factors = jax.scipy.linalg.lu_factor(jax.lax.stop_gradient(M))

    def solve(a1, a2, a3):
        r = jnp.concatenate([a1, a2, c * a3])
        # u = M⁻¹r, written so that AD never touches the factorisation: with
        # u₀ = M⁻¹r computed without gradients, u = u₀ + M⁻¹(r - M u₀) has the
        # value of u₀ after one step of iterative refinement and the exact
        # derivative du = M⁻¹(dr - dM u₀) of M⁻¹r, through triangular solves
        # with the same factors (no custom rule needed).
        u0 = jax.lax.stop_gradient(jax.scipy.linalg.lu_solve(factors, r))
        u = u0 + jax.scipy.linalg.lu_solve(factors, r - M @ u0)
        return u[:n], u[n : n + m], c * u[n + m :]

    return solve


class InteriorPointQP(AbstractSolver):
    """Primal-dual predictor-corrector (Mehrotra) interior point method for
    the convex QP of eq. (12), as in CVXOPT's `coneqp` and OptNet.

    The state is $w = (x, s, z, y)$ with slacks $Gx + s = h$, $s, z > 0$. The
    KKT residual (`optimality`) is
    $\\Phi(w, \\theta) = (Qx + q + A^\\top y + G^\\top z,\\ Ax - b,\\ Gx + s - h,\\ s\\circ z)$.
    One step $F(w, \\theta)$:

    1. Predictor: the Newton direction $\\Delta^a$ of $\\Phi = 0$,
       $J_w\\Phi(w)\\,\\Delta^a = -\\Phi(w, \\theta)$; $\\alpha^a$ the largest
       step in $[0, 1]$ keeping $s, z \\ge 0$;
       $\\mu = s^\\top z / p$, $\\mu^a = (s + \\alpha^a \\Delta s^a)^\\top(z + \\alpha^a \\Delta z^a)/p$,
       $\\sigma = \\min(1, (\\mu^a/\\mu)^3)$.
    2. Corrector: $J_w\\Phi(w)\\,\\Delta = -\\Phi(w, \\theta) - (0, 0, 0,
       \\Delta s^a \\circ \\Delta z^a - \\sigma\\mu\\mathbf{1})$, with the same
       factorisation.
    3. $w^+ = w + \\alpha\\Delta$ with $\\alpha = \\min(1, \\eta\\,\\alpha_{\\max})$,
       $\\alpha_{\\max}$ the step to the boundary of $s, z \\ge 0$ and
       $\\eta = \\max(\\eta_{\\min}, 1 - \\mu)$. Like a line search, $\\alpha$
       is a safeguard and carries no derivative.

    The Newton systems are solved after eliminating $\\Delta s$: one LU
    factorisation per step of the $(n + m + p)$ augmented KKT matrix, with the
    inequality block scaled by $\\min(1, \\sqrt{z/s})$ so that it stays well
    conditioned as the gap closes, shared by predictor and corrector (cost
    $\\tfrac23 (n + m + p)^3$). Differentiating a step reuses that factorisation
    (triangular solves only). As the gap closes $\\sigma \\to 0$ and
    $\\eta \\to 1$, so the last steps are (nearly) full Newton steps on
    $\\Phi = 0$ and $J_w F \\to 0$ at the solution (`superlinear`): the one-step
    derivative `ig.OneStep()` then matches implicit differentiation up to
    $O(\\|w_{k-1} - \\bar w\\|)$ (Corollary 3), and the stopping rule (see
    `residual_norm`) makes $w_{k-1}$ itself converged.

    `init(None, qp)` is CVXOPT's starting point (one KKT solve with
    $\\mathrm{diag}(z/s) = I$, then slacks and duals shifted to be positive);
    `init(x0, qp)` replaces its $x$ by `x0` (interior point methods gain little
    from warm starts). The starting point is a constant: its dependence on
    $\\theta$ is not differentiated.

    **Arguments:**

    - `eta_min`: the floor $\\eta_{\\min} \\in (0, 1)$ of the fraction-to-boundary
      factor (default `0.99`).
    - `regularisation`: relative diagonal shift of the two factorised matrices
      (default `1e-14`); a safeguard for a semidefinite $Q$ or dependent rows
      of $A$, negligible otherwise.
    - `infeasibility_tol`: tolerance of the Farkas certificates checked after
      every step (default `1e-9`): primal infeasibility when
      $b^\\top y + h^\\top z < 0$ and $\\|A^\\top y + G^\\top z\\|$ is below
      `infeasibility_tol` times it (normalised by the data), unboundedness when
      $q^\\top x < 0$ and $\\|Qx\\|, \\|Ax\\|, \\max(Gx)_+$ are; the solve then stops
      with `RESULTS.infeasible`.

    !!! warning

        Needs `Q` positive definite on the null space of `A`, `A` of full row
        rank and, for a differentiable solution, strict complementarity;
        otherwise `Implicit` reports a failed linear solve. The tolerances
        `rtol`/`atol` of `itergrad.solve` apply to a relative KKT residual (see
        `residual_norm`); in float32 use about `1e-5`.
    """

    eta_min: float = 0.99
    regularisation: float = 1e-14
    infeasibility_tol: float = 1e-9

    superlinear: ClassVar[bool] = True

    def __check_init__(self):
        if not 0 < self.eta_min < 1:
            raise ValueError(f"InteriorPointQP(eta_min=...) must lie in (0, 1), got {self.eta_min!r}.")
        if not self.regularisation >= 0:
            raise ValueError(
                f"InteriorPointQP(regularisation=...) must be non-negative, got {self.regularisation!r}."
            )
        if not self.infeasibility_tol > 0:
            raise ValueError(
                "InteriorPointQP(infeasibility_tol=...) must be positive, got "
                f"{self.infeasibility_tol!r}."
            )

    def init(self, x0: Float[Array, " n"] | None, theta: QP) -> _InteriorPointState:
        check_qp(theta)
        qp = jax.lax.stop_gradient(theta)
        n, m, p = qp.sizes
        if x0 is not None:
            x0 = jnp.asarray(x0)
            if x0.shape != (n,):
                raise ValueError(
                    f"InteriorPointQP: `x0` must have shape (n,) = ({n},), got {x0.shape}."
                )
        Qs = _symmetric(qp.Q)
        ones = jnp.ones((p,), Qs.dtype)
        solve = _kkt_solver(Qs, qp.A, qp.G, ones, ones, self.regularisation)
        # CVXOPT: solve [Q Aᵀ Gᵀ; A 0 0; G 0 -I](x, y, z) = (-q, b, h), i.e.
        # min ½xᵀQx + qᵀx + ½‖Gx - h‖² s.t. Ax = b, then s = -z = h - Gx.
        x, y, _ = solve(-qp.q, qp.b, qp.h)
        if x0 is not None:
            x = jax.lax.stop_gradient(x0).astype(Qs.dtype)
        z = qp.G @ x - qp.h
        s = -z
        return _InteriorPointState(
            x=x, s=_shift_positive(s), z=_shift_positive(z), y=y, result=RESULTS.successful
        )

    def step(self, state: _InteriorPointState, theta: QP) -> _InteriorPointState:
        qp = theta
        x, s, z, y = state.x, state.s, state.z, state.y
        _, m, p = qp.sizes
        Qs = _symmetric(qp.Q)
        A, G = qp.A, qp.G
        rx = Qs @ x + qp.q + A.T @ y + G.T @ z
        ry = A @ x - qp.b
        rz = G @ x + s - qp.h
        solve = _kkt_solver(Qs, A, G, s, z, self.regularisation)
        if p == 0:
            # Equality-constrained QP: one Newton step solves it exactly.
            dx, dy, _ = solve(-rx, -ry, rz)
            new = (x + dx, s, z, y + dy)
        else:

            def direction(rs):
                # Newton system of Φ with -rs on the complementarity row:
                # Δs = -rz - GΔx and z∘Δs + s∘Δz = -rs give
                # GΔx - (s/z)∘Δz = rs/z - rz.
                dx, dy, dz = solve(-rx, -ry, rs / z - rz)
                return dx, -rz - G @ dx, dz, dy

            mu = jnp.dot(s, z) / p
            _, ds_a, dz_a, _ = direction(s * z)
            alpha_a = jnp.minimum(1.0, jnp.minimum(_max_step(s, ds_a), _max_step(z, dz_a)))
            mu_a = jnp.dot(s + alpha_a * ds_a, z + alpha_a * dz_a) / p
            positive = mu > 0
            safe_mu = jnp.where(positive, mu, 1.0)
            sigma = jnp.where(positive, jnp.clip(mu_a / safe_mu, 0.0, 1.0) ** 3, 0.0)
            dx, ds, dz, dy = direction(s * z + ds_a * dz_a - sigma * mu)
            alpha_max = jnp.minimum(_max_step(s, ds), _max_step(z, dz))
            # The fraction to the boundary tends to 1 with the gap, so that the
            # last, differentiated steps are full Newton steps up to O(μ)
            # (a fixed 0.99999 would bias the one-step derivative by 1e-5).
            eta = jnp.maximum(self.eta_min, 1.0 - mu)
            # The step length is a safeguard (which pair reaches the boundary
            # first), like Newton's line search: it carries no derivative.
            # Differentiating it adds Δ ∂α/∂θ with ∂α_max ∝ 1/s_i for a pair
            # whose s_i → 0: measured 10x worse one-step derivatives (QP
            # n=300: 1.8e-7 instead of 1.7e-8; n=1000: 9e-7 instead of 8e-8).
            alpha = jax.lax.stop_gradient(jnp.minimum(1.0, eta * alpha_max))
            new = (x + alpha * dx, s + alpha * ds, z + alpha * dz, y + alpha * dy)
        result = self._certificate(*new, qp, Qs)
        return _InteriorPointState(*new, result=result)

    def _certificate(self, x, s, z, y, qp, Qs) -> RESULTS:
        """`RESULTS.infeasible` when the iterate carries a Farkas certificate of
        primal infeasibility or of unboundedness."""
        del s
        tol = self.infeasibility_tol
        A, b, G, h = qp.A, qp.b, qp.G, qp.h
        # Primal infeasibility: Aᵀy + Gᵀz = 0, z >= 0, bᵀy + hᵀz < 0.
        t_p = -(jnp.dot(b, y) + jnp.dot(h, z))
        r_p = _amax(A.T @ y + G.T @ z)
        scale_mat = 1 + jnp.maximum(_amax(A), _amax(G))
        scale_rhs = 1 + jnp.maximum(_amax(b), _amax(h))
        primal = (t_p > 0) & (r_p * scale_rhs <= tol * t_p * scale_mat)
        # Unboundedness: Qx = 0, Ax = 0, Gx <= 0, qᵀx < 0.
        t_d = -jnp.dot(qp.q, x)
        Gx = G @ x
        r_d = jnp.maximum(
            jnp.maximum(_amax(Qs @ x) / (1 + _amax(Qs)), _amax(A @ x) / scale_mat),
            (jnp.max(jnp.maximum(Gx, 0.0)) if Gx.size else 0.0) / scale_mat,
        )
        dual = (t_d > 0) & (r_d * (1 + _amax(qp.q)) <= tol * t_d)
        return RESULTS.where(primal | dual, RESULTS.infeasible, RESULTS.successful)

    def value(self, state: _InteriorPointState) -> Float[Array, " n"]:
        return state.x

    def optimality(self, state: _InteriorPointState, theta: QP) -> Any:
        """The KKT residual $\\Phi(w, \\theta)$ over $w = (x, s, z, y)$:
        $(Qx + q + A^\\top y + G^\\top z,\\ s \\circ z,\\ Gx + s - h,\\ Ax - b)$ in
        the slots of $(x, s, z, y)$ (a square system, invertible at a strictly
        complementary solution with linearly independent active
        constraints)."""
        qp = theta
        x, s, z, y = state.x, state.s, state.z, state.y
        rx = _symmetric(qp.Q) @ x + qp.q + qp.A.T @ y + qp.G.T @ z
        floats = eqx.filter(state, eqx.is_inexact_array)
        return eqx.tree_at(
            lambda t: (t.x, t.s, t.z, t.y),
            floats,
            (rx, s * z, qp.G @ x + s - qp.h, qp.A @ x - qp.b),
        )

    def residual_norm(
        self, state: _InteriorPointState, new_state: _InteriorPointState, theta: QP
    ) -> Scalar:
        """The larger relative KKT error of $w_{k-1}$ (`state`) and $w_k$
        (`new_state`), where the error of $w$ is the max of

        - $\\|Qx + q + A^\\top y + G^\\top z\\|_\\infty / (1 + \\max(\\|Qx\\|_\\infty, \\|q\\|_\\infty, \\|A^\\top y\\|_\\infty, \\|G^\\top z\\|_\\infty))$,
        - $\\|Ax - b\\|_\\infty / (1 + \\max(\\|Ax\\|_\\infty, \\|b\\|_\\infty))$,
        - $\\|Gx + s - h\\|_\\infty / (1 + \\max(\\|Gx\\|_\\infty, \\|s\\|_\\infty, \\|h\\|_\\infty))$,
        - the gap $(s^\\top z / p) / (1 + |\\tfrac12 x^\\top Q x + q^\\top x|)$.

        Requiring $w_{k-1}$ to be converged too costs about one extra step and
        makes the differentiated last step start at the solution, so that
        `OneStep` is as accurate as `Implicit` (Corollary 3)."""
        return jnp.maximum(_kkt_error(state, theta), _kkt_error(new_state, theta))

    def status(self, state: _InteriorPointState) -> RESULTS:
        return state.result


def _kkt_error(state: _InteriorPointState, qp: QP) -> Scalar:
    x, s, z, y = state.x, state.s, state.z, state.y
    _, _, p = qp.sizes
    Qx = _symmetric(qp.Q) @ x
    Aty = qp.A.T @ y
    Gtz = qp.G.T @ z
    dual = _amax(Qx + qp.q + Aty + Gtz) / (
        1 + jnp.max(jnp.stack([_amax(Qx), _amax(qp.q), _amax(Aty), _amax(Gtz)]))
    )
    Ax = qp.A @ x
    eq = _amax(Ax - qp.b) / (1 + jnp.maximum(_amax(Ax), _amax(qp.b)))
    error = jnp.maximum(dual, eq)
    if p:
        Gx = qp.G @ x
        ineq = _amax(Gx + s - qp.h) / (
            1 + jnp.maximum(jnp.maximum(_amax(Gx), _amax(s)), _amax(qp.h))
        )
        # Complementarity pair by pair, not the average gap s'z/p relative to
        # the objective: on large QPs one unresolved pair (s_i, z_i ~ 3e-3)
        # hid behind a large objective and left the derivative wrong by 1e-3.
        gap = _amax(s * z) / (1 + jnp.maximum(_amax(s), _amax(z)))
        error = jnp.maximum(error, jnp.maximum(ineq, gap))
    return error


def _shift_positive(v: Array) -> Array:
    """CVXOPT's initial shift: if $\\min v \\le 10^{-8}\\max(\\|v\\|, 1)$, add
    $(1 + \\max(-v))\\mathbf{1}$ so that every entry is at least 1."""
    if v.size == 0:
        return v
    t = jnp.max(-v)
    shift = t >= -1e-8 * jnp.maximum(jnp.linalg.norm(v), 1.0)
    return jnp.where(shift, v + (1 + t), v)
