"""A primal-dual interior point method for convex quadratic programs (§4),
with two-sided rows and bounds."""

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx
from jaxtyping import Array, Bool, Float, Int, Scalar

from .._linear_solve import linear_solve
from .._solution import RESULTS
from .._validate import (
    in_open_interval,
    nonnegative_float,
    nonnegative_int,
    positive_float,
)
from ..problems._qp import QP, check_qp
from ._base import AbstractSolver


class _Sides(eqx.Module):
    """Slack/dual pairs of two-sided constraints $L \\le v \\le U$:
    $v - L = s_l$, $U - v = s_u$, duals $z_l, z_u \\ge 0$. On a side with an
    infinite bound the pair is a constant placeholder $(1, 0)$; on an equality
    ($L = U$) `zl` is the free multiplier and the other three are
    placeholders."""

    sl: Float[Array, " k"]
    zl: Float[Array, " k"]
    su: Float[Array, " k"]
    zu: Float[Array, " k"]


class _PrimalDual(eqx.Module):
    """The unknowns: primal `x`; slacks `s` of $Gx + s = h$ and their duals
    `z >= 0`; equality duals `y`; the pairs of the two-sided rows `C` (`rows`)
    and of the bounds (`bounds`, empty without bounds)."""

    x: Float[Array, " n"]
    s: Float[Array, " p"]
    z: Float[Array, " p"]
    y: Float[Array, " m"]
    rows: _Sides
    bounds: _Sides


# Steps without a 10% decrease of the KKT error, below sqrt(eps), after which
# the solve is reported `stalled`.
_STALL = 5


class _Aux(eqx.Module):
    """Auxiliary state: the infeasibility code of the last step, the Ruiz
    scaling computed once by `init` (columns `d`, rows `e`, cost `c`), and the
    KKT errors (`kkt_error` over `error_unit`) of the iterate entering the last step
    and of the one it produced, which the step computes anyway from the
    residuals it needs (so `residual_norm` recomputes neither)."""

    result: RESULTS
    d: Float[Array, " n"]
    e: Float[Array, " r"]
    c: Float[Array, ""]
    # min(1, the largest datum): the unit of the stopping measure (class
    # docstring, "Stopping"), so that data scaled down stop at the same point.
    error_unit: Float[Array, ""]
    previous_error: Float[Array, ""]
    error: Float[Array, ""]
    # Consecutive steps without progress near the rounding floor (`_STALL`):
    # no 10% decrease of `best_error`, the smallest KKT error so far.
    stalls: Int[Array, ""]
    best_error: Float[Array, ""]
    # The dual Schur path (`_DualFactor`), computed once by `init` for a QP
    # without bounds: the inverse of the Cholesky factor of the regularised P
    # (n x n) and the Gram matrix K A^{-1} K^T of the rows (r x r). Empty
    # (0 x 0) on the primal path, so that the path is a static property of
    # the shapes.
    p_factor_inv: Float[Array, "n n"]
    row_gram: Float[Array, "r r"]


class _SymmetricPart(eqx.Module):
    """$P = (Q + Q^\top)/2$, applied without forming it: $Px = (Qx + x^\top Q)/2$.

    ½xᵀQx only sees the symmetric part of Q; using it everywhere keeps the
    step, the optimality condition and their derivatives with respect to an
    arbitrary (non-symmetric) perturbation of Q consistent with the objective.
    Forming it would cost a pass over an n × n matrix in every step (as much
    as a Cholesky factorisation at n = 1000 on a CPU)."""

    Q: Array

    def mv(self, x: Array) -> Array:
        return 0.5 * (self.Q @ x + x @ self.Q)

    def dense(self) -> Array:
        return 0.5 * (self.Q + self.Q.T)


class _StackedRows(eqx.Module):
    """The rows $K = [A; G; C]$, applied block by block, without forming
    (copying) $K$ in every step: `mv(x)` is $Kx$, `rmv(v)` is $K^\top v$
    (computed as $v^\top K$: XLA on CPU copies a transposed operand)."""

    blocks: tuple[Array, ...]
    n: int = eqx.field(static=True)

    @property
    def rows(self) -> int:
        return sum(B.shape[0] for B in self.blocks)

    def mv(self, x: Array) -> Array:
        if not self.blocks:
            return jnp.zeros((0,), x.dtype)
        return jnp.concatenate([B @ x for B in self.blocks])

    def rmv(self, v: Array) -> Array:
        out = jnp.zeros((self.n,), v.dtype)
        start = 0
        for B in self.blocks:
            out = out + v[start:start + B.shape[0]] @ B
            start += B.shape[0]
        return out

    def dense(self, dtype) -> Array:
        if not self.blocks:
            return jnp.zeros((0, self.n), dtype)
        return jnp.concatenate(self.blocks)


class _Canonical(eqx.Module):
    """Every constraint of the QP as rows $L \\le Kx \\le U$ with masks, plus
    the bounds: the one form the Newton step works on. `K = [A; G; C]`."""

    P: _SymmetricPart
    q: Array
    K: _StackedRows
    L: Array
    U: Array
    eq: Bool[Array, " r"]
    hl: Bool[Array, " r"]
    hu: Bool[Array, " r"]
    bL: Array
    bU: Array
    beq: Bool[Array, " nb"]
    bhl: Bool[Array, " nb"]
    bhu: Bool[Array, " nb"]


def _masks(lo, hi, lo_fin, hi_fin):
    eq = lo_fin & hi_fin & (lo == hi)
    return eq, lo_fin & ~eq, hi_fin & ~eq


def _canonical(qp: QP) -> _Canonical:
    n, m, p = qp.sizes
    dt = qp.Q.dtype
    t, f = jnp.ones, jnp.zeros
    ceq, chl, chu = _masks(qp.l, qp.u, qp.l_finite, qp.u_finite)
    beq, bhl, bhu = _masks(qp.lb, qp.ub, qp.lb_finite, qp.ub_finite)
    return _Canonical(
        P=_SymmetricPart(qp.Q),
        q=qp.q,
        K=_StackedRows(tuple(B for B in (qp.A, qp.G, qp.C) if B.shape[0]), n),
        L=jnp.concatenate([qp.b, f((p,), dt), qp.l]),
        U=jnp.concatenate([qp.b, qp.h, qp.u]),
        eq=jnp.concatenate([t((m,), bool), f((p,), bool), ceq]),
        hl=jnp.concatenate([f((m,), bool), f((p,), bool), chl]),
        hu=jnp.concatenate([f((m,), bool), t((p,), bool), chu]),
        bL=qp.lb, bU=qp.ub, beq=beq, bhl=bhl, bhu=bhu,
    )


def _row_sides(w: _PrimalDual) -> _Sides:
    """The canonical rows' pairs: `A` rows are equalities with multiplier `y`,
    `G` rows have an upper side only."""
    m, p = w.y.shape[0], w.s.shape[0]
    one, zero = jnp.ones((m + p,), w.x.dtype), jnp.zeros((m + p,), w.x.dtype)
    return _Sides(
        sl=jnp.concatenate([one, w.rows.sl]),
        zl=jnp.concatenate([w.y, zero[:p], w.rows.zl]),
        su=jnp.concatenate([one[:m], w.s, w.rows.su]),
        zu=jnp.concatenate([zero[:m], w.z, w.rows.zu]),
    )


def _from_row_sides(w: _PrimalDual, x: Array, r: _Sides, b: _Sides) -> _PrimalDual:
    m, p = w.y.shape[0], w.s.shape[0]
    return _PrimalDual(
        x=x, s=r.su[m : m + p], z=r.zu[m : m + p], y=r.zl[:m],
        rows=_Sides(r.sl[m + p :], r.zl[m + p :], r.su[m + p :], r.zu[m + p :]),
        bounds=b,
    )


def _multiplier(sd: _Sides, eq, hl, hu) -> Array:
    """The multiplier of $v$ in the Lagrangian: $z_u - z_l$ (free on equalities)."""
    return jnp.where(eq, sd.zl, jnp.where(hu, sd.zu, 0.0) - jnp.where(hl, sd.zl, 0.0))


class _KKTResidual(eqx.Module):
    """$\\Phi(w, \\theta)$ and the pieces of the stopping test."""

    dual: Float[Array, " n"]  # Px + q + Kᵀλ + λ_b
    rows: _Sides  # per canonical row: primal-lower, compl-lower, primal-upper, compl-upper
    bounds: _Sides  # the same for the bounds
    violation: Scalar  # max constraint violation of x itself (∞-norm)
    gap: Scalar  # |xᵀPx + qᵀx + Σ U λ⁺ + L λ⁻| (the QP benchmarks' duality gap)
    lam: Array  # row multipliers
    blam: Array  # bound multipliers


