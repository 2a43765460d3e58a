"""Matrix-free inexact Newton (Krylov solves driven by a forcing term): the
forcing sequence, the inexact-Newton stopping test, and derivatives that stay
those of the exact Newton map (dense implicit-function reference and finite
differences) whatever accuracy the forward solves used."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import pytest

import itergrad as ig
from itergrad._linear_solve import linear_solve
from itergrad.problems import logistic_data
from itergrad.solvers._forcing import forced_solver

from .helpers import central_difference_jacobian, relative_error

N_SAMPLES, N_FEATURES = 200, 20
SOLVE_TOL = 1e-12
CG = lx.CG(rtol=1e-12, atol=1e-12, max_steps=300)
RTOL_EXACT = 1e-8  # derivative solves stopped at CG tolerance 1e-12
RTOL_FD = 1e-6  # central differences with step 1e-6


@pytest.fixture(scope="module")
def logistic():
    problem = logistic_data(jr.key(3), N_SAMPLES, N_FEATURES, lam=1.0)
    theta = jr.uniform(jr.key(4), (N_SAMPLES,), minval=0.5, maxval=1.5)
    return problem, theta


def _solve(solver, theta, estimator=ig.OneStep()):
    """The logistic problem from x0 = 0 (features plus intercept unknowns)."""
    x0 = jnp.zeros(N_FEATURES + 1)
    return ig.solve(
        solver, x0, theta, estimator=estimator, rtol=SOLVE_TOL, atol=SOLVE_TOL
    )


@pytest.fixture(scope="module")
def dense_reference(logistic):
    """`(x_bar, gradient of ||x||^2/2)` by the implicit function theorem with
    dense matrices at a dense-Newton solution."""
    problem, theta = logistic
    f = problem.objective
    x_bar = _solve(ig.Newton(f), theta).value
    H = jax.hessian(f)(x_bar, theta)
    cross = jax.jacobian(jax.grad(f), argnums=1)(x_bar, theta)
    return x_bar, -jnp.linalg.solve(H, cross).T @ x_bar


def test_eisenstat_walker_sequence():
    ew = ig.EisenstatWalker(gamma=0.9, alpha=1.5, eta_max=0.8)
    one = jnp.array(1.0)
    # First step (no previous gradient norm): eta_max.
    assert float(ew(one, jnp.array(0.0), jnp.array(0.0))) == pytest.approx(0.8)
    # gamma (|g_k| / |g_{k-1}|)^alpha, previous eta small (no safeguard).
    assert float(ew(one, jnp.array(4.0), jnp.array(0.05))) == pytest.approx(
        0.9 * 0.25**1.5
    )
    # Safeguard: gamma eta_{k-1}^alpha = 0.9 * 0.6^1.5 = 0.418 > 0.1 wins.
    assert float(ew(one, jnp.array(100.0), jnp.array(0.6))) == pytest.approx(
        0.9 * 0.6**1.5
    )
    # Capped at eta_max when the gradient grew; non-finite -> eta_max.
    assert float(ew(jnp.array(3.0), one, jnp.array(0.05))) == pytest.approx(0.8)
    assert float(ew(jnp.array(jnp.inf), one, jnp.array(0.05))) == pytest.approx(0.8)
    default = ig.EisenstatWalker()
    assert (default.gamma, default.alpha, default.eta_max) == (
        0.9, (1 + math.sqrt(5)) / 2, 0.9,
    )


def test_forced_krylov_solve_stops_at_the_inexact_newton_condition():
    # f(x) = x^T Q x / 2 - c^T x at x = 0: g = -c, H = Q (condition ~1e3).
    key_q, key_c = jr.split(jr.key(5))
    M = jr.normal(key_q, (60, 60))
    Q = M @ M.T / 60 + 1e-2 * jnp.eye(60)
    c = jr.normal(key_c, (60,))

    def objective(x, theta):
        return 0.5 * x @ Q @ x - theta @ x

    for eta in [0.5, 1e-3]:
        solver = forced_solver(CG, jnp.array(eta), jnp.linalg.norm(c))
        hessian = lx.MatrixLinearOperator(Q, lx.positive_semidefinite_tag)
        out = linear_solve(hessian, c, solver, derivative_solver=CG)
        d, usable, steps = out.value, out.usable, out.steps
        residual = jnp.linalg.norm(Q @ d - c) / jnp.linalg.norm(c)
        assert bool(usable)
        assert float(residual) <= eta
        # Inexact indeed: far from CG's own tolerance, in few iterations.
        assert float(residual) > 1e-8
        assert 0 < int(steps) < 60
    # Solvers whose tolerances mean something else are left alone.
    lsmr = lx.LSMR(rtol=1e-8, atol=1e-8)
    assert forced_solver(lsmr, jnp.array(0.5), jnp.array(1.0)) is lsmr


@pytest.mark.parametrize(
    "estimator, mode",
    [
        (ig.OneStep(), "reverse"),
        (ig.OneStep(), "forward"),
        (ig.Implicit(), "reverse"),
        (ig.Unroll(), "reverse"),
        (ig.Truncated(2), "reverse"),
    ],
)
def test_inexact_newton_derivatives_are_exact(
    logistic, dense_reference, estimator, mode
):
    problem, theta = logistic
    solver = ig.Newton(problem.objective, linear_solver=CG, hessian="hvp")
    x_bar, reference = dense_reference

    def loss(t):
        return 0.5 * jnp.sum(_solve(solver, t, estimator).value ** 2)

    sol = eqx.filter_jit(_solve)(solver, theta)
    assert sol.result == ig.RESULTS.successful
    assert relative_error(sol.value, x_bar) < 1e-10
    derivative = jax.grad if mode == "reverse" else jax.jacfwd
    g = jax.jit(derivative(loss))(theta)
    assert relative_error(g, reference) < RTOL_EXACT
    if isinstance(estimator, ig.OneStep) and mode == "reverse":
        fd = central_difference_jacobian(lambda t: jax.jit(loss)(t)[None], theta)[0]
        assert relative_error(g, fd) < RTOL_FD


@pytest.mark.parametrize(
    "krylov",
    [
        lx.GMRES(rtol=1e-12, atol=1e-12, max_steps=200),
        lx.BiCGStab(rtol=1e-12, atol=1e-12, max_steps=200),
    ],
)
def test_forcing_with_other_krylov_solvers(logistic, dense_reference, krylov):
    problem, theta = logistic
    solver = ig.Newton(problem.objective, linear_solver=krylov, hessian="hvp")

    def loss(t):
        return 0.5 * jnp.sum(_solve(solver, t).value ** 2)

    sol = eqx.filter_jit(_solve)(solver, theta)
    assert sol.result == ig.RESULTS.successful
    assert relative_error(sol.value, dense_reference[0]) < 1e-10
    g = jax.jit(jax.grad(loss))(theta)
    assert relative_error(g, dense_reference[1]) < RTOL_EXACT


def test_forcing_saves_krylov_steps_not_accuracy(logistic):
    problem, theta = logistic
    forced = ig.Newton(problem.objective, linear_solver=CG, hessian="hvp")
    exact = ig.Newton(problem.objective, linear_solver=CG, hessian="hvp", forcing=None)
    solve = eqx.filter_jit(_solve)
    sol_forced, sol_exact = solve(forced, theta), solve(exact, theta)
    # Measured on this problem: 29 Hessian-vector products against 97.
    assert int(sol_forced.state.aux.krylov_steps) < 0.5 * int(sol_exact.state.aux.krylov_steps)
    assert relative_error(sol_forced.value, sol_exact.value) < 1e-10

    def grad(solver):
        return jax.jit(
            jax.grad(lambda t: 0.5 * jnp.sum(_solve(solver, t).value ** 2))
        )(theta)

    assert relative_error(grad(forced), grad(exact)) < 1e-9


def test_inexact_newton_differentiates_closed_over_arrays():
    # x*(c) = Q^{-1} c for f(x) = x^T Q x / 2 - c^T x + theta |x|^2 / 2 with
    # theta = 0: the Jacobian in the closed-over c is Q^{-1}.
    M = jr.normal(jr.key(6), (8, 8))
    Q = M @ M.T / 8 + 0.5 * jnp.eye(8)

    def x_of(c, estimator):
        def objective(x, theta):
            return 0.5 * x @ Q @ x - c @ x + 0.5 * theta * x @ x

        solver = ig.Newton(objective, linear_solver=CG, hessian="hvp")
        return ig.solve(
            solver, jnp.zeros(8), jnp.array(0.0), estimator=estimator,
            rtol=SOLVE_TOL, atol=SOLVE_TOL,
        ).value

    c = jr.normal(jr.key(7), (8,))
    closed_form = jnp.linalg.inv(Q)
    for estimator in [ig.OneStep(), ig.Implicit(), ig.Unroll()]:
        J = jax.jit(jax.jacrev(lambda c: x_of(c, estimator)))(c)
        assert relative_error(J, closed_form) < RTOL_EXACT
    fd = central_difference_jacobian(jax.jit(lambda c: x_of(c, ig.OneStep())), c)
    assert relative_error(fd, closed_form) < RTOL_FD


def test_inexact_newton_under_vmap(logistic, dense_reference):
    problem, theta = logistic
    solver = ig.Newton(problem.objective, linear_solver=CG, hessian="hvp")
    thetas = jnp.stack([theta, 0.5 * theta, 2.0 * theta])

    def grad(t):
        return jax.grad(lambda t: 0.5 * jnp.sum(_solve(solver, t).value ** 2))(t)

    batched = jax.jit(jax.vmap(grad))(thetas)
    assert relative_error(batched[0], dense_reference[1]) < RTOL_EXACT
    for row, t in zip(batched, thetas, strict=True):
        assert relative_error(row, jax.jit(grad)(t)) < 1e-10


def test_forcing_validation():
    f = lambda x, t: jnp.sum(x**2)  # noqa: E731
    with pytest.raises(ValueError, match="gamma"):
        ig.EisenstatWalker(gamma=0.0)
    with pytest.raises(ValueError, match="alpha"):
        ig.EisenstatWalker(alpha=3.0)
    with pytest.raises(ValueError, match="eta_max"):
        ig.EisenstatWalker(eta_max=1.0)
    with pytest.raises(TypeError, match="forcing"):
        ig.Newton(f, forcing="eisenstat-walker")
