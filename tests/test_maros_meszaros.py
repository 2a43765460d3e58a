"""InteriorPointQP on the smallest Maros–Meszaros problems: success on the
original problem (checked independently from the raw `.mat` data, with the QP
benchmarks' absolute residuals), one compilation for problems padded to the
same shapes, and derivatives (OneStep vs Implicit vs finite differences) where
the active set is stable. The full set runs in `benchmarks/maros_meszaros.py`."""

import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import itergrad as ig
from itergrad.problems._maros_meszaros import load_maros_meszaros
from itergrad.solvers._interior_point import kkt_residual

DATA = Path(
    os.environ.get(
        "ITERGRAD_MAROS_MESZAROS",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "maros_meszaros",
    )
)
pytestmark = pytest.mark.skipif(
    not (DATA / "HS21.mat").exists(),
    reason=f"Maros–Meszaros data not found at {DATA} (../shared absent; set "
    "ITERGRAD_MAROS_MESZAROS to the folder of .mat files)",
)

# Every problem with n <= 32 and at most 32 general rows, padded to one shape.
SMALL = ["GENHS28", "HS118", "HS21", "HS35", "HS35MOD", "HS52", "HS53", "LOTSCHD",
         "QAFIRO", "QPTEST", "TAME"]
PAD = (32, 32)
TOL = 1e-9  # absolute primal residual, dual residual and gap, as qpbenchmark's high accuracy
AGREE_TOL = 1e-6  # OneStep vs Implicit (relative)
FD_TOL = 1e-5  # Implicit vs central differences (relative)
# Active set stable: every constraint side has max(s, z) above this margin, and
# the finite-difference step moves no slack or dual by more than a tenth of it.
MARGIN = 1e-6

SOLVER = ig.InteriorPointQP()


@eqx.debug.assert_max_traces(max_traces=1)
def _solve_traced(qp):
    return ig.solve(SOLVER, None, qp, throw=False, rtol=0.0, atol=TOL, max_steps=200)


_solve = eqx.filter_jit(_solve_traced)


def _x_loss(estimator):
    def loss(qp, v):
        x = ig.solve(SOLVER, None, qp, estimator=estimator, rtol=0.0, atol=TOL,
                     max_steps=200).value
        return jnp.dot(v, x)

    return eqx.filter_jit(eqx.filter_grad(loss))


_grad_onestep = _x_loss(ig.OneStep())
_grad_implicit = _x_loss(ig.Implicit())


def _raw(name):
    import scipy.io

    d = scipy.io.loadmat(DATA / f"{name}.mat")
    P, A = d["P"].toarray(), d["A"].toarray()
    q, lo, hi = (np.asarray(d[k], float).ravel() for k in ("q", "l", "u"))
    lo = np.where(lo <= -9e19, -np.inf, lo)
    hi = np.where(hi >= 9e19, np.inf, hi)
    return P, q, A, lo, hi


def _benchmark_residuals(name, x, y):
    """qpbenchmark's primal residual, dual residual and duality gap of the
    original problem `l <= A x <= u` (A = [C; I]) at primal `x`, multipliers
    `y` (positive on upper sides)."""
    P, q, A, lo, hi = _raw(name)
    Ax = A @ x
    primal = max(np.max(np.maximum(Ax - hi, 0)), np.max(np.maximum(lo - Ax, 0)))
    dual = np.max(np.abs(P @ x + q + A.T @ y))
    up = np.where(np.isfinite(hi), hi, 0.0) @ np.maximum(y, 0)
    low = np.where(np.isfinite(lo), lo, 0.0) @ np.minimum(y, 0)
    gap = abs(x @ P @ x + q @ x + up + low)
    return primal, dual, gap


def _split(qp, sol, name):
    P, _, A, _, _ = _raw(name)
    n, k = P.shape[0], A.shape[0] - P.shape[0]
    r = kkt_residual(sol.state.z, qp)
    x = np.asarray(sol.value)[:n]
    y = np.concatenate([np.asarray(r.lam)[:k], np.asarray(r.blam)[:n]])
    return x, y, n


@pytest.fixture(scope="module")
def solved():
    out = {}
    for name in SMALL:
        qp = load_maros_meszaros(DATA / f"{name}.mat", pad=PAD)
        out[name] = (qp, _solve(qp))
    return out


def test_small_problems_solved_to_1e9(solved):
    for name, (qp, sol) in solved.items():
        assert sol.result == ig.RESULTS.successful, name
        x, y, _ = _split(qp, sol, name)
        primal, dual, gap = _benchmark_residuals(name, x, y)
        assert max(primal, dual, gap) <= TOL, (name, primal, dual, gap)


# Problems whose iterates jammed before the dual step of an inactive
# constraint side came from that side's own complementarity (the fraction to
# the boundary cut every step short on one dual: QSHARE2B stopped at a KKT
# error of 3.6e-3, QADLITTL ran out of its 200 steps). Padded to one shape.
JAMMED = ["QADLITTL", "QSHARE2B"]