def _side_residual(v, L, U, eq, hl, hu, sd: _Sides) -> tuple[_Sides, Scalar]:
    """Residuals of the pairs of $L \\le v \\le U$ in the slots (sl, zl, su,
    zu), placeholders included, and the violation of $v$ itself."""
    pl = jnp.where(eq, v - L, jnp.where(hl, v - L - sd.sl, sd.sl - 1.0))
    cl = jnp.where(eq, sd.sl - 1.0, jnp.where(hl, sd.sl * sd.zl, sd.zl))
    pu = jnp.where(hu, U - v - sd.su, sd.su - 1.0)
    cu = jnp.where(hu, sd.su * sd.zu, sd.zu)
    viol = jnp.maximum(
        jnp.where(eq, jnp.abs(v - L), 0.0),
        jnp.maximum(jnp.where(hl, L - v, 0.0), jnp.where(hu, v - U, 0.0)),
    )
    return _Sides(pl, cl, pu, cu), _amax(viol)


def kkt_residual(w: _PrimalDual, qp: QP) -> _KKTResidual:
    """The KKT residuals of the QP at $w$: the one place they are computed."""
    cf = _canonical(qp)
    rs, bs = _row_sides(w), w.bounds
    lam = _multiplier(rs, cf.eq, cf.hl, cf.hu)
    blam = _multiplier(bs, cf.beq, cf.bhl, cf.bhu)
    Px = cf.P.mv(w.x)
    dual = Px + cf.q + cf.K.rmv(lam)
    if blam.size:
        dual = dual + blam
    rows, viol = _side_residual(cf.K.mv(w.x), cf.L, cf.U, cf.eq, cf.hl, cf.hu, rs)
    if bs.sl.size:
        bounds, bviol = _side_residual(w.x, cf.bL, cf.bU, cf.beq, cf.bhl, cf.bhu, bs)
    else:
        bounds, bviol = bs, jnp.zeros((), w.x.dtype)

    def support(lm, L, U, eq, hl, hu):
        return jnp.sum(
            jnp.where(eq, L * lm, jnp.where(hu, U * jnp.maximum(lm, 0.0), 0.0)
                      + jnp.where(hl, L * jnp.minimum(lm, 0.0), 0.0))
        )

    gap = jnp.abs(
        jnp.dot(w.x, Px) + jnp.dot(cf.q, w.x)
        + support(lam, cf.L, cf.U, cf.eq, cf.hl, cf.hu)
        + support(blam, cf.bL, cf.bU, cf.beq, cf.bhl, cf.bhu)
    )
    return _KKTResidual(dual, rows, bounds, jnp.maximum(viol, bviol), gap, lam, blam)


def _amax(v: Array) -> Scalar:
    """max |v|, 0 for an empty array."""
    return jnp.max(jnp.abs(v)) if v.size else jnp.zeros((), v.dtype)


def _max_step(v: Array, dv: Array) -> Scalar:
    """The largest $\\alpha$ with $v + \\alpha\\, dv \\ge 0$ ($+\\infty$ if none)."""
    decreasing = dv < 0
    # Divide by a safe value off the decreasing entries: a 0/0 in the branch
    # that `where` discards would still poison the derivative with NaN.
    ratio = -v / jnp.where(decreasing, dv, -1.0)
    return jnp.min(jnp.where(decreasing, ratio, jnp.inf)) if v.size else jnp.asarray(jnp.inf, v.dtype)


class _Augmented(eqx.Module):
    r"""The symmetric quasi-definite Newton matrix
    $egin{pmatrix} H & 	ilde K^	op \ 	ilde K & -E\end{pmatrix}$
    in $(\Delta x, \Delta	ilde\lambda)$, applied matrix-free from its
    factors: $H = \Pi P \Pi + \mathrm{diag}(h)$ and $	ilde K = C K \Pi$, with
    $\Pi = \mathrm{diag}(\mathrm{keep})$ removing fixed variables and
    $C = \mathrm{diag}(c_s)$ the row scaling. Nothing of size $n^2$ or
    $n r$ is formed per step (each such elementwise pass costs as much as a
    Cholesky factorisation at n = 1000)."""

    P: _SymmetricPart
    h: Array
    keep: Array | None  # None: no fixed variables
    K: _StackedRows
    cs: Array
    E: Array

    def _masked(self, u):
        return u if self.keep is None else jnp.where(self.keep, u, 0.0)

    def mv(self, u):
        n = self.h.shape[0]
        ux, ul = u[:n], u[n:]
        uk = self._masked(ux)
        top = self._masked(self.P.mv(uk) + self.K.rmv(self.cs * ul)) + self.h * ux
        return jnp.concatenate([top, self.cs * self.K.mv(uk) - self.E * ul])


class _PrimalFactor(eqx.Module):
    r"""The regularised augmented system solved through the $n 	imes n$
    reduced matrix $N = H_\delta + 	ilde K^	op E_r^{-1} 	ilde K$ (one
    Cholesky factor `chol`): $u_1 = N^{-1}(r_1 + 	ilde K^	op E_r^{-1} r_2)$,
    $u_2 = E_r^{-1}(	ilde K u_1 - r_2)$, with $	ilde K = C K \Pi$ applied
    from `matrix` (an `_Augmented`). Cost per step: forming $N$ ($n^2 r$)
    and factorising it ($n^3/3$)."""

    chol: Array
    matrix: _Augmented
    Einv: Array

    def solve(self, r):
        a, n = self.matrix, self.chol.shape[0]
        r1, r2 = r[:n], r[n:]
        u1 = jsl.cho_solve((self.chol, True), r1 + a._masked(a.K.rmv(a.cs * self.Einv * r2)))
        return jnp.concatenate([u1, self.Einv * (a.cs * a.K.mv(a._masked(u1)) - r2)])


class _DualFactor(eqx.Module):
    r"""The regularised augmented system solved through the $r 	imes r$
    dual Schur complement $S = E_r + C (K A^{-1} K^	op) C$, for a QP without
    bounds, where $A = P + \delta$ does not change between steps: the inverse
    $L_A^{-1}$ of its Cholesky factor and the Gram matrix $K A^{-1} K^	op$
    are computed once by `init`, so a step only forms and factorises $S$
    ($r^3/3$, no $n^2 r$ product). With $y = A^{-1} r_1$:
    $u_2 = S^{-1}(	ilde K y - r_2)$, $u_1 = A^{-1}(r_1 - 	ilde K^	op u_2)$
    ($	ilde K = C K$), $A^{-1} v = L_A^{-	op} (L_A^{-1} v)$ by two
    matrix-vector products (three times faster than triangular solves on a
    CPU, and the transposed solve made XLA copy the factor every step)."""

    p_factor_inv: Array
    s_factor: Array
    K: _StackedRows
    cs: Array

    def _p_solve(self, v):
        return (self.p_factor_inv @ v) @ self.p_factor_inv

    def solve(self, r):
        n = self.p_factor_inv.shape[0]
        r1, r2 = r[:n], r[n:]
        y = self._p_solve(r1)
        u2 = jsl.cho_solve((self.s_factor, True), self.cs * self.K.mv(y) - r2)
        u1 = self._p_solve(r1 - self.K.rmv(self.cs * u2))
        return jnp.concatenate([u1, u2])


class _QuasiDefiniteCholesky(lx.AbstractLinearSolver):
    """Solves the augmented system with a factorisation of its regularised
    version (`_PrimalFactor` or `_DualFactor`), then `refinement_steps` steps
    of iterative refinement against the true matrix. The state is
    `(factor, true)`, built by `InteriorPointQP._newton`; the matrix is
    symmetric, so transposing is free."""

    refinement_steps: int = eqx.field(static=True, default=2)

    def init(self, operator, options):
        raise NotImplementedError("build the state with `InteriorPointQP._newton`")

    def compute(self, state, vector, options):
        factor, true = state
        # A loop, not unrolled Python: the step is traced several times per
        # solve (init, loop body, the differentiated last step, the error
        # estimate), and unrolled refinement made up a third of its compile
        # time.
        u = jax.lax.fori_loop(
            0, self.refinement_steps,
            lambda _, u: u + factor.solve(vector - true.mv(u)),
            factor.solve(vector),
        )
        return u, lx.RESULTS.successful, {}

    def transpose(self, state, options):
        return state, options

    def conj(self, state, options):
        return state, options

    def assume_full_rank(self):
        return True

    def allow_dependent_columns(self, operator):
        return False

    def allow_dependent_rows(self, operator):
        return False


def _cholesky(N: Array) -> Array:
    """Cholesky factor of the symmetric positive semidefinite `N` after a
    relative diagonal shift $\\epsilon\\, \\mathrm{diag}(N)$ only when rounding
    makes the plain factorisation break down (the diagonal of $N$ spans up to
    1e20 near the end, when active constraints tend to equalities):
    $\\epsilon = 10^{-12}$, then $10^{-8}$, then $10^{-4}$. The shift only
    changes the factorisation, which iterative refinement corrects, but
    slowly (its contraction is about $\\epsilon$ times the condition number
    of the Jacobi-scaled $N$, which grows like $1/\\mu$): an unconditional
    $10^{-12}$ shift cost the one-step derivative 4e-6 on a random QP."""
    diag = jnp.diag(N)
    shifts = jnp.asarray([0.0, 1e-12, 1e-8, 1e-4], N.dtype)
    index = jnp.diag_indices(N.shape[0])

    def attempt(i):
        # N is symmetric by construction and LAPACK reads one triangle:
        # `jnp.linalg.cholesky`'s symmetrisation, (N + Nᵀ)/2, would be one
        # more pass over N per step.
        shifted = N if isinstance(i, int) else N.at[index].add(shifts[i] * diag)
        return jax.lax.linalg.cholesky(shifted, symmetrize_input=False)

    def failed(L):
        return ~jnp.all(jnp.isfinite(jnp.diag(L)))

    # One factorisation in a loop over the shifts rather than a chain of
    # `cond`s: one Cholesky in the compiled program instead of four (under
    # `vmap` a `cond` runs both branches, so all four ran every step), and a
    # third less compile time for the step.
    def retry(carry):
        i, _ = carry
        return i + 1, attempt(i + 1)

    _, L = jax.lax.while_loop(
        lambda carry: failed(carry[1]) & (carry[0] < shifts.shape[0] - 1),
        retry,
        (jnp.asarray(0), attempt(0)),  # the unshifted N: no pass to add a zero shift
    )
    return L


