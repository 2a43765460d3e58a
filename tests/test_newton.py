"""Newton's method on weighted logistic regression (eq. 11): one-step vs
implicit vs an explicit dense implicit-function reference and finite
differences; line searches; planted failures."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import pytest

import itergrad as ig
from itergrad.problems import logistic_data

from .helpers import central_difference_jacobian, relative_error

N_SAMPLES, N_FEATURES = 200, 20
SOLVE_TOL = 1e-12
RTOL_AGREE = 1e-10  # one-step vs implicit vs dense reference (Corollary 3)
RTOL_CG = 1e-8  # matrix-free inexact Newton (CG stopped at 1e-12)
RTOL_FD = 1e-6  # central differences with step 1e-6
CG = lx.CG(rtol=1e-12, atol=1e-12, max_steps=200)


@pytest.fixture(scope="module")
def logistic():
    problem = logistic_data(jr.key(0), N_SAMPLES, N_FEATURES, lam=1.0)
    theta = jr.uniform(jr.key(1), (N_SAMPLES,), minval=0.5, maxval=1.5)
    return problem, theta


def _loss(solver, estimator, x0):
    """theta -> ||x(theta)||^2 / 2, the paper's §4 test function."""

    def loss(theta):
        x = ig.solve(
            solver, x0, theta, estimator=estimator, rtol=SOLVE_TOL, atol=SOLVE_TOL
        ).value
        return 0.5 * jnp.sum(x**2)

    return loss


def _grad(solver, estimator, x0):
    # Jitted: one compilation is much cheaper than eager tracing of the loops.
    return jax.jit(jax.grad(_loss(solver, estimator, x0)))


@pytest.fixture(scope="module")
def reference(logistic):
    """The implicit function theorem written out with dense matrices:
    `(x_bar, J, grad of ||x||^2/2, the jitted function of theta)`."""
    problem, theta = logistic
    f = problem.objective

    @jax.jit
    def dense(theta):
        x_bar = ig.solve(
            ig.Newton(f), jnp.zeros(problem.n), theta, rtol=SOLVE_TOL, atol=SOLVE_TOL
        ).value
        H = jax.hessian(f)(x_bar, theta)
        cross = jax.jacobian(jax.grad(f), argnums=1)(x_bar, theta)
        jacobian = -jnp.linalg.solve(H, cross)
        return x_bar, jacobian, jacobian.T @ x_bar

    return (*dense(theta), dense)


@pytest.fixture(scope="module")
def fd_gradient(logistic):
    problem, theta = logistic
    loss = jax.jit(
        _loss(ig.Newton(problem.objective), ig.OneStep(), jnp.zeros(problem.n))
    )
    return central_difference_jacobian(lambda t: loss(t)[None], theta)[0]


def test_newton_quadratic_convergence(logistic, reference):
    problem, theta = logistic
    x_bar = reference[0]
    solver = ig.Newton(problem.objective)
    step = eqx.filter_jit(solver.step)
    x, aux = solver.init(jnp.zeros(problem.n), theta)
    errors = [float(jnp.linalg.norm(x - x_bar))]
    for _ in range(12):
        x, aux = step(x, aux, theta)
        assert aux.result == ig.RESULTS.successful
        errors.append(float(jnp.linalg.norm(x - x_bar)))
    assert errors[-1] < 1e-13
    # Quadratic tail: e_{k+1} <= C e_k^2 once e_k is small (C from the data).
    tail = [(a, b) for a, b in zip(errors, errors[1:], strict=False) if 1e-6 < a < 1e-1]
    assert tail
    assert all(b <= 10 * a**2 for a, b in tail)


@pytest.mark.parametrize("linesearch", [ig.Backtracking(), ig.Wolfe()])
def test_newton_one_step_implicit_agree(logistic, reference, fd_gradient, linesearch):
    problem, theta = logistic
    solver = ig.Newton(problem.objective, linesearch)
    x0 = jnp.zeros(problem.n)
    g_os = _grad(solver, ig.OneStep(), x0)(theta)
    g_ref = reference[2]
    assert relative_error(g_os, g_ref) < RTOL_AGREE
    assert relative_error(g_os, fd_gradient) < RTOL_FD
    if isinstance(linesearch, ig.Backtracking):
        # The estimator agreement of Figure 3 (the line search plays no role).
        g_id = _grad(solver, ig.Implicit(), x0)(theta)
        assert relative_error(g_os, g_id) < RTOL_AGREE
        assert relative_error(g_id, g_ref) < RTOL_AGREE


def test_newton_matrix_free_cg(logistic, reference, fd_gradient):
    problem, theta = logistic
    solver = ig.Newton(problem.objective, linear_solver=CG, hessian="hvp")
    x0 = jnp.zeros(problem.n)
    # Implicit does not use Newton's linear solver: one-step is the check here.
    g = _grad(solver, ig.OneStep(), x0)(theta)
    assert relative_error(g, reference[2]) < RTOL_CG
    assert relative_error(g, fd_gradient) < RTOL_FD


def test_newton_forward_mode_jacobian(logistic, reference):
    problem, theta = logistic
    solver = ig.Newton(problem.objective)

    def x_of(t):
        return ig.solve(
            solver,
            jnp.zeros(problem.n),
            t,
            estimator=ig.Implicit(),
            rtol=SOLVE_TOL,
            atol=SOLVE_TOL,
        ).value

    assert relative_error(jax.jit(jax.jacfwd(x_of))(theta), reference[1]) < RTOL_AGREE


