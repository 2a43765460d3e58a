"""Proximal gradient (ISTA / FISTA) and `itergrad.prox`: the operators
against their defining minimisation; Lasso / elastic-net solutions against
scikit-learn; the hypergradient in log(lambda) against the closed form on the
support and finite differences for every estimator under jit / vmap / jacfwd /
jacrev; OneStep / Truncated(K) against Corollary 1's bound."""

import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import itergrad as ig
from itergrad import prox
from itergrad.problems import Lasso, lasso_data

from .helpers import relative_error

N_SAMPLES, N_FEATURES, N_INFORMATIVE = 40, 80, 5
SOLVE_TOL = 1e-13
MAX_STEPS = 20000
RTOL_CLOSED_FORM = 1e-8  # Implicit vs the closed form on the support (issue)
RTOL_FD = 1e-6  # central differences, step 1e-6 in log(lambda)
RTOL_SKLEARN = 1e-6  # coordinate descent stopped at tol=1e-12 (duality gap)
GMRES = lx.GMRES(rtol=1e-12, atol=1e-12)

ESTIMATORS = [
    ("implicit", ig.Implicit(), ("fwd", "rev"), RTOL_CLOSED_FORM),
    (
        "implicit_fixed_point",
        ig.Implicit(condition="fixed_point"),
        ("fwd", "rev"),
        RTOL_CLOSED_FORM,
    ),
    (
        "implicit_gmres",
        ig.Implicit(linear_solver=GMRES),
        ("fwd", "rev"),
        RTOL_CLOSED_FORM,
    ),
    ("unroll", ig.Unroll(), ("rev",), 1e-8),
    ("unroll_forward", ig.Unroll(mode="forward"), ("fwd",), 1e-8),
    ("onestep", ig.OneStep(), ("fwd", "rev"), None),
    ("truncated", ig.Truncated(20), ("fwd", "rev"), None),
]
IDS = [c[0] for c in ESTIMATORS]


# --- ig.prox ----------------------------------------------------------------


def _is_prox(op, g, x, step, key):
    """u = op(x) minimises 1/2 ||u - x||^2 + step g(u): no random nearby point
    (nor a sparse one) does better."""
    u = op(x)
    value = 0.5 * jnp.sum((u - x) ** 2) + step * g(u)
    perturbations = 1e-3 * jr.normal(key, (200, *x.shape))
    candidates = jnp.concatenate(
        [
            u + perturbations,
            jnp.where(jr.bernoulli(key, 0.3, (200, *x.shape)), 0, u + perturbations),
        ]
    )
    others = jax.vmap(lambda c: 0.5 * jnp.sum((c - x) ** 2) + step * g(c))(candidates)
    return bool(jnp.all(others >= value - 1e-12))


def test_prox_operators_minimise_their_problem():
    key = jr.key(3)
    x = jr.normal(key, (12,))
    s = 0.7
    assert _is_prox(
        lambda v: prox.l1(v, s, 0.5), lambda u: 0.5 * jnp.sum(jnp.abs(u)), x, s, key
    )
    assert _is_prox(
        lambda v: prox.elastic_net(v, s, 0.5, 2.0),
        lambda u: 0.5 * jnp.sum(jnp.abs(u)) + jnp.sum(u**2),
        x,
        s,
        key,
    )
    big = 1e6  # an indicator, as a steep penalty outside the set
    assert _is_prox(
        lambda v: prox.nonnegative(v),
        lambda u: big * jnp.sum(jnp.maximum(-u, 0)),
        x,
        s,
        key,
    )
    assert _is_prox(
        lambda v: prox.box(v, s, -0.3, 0.4),
        lambda u: big * jnp.sum(jnp.maximum(u - 0.4, 0) + jnp.maximum(-0.3 - u, 0)),
        x,
        s,
        key,
    )
    groups = x.reshape(4, 3)
    strength = jnp.array([0.1, 5.0, 0.5, 1.0])
    assert _is_prox(
        lambda v: prox.group_lasso(v, s, strength),
        lambda u: jnp.sum(strength * jnp.linalg.norm(u, axis=-1)),
        groups,
        s,
        key,
    )
    out = prox.group_lasso(groups, s, strength)
    assert jnp.all(out[1] == 0)  # a group below its threshold vanishes
    # At zero: finite, zero derivative (the safe norm).
    assert jnp.all(
        jax.jacfwd(lambda v: prox.group_lasso(v, s, 1.0))(jnp.zeros((2, 3))) == 0
    )