def _side_newton(v, L, U, eq, hl, hu, sd: _Sides, tl, tu):
    """Eliminating the pairs of one block of constraints $L \\le v \\le U$.

    With $t$ the right-hand sides of the linearised complementarity
    $z\\Delta s + s\\Delta z = t$ and $p_l = v - L - s_l$, $p_u = U - v - s_u$,
    the multiplier step on an inequality is
    $\\Delta\\lambda = D\\,\\Delta v + g$, $D = z_l/s_l + z_u/s_u$; written
    without dividing by a slack (slacks of active constraints tend to 0):
    $\\Delta v - E\\,\\Delta\\lambda = r$ with
    $E = 1/D = s_l s_u / (z_l s_u + z_u s_l)$ and
    $r = -g/D = ((t_l - z_l p_l) s_u - (t_u - z_u p_u) s_l) / (z_l s_u + z_u s_l)$
    (a missing side counts as $s = 1$, $z = 0$, $t = 0$).

    Returns `(E, r, D, g, recover)`; `recover(dv, dlam)` gives the pairs'
    steps from $\\Delta v$ and $\\Delta\\lambda$: slacks from the primal
    equations; a side's dual from its own linearised complementarity,
    $\\Delta z = (t - z\\Delta s)/s$, where its slack is at least its dual (an
    inactive side), else from $\\Delta\\lambda = \\Delta z_u - \\Delta z_l$,
    never by dividing by a vanishing slack.
    """
    pl = v - L - sd.sl
    pu = U - v - sd.su
    sl = jnp.where(hl, sd.sl, 1.0)
    su = jnp.where(hu, sd.su, 1.0)
    zl = jnp.where(hl, sd.zl, 0.0)
    zu = jnp.where(hu, sd.zu, 0.0)
    nl = jnp.where(hl, tl - zl * pl, 0.0)
    nu = jnp.where(hu, tu - zu * pu, 0.0)
    den = zl * su + zu * sl
    ineq = (hl | hu) & (den > 0)
    safe = jnp.where(ineq, den, 1.0)
    E = jnp.where(ineq, sl * su / safe, 1.0)
    r = jnp.where(ineq, (nl * su - nu * sl) / safe, 0.0)
    D = zl / sl + zu / su
    g = nu / su - nl / sl

    def recover(dv, dlam):
        dsl = jnp.where(hl, dv + pl, 0.0)
        dsu = jnp.where(hu, pu - dv, 0.0)
        # A side's dual step from its own linearised complementarity,
        # (t - z Δs) / s, where its slack is the larger of the pair (an
        # inactive side: the division is safe); from Δλ = Δz_u - Δz_l where
        # its dual is the larger (an active side, s -> 0). Δλ (the multiplier
        # step, or for bounds the stationarity rows) is accurate in absolute
        # terms only: taken for every one-sided pair, it left an inactive
        # bound of QSHARE2B (s = 20, z = 6e-7) with z Δs + s Δz = -1.2e-2
        # against a target of -1.3e-5; the fraction to the boundary then cut
        # every step short on that dual, and the iterates jammed at a KKT
        # error of 3.6e-3 (QBORE3D alike, at 4.6e3, through a two-sided bound
        # whose other side had the larger slack). The comparison is in the
        # problem's units: which of s and z vanishes is what matters, and near
        # the solution their ratio tends to 0 or infinity whatever the
        # scaling (in Ruiz-scaled units it picked Δλ for an inactive bound of
        # QBORE3D with s = 3.7, z = 1.6e-5).
        # (A slack that underflowed to 0 with its dual never divides.)
        own_l, own_u = (sl >= zl) & (sl > 0), (su >= zu) & (su > 0)
        # s Δz = t - z Δs: each side's dual step times its slack.
        num_l, num_u = tl - zl * dsl, tu - zu * dsu
        comp_l = num_l / jnp.where(own_l, sl, 1.0)
        comp_u = num_u / jnp.where(own_u, su, 1.0)
        # Two-sided with both sides' duals the larger (early iterates): from
        # the side with the larger slack, the other through Δλ.
        use_l = sl >= su
        big_l = num_l / jnp.where(use_l, sl, 1.0)
        big_u = num_u / jnp.where(use_l, 1.0, su)
        dzl2 = jnp.where(own_l, comp_l, jnp.where(own_u, comp_u - dlam,
                         jnp.where(use_l, big_l, big_u - dlam)))
        dzu2 = jnp.where(own_u, comp_u, jnp.where(own_l, comp_l + dlam,
                         jnp.where(use_l, big_l + dlam, big_u)))
        two = hl & hu
        one_l = jnp.where(own_l, comp_l, -dlam)
        one_u = jnp.where(own_u, comp_u, dlam)
        dzl = jnp.where(two, dzl2, jnp.where(hl, one_l, jnp.where(eq, dlam, 0.0)))
        dzu = jnp.where(two, dzu2, jnp.where(hu, one_u, 0.0))
        return _Sides(dsl, dzl, dsu, dzu)

    return E, r, D, g, recover