def test_newton_jit_vmap(logistic, reference):
    problem, theta = logistic
    solver = ig.Newton(problem.objective)
    x0 = jnp.zeros(problem.n)
    thetas = theta[None, :] * jnp.array([1.0, 0.5, 2.0])[:, None]

    @eqx.debug.assert_max_traces(max_traces=1)
    def batched(ts):
        return jax.vmap(jax.grad(_loss(solver, ig.OneStep(), x0)))(ts)

    jitted = jax.jit(batched)
    grads = jitted(thetas)
    jitted(thetas * 1.01)
    dense = reference[3]
    for g, t in zip(grads, thetas, strict=True):
        assert relative_error(g, dense(t)[2]) < RTOL_AGREE


def test_newton_pytree_iterate(logistic, reference):
    problem, theta = logistic

    def objective(x, t):
        return problem.objective(jnp.concatenate([x["intercept"], x["w"]]), t)

    solver = ig.Newton(objective)
    x0 = {"intercept": jnp.zeros(1), "w": jnp.zeros(problem.n - 1)}

    def loss(estimator):
        def fn(t):
            x = ig.solve(
                solver, x0, t, estimator=estimator, rtol=SOLVE_TOL, atol=SOLVE_TOL
            ).value
            return 0.5 * (jnp.sum(x["intercept"] ** 2) + jnp.sum(x["w"] ** 2))

        return fn

    g_os = jax.jit(jax.grad(loss(ig.OneStep())))(theta)
    assert relative_error(g_os, reference[2]) < RTOL_AGREE


@pytest.mark.parametrize(
    "linesearch", [ig.Backtracking(), ig.Wolfe(), ig.Wolfe(strong=False)]
)
def test_linesearch_accepts_unit_newton_step(linesearch):
    # A strictly convex quartic: Newton's direction near the minimiser must be
    # taken in full, including when the decrease is below rounding.
    def f(x):
        return jnp.sum(x**2 + 0.1 * x**4) + 10.0

    @functools.partial(jax.jit, static_argnums=1)
    def search(x, newton):
        g = jax.grad(f)(x)
        d = -jnp.linalg.solve(jax.hessian(f)(x), g) if newton else g
        return linesearch(f, x, f(x), g, d)

    for offset in (1e-3, 1e-9):
        t, ok = search(jnp.full(3, offset), True)
        assert bool(ok) and float(t) == 1.0
    # An ascent direction is rejected.
    _, ok = search(jnp.ones(3), False)
    assert not bool(ok)


def test_linesearch_backtracks():
    # Pseudo-Huber: the full Newton step from x = 3 overshoots to about -27.
    def f(x, theta):
        return jnp.sum(jnp.sqrt(1 + (x - theta) ** 2))

    x, zero = jnp.full(2, 3.0), jnp.zeros(2)
    g = jax.grad(f)(x, zero)
    d = -g / jax.vmap(jax.grad(jax.grad(lambda u: f(u[None], 0.0))))(x)
    f_x = lambda z: f(z, zero)  # noqa: E731
    for linesearch in (ig.Backtracking(), ig.Wolfe()):
        t, ok = eqx.filter_jit(linesearch)(f_x, x, f_x(x), g, d)
        assert bool(ok) and 0 < float(t) < 1
        assert f_x(x + t * d) <= f_x(x) + linesearch.c1 * t * jnp.vdot(g, d)
        if isinstance(linesearch, ig.Wolfe):
            slope = jnp.vdot(jax.grad(f_x)(x + t * d), d)
            assert abs(slope) <= linesearch.c2 * abs(jnp.vdot(g, d))
    solve = eqx.filter_jit(ig.solve)
    sol = solve(ig.Newton(f), x, zero)
    assert sol.result == ig.RESULTS.successful
    assert float(jnp.max(jnp.abs(sol.value))) < 1e-9
    sol = solve(ig.Newton(f, ig.Backtracking(max_steps=1)), x, zero, throw=False)
    assert sol.result == ig.RESULTS.linesearch_failed


def test_newton_planted_failure():
    def concave(x, t):
        return -jnp.sum(t * x**2)

    def nan(x, t):
        return jnp.sum(t * x**2) * jnp.nan

    x0, theta = jnp.ones(3), jnp.ones(3)
    solve = eqx.filter_jit(ig.solve)
    # Concave: Cholesky of the indefinite Hessian gives NaN, LU an ascent
    # direction; neither is a descent direction.
    for solver, allowed in [
        (ig.Newton(concave), [ig.RESULTS.linesearch_failed]),
        (ig.Newton(concave, linear_solver=lx.LU()), [ig.RESULTS.linesearch_failed]),
        (ig.Newton(nan), [ig.RESULTS.linesearch_failed, ig.RESULTS.nonfinite]),
    ]:
        sol = solve(solver, x0, theta, throw=False)
        assert any(bool(sol.result == code) for code in allowed)
        # The iterate stays where the failure happened, not replaced by NaN.
        assert bool(jnp.all(jnp.isfinite(sol.value)))
    with pytest.raises(eqx.EquinoxRuntimeError, match="line search"):
        solve(ig.Newton(concave), x0, theta)


def test_newton_validation():
    f = lambda x, t: jnp.sum(x**2)  # noqa: E731
    with pytest.raises(ValueError, match="c1"):
        ig.Backtracking(c1=0.6)
    with pytest.raises(ValueError, match="decrease"):
        ig.Backtracking(decrease=1.5)
    with pytest.raises(ValueError, match="c2"):
        ig.Wolfe(c2=1e-5)
    with pytest.raises(TypeError, match="line search"):
        ig.Newton(f, linesearch="armijo")
    with pytest.raises(TypeError, match="Lineax"):
        ig.Newton(f, linear_solver="cholesky")
    assert ig.Newton.superlinear