def test_prox_l1_derivatives():
    x = jnp.array([2.0, -1.5, 0.1, -0.2, 0.0])
    s, lam = 0.5, 1.0
    # Closed forms: d/dx = diag(|x| > s lam), d/dlam = -s sign(x) (|x| > s lam).
    active = jnp.abs(x) > s * lam
    np.testing.assert_array_equal(
        jax.jacfwd(prox.l1)(x, s, lam), jnp.diag(active.astype(float))
    )
    np.testing.assert_allclose(
        jax.jacrev(prox.l1, argnums=2)(x, s, lam), -s * jnp.sign(x) * active
    )
    eps = 1e-6
    fd = (prox.l1(x, s, lam + eps) - prox.l1(x, s, lam - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.jacfwd(prox.l1, argnums=2)(x, s, lam), fd, atol=1e-9)


# --- The Lasso --------------------------------------------------------------


@pytest.fixture(scope="module")
def lasso():
    problem, _ = lasso_data(
        jr.key(0), N_SAMPLES, N_FEATURES, n_informative=N_INFORMATIVE, noise=0.1
    )
    theta = jnp.log(0.1 * problem.lambda_max())
    return problem, theta


def _solver(problem, accelerate=True):
    return ig.ProximalGradient(
        problem.smooth, problem.prox, 1 / problem.lipschitz(), accelerate=accelerate
    )


def _x_of(problem, estimator, accelerate=True):
    solver = _solver(problem, accelerate)

    def x_of(theta):
        return ig.solve(
            solver,
            jnp.zeros(problem.n),
            theta,
            estimator=estimator,
            max_steps=MAX_STEPS,
            rtol=SOLVE_TOL,
            atol=SOLVE_TOL,
        ).value

    return x_of


@pytest.fixture(scope="module")
def solutions(lasso):
    """ISTA and FISTA solutions (jitted once each), with their step counts."""
    problem, theta = lasso
    out = {}
    for accelerate in (False, True):
        solver = _solver(problem, accelerate)
        sol = jax.jit(
            lambda t, solver=solver: ig.solve(
                solver,
                jnp.zeros(problem.n),
                t,
                max_steps=MAX_STEPS,
                rtol=SOLVE_TOL,
                atol=SOLVE_TOL,
            )
        )(theta)
        assert sol.result == ig.RESULTS.successful
        out[accelerate] = sol
    return out


@pytest.fixture(scope="module")
def closed_form(lasso, solutions):
    problem, theta = lasso
    return problem.jacobian_on_support(solutions[True].value, theta)


@pytest.fixture(scope="module")
def fd_derivative(lasso):
    """Central differences of the FISTA solution in log(lambda)."""
    problem, theta = lasso
    x_of = jax.jit(_x_of(problem, ig.OneStep()))
    eps = 1e-6
    return (x_of(theta + eps) - x_of(theta - eps)) / (2 * eps)


def test_lasso_solution_matches_sklearn(lasso, solutions):
    from sklearn.linear_model import Lasso as SkLasso

    problem, theta = lasso
    sk = SkLasso(
        alpha=float(jnp.exp(theta)), fit_intercept=False, tol=1e-12, max_iter=100000
    )
    sk.fit(np.asarray(problem.A), np.asarray(problem.b))
    for sol in solutions.values():
        assert relative_error(sol.value, sk.coef_) < RTOL_SKLEARN
        np.testing.assert_array_equal(np.asarray(sol.value) != 0, sk.coef_ != 0)
    # Sparse, and FISTA (with restart) much faster than ISTA.
    assert 0 < int(jnp.sum(solutions[True].value != 0)) < N_SAMPLES
    assert int(solutions[True].steps) < 0.5 * int(solutions[False].steps)


def test_closed_form_matches_finite_differences(closed_form, fd_derivative):
    assert relative_error(closed_form, fd_derivative) < RTOL_FD


@pytest.mark.parametrize("name, estimator, modes, tol", ESTIMATORS, ids=IDS)
def test_estimator_matrix(
    lasso, closed_form, fd_derivative, name, estimator, modes, tol
):
    """jit (no retrace) of vmap over two thetas of each AD mode; the exact
    estimators match the closed form on the support (<= 1e-8) and finite
    differences; the biased ones point the right way."""
    problem, theta = lasso
    x_of = _x_of(problem, estimator)
    thetas = jnp.stack([theta, theta + 0.3])

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(thetas):
        return {
            mode: jax.vmap({"fwd": jax.jacfwd, "rev": jax.jacrev}[mode](x_of))(thetas)
            for mode in modes
        }

    run(thetas + 1e-3)
    out = run(thetas)
    derivs = [out[m] for m in modes]
    if len(derivs) == 2:
        np.testing.assert_allclose(derivs[0], derivs[1], rtol=1e-9, atol=1e-12)
    d = derivs[0]
    second = problem.jacobian_on_support(
        jax.jit(_x_of(problem, ig.OneStep()))(thetas[1]), thetas[1]
    )
    if tol is not None:
        assert relative_error(d[0], closed_form) < tol
        assert relative_error(d[1], second) < tol
        assert relative_error(d[0], fd_derivative) < RTOL_FD
    else:
        for estimate, exact in ((d[0], closed_form), (d[1], second)):
            error = relative_error(estimate, exact)
            assert 1e-8 < error < 1.0, error
            assert jnp.vdot(estimate, exact) > 0


def test_onestep_and_truncated_within_corollary_1(lasso, solutions, closed_form):
    """ISTA: ||J^K - J|| <= rho^K L_F / (1 - rho) (+ L_J ||x_{k-K} - x_bar||,
    negligible at 1e-13), with rho = ||D (I - alpha H) D||_op on the support
    and L_F = ||J_theta T(x_bar)||; and the bound is not vacuous: the errors
    decrease geometrically, like rho^K."""
    problem, theta = lasso
    x_bar = solutions[False].value
    solver = _solver(problem, accelerate=False)
    support = np.flatnonzero(np.asarray(x_bar) != 0)
    alpha = 1 / problem.lipschitz()
    A_S = problem.A[:, support]
    H_SS = A_S.T @ A_S / N_SAMPLES
    rho = float(jnp.linalg.norm(jnp.eye(support.size) - alpha * H_SS, ord=2))
    L_F = float(jnp.linalg.norm(jax.jacfwd(lambda t: solver._map(x_bar, t))(theta)))
    assert 0 < rho < 1
    J_norm = float(jnp.linalg.norm(closed_form))
    errors = {}
    Ks = (1, 10, 100)

    @jax.jit
    def estimates(theta):
        return [
            jax.jacfwd(
                _x_of(
                    problem,
                    ig.OneStep() if K == 1 else ig.Truncated(K),
                    accelerate=False,
                )
            )(theta)
            for K in Ks
        ]

    for K, estimate in zip(Ks, estimates(theta)):
        errors[K] = float(jnp.linalg.norm(estimate - closed_form))
        bound = rho**K * L_F / (1 - rho)
        assert errors[K] <= bound, (K, errors[K], bound)
        # At the fixed point the truncation error is exactly (J_x T)^K J: it
        # is at most rho^K ||J||, a sharper version of the same bound.
        assert errors[K] <= rho**K * J_norm * (1 + 1e-6) + 1e-10
    assert errors[100] < 1e-2 * errors[1]


def test_elastic_net_closed_form_and_sklearn():
    from sklearn.linear_model import ElasticNet

    problem, _ = lasso_data(
        jr.key(1), N_SAMPLES, N_FEATURES, n_informative=N_INFORMATIVE, l1_ratio=0.6
    )
    theta = jnp.log(0.05 * problem.lambda_max())
    x_of = _x_of(problem, ig.Implicit())
    x, d = jax.jit(jax.jvp, static_argnums=0)(x_of, (theta,), (jnp.ones_like(theta),))
    sk = ElasticNet(
        alpha=float(jnp.exp(theta)),
        l1_ratio=0.6,
        fit_intercept=False,
        tol=1e-12,
        max_iter=100000,
    )
    sk.fit(np.asarray(problem.A), np.asarray(problem.b))
    assert relative_error(x, sk.coef_) < RTOL_SKLEARN
    assert relative_error(d, problem.jacobian_on_support(x, theta)) < RTOL_CLOSED_FORM


def test_nonnegative_least_squares_matches_scipy():
    from scipy.optimize import nnls

    A = jr.normal(jr.key(4), (30, 10))
    b = jr.normal(jr.key(5), (30,))
    L = float(jnp.linalg.norm(A, ord=2) ** 2)
    solver = ig.ProximalGradient(
        lambda x, t: 0.5 * jnp.sum((A @ x - t) ** 2), prox.nonnegative, "1/L", L=L
    )
    x_of = jax.jit(
        lambda t: (
            ig.solve(
                solver,
                jnp.zeros(10),
                t,
                estimator=ig.Implicit(),
                max_steps=MAX_STEPS,
                rtol=SOLVE_TOL,
                atol=SOLVE_TOL,
            ).value
        )
    )
    x = x_of(b)
    reference, _ = nnls(np.asarray(A), np.asarray(b))
    np.testing.assert_allclose(x, reference, atol=1e-9)
    # d x / d b on the active set P: (A_P^T A_P)^{-1} A_P^T, zero elsewhere.
    P = np.flatnonzero(reference > 0)
    expected = np.zeros((10, 30))
    expected[P] = np.linalg.pinv(np.asarray(A)[:, P])
    np.testing.assert_allclose(jax.jit(jax.jacrev(x_of))(b), expected, atol=1e-9)


def test_float32(lasso, closed_form):
    problem, theta = lasso
    p32 = Lasso(problem.A.astype(jnp.float32), problem.b.astype(jnp.float32))
    solver = ig.ProximalGradient(p32.smooth, p32.prox, 1 / p32.lipschitz())

    @jax.jit
    def run(t):
        def x_of(t):
            return ig.solve(
                solver,
                jnp.zeros(problem.n, jnp.float32),
                t,
                estimator=ig.Implicit(),
                max_steps=MAX_STEPS,
                rtol=1e-6,
                atol=1e-6,
            ).value

        return jax.jvp(x_of, (t,), (jnp.ones_like(t),))

    x, d = run(theta.astype(jnp.float32))
    assert x.dtype == d.dtype == jnp.float32
    assert relative_error(d, closed_form) < 1e-3


def test_misuse_is_refused():
    f = lambda x, t: jnp.sum(x**2)  # noqa: E731
    with pytest.raises(TypeError, match="prox"):
        ig.ProximalGradient(f, "l1", 0.1)
    with pytest.raises(ValueError, match="positive"):
        ig.ProximalGradient(f, prox.nonnegative, -1.0)
    with pytest.raises(ValueError, match="L"):
        ig.ProximalGradient(f, prox.nonnegative, "1/L")
    with pytest.raises(ValueError, match="l1_ratio"):
        Lasso(jnp.ones((3, 2)), jnp.ones(3), l1_ratio=0.0)


def test_lasso_selection_example_matches_grid_search():
    """examples/lasso_selection.py (quick): hypergradient descent on the
    validation loss selects a lambda within one grid step of the grid's best,
    with a validation loss within 1e-3 (relative) of it."""
    path = pathlib.Path(__file__).parents[1] / "examples" / "lasso_selection.py"
    spec = importlib.util.spec_from_file_location("example_lasso_selection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    r = module.main(quick=True, verbose=False)
    assert abs(r["theta"] - r["grid_theta"]) <= r["grid_spacing"], r
    assert r["loss"] <= (1 + 1e-3) * r["grid_loss"], r