class InteriorPointQP(AbstractSolver[_PrimalDual, _Aux]):
    """Primal-dual predictor-corrector (Mehrotra) interior point method for
    the convex QP of eq. (12) with two-sided rows and bounds (`ig.QP`), in the
    style of CVXOPT's `coneqp` and OptNet.

    Every constraint is seen as $L \\le v \\le U$ with $v = Kx$ a row
    ($K = [A; G; C]$) or $v = x_j$ a bound; each finite side has a slack and a
    dual, $v - L = s_l$, $U - v = s_u$, $s, z > 0$; equalities ($L = U$) have a
    free multiplier. The multiplier of $v$ is $\\lambda = z_u - z_l$. The KKT
    residual (`optimality`) is $\\Phi(w, \\theta) = (Px + q + K^\\top\\lambda
    + \\lambda_b,\\ v - L - s_l,\\ U - v - s_u,\\ s_l \\circ z_l,\\ s_u \\circ
    z_u)$ (with placeholder equations on infinite sides). One step
    $F(w, \\theta)$:

    1. Predictor: the Newton direction $\\Delta^a$ of $\\Phi = 0$; $\\alpha^a$
       the largest step in $[0, 1]$ keeping $s, z \\ge 0$;
       $\\mu = s^\\top z / p$, $\\mu^a$ the same after the step,
       $\\sigma = \\min(1, (\\mu^a/\\mu)^3)$.
    2. Corrector: the Newton direction with complementarity target
       $\\sigma\\mu - \\Delta s^a \\circ \\Delta z^a$, same factorisation;
       the step direction is $\\Delta = \\Delta^a + \\omega(\\Delta^c - \\Delta^a)$
       with the largest $\\omega \\in \\{1, 1/2, \\dots, 1/16, 0\\}$ whose step
       to the boundary is within 90% of the longest (a weighted corrector,
       Colombo & Gondzio 2008; no extra solve; $\\omega = 1$ near the
       solution).
    3. $w^+ = w + \\alpha\\Delta$, $\\alpha = \\min(1, \\eta\\,\\alpha_{\\max})$,
       $\\eta = \\max(\\eta_{\\min}, 1 - \\mu)$. Like a line search, $\\alpha$
       is a safeguard and carries no derivative: the step is differentiated
       as the full Newton step $w + \\Delta(w, \\theta)$, so that `OneStep`
       does not inherit a factor $\\alpha < 1$ from whichever step was last.
       The centring target $\\sigma\\mu$ and $\\omega$ carry no derivative
       either (they vanish or tend to 1 at the solution).

    **Newton system.** Slacks and duals are eliminated: bounds add the diagonal
    $z_l/s_l + z_u/s_u$ to $P$ (fixed variables are eliminated exactly), rows
    give the quasi-definite augmented matrix
    $\\begin{pmatrix} P + D_b & K^\\top C \\\\ C K & -E\\end{pmatrix}$ with the
    row scaling $C = \\min(1, \\sqrt{D})$, $E = \\min(1, 1/D)$ on inequality rows
    ($E = 0$ on equalities). It is solved through one Cholesky factorisation
    of the $n \\times n$ reduced matrix of its regularised version
    (proximal shifts `factorization_regularization` in Ruiz-scaled units),
    followed by `refinement_steps` of iterative refinement against the true
    matrix: cost $n^3/3 + r n^2$ per step for $r$ rows, shared by predictor,
    corrector and every derivative of the step (`itergrad._linear_solve`,
    with the refinement inside the solver so that the derivative solves are
    refined too). Without bounds and with $r \\le n$ rows, the (1,1) block
    $P + \\delta$ is the same at every step: `init` factorises it once and
    forms $M = K (P + \\delta)^{-1} K^\\top$, and each step factorises the
    $r \\times r$ dual Schur complement $E + C M C$ instead ($r^3/3$ per step,
    no $n^2 r$ product; `kkt_reduction`).

    **Scaling.** `init` computes a Ruiz equilibration of
    $\\begin{pmatrix} P & K^\\top \\\\ K & 0\\end{pmatrix}$ and a cost scaling
    (kept in the auxiliary state): the starting point, the regularisation and
    the infeasibility tests are defined in scaled units; the unknowns stay in
    the original units, so derivatives need no unscaling.

    **Stopping.** `residual_norm` is the absolute KKT error of the original
    problem, the QP benchmarks' measure: the max of the primal residual
    (constraint violation of $x$ and the slack equations), the dual residual
    $\\|Px + q + K^\\top\\lambda + \\lambda_b\\|_\\infty$, the duality gap
    $|x^\\top P x + q^\\top x + \\sum U\\lambda^+ + L\\lambda^-|$, the largest
    complementarity product and the largest weak-activity measure
    $\\min(s_i, z_i)^2 / \\max(s_i, z_i)$ (about $\\min(s_i, z_i)$ at a
    weakly active constraint, where $s_i$ and $z_i$ vanish together and the
    product alone would stop with an error of $\\sqrt{\\mathrm{tol}}$ in
    $x$; negligible at a strictly complementary pair); of both $w_{k-1}$ and $w_k$, so that the
    differentiated last step starts at the solution and `ig.OneStep()` matches
    `ig.Implicit()` (Corollary 3). It is measured in the unit
    $\\min(1, m)$, $m$ the largest datum in absolute value: absolute for
    data of size 1 or more (the benchmarks' measure), and relative for
    smaller data, so that a QP whose data are all scaled by $10^{-8}$ stops
    where the original does (every KKT term scales with the data; $x$ and
    the multipliers do not). `itergrad.solve` stops when it is at most
    `atol + rtol * ||x||`. When the KKT error, already below
    $\\sqrt{\\epsilon}$, fails to come 10% below the smallest so far in 5
    consecutive steps
    (the rounding floor of the data's precision, above the tolerance: in
    float32 about `1e-4` for a few hundred variables), the solve ends with
    `RESULTS.stalled`, which says to loosen the tolerance or use float64.

    **Arguments:**

    - `eta_min`: the floor $\\eta_{\\min} \\in (0, 1)$ of the fraction-to-boundary
      factor (default `0.99`).
    - `regularization`: the diagonal shift of the true Newton matrix (in
      scaled units, default `1e-14` in float64, $100\\epsilon^2$ in lower
      precision): a safeguard for a singular $P$ or dependent rows,
      negligible otherwise.
    - `factorization_regularization`: the larger shift of the factorised
      matrix (default `1e-9` in float64, `1e-3` in lower precision, where
      smaller shifts are lost to rounding and the iterates stall or diverge),
      removed by the refinement.
    - `refinement_steps`: iterative refinement steps per solve (default 3).
    - `kkt_reduction`: which Schur complement of the Newton system is
      factorised: `"primal"` ($n \\times n$, every step), `"dual"`
      ($r \\times r$, QPs without bounds only) or `"auto"` (default: dual
      when there are no bounds and $0 < r \\le n$). Both solve the same
      regularised system, refined against the same true matrix.
    - `infeasibility_tol`: tolerance of the Farkas certificates checked after
      every step: primal infeasibility when the multipliers
      $\\lambda$ satisfy $K^\\top\\lambda + \\lambda_b \\approx 0$ with
      $\\sum U\\lambda^+ + L\\lambda^- < 0$, unboundedness when $Px \\approx 0$,
      $x$ is in the recession cone of the constraints and $q^\\top x < 0$
      (the primal test also on the last change of $\\lambda$, as OSQP);
      the solve then stops with `RESULTS.infeasible` (default `1e-9` in
      float64, $100\\epsilon$ in lower precision).

    **Convexity.** `init` checks, with one Cholesky factorisation of the
    scaled $P + \\rho A_{eq}^\\top A_{eq}$, that $P$ is positive semidefinite
    on the null space of the equalities; a non-convex QP (whose stationary
    points may be saddles) is refused with `RESULTS.nonconvex`.

    !!! warning

        For a differentiable solution, the solution must be unique with
        linearly independent active constraints and strict complementarity.

        - *Dependent active constraints* (a degenerate vertex, redundant
          rows): the KKT Jacobian is singular, `Implicit` reports
          `RESULTS.linear_solve_failed`, and `OneStep` returns the
          derivative of a step that is not a valid Jacobian.
        - *No strict complementarity* (a constraint active with a zero
          multiplier, e.g. projecting 0 onto $[0, 1]$): the solution map has a
          kink, its one-sided derivatives differ. The solve ends with that
          pair's slack and dual both of the order of the tolerance (the
          stopping rule's weak-activity measure keeps $x$ accurate), where
          the KKT Jacobian is invertible: `Implicit` and `OneStep` return the
          derivative at that interior point. For one such constraint it is a
          convex combination of the two one-sided derivatives, weighted by
          $z_i / s_i$ (their mean on the projection above, where
          $s_i = z_i$): one element of the Clarke generalised Jacobian, as
          `jax.nn.relu`'s derivative at 0 is one element of its
          subdifferential, not an error. `error_estimate=True` shows it:
          on that projection 2e-2 with `Implicit` (0.6 with `OneStep`),
          against 5e-15 (4e-5 to 6e-4) with the constraint strictly active
          or inactive. To test for it, $\\min_i \\max(s_i, z_i)$
          over the pairs of `sol.state.z` is of the order of the tolerance.
    """

    eta_min: float = 0.99
    regularization: float | None = None
    factorization_regularization: float | None = None
    refinement_steps: int = 3
    infeasibility_tol: float | None = None
    kkt_reduction: str = eqx.field(static=True, default="auto")

    superlinear: ClassVar[bool] = True
    # In float32 the error estimate's power iterations meet non-finite
    # cotangents inside the step's backward pass (1/s terms near the
    # boundary), and Lineax's transposed KKT solve then raises even under
    # throw=False (measured on random QPs with n = 20): no estimate below
    # float64.
    error_estimate_needs_float64: ClassVar[bool] = True

    def __check_init__(self):
        in_open_interval(self.eta_min, "InteriorPointQP(eta_min=...)", 0, 1)
        if self.regularization is not None:
            nonnegative_float(self.regularization, "InteriorPointQP(regularization=...)")
        if self.factorization_regularization is not None:
            positive_float(
                self.factorization_regularization,
                "InteriorPointQP(factorization_regularization=...)",
            )
        nonnegative_int(self.refinement_steps, "InteriorPointQP(refinement_steps=...)")
        if self.kkt_reduction not in ("auto", "primal", "dual"):
            raise ValueError(
                "InteriorPointQP(kkt_reduction=...) must be 'auto', 'primal' or 'dual', "
                f"got {self.kkt_reduction!r}."
            )
        if self.infeasibility_tol is not None:
            positive_float(
                self.infeasibility_tol, "InteriorPointQP(infeasibility_tol=...)"
            )

    def _shifts(self, dtype) -> tuple[float, float, float]:
        """`(regularization, factorization_regularization, infeasibility_tol)`,
        the defaults following the data's precision: `1e-14`, `1e-9`, `1e-9`
        in float64; in lower precision (machine epsilon $\\epsilon$)
        $100\\epsilon^2$, `1e-3` and $100\\epsilon$, so that the
        shifts are not lost to rounding (else the iterates stall)."""
        eps = float(jnp.finfo(dtype).eps)
        regularization = (
            max(1e-14, 100 * eps**2) if self.regularization is None
            else self.regularization
        )
        # Measured on random QPs in float32: 1e-5 stalls at n = 50; 1e-4
        # (sqrt(eps)/3) converges at n = 20, 50 but diverges on 5 of 12 at
        # n = 200 (residual 1e4 to 1e9 after 100 steps); 1e-3 converges on
        # those (24 of 24 at n = 200) in the same steps at n = 20, 50 (32 each).
        float64 = eps <= 1e-15
        factorization = (
            (1e-9 if float64 else 1e-3)
            if self.factorization_regularization is None
            else self.factorization_regularization
        )
        infeasibility = (
            max(1e-9, 100 * eps) if self.infeasibility_tol is None
            else self.infeasibility_tol
        )
        return regularization, factorization, infeasibility

    # -- the Newton system ---------------------------------------------------

    def _newton(self, w: _PrimalDual, qp: QP, aux: _Aux):
        """Eliminate slacks and duals and factorise once; returns
        `direction(targets) -> Δw` for complementarity targets."""
        cf = _canonical(qp)
        n = qp.Q.shape[0]
        dt = qp.Q.dtype
        x = w.x
        rs, bs = _row_sides(w), w.bounds
        v = cf.K.mv(x)
        res = kkt_residual(w, qp)
        nb = bs.sl.shape[0]
        dual = res.dual
        d, e, c = aux.d, aux.e, aux.c

        def build(tl, tu, btl, btu):
            E, r, _, _, rec = _side_newton(v, cf.L, cf.U, cf.eq, cf.hl, cf.hu, rs, tl, tu)
            if nb:
                _, _, DB, gB, brec = _side_newton(
                    x, cf.bL, cf.bU, cf.beq, cf.bhl, cf.bhu, bs, btl, btu
                )
                DB = jnp.where(cf.bhl | cf.bhu, DB, 0.0)
                gB = jnp.where(cf.bhl | cf.bhu, gB, 0.0)
            else:
                DB = gB = jnp.zeros((n,), dt)
                brec = None
            return E, r, rec, DB, gB, brec

        regularization, factorization_regularization, _ = self._shifts(dt)
        zeros_r = jnp.zeros_like(v)
        zeros_b = jnp.zeros((nb,), dt)
        E0, _, _, DB, _, _ = build(zeros_r, zeros_r, zeros_b, zeros_b)
        fixed = cf.beq if nb else jnp.zeros((n,), bool)
        ineq = cf.hl | cf.hu
        # Rows scaled by c = min(1, 1/sqrt(E)): active rows (E → 0) tend to
        # equalities, inactive ones (E → ∞) decouple; the matrix stays well
        # conditioned as the gap closes.
        cs = jnp.where(ineq, jnp.sqrt(jnp.minimum(1.0, 1.0 / E0)), jnp.where(cf.eq, 1.0, 0.0))
        # Equalities: E = 0 up to the safeguard shift, in Ruiz-scaled units
        # (E = δ c / e² is a shift δ of the scaled matrix).
        E = jnp.where(ineq, jnp.minimum(1.0, E0), jnp.where(cf.eq, regularization * c / e**2, 1.0))
        keep = ~fixed if nb else None
        h = jnp.where(fixed, 1.0, DB + regularization / (c * d**2))
        true = _Augmented(cf.P, h, keep, cf.K, cs, E)
        # The factorisation: proximal shifts δ_f in scaled units, removed by the
        # refinement; computed on stopped values (the derivative never goes
        # through it, see `itergrad._linear_solve`).
        stopped = jax.lax.stop_gradient(true)
        delta = factorization_regularization
        # Every row gets at least the proximal shift: active inequalities tend
        # to equalities (E → 0) and are treated alike.
        E_reg = jnp.maximum(stopped.E, delta * c / e**2)
        if aux.p_factor_inv.size:
            # Without bounds, P + δ is the same matrix at every step: see
            # `_DualFactor`. (C K A⁻¹ Kᵀ C = C M C, with M from `init`.)
            cs_s = stopped.cs
            S = (cs_s[:, None] * aux.row_gram * cs_s[None, :]).at[jnp.diag_indices(cs_s.shape[0])].add(E_reg)
            factor = _DualFactor(aux.p_factor_inv, _cholesky(jax.lax.stop_gradient(S)),
                                 stopped.K, cs_s)
        else:
            Einv = 1.0 / E_reg
            # N = Π P Π + diag(h + δ) + Πᵀ Kᵀ C E⁻¹ C K Π, one pass over K.
            Kw = stopped.K.dense(dt) * (stopped.cs * jnp.sqrt(Einv))[:, None]
            P = stopped.P.dense()
            if keep is not None:
                Kw = jnp.where(keep[None, :], Kw, 0.0)
                P = jnp.where(keep[None, :] & keep[:, None], P, 0.0)
            N = P + jnp.diag(stopped.h + delta / (c * d**2)) + Kw.T @ Kw
            factor = _PrimalFactor(_cholesky(N), stopped, Einv)
        state = (factor, jax.lax.stop_gradient(true))
        operator = lx.FunctionLinearOperator(
            true.mv, jax.ShapeDtypeStruct((n + v.shape[0],), dt), lx.symmetric_tag
        )
        solver = _QuasiDefiniteCholesky(self.refinement_steps)

        def direction(tl, tu, btl, btu):
            _, r, rec, DB, gB, brec = build(tl, tu, btl, btu)
            a1 = -dual - gB
            a2 = jnp.where(cf.eq, -(v - cf.L), cs * r)
            if nb:
                dxf = jnp.where(fixed, -(x - cf.bL), 0.0)
                a1 = jnp.where(fixed, dxf, a1 - cf.P.mv(dxf) - DB * dxf)
                a2 = a2 - cs * cf.K.mv(dxf)
            u = linear_solve(operator, jnp.concatenate([a1, a2]), solver, state=state).value
            dx = u[:n]
            dlam = cs * u[n:]
            drs = rec(cf.K.mv(dx), dlam)
            if nb:
                # Bound multipliers from the stationarity rows (no division by
                # a vanishing slack); exact for fixed variables.
                dlam_b = -dual - cf.P.mv(dx) - cf.K.rmv(dlam)
                assert brec is not None
                dbs = brec(dx, dlam_b)
            else:
                dbs = bs
            return dx, drs, dbs

        return direction, rs, bs, cf, res

    def _dual_path(self, cf: _Canonical, d: Array, c: Array, nb: int) -> tuple[Array, Array]:
        """`(p_factor_inv, row_gram)` of `_DualFactor` when the QP has no bounds
        (then $A = P + \\mathrm{diag}((\\delta_r + \\delta_f)/(c d^2))$ is the
        same at every step) and `kkt_reduction` allows it; two empty arrays
        otherwise (the primal path). Cost, once: $n^3/3 + n^2 r + n r^2$."""
        n, r = cf.q.shape[0], cf.K.rows
        dt = cf.q.dtype
        reduction = self.kkt_reduction
        if reduction == "auto":
            reduction = "dual" if (nb == 0 and 0 < r <= n) else "primal"
        if reduction == "primal" or r == 0:
            return jnp.zeros((0, 0), dt), jnp.zeros((0, 0), dt)
        regularization, factorization_regularization, _ = self._shifts(dt)
        A = cf.P.dense() + jnp.diag((regularization + factorization_regularization) / (c * d**2))
        p_factor_inv = jsl.solve_triangular(_cholesky(A), jnp.eye(n, dtype=dt), lower=True)
        W = p_factor_inv @ cf.K.dense(dt).T
        return p_factor_inv, W.T @ W

    def init(self, x0: Float[Array, " n"] | None, theta: QP) -> tuple[_PrimalDual, _Aux]:
        check_qp(theta)
        qp = jax.lax.stop_gradient(theta)
        n, m, p = qp.sizes
        dt = qp.Q.dtype
        if x0 is not None:
            x0 = jnp.asarray(x0)
            if x0.shape != (n,):
                raise ValueError(
                    f"InteriorPointQP: `x0` must have shape (n,) = ({n},), got {x0.shape}."
                )
        k, nb = qp.rows, qp.lb.shape[0]
        if self.kkt_reduction == "dual" and nb:
            raise ValueError(
                "InteriorPointQP(kkt_reduction='dual') needs a QP without bounds (lb, ub): "
                "bounds change the (1,1) block at every step. Use 'auto' or 'primal'."
            )
        cf = _canonical(qp)
        unit = _error_unit(cf)
        d, e, c = _ruiz(cf.P.dense(), cf.K.dense(dt), cf.q, floor=1e-8 * unit)
        inf = jnp.asarray(jnp.inf, dt)
        p_factor_inv, row_gram = self._dual_path(cf, d, c, nb)
        aux = _Aux(
            RESULTS.where(_convex(cf, d, e, c), RESULTS.successful, RESULTS.nonconvex),
            d, e, c, unit, inf, inf, jnp.zeros((), jnp.int32), inf, p_factor_inv, row_gram,
        )

        def placeholder(size):
            return _Sides(*(jnp.ones((size,), dt) if i % 2 == 0 else jnp.zeros((size,), dt)
                            for i in range(4)))

        # Starting point: the Newton system with every pair at z/s = D,
        # i.e. min ½xᵀPx + qᵀx + ½Σ D (v - t)² over rows and bounds, with
        # targets t at the finite bound (the midpoint of two finite ones) and
        # equalities exact (CVXOPT's start for Gx <= h); then slacks and duals
        # shifted to be positive in scaled units.
        w0 = _PrimalDual(
            x=jnp.zeros((n,), dt), s=jnp.ones((p,), dt), z=jnp.ones((p,), dt),
            y=jnp.zeros((m,), dt), rows=placeholder(k), bounds=placeholder(nb),
        )
        # The weights D come from the *relative* Ruiz factors (divided by their
        # geometric means, no cost scaling): D = e_rel² for rows and 1/d_rel² for
        # bounds. Data whose rows and columns are already balanced (the
        # paper's random QPs: relative factors within 10% of 1) thus start at
        # about CVXOPT's point, D = 1, while badly balanced rows and columns are
        # still equilibrated. Measured (float64, random QPs n = 100/300/1000
        # and the 27 Maros-Meszaros problems with n <= 250): the fully scaled
        # weights (D = e²/c) took 10/14/18 steps on the random QPs and 689 on
        # the set, the original units (D = 1) 9/11/14 and 708 (QADLITTL 84
        # instead of 52), these relative weights 9/12/14 and 673 (the fewest;
        # QSC205 and QSHARE2B reach 200 steps with all three); the shift stays
        # in fully scaled units (in relative units QADLITTL did not converge).
        e_rel = _relative(e)
        d_rel = _relative(d)
        rD = e_rel**2

        def start_pairs(L, U, eq, hl, hu, D, unit):
            two = hl & hu
            sl = jnp.where(hl, jnp.where(two, 0.5 * (U - L), unit), 1.0)
            su = jnp.where(hu, jnp.where(two, 0.5 * (U - L), unit), 1.0)
            half = jnp.where(two, 0.5, 1.0)
            zl = jnp.where(hl, half * D * sl, 0.0)
            zu = jnp.where(hu, half * D * su, 0.0)
            t = jnp.where(two, 0.5 * (L + U), jnp.where(hl, L + sl, jnp.where(hu, U - su, 0.0)))
            return _Sides(sl, zl, su, zu), t

        rs0, t_rows = start_pairs(cf.L, cf.U, cf.eq, cf.hl, cf.hu, rD, 1.0 / e_rel)
        if nb:
            bD = 1.0 / d_rel**2
            bs0, t_b = start_pairs(cf.bL, cf.bU, cf.beq, cf.bhl, cf.bhu, bD, d_rel)
        else:
            bD = t_b = jnp.zeros((0,), dt)
            bs0 = placeholder(0)
        w1 = _from_row_sides(w0, w0.x, rs0, bs0)
        direction, rs, bs, _, _ = self._newton(w1, qp, aux)
        zr = jnp.zeros_like(cf.L)
        zb = jnp.zeros((nb,), dt)
        dx, drs, dbs = direction(zr, zr, zb, zb)
        x = dx  # from x = 0
        if x0 is not None:
            x = jax.lax.stop_gradient(x0).astype(dt)
        lam = jnp.where(cf.eq, drs.zl, rD * (cf.K.mv(dx) - t_rows))
        v = cf.K.mv(x)
        # Slacks from x; duals from the multiplier estimate, shifted positive
        # (in scaled units: s·e for rows, s/d for bounds; z/e·c, z·d·c).
        sl = jnp.where(cf.hl, v - cf.L, 1.0)
        su = jnp.where(cf.hu, cf.U - v, 1.0)
        zl = jnp.where(cf.hl, -lam, 0.0)
        zu = jnp.where(cf.hu, lam, 0.0)
        rows_s = _Sides(
            sl=_shift_positive(sl * e, cf.hl) / e, zl=_shift_positive(zl * c / e, cf.hl) * e / c,
            su=_shift_positive(su * e, cf.hu) / e, zu=_shift_positive(zu * c / e, cf.hu) * e / c,
        )
        rows_s = eqx.tree_at(lambda t: t.zl, rows_s, jnp.where(cf.eq, lam, rows_s.zl))
        if nb:
            blam = jnp.where(cf.beq, dbs.zl, bD * (dx - t_b))
            bsl = jnp.where(cf.bhl, x - cf.bL, 1.0)
            bsu = jnp.where(cf.bhu, cf.bU - x, 1.0)
            bzl = jnp.where(cf.bhl, -blam, 0.0)
            bzu = jnp.where(cf.bhu, blam, 0.0)
            b_s = _Sides(
                sl=_shift_positive(bsl / d, cf.bhl) * d, zl=_shift_positive(bzl * c * d, cf.bhl) / (c * d),
                su=_shift_positive(bsu / d, cf.bhu) * d, zu=_shift_positive(bzu * c * d, cf.bhu) / (c * d),
            )
            b_s = eqx.tree_at(lambda t: t.zl, b_s, jnp.where(cf.beq, blam, b_s.zl))
        else:
            b_s = bs
        w = _from_row_sides(w0, x, rows_s, b_s)
        return w, aux

    def step(self, z: _PrimalDual, aux: _Aux, theta: QP) -> tuple[_PrimalDual, _Aux]:
        qp, w = theta, z
        direction, rs, bs, cf, res = self._newton(w, qp, aux)
        nb = bs.sl.shape[0]
        eps = float(jnp.finfo(w.x.dtype).eps)  # the data's precision

        def products(r: _Sides, b: _Sides):
            pr = jnp.concatenate([jnp.where(cf.hl, r.sl * r.zl, 0.0), jnp.where(cf.hu, r.su * r.zu, 0.0)])
            if nb:
                pr = jnp.concatenate([pr, jnp.where(cf.bhl, b.sl * b.zl, 0.0),
                                      jnp.where(cf.bhu, b.su * b.zu, 0.0)])
            return pr

        count = jnp.sum(cf.hl) + jnp.sum(cf.hu) + (jnp.sum(cf.bhl) + jnp.sum(cf.bhu) if nb else 0)
        count = jnp.maximum(count, 1)
        mu = jnp.sum(products(rs, bs)) / count

        def go(tl, tu, btl, btu):
            return direction(tl, tu, btl, btu)

        def alpha_max(dr: _Sides, db: _Sides):
            steps = [_max_step(jnp.where(cf.hl, rs.sl, 1.0), dr.sl), _max_step(jnp.where(cf.hl, rs.zl, 1.0), jnp.where(cf.hl, dr.zl, 0.0)),
                     _max_step(jnp.where(cf.hu, rs.su, 1.0), dr.su), _max_step(jnp.where(cf.hu, rs.zu, 1.0), dr.zu)]
            if nb:
                steps += [_max_step(jnp.where(cf.bhl, bs.sl, 1.0), db.sl), _max_step(jnp.where(cf.bhl, bs.zl, 1.0), jnp.where(cf.bhl, db.zl, 0.0)),
                          _max_step(jnp.where(cf.bhu, bs.su, 1.0), db.su), _max_step(jnp.where(cf.bhu, bs.zu, 1.0), db.zu)]
            return jnp.min(jnp.stack(steps))

        zb = jnp.zeros((nb,), rs.sl.dtype)
        tl0 = -jnp.where(cf.hl, rs.sl * rs.zl, 0.0)
        tu0 = -jnp.where(cf.hu, rs.su * rs.zu, 0.0)
        btl0 = -jnp.where(cf.bhl, bs.sl * bs.zl, 0.0) if nb else zb
        btu0 = -jnp.where(cf.bhu, bs.su * bs.zu, 0.0) if nb else zb
        dxa, dra, dba = go(tl0, tu0, btl0, btu0)
        alpha_a = jnp.minimum(1.0, alpha_max(dra, dba))

        def add(a: _Sides, da: _Sides, t):
            return jax.tree.map(lambda u, du: u + t * du, a, da)

        mu_a = jnp.sum(products(add(rs, dra, alpha_a), add(bs, dba, alpha_a) if nb else bs)) / count
        positive = mu > 0
        safe_mu = jnp.where(positive, mu, 1.0)
        sigma = jnp.where(positive, jnp.clip(mu_a / safe_mu, 0.0, 1.0) ** 3, 0.0)
        # The centring target σμ is the path-following heuristic, like α, η
        # and ω: it carries no derivative. At the solution μ = 0, so it
        # changes the derivative by O(μ) only; but at float32's rounding
        # floor the computed σ is 1 (μ^a is rounding of the primal residual,
        # ~ε|h|, far above μ ~ 1e-14) and σ ∂μ/∂s = σ z/p differentiated the
        # step map by O(1) in the directions of the vanishing slacks and
        # duals: ‖J_w F‖ came out 0.04 to 2.9 (test matrix's float32 QP,
        # truncated_auto under vmap: refused not_contracting), where the
        # same state in float64 gives 5e-13; with σμ frozen, 3e-7.
        sm = jax.lax.stop_gradient(sigma * mu)
        tl = jnp.where(cf.hl, tl0 + sm - dra.sl * dra.zl, 0.0)
        tu = jnp.where(cf.hu, tu0 + sm - dra.su * dra.zu, 0.0)
        btl = jnp.where(cf.bhl, btl0 + sm - dba.sl * dba.zl, 0.0) if nb else zb
        btu = jnp.where(cf.bhu, btu0 + sm - dba.su * dba.zu, 0.0) if nb else zb
        dx, dr, db = go(tl, tu, btl, btu)
        # Weighted corrector (Colombo & Gondzio, 2008): the direction is
        # Δ^a + ω (Δ - Δ^a), with ω the largest of 1, 1/2, ..., 1/16, 0 whose
        # step to the boundary is at least 90% of the longest of them. The
        # directions are linear in the targets, so this costs no solve. Plain
        # Mehrotra (ω = 1) can take a corrector that steps into the boundary
        # while the predictor does not: on QBORE3D the predictor's step
        # stayed at 0.91 while the corrector's fell to 2e-3, then 1e-6, and
        # the iterates jammed at a KKT error of 4.6e3. Near the solution the
        # corrector's step tends to 1 and ω = 1. ω carries no derivative:
        # both directions are Newton steps of the same system, whose
        # targets vanish at the solution.
        omegas = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)

        def weighted(omega, predictor, corrector):
            return jax.tree.map(lambda a, c: a + omega * (c - a), predictor, corrector)

        # The pairs' steps decide ω; the primal step follows.
        pairs_a, pairs_c = (dra, dba), (dr, db)
        reach = jnp.stack([alpha_max(*weighted(o, pairs_a, pairs_c)) for o in omegas])
        reach = jnp.minimum(1.0, jnp.where(jnp.isnan(reach), 0.0, reach))
        good = reach >= 0.9 * jnp.max(reach)
        omega = jax.lax.stop_gradient(
            jnp.asarray(omegas, reach.dtype)[jnp.argmax(good)]
        )
        dx, (dr, db) = weighted(omega, dxa, dx), weighted(omega, pairs_a, pairs_c)
        # The fraction to the boundary tends to 1 with the gap, so that the
        # last, differentiated steps are full Newton steps up to O(μ)
        # (a fixed 0.99999 would bias the one-step derivative by 1e-5).
        # Capped below 1 so that no slack or dual becomes 0 (the elimination
        # divides by slacks): s + αΔs ≥ (1 - η) s exactly, and its rounding
        # is ~ε s, so the cap keeps 1 - η ≥ 16ε. A cap of 1 - 1e-12 rounds
        # to 1 in float32: a slack then came out at -2e-19 and the next step
        # was NaN (2 of 128 random QPs with n = 50, `benchmarks/batched_qp.py`).
        # The derivative is the full Newton step's, whatever η (see below).
        headroom = max(1e-12, 16 * eps)
        eta = jnp.clip(1.0 - mu, self.eta_min, 1.0 - headroom)
        # The step length is a safeguard (which pair reaches the boundary
        # first), like Newton's line search: it carries no derivative.
        # Differentiating it adds Δ ∂α/∂θ with ∂α_max ∝ 1/s_i for a pair
        # whose s_i → 0: measured 10x worse one-step derivatives (QP
        # n=300: 1.8e-7 instead of 1.7e-8; n=1000: 9e-7 instead of 8e-8).
        # A problem refused by `init` (non-convex) keeps its code and its
        # starting point: a zero step. (Gating on the step length, a constant
        # of the linearisation, rather than selecting between `new` and `w`:
        # that select made jaxlib 0.10 lower the linearised step's Cholesky
        # as an untyped custom call, "No registered implementation for
        # untyped custom call to lapack_dpotrf_ffi", in the error estimate's
        # power iterations.)
        ok = aux.result == RESULTS.successful
        alpha = jax.lax.stop_gradient(
            jnp.where(ok, jnp.minimum(1.0, eta * alpha_max(dr, db)), 0.0)
        )
        # The value is w + αΔ; the derivative is that of the full Newton step
        # w + Δ(w, θ) (zero for a refused problem). With α merely frozen, the
        # one-step derivative would be α times the implicit one, biased by
        # 1 - α of whichever step happened to be last: measured 1e-5 (random
        # QP n = 300) where a pair near the boundary held the last α at
        # 1 - 1e-5. Newton's map has J_w = 0 at the solution (Corollary 3)
        # whatever α the iterates took.
        gate = jax.lax.stop_gradient(jnp.where(ok, 1.0, 0.0))

        def advance(u, du):
            frozen = jax.lax.stop_gradient(du)
            return u + alpha * frozen + gate * (du - frozen)

        new_rows = jax.tree.map(advance, rs, dr)
        new_b = jax.tree.map(advance, bs, db) if nb else bs
        new = _from_row_sides(w, advance(w.x, dx), new_rows, new_b)
        certificate, new_res = self._certificate(new, qp, aux, w)
        result = RESULTS.where(ok, certificate, aux.result)
        # Bookkeeping for `residual_norm`, not part of the differentiated map.
        errors = jax.lax.stop_gradient(
            (_kkt_error(res, w, cf) / aux.error_unit, _kkt_error(new_res, new, cf) / aux.error_unit)
        )
        # At the rounding floor of the data's precision the KKT error stops
        # decreasing above a tolerance it cannot reach (float32, a few hundred
        # variables: 1e-4, measured in `benchmarks/batched_qp.py`): report
        # `stalled` instead of running to `max_steps` and blaming the step map.
        # Progress is measured against the best error so far, not the last
        # one: at the floor the error jitters (CVXQP3_M: 1e-9 to 6e-9, down
        # by more than 10% every few steps), and against the last error the
        # count restarted until μ underflowed (1e-12 per step) and the
        # iterate became NaN.
        floor = eps**0.5
        no_progress = (errors[1] > 0.9 * aux.best_error) & (errors[1] <= floor)
        stalls = jnp.where(no_progress, aux.stalls + 1, 0)
        best_error = jnp.minimum(aux.best_error, errors[1])
        result = RESULTS.where(
            (result == RESULTS.successful) & (stalls >= _STALL), RESULTS.stalled, result
        )
        return new, _Aux(result, aux.d, aux.e, aux.c, aux.error_unit, *errors, stalls, best_error,
                         aux.p_factor_inv, aux.row_gram)

    def _certificate(
        self, w: _PrimalDual, qp: QP, aux: _Aux, previous: _PrimalDual
    ) -> tuple[RESULTS, _KKTResidual]:
        """`RESULTS.infeasible` when the iterate carries a Farkas certificate of
        primal infeasibility or of unboundedness (tests in Ruiz-scaled units).
        The primal certificate is sought in the multipliers $\\lambda$ and in
        their last change $\\lambda_k - \\lambda_{k-1}$ (OSQP's test): on an
        infeasible problem the iterates jam against the boundary once the
        multipliers are large, and $\\lambda$ itself then stays a few digits
        short of a certificate, while its change along the Farkas ray has
        $K^\\top \\delta\\lambda = -P\\,\\delta x \\approx 0$."""
        _, _, tol = self._shifts(qp.Q.dtype)
        cf = _canonical(qp)
        d, e = aux.d, aux.e
        res = kkt_residual(w, qp)
        lam, blam = res.lam, res.blam

        def support(lm, L, U, eq, hl, hu):
            return jnp.sum(jnp.where(eq, L * lm, jnp.where(hu, U * jnp.maximum(lm, 0.0), 0.0)
                                     + jnp.where(hl, L * jnp.minimum(lm, 0.0), 0.0)))

        def cone(lm, eq, hl, hu):
            # The part of a multiplier change with the sign its sides allow
            # (λ itself has it by construction).
            return jnp.where(eq | (hl & hu), lm,
                             jnp.where(hu, jnp.maximum(lm, 0.0),
                                       jnp.where(hl, jnp.minimum(lm, 0.0), 0.0)))

        # Scaled units: λ̂ = λ/e (rows), residual d ⊙ (Kᵀλ), rhs e ⊙ (L, U).
        scale = 1 + jnp.maximum(_amax(e * cf.L), _amax(e * cf.U))

        def farkas(lam, blam):
            # Primal infeasibility: Kᵀλ + λ_b = 0 and Σ U λ⁺ + L λ⁻ < 0.
            lam = cone(lam, cf.eq, cf.hl, cf.hu)
            Ktl = cf.K.rmv(lam)
            t_p = -support(lam, cf.L, cf.U, cf.eq, cf.hl, cf.hu)
            if blam.size:
                blam = cone(blam, cf.beq, cf.bhl, cf.bhu)
                Ktl = Ktl + blam
                t_p = t_p - support(blam, cf.bL, cf.bU, cf.beq, cf.bhl, cf.bhu)
            r_p = _amax(d * Ktl)
            lam_norm = jnp.maximum(_amax(lam / e), _amax(blam * d) if blam.size else 0.0)
            return (t_p > 0) & (r_p * scale <= tol * t_p) & (lam_norm > 0)

        rs0 = _row_sides(previous)
        lam0 = _multiplier(rs0, cf.eq, cf.hl, cf.hu)
        blam0 = _multiplier(previous.bounds, cf.beq, cf.bhl, cf.bhu)
        primal = farkas(lam, blam) | farkas(lam - lam0, blam - blam0)
        # Unboundedness: Px = 0, x in the recession cone, qᵀx < 0.
        x = w.x
        t_d = -jnp.dot(cf.q, x)
        Kx = cf.K.mv(x)

        def cone_violation(v, eq, hl, hu, sc):
            return _amax(sc * jnp.where(eq, v, jnp.where(hu, jnp.maximum(v, 0.0), 0.0)
                                        + jnp.where(hl, jnp.maximum(-v, 0.0), 0.0)))

        r_d = jnp.maximum(_amax(d * cf.P.mv(x)), cone_violation(Kx, cf.eq, cf.hl, cf.hu, e))
        if blam.size:
            r_d = jnp.maximum(r_d, cone_violation(x, cf.beq, cf.bhl, cf.bhu, 1.0 / d))
        dual = (t_d > 0) & (r_d * (1 + _amax(d * cf.q)) <= tol * t_d)
        # The residual at `w` too: the step turns it into `kkt_error`.
        return RESULTS.where(primal | dual, RESULTS.infeasible, RESULTS.successful), res

    def value(self, z: _PrimalDual) -> Float[Array, " n"]:
        return z.x

    def optimality(self, z: _PrimalDual, aux: _Aux, theta: QP) -> _PrimalDual:
        """The KKT residual $\\Phi(w, \\theta)$, in the slots of $w$: the dual
        residual in `x`; for each constraint its primal residual and
        complementarity (placeholder equations on infinite sides). A square
        system, invertible at a strictly complementary solution with linearly
        independent active constraints."""
        r = kkt_residual(z, theta)
        m, p = z.y.shape[0], z.s.shape[0]
        rows = r.rows
        return _PrimalDual(
            x=r.dual,
            s=rows.su[m : m + p],
            z=rows.zu[m : m + p],
            y=rows.sl[:m],
            rows=_Sides(rows.sl[m + p :], rows.zl[m + p :], rows.su[m + p :], rows.zu[m + p :]),
            bounds=r.bounds,
        )

    def residual_norm(
        self, z: _PrimalDual, new_z: _PrimalDual, new_aux: _Aux, theta: QP
    ) -> Scalar:
        """The larger absolute KKT error of $w_{k-1}$ (`z`) and $w_k$
        (`new_z`): the max of the primal residual, the dual residual, the
        duality gap, the largest complementarity product and the largest
        $\\min(s_i, z_i)^2 / \\max(s_i, z_i)$ (see the class docstring). Requiring $w_{k-1}$ to
        be converged too costs about one extra step and makes the
        differentiated last step start at the solution, so that `OneStep` is
        as accurate as `Implicit`. Both were computed by the step that made
        `new_aux` from `z` (`_Aux`); `kkt_error` computes one directly."""
        del z, new_z, theta
        return jnp.maximum(new_aux.previous_error, new_aux.error)

    def status(self, aux: _Aux) -> RESULTS:
        return aux.result


