"""InteriorPointQP and QP: solutions, derivatives of every field, transforms,
input validation and infeasibility reports."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.optimize

import itergrad as ig
from itergrad.problems import QP, random_qp

from .helpers import central_difference_jacobian, relative_error

KKT_TOL = 1e-8  # raw KKT residuals at the returned solution
REF_TOL = 1e-8  # x and Implicit's gradient against the active-set closed form
AGREE_TOL = 1e-8  # OneStep against Implicit (the paper claims 1e-6)
FD_TOL = 1e-6  # central differences with eps = 1e-6 carry ~1e-9 noise / curvature
# The library's default tolerances (1e-10 on the relative KKT error of the last
# two iterates). Much tighter ones make the differentiated step start past the
# float64 floor (gap ~1e-20), where one-step agreement degrades to ~3e-8.
TOL = dict(rtol=1e-10, atol=1e-10)
SOLVER = ig.InteriorPointQP()
# The larger size compiles every function of this file a second time: it runs
# in the slow tier (CI time budget); n = 20 covers the same code.
SIZES = [(20, 5, 10), pytest.param((60, 15, 30), marks=pytest.mark.slow)]


def _loss(qp, estimator):
    x = ig.solve(SOLVER, None, qp, estimator=estimator, **TOL).value
    return 0.5 * jnp.dot(x, x)


# Compiled once per shape and reused across tests: compilation dominates the
# run time of this file.
_solve = eqx.filter_jit(lambda qp: ig.solve(SOLVER, None, qp, throw=False, **TOL))
_solve_throw = eqx.filter_jit(lambda qp: ig.solve(SOLVER, None, qp, throw=True))
_grad = eqx.filter_jit(eqx.filter_grad(_loss))


def _active_set_reference(qp, x):
    """Independent reference: identify the active inequalities at `x`, solve the
    equality-constrained KKT system [[Q, Cᵀ], [C, 0]] with C = [A; G_act] in
    numpy, and return (x_ref, multipliers, gradient of ½‖x‖² w.r.t. every field).

    The KKT conditions of a convex QP are sufficient, so x_ref is certified
    optimal when its inactive constraints hold and its active multipliers are
    positive (checked by the caller)."""
    Q, q, A, b, G, h = (np.asarray(v) for v in (qp.Q, qp.q, qp.A, qp.b, qp.G, qp.h))
    n, m = Q.shape[0], A.shape[0]
    active = np.abs(G @ np.asarray(x) - h) < 1e-6
    C = np.vstack([A, G[active]])
    k = C.shape[0]
    K = np.block([[Q, C.T], [C, np.zeros((k, k))]])
    sol = np.linalg.solve(K, np.concatenate([-q, b, h[active]]))
    x_ref, lam = sol[:n], sol[n:]
    # x = [K⁻¹]ₓ (−q, b, h_act): the gradient of ½‖x‖² w.r.t. the right-hand
    # side is w = K⁻ᵀ (x, 0), and ∂(Q_sym x)/∂Q gives −sym(w_x xᵀ).
    w = np.linalg.solve(K.T, np.concatenate([x_ref, np.zeros(k)]))
    wx = w[:n]
    grad_h = np.zeros_like(h)
    grad_h[active] = w[n + m :]
    grads = {
        "Q": -0.5 * (np.outer(wx, x_ref) + np.outer(x_ref, wx)),
        "q": -wx,
        "b": w[n : n + m],
        "h": grad_h,
    }
    return x_ref, lam, active, grads


@pytest.fixture(scope="module", params=SIZES, ids=["n20-m5-p10", "n60-m15-p30"])
def problem(request):
    n, m, p = request.param
    qp = random_qp(jr.PRNGKey(n), n, m, p)
    sol = _solve(qp)
    return qp, sol


def test_solution_kkt_and_reference(problem):
    qp, sol = problem
    assert sol.result == ig.RESULTS.successful
    st = sol.state.z
    x, s, z, y = (np.asarray(v) for v in (st.x, st.s, st.z, st.y))
    Q, q, A, b, G, h = (np.asarray(v) for v in (qp.Q, qp.q, qp.A, qp.b, qp.G, qp.h))
    assert np.max(np.abs(Q @ x + q + A.T @ y + G.T @ z)) < KKT_TOL
    assert np.max(np.abs(A @ x - b)) < KKT_TOL
    assert np.max(np.abs(G @ x + s - h)) < KKT_TOL
    assert np.min(s) > 0 and np.min(z) > 0
    assert np.max(s * z) < KKT_TOL
    x_ref, lam, active, _ = _active_set_reference(qp, x)
    m = A.shape[0]
    assert np.all(G[~active] @ x_ref < h[~active])  # primal feasible
    assert np.all(lam[m:] > 0)  # dual feasible: x_ref is the global solution
    assert np.max(np.abs(x - x_ref)) < REF_TOL * (1 + np.max(np.abs(x_ref)))
    np.testing.assert_allclose(y, lam[:m], rtol=1e-7, atol=1e-7)


def _loss_value(qp):
    x = _solve(qp).value
    return 0.5 * jnp.dot(x, x)


def test_solution_matches_scipy():
    n, m, p = 20, 5, 10
    qp = random_qp(jr.PRNGKey(n), n, m, p)
    Q, q, A, b, G, h = (np.asarray(v) for v in (qp.Q, qp.q, qp.A, qp.b, qp.G, qp.h))
    ref = scipy.optimize.minimize(
        lambda x: 0.5 * x @ Q @ x + q @ x,
        np.zeros(n),
        jac=lambda x: Q @ x + q,
        method="SLSQP",
        constraints=[
            {"type": "eq", "fun": lambda x: A @ x - b, "jac": lambda x: A},
            {"type": "ineq", "fun": lambda x: h - G @ x, "jac": lambda x: -G},
        ],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert ref.success
    # SLSQP is the looser of the two: 1e-6 is its accuracy, not ours.
    np.testing.assert_allclose(_solve(qp).value, ref.x, atol=1e-6)


def test_gradients_all_fields(problem):
    """OneStep ≈ Implicit ≈ active-set closed form for b, h, q, Q at once."""
    qp, sol = problem
    _, _, _, ref = _active_set_reference(qp, sol.value)
    g_im = _grad(qp, ig.Implicit())
    g_os = _grad(qp, ig.OneStep())
    for field, g_ref in ref.items():
        im, os_ = getattr(g_im, field), getattr(g_os, field)
        assert relative_error(im, g_ref) < REF_TOL, field
        assert relative_error(os_, im) < AGREE_TOL, field
    # Fields not in the closed form: A and G, checked between estimators.
    for field in ("A", "G"):
        assert relative_error(getattr(g_os, field), getattr(g_im, field)) < AGREE_TOL


@pytest.mark.slow  # n = 300 compile; the smaller sizes stay in the default run
def test_one_step_at_a_larger_size_is_not_biased_by_the_step_length():
    """The last step's length α carries no derivative: differentiating the
    fraction-to-boundary rule added Δ ∂α/∂θ and left OneStep 1.9e-8 away from
    Implicit here (measured); without it the gap is 3.6e-9, the (1 - α) of
    the last step, the same in every field."""
    qp = random_qp(jr.PRNGKey(300), 300, 75, 150)
    g_os, g_im = _grad(qp, ig.OneStep()), _grad(qp, ig.Implicit())
    for field in ("b", "h", "q"):
        assert relative_error(getattr(g_os, field), getattr(g_im, field)) < 1e-8, field


def test_gradient_b_finite_differences(problem):
    qp, _ = problem

    def loss_b(b):
        return _loss_value(eqx.tree_at(lambda t: t.b, qp, b))

    fd = central_difference_jacobian(loss_b, qp.b)
    assert relative_error(_grad(qp, ig.Implicit()).b, fd) < FD_TOL
    assert relative_error(_grad(qp, ig.OneStep()).b, fd) < FD_TOL


def test_directional_finite_differences_other_fields():
    qp = random_qp(jr.PRNGKey(SIZES[0][0]), *SIZES[0])
    g = _grad(qp, ig.OneStep())
    keys = jr.split(jr.PRNGKey(7), 3)
    eps = 1e-6
    for key, field in zip(keys, ("h", "q", "Q"), strict=True):
        v = jr.normal(key, getattr(qp, field).shape)
        plus = eqx.tree_at(lambda t, f=field: getattr(t, f), qp, getattr(qp, field) + eps * v)
        minus = eqx.tree_at(lambda t, f=field: getattr(t, f), qp, getattr(qp, field) - eps * v)
        fd = (_loss_value(plus) - _loss_value(minus)) / (2 * eps)
        ad = jnp.vdot(getattr(g, field), v)
        assert abs(fd - ad) < FD_TOL * (1 + abs(ad)), field


def test_jit_and_vmap_over_b():
    qp = random_qp(jr.PRNGKey(SIZES[0][0]), *SIZES[0])
    bs = qp.b + 0.1 * jr.normal(jr.PRNGKey(1), (3,) + qp.b.shape)

    def loss_b(b):
        x = ig.solve(SOLVER, None, eqx.tree_at(lambda t: t.b, qp, b), **TOL).value
        return 0.5 * jnp.sum(x**2), x

    (_, xs), gs = jax.jit(jax.vmap(jax.value_and_grad(loss_b, has_aux=True)))(bs)
    for i in range(3):
        qp_i = eqx.tree_at(lambda t: t.b, qp, bs[i])
        np.testing.assert_allclose(xs[i], _solve(qp_i).value, rtol=1e-10, atol=1e-10)
        # Batched and unbatched LU round differently; the one-step estimate
        # itself is only ~1e-9 accurate here, so ask for agreement at that level.
        np.testing.assert_allclose(gs[i], _grad(qp_i, ig.OneStep()).b, rtol=1e-7, atol=1e-9)


@pytest.mark.slow  # two more QP compiles: slow tier (CI time budget)
@pytest.mark.parametrize("kind", ["equality_only", "inequality_only"])
def test_one_kind_of_constraint(kind):
    full = random_qp(jr.PRNGKey(4), 12, 4, 8)
    if kind == "equality_only":
        qp = QP(full.Q, full.q, A=full.A, b=full.b)
    else:
        qp = QP(full.Q, full.q, G=full.G, h=full.h)
    sol = _solve(qp)
    assert sol.result == ig.RESULTS.successful
    _, _, _, ref = _active_set_reference(qp, sol.value)
    g_os = _grad(qp, ig.OneStep())
    for field in ("q", "b") if kind == "equality_only" else ("q", "h"):
        assert relative_error(getattr(g_os, field), ref[field]) < REF_TOL


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("Q", dict(Q=np.ones((3, 2)))),
        ("q", dict(q=np.ones(4))),
        ("A", dict(A=np.ones((2, 4)))),
        ("b", dict(b=np.ones(3))),
        ("G", dict(G=np.ones((2, 2)))),
        ("h", dict(h=np.ones(1))),
    ],
)
def test_bad_shapes_raise(field, kwargs):
    data = dict(Q=np.eye(3), q=np.ones(3), A=np.ones((2, 3)), b=np.ones(2),
                G=np.ones((2, 3)), h=np.ones(2))
    data.update(kwargs)
    with pytest.raises(ValueError, match=f"`{field}`"):
        QP(**data)


def test_missing_partner_and_nan_raise():
    with pytest.raises(ValueError, match="`A` and `b`"):
        QP(np.eye(2), np.ones(2), A=np.ones((1, 2)))
    with pytest.raises(ValueError, match="`h` contains NaN"):
        QP(np.eye(2), np.ones(2), G=np.ones((1, 2)), h=np.array([np.nan]))
    with pytest.raises(TypeError, match="QP"):
        ig.solve(SOLVER, None, {"Q": np.eye(2)})


def test_nan_under_jit_is_reported():
    qp = random_qp(jr.PRNGKey(SIZES[0][0]), *SIZES[0])
    sol = _solve(eqx.tree_at(lambda t: t.b, qp, qp.b.at[0].set(jnp.nan)))
    assert sol.result == ig.RESULTS.nonfinite


_infeasible = {
    # x1 = 0 and x1 = 1.
    "equalities": QP(np.eye(2), np.zeros(2), A=[[1.0, 0.0], [1.0, 0.0]], b=[0.0, 1.0]),
    # x1 <= -1 and x1 >= 1.
    "inequalities": QP(np.eye(2), np.zeros(2), G=[[1.0, 0.0], [-1.0, 0.0]], h=[-1.0, -1.0]),
    # min x1 s.t. x2 <= 1 with Q = 0: unbounded below.
    "unbounded": QP(np.zeros((2, 2)), [1.0, 0.0], G=[[0.0, 1.0]], h=[1.0]),
}


@pytest.mark.parametrize("name", sorted(_infeasible))
def test_infeasible_is_reported(name):
    qp = _infeasible[name]
    assert _solve(qp).result == ig.RESULTS.infeasible
    if name == "inequalities":  # one compilation is enough to check `throw`
        with pytest.raises(eqx.EquinoxRuntimeError, match="infeasible"):
            _solve_throw(qp)


def test_random_qp_and_solver_arguments():
    with pytest.raises(ValueError, match="`m`"):
        random_qp(jr.PRNGKey(0), 3, 4, 1)
    with pytest.raises(ValueError, match="eta_min"):
        ig.InteriorPointQP(eta_min=1.0)
    qp = random_qp(jr.PRNGKey(0), 4, 1, 2, dtype=jnp.float32, regularization=1e-3)
    assert qp.Q.dtype == jnp.float32 and qp.sizes == (4, 1, 2)
    with pytest.raises(ValueError, match="`x0`"):
        SOLVER.init(jnp.zeros(3), qp)


def test_float32_slacks_stay_positive_to_the_end():
    """Regression (batched QP benchmark): in float32 the fraction to the
    boundary, capped at 1 - 1e-12, rounded to exactly 1; on this QP a slack
    came out at -2e-19 after 10 steps and step 11 was NaN. With the cap at
    1 - 16 eps the float32 solve converges (default float32 tolerances) to
    the float64 solution of the same data, and its OneStep derivative to the
    float64 Implicit one."""
    qp32 = random_qp(jr.key(79), 50, 10, 50).astype(jnp.float32)
    qp64 = qp32.astype(jnp.float64)

    def solve(qp, b, estimator, **kwargs):
        sol = ig.solve(
            ig.InteriorPointQP(), None, eqx.tree_at(lambda q: q.b, qp, b),
            estimator=estimator, max_steps=100, throw=False, **kwargs,
        )
        return sol.value, sol

    # The error estimate is +inf (none) in float32: it used to raise Lineax's
    # non-finite error from inside the estimate, even with throw=False.
    J32, sol32 = jax.jit(jax.jacrev(
        lambda b: solve(qp32, b, ig.OneStep(), error_estimate=True), has_aux=True
    ))(qp32.b)
    assert sol32.stats["derivative_error_bound"] == jnp.inf
    J64, sol64 = jax.jit(jax.jacrev(
        lambda b: solve(qp64, b, ig.Implicit(), rtol=1e-12, atol=1e-12), has_aux=True
    ))(qp64.b)
    assert sol32.result == ig.RESULTS.successful, ig.result_name(sol32.result)
    assert sol64.result == ig.RESULTS.successful
    assert bool(jnp.all(sol32.state.z.s > 0)) and bool(jnp.all(sol32.state.z.z > 0))
    assert relative_error(np.asarray(sol32.value, np.float64), sol64.value) < 1e-4
    assert relative_error(np.asarray(J32, np.float64), J64) < 1e-3


def test_astype_casts_floating_fields_and_keeps_masks():
    qp = QP(Q=jnp.eye(2), q=jnp.ones(2), lb=jnp.array([0.0, -jnp.inf]),
            ub=jnp.array([jnp.inf, 1.0]))
    qp32 = qp.astype(jnp.float32)
    for name in ("Q", "q", "lb", "ub", "A", "b", "G", "h"):
        assert getattr(qp32, name).dtype == jnp.float32, name
    for name in ("lb_finite", "ub_finite"):
        assert getattr(qp32, name).dtype == jnp.bool_
        np.testing.assert_array_equal(getattr(qp32, name), getattr(qp, name))
    np.testing.assert_array_equal(qp32.astype(jnp.float64).lb, qp.lb)


def _rank_deficient_box_qp():
    """A QP with singular P (rank 4 of 12) and the box -1 <= x <= 1 as rows of
    G, plus two equalities: the regularised (1,1) block of the dual path is
    then ill conditioned (1/δ in the null space of P)."""
    n = 12
    U = jr.normal(jr.PRNGKey(11), (n, 4))
    return QP(U @ U.T, jr.normal(jr.PRNGKey(12), (n,)),
              A=jr.normal(jr.PRNGKey(13), (2, n)), b=jnp.array([0.3, -0.2]),
              G=jnp.concatenate([jnp.eye(n), -jnp.eye(n)]), h=jnp.ones(2 * n))


# Slow tier (CI time budget: each case compiles two QP solves with both
# estimators' gradients, ~25 s). The default tier runs the dual path in every
# other test of a QP without bounds (the `auto` choice), against closed forms
# and finite differences.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "singular_P"])
def test_dual_and_primal_kkt_reductions_agree(kind):
    # The two factorisations of the same regularised Newton system, each refined
    # against the true matrix: solutions and both estimators' gradients agree.
    qp = random_qp(jr.PRNGKey(5), 30, 6, 12) if kind == "random" else _rank_deficient_box_qp()

    def gradients(reduction):
        # One compiled function per reduction giving the solution and both
        # estimators' gradients (each compile of a QP solve costs seconds).
        solver = ig.InteriorPointQP(kkt_reduction=reduction)

        def loss(qp, estimator):
            sol = ig.solve(solver, None, qp, estimator=estimator, throw=False, **TOL)
            return 0.5 * jnp.dot(sol.value, sol.value), sol

        @eqx.filter_jit
        def both(qp):
            g_os, sol = eqx.filter_grad(loss, has_aux=True)(qp, ig.OneStep())
            g_id, sol_id = eqx.filter_grad(loss, has_aux=True)(qp, ig.Implicit())
            return sol.value, sol.result, sol_id.result, {"os": g_os, "id": g_id}

        x, result_os, result_id, grads = both(qp)
        assert result_os == ig.RESULTS.successful, reduction
        assert result_id == ig.RESULTS.successful, reduction
        return x, grads, both

    x_primal, g_primal, _ = gradients("primal")
    x_dual, g_dual, dual_solve_and_gradients = gradients("dual")
    assert relative_error(x_dual, x_primal) < 1e-9
    for name in ("os", "id"):
        for field in ("q", "b", "h"):
            a, b = getattr(g_dual[name], field), getattr(g_primal[name], field)
            assert relative_error(a, b) < 1e-8, (name, field)

    # And the dual path's Implicit against central differences in b (the
    # compiled function above, evaluated at every shifted b: no new compile).
    def half_norm_squared(b):
        x = dual_solve_and_gradients(eqx.tree_at(lambda t: t.b, qp, b))[0]
        return 0.5 * jnp.sum(x**2)

    fd = central_difference_jacobian(half_norm_squared, qp.b)
    assert relative_error(g_dual["id"].b, fd) < FD_TOL


def test_kkt_reduction_is_checked():
    with pytest.raises(ValueError, match="kkt_reduction"):
        ig.InteriorPointQP(kkt_reduction="schur")
    boxed = QP(jnp.eye(2), jnp.ones(2), lb=-jnp.ones(2), ub=jnp.ones(2),
               A=jnp.ones((1, 2)), b=jnp.zeros(1))
    with pytest.raises(ValueError, match="without bounds"):
        ig.solve(ig.InteriorPointQP(kkt_reduction="dual"), None, boxed)
    # `auto` takes the primal path with bounds (no factor of P + δ in aux) and
    # the dual one without (bounded QPs are solved by the auto path throughout
    # this file, test_catalogue.py and test_maros_meszaros.py).
    _, aux = jax.eval_shape(ig.InteriorPointQP().init, None, boxed)  # shapes, no compile
    assert aux.p_factor_inv.shape == (0, 0)
    unbounded = QP(jnp.eye(2), jnp.ones(2), A=jnp.ones((1, 2)), b=jnp.zeros(1))
    _, aux = jax.eval_shape(ig.InteriorPointQP().init, None, unbounded)
    assert aux.p_factor_inv.shape == (2, 2)