def test_problems_that_jammed_are_solved():
    solve = eqx.filter_jit(
        lambda qp: ig.solve(SOLVER, None, qp, throw=False, rtol=0.0, atol=1e-6,
                            max_steps=200)
    )
    for name in JAMMED:
        qp = load_maros_meszaros(DATA / f"{name}.mat", pad=(128, 128))
        sol = solve(qp)
        assert sol.result == ig.RESULTS.successful, (name, int(sol.steps))
        x, y, _ = _split(qp, sol, name)
        primal, dual, gap = _benchmark_residuals(name, x, y)
        assert max(primal, dual, gap) <= 1e-6, (name, primal, dual, gap)


def test_one_compilation_for_padded_problems(solved):
    # Every padded problem has the same shapes and infinite entries are masks,
    # not removed rows: one trace for all (a second would raise).
    assert len(solved) == len(SMALL)
    assert eqx.debug.get_num_traces(_solve_traced) == 1


def _stable(sol):
    """The smallest max(s, z) over the inequality sides: the margin by which
    the active set is decided (strict complementarity)."""
    w = sol.state.z
    pairs = [(w.s, w.z), (w.rows.sl, w.rows.zl), (w.rows.su, w.rows.zu),
             (w.bounds.sl, w.bounds.zl), (w.bounds.su, w.bounds.zu)]
    # Placeholders are (1, 0) and never limit the margin.
    return min(float(jnp.min(jnp.maximum(s, z))) for s, z in pairs if s.size)


def _nondegenerate(qp, sol, name):
    """The derivative exists when the active set is stable: strict
    complementarity (every side has max(s, z) > MARGIN) and a nonsingular
    KKT matrix of the active constraints (LICQ and P positive definite on
    their null space): `[[P, Jᵀ], [J, 0]]` with condition number < 1e10.
    QAFIRO fails the second test (a degenerate vertex: Implicit's system is
    singular there and its gradient is 1e26)."""
    P, _, A, _, _ = _raw(name)
    n, k = P.shape[0], A.shape[0] - P.shape[0]
    w = sol.state.z
    active = np.zeros(A.shape[0], bool)
    eq_rows = np.asarray(qp.l_finite & qp.u_finite & (qp.l == qp.u))[:k]
    active[:k] = eq_rows | np.asarray(
        (qp.l_finite & (w.rows.zl > w.rows.sl)) | (qp.u_finite & (w.rows.zu > w.rows.su))
    )[:k]
    active[k:] = np.asarray(
        (qp.lb_finite & (w.bounds.zl > w.bounds.sl)) | (qp.ub_finite & (w.bounds.zu > w.bounds.su))
    )[:n]
    J = A[active]
    K = np.block([[P, J.T], [J, np.zeros((J.shape[0], J.shape[0]))]])
    return _stable(sol) > MARGIN and np.linalg.cond(K) < 1e10


def test_degenerate_vertex_is_detected(solved):
    qp, sol = solved["QAFIRO"]
    assert not _nondegenerate(qp, sol, "QAFIRO")


@pytest.mark.parametrize(
    "name", [pytest.param("HS118", marks=pytest.mark.slow), "HS21", "HS35"]
)
def test_derivatives_onestep_implicit_fd(solved, name):
    qp, sol = solved[name]
    assert _nondegenerate(qp, sol, name)
    n = _raw(name)[0].shape[0]
    key = jax.random.PRNGKey(0)
    v = jnp.zeros(PAD[0]).at[:n].set(jax.random.normal(key, (n,)))
    g_os = _grad_onestep(qp, v)
    g_im = _grad_implicit(qp, v)
    # All fields at once: on a vertex solution (HS118) x does not depend on q
    # and that block alone is rounding noise (1e-18).
    fields = ("Q", "q", "C", "l", "u", "lb", "ub")
    a, b = (np.concatenate([np.ravel(getattr(g, f)) for f in fields]) for g in (g_os, g_im))
    assert np.linalg.norm(a - b) <= AGREE_TOL * np.linalg.norm(b)
    # Central differences of vᵀx along a random direction in q and in the
    # finite entries of l and u.
    eps = 1e-6
    for field, k in (("q", 1), ("l", 2), ("u", 3)):
        base = getattr(qp, field)
        mask = {"q": jnp.ones_like(base, bool), "l": qp.l_finite, "u": qp.u_finite}[field]
        d = jnp.where(mask, jax.random.normal(jax.random.PRNGKey(k), base.shape), 0.0)

        def f(t, field=field, base=base, d=d):
            qp_t = eqx.tree_at(lambda p, f=field: getattr(p, f), qp, base + t * d)
            return jnp.dot(v, _solve(qp_t).value)

        fd = (f(eps) - f(-eps)) / (2 * eps)
        ad = jnp.vdot(getattr(g_im, field), d)
        assert abs(fd - ad) <= FD_TOL * (1 + abs(ad)), (field, fd, ad)