def kkt_error(w: _PrimalDual, qp: QP) -> Scalar:
    """The absolute KKT error of $w$ on `qp` (the stopping measure, before
    it is divided by the error unit $\\min(1, m)$; see "Stopping")."""
    return _kkt_error(kkt_residual(w, qp), w, _canonical(qp))


def _error_unit(cf: _Canonical) -> Scalar:
    """$\\min(1, m)$, $m$ the largest datum in absolute value ($P$, $q$, the
    rows, their finite sides and the finite bounds). Every term of the KKT
    error scales like the data when all of them are scaled together (x and
    the multipliers do not change), so the error divided by this unit stops a
    QP scaled by 1e-8 where it stops the original; data of size 1 or more are
    measured in absolute terms, as the QP benchmarks do."""

    def finite_max(v):
        return _amax(jnp.where(jnp.isfinite(v), v, 0.0))

    largest = jnp.max(jnp.stack([
        _amax(cf.P.Q), _amax(cf.q), *(_amax(B) for B in cf.K.blocks),  # no dense copy of K
        finite_max(cf.L), finite_max(cf.U), finite_max(cf.bL), finite_max(cf.bU),
    ]))
    # All-zero data (or NaN, which the solve reports as non-finite): unit 1.
    return jnp.where(largest > 0, jnp.minimum(largest, 1.0), 1.0)


def _kkt_error(r: _KKTResidual, w: _PrimalDual, cf: _Canonical) -> Scalar:
    """`kkt_error` from the residual `r = kkt_residual(w, qp)` already at hand."""
    slack = jnp.maximum(
        jnp.maximum(_amax(jnp.where(cf.hl | cf.eq, r.rows.sl, 0.0)), _amax(jnp.where(cf.hu, r.rows.su, 0.0))),
        jnp.maximum(_amax(jnp.where(cf.bhl | cf.beq, r.bounds.sl, 0.0)), _amax(jnp.where(cf.bhu, r.bounds.su, 0.0))),
    )
    comp = jnp.maximum(
        jnp.maximum(_amax(jnp.where(cf.hl, r.rows.zl, 0.0)), _amax(jnp.where(cf.hu, r.rows.zu, 0.0))),
        jnp.maximum(_amax(jnp.where(cf.bhl, r.bounds.zl, 0.0)), _amax(jnp.where(cf.bhu, r.bounds.zu, 0.0))),
    )
    # Weak activity, min(s, z)^2 / max(s, z) per pair: at a weakly active
    # constraint (s, z -> 0 together) the product s z is the square of the
    # error in x, and a small product alone stopped at x ~ sqrt(tol). The
    # measure is ~min(s, z) there and negligible at a strictly complementary
    # pair (so that it adds no steps, which cost OneStep accuracy, there).
    rs, bs = _row_sides(w), w.bounds

    def weak(has, s, z):
        lo, hi = jnp.minimum(s, z), jnp.maximum(s, z)
        return _amax(jnp.where(has, lo * lo / jnp.where(hi > 0, hi, 1.0), 0.0))

    near = jnp.maximum(
        jnp.maximum(weak(cf.hl, rs.sl, rs.zl), weak(cf.hu, rs.su, rs.zu)),
        jnp.maximum(weak(cf.bhl, bs.sl, bs.zl), weak(cf.bhu, bs.su, bs.zu)),
    )
    return jnp.max(jnp.stack([_amax(r.dual), r.violation, slack, r.gap, comp, near]))


def _convex(cf: _Canonical, d: Array, e: Array, c: Array) -> Array:
    """Whether the QP is convex up to rounding: its Ruiz-scaled $P$ is
    positive semidefinite on the null space of the equalities (fixed variables
    removed), tested by one Cholesky factorisation in `init` of
    $\\hat P + \\rho \\hat A_{eq}^\\top \\hat A_{eq} + \\tau I$ with
    $\\rho = 10^4$, $\\tau = \\sqrt\\epsilon \\max(1, \\max_i M_{ii})$. NaN data
    is not reported here (the solve reports it as non-finite)."""
    n = d.shape[0]
    eps = float(jnp.finfo(d.dtype).eps)
    keep = ~cf.beq if cf.beq.size else jnp.ones((n,), bool)
    M = c * (d[:, None] * cf.P.dense() * d[None, :])
    if cf.K.rows:
        Ks = jnp.where(cf.eq[:, None], e[:, None] * cf.K.dense(M.dtype) * d[None, :], 0.0)
        M = M + 1e4 * Ks.T @ Ks
    M = jnp.where(keep[:, None] & keep[None, :], M, 0.0)
    tau = eps**0.5 * jnp.maximum(1.0, jnp.max(jnp.diag(M)))
    L = jnp.linalg.cholesky(M + jnp.diag(jnp.where(keep, tau, 1.0)))
    return jnp.all(jnp.isfinite(L)) | ~jnp.all(jnp.isfinite(M))


def _ruiz(
    P: Array, K: Array, q: Array, iterations: int = 15, floor: Array | float = 1e-8
) -> tuple[Array, Array, Array]:
    """Ruiz equilibration of $\\begin{pmatrix} P & K^\\top \\\\ K & 0\\end{pmatrix}$:
    column scaling `d`, row scaling `e` (∞-norms of the scaled matrix ≈ 1), and a
    cost scaling `c` (OSQP's rule). Rows and columns whose norm is at most
    `floor` count as empty (`init` passes $10^{-8}$ times the error unit:
    absolute for data of size 1 or more, relative for smaller data, which
    an absolute floor would leave unscaled)."""
    n, r = P.shape[0], K.shape[0]
    d = jnp.ones((n,), P.dtype)
    e = jnp.ones((r,), P.dtype)

    def safe(v):
        return jnp.where(v > floor, v, 1.0)

    def sweep(_, de):
        d, e = de
        Ps = d[:, None] * P * d[None, :]
        Ks = e[:, None] * K * d[None, :]
        col = jnp.max(jnp.abs(Ps), axis=0)
        if r:
            col = jnp.maximum(col, jnp.max(jnp.abs(Ks), axis=0))
            e = e / jnp.sqrt(safe(jnp.max(jnp.abs(Ks), axis=1)))
        return d / jnp.sqrt(safe(col)), e

    d, e = jax.lax.fori_loop(0, iterations, sweep, (d, e))
    Ps = d[:, None] * P * d[None, :]
    scale = jnp.maximum(jnp.mean(jnp.max(jnp.abs(Ps), axis=0)), _amax(d * q))
    c = 1.0 / jnp.clip(scale, 1e-4, 1e4)
    return d, e, c


def _relative(v: Array) -> Array:
    """`v` divided by its geometric mean (scaling factors without their
    overall size); unchanged if empty."""
    return v / jnp.exp(jnp.mean(jnp.log(v))) if v.size else v


def _shift_positive(v: Array, mask: Array) -> Array:
    """CVXOPT's initial shift over the masked entries: if
    $\\min v \\le 10^{-8}\\max(\\|v\\|, 1)$, add $(1 + \\max(-v))$ so that every
    entry is at least 1. Entries off the mask are returned unchanged."""
    if v.size == 0:
        return v
    vm = jnp.where(mask, v, jnp.inf)
    t = jnp.max(jnp.where(mask, -v, -jnp.inf))
    norm = jnp.linalg.norm(jnp.where(mask, v, 0.0))
    shift = t >= -1e-8 * jnp.maximum(norm, 1.0)
    del vm
    return jnp.where(mask & shift, v + (1 + t), v)


_unused: Any = None
