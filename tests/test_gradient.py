"""Gradient descent and heavy ball on weighted ridge: every estimator against the
closed-form Jacobian and finite differences; Corollary 1's bound."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import itergrad as ig
from itergrad.problems import WeightedRidge, ridge_lambda

from .helpers import central_difference_jacobian, relative_error

N_SAMPLES, N_FEATURES = 30, 5
KAPPA = 10.0
SOLVE_TOL = 1e-13  # rtol = atol of the forward loops
MAX_STEPS = 5000
RTOL_CLOSED_FORM = 1e-8  # estimator vs closed form at a converged iterate
RTOL_FD = 1e-6  # vs central differences (step 1e-6: truncation ~1e-12, noise ~1e-10)
RTOL_TRUNCATED_TARGET = 1e-8  # the accuracy Truncated(K) is sized for


def _ridge(kappa, seed=0):
    """A small weighted ridge problem with condition number `kappa` at its
    weights `theta`."""
    k_a, k_y, k_t = jr.split(jr.key(seed), 3)
    # Decaying column scales: the unregularized design is badly conditioned,
    # so that lambda > 0 can set any kappa in the tests' range.
    scales = jnp.geomspace(1.0, 0.02, N_FEATURES)
    A = jr.normal(k_a, (N_SAMPLES, N_FEATURES)) * scales
    y = jr.normal(k_y, (N_SAMPLES,))
    theta = jr.uniform(k_t, (N_SAMPLES,), minval=0.5, maxval=1.5)
    return WeightedRidge(A, y, ridge_lambda(A, kappa, theta)), theta


def _gd(problem, theta, stepsize="1/L"):
    L, mu = problem.smoothness(theta)
    return ig.GradientDescent(problem.objective, stepsize, L=L, mu=mu)


def _solution_map(solver, estimator, x0, **kwargs):
    def x_of(theta):
        return ig.solve(
            solver,
            x0,
            theta,
            estimator=estimator,
            max_steps=MAX_STEPS,
            rtol=SOLVE_TOL,
            atol=SOLVE_TOL,
            **kwargs,
        ).value

    return x_of


def _one_step_closed_form(problem, solver, theta, x):
    """$J_\\theta F(x, \\theta) = \\alpha A^T \\mathrm{diag}(y - A x)$ for GD."""
    L, mu = problem.smoothness(theta)
    alpha = 1.0 / L if solver.stepsize == "1/L" else 2.0 / (L + mu)
    return alpha * problem.A.T * (problem.y - problem.A @ x)[None, :], alpha


@pytest.fixture(scope="module")
def ridge():
    return _ridge(KAPPA)


@pytest.fixture(scope="module")
def fd_jacobian(ridge):
    problem, theta = ridge
    x_of = jax.jit(
        _solution_map(_gd(problem, theta), ig.OneStep(), jnp.zeros(N_FEATURES))
    )
    return central_difference_jacobian(x_of, theta)


def test_gd_converges_to_closed_form(ridge, fd_jacobian):
    problem, theta = ridge
    sol = eqx.filter_jit(ig.solve)(
        _gd(problem, theta),
        jnp.zeros(N_FEATURES),
        theta,
        max_steps=MAX_STEPS,
        rtol=SOLVE_TOL,
        atol=SOLVE_TOL,
    )
    assert sol.result == ig.RESULTS.successful
    assert relative_error(sol.value, problem.solution(theta)) < RTOL_CLOSED_FORM
    assert relative_error(fd_jacobian, problem.jacobian(theta)) < RTOL_FD


@pytest.mark.parametrize(
    "estimator, jac",
    [
        (ig.Implicit(), jax.jacrev),
        (ig.Implicit(condition="fixed_point"), jax.jacfwd),
        (ig.Unroll(), jax.jacrev),
        (ig.Unroll("forward"), jax.jacfwd),
    ],
    ids=["implicit-rev", "implicit-fixed-point-fwd", "unroll-rev", "unroll-fwd"],
)
def test_gd_fixed_point_estimators(ridge, fd_jacobian, estimator, jac):
    problem, theta = ridge
    x_of = _solution_map(_gd(problem, theta), estimator, jnp.zeros(N_FEATURES))
    J = jax.jit(jac(x_of))(theta)
    assert relative_error(J, problem.jacobian(theta)) < RTOL_CLOSED_FORM
    assert relative_error(J, fd_jacobian) < RTOL_FD


@pytest.mark.parametrize("K", [1, 3])
def test_gd_one_step_and_truncated_closed_form(ridge, K):
    # The estimators' own closed forms at the (converged) iterate:
    # sum_{i<K} (I - alpha H)^i B with B = J_theta F(x_bar).
    problem, theta = ridge
    solver = _gd(problem, theta)
    estimator = ig.OneStep() if K == 1 else ig.Truncated(K)
    J = jax.jit(jax.jacrev(_solution_map(solver, estimator, jnp.zeros(N_FEATURES))))(
        theta
    )
    x_bar = problem.solution(theta)
    B, alpha = _one_step_closed_form(problem, solver, theta, x_bar)
    M = jnp.eye(N_FEATURES) - alpha * problem.hessian(theta)
    expected = sum(jnp.linalg.matrix_power(M, i) @ B for i in range(K))
    assert relative_error(J, expected) < RTOL_CLOSED_FORM

    # Second reference: finite differences of theta -> F^K(x_bar, theta).
    def F_K(t):
        x = x_bar
        for _ in range(K):
            x, _ = solver.step(x, None, t)
        return x

    assert relative_error(J, central_difference_jacobian(F_K, theta)) < RTOL_FD


def _one_step_error_and_bound(kappa):
    problem, theta = _ridge(kappa)
    solver = _gd(problem, theta)
    x0 = jnp.zeros(N_FEATURES)
    x_of = _solution_map(solver, ig.OneStep(), x0)
    J_os, x_k = jax.jit(jax.jacrev(lambda t: (x_of(t), x_of(t)), has_aux=True))(theta)
    J_bar = problem.jacobian(theta)
    error = float(jnp.linalg.norm(J_os - J_bar, ord=2))

    x_bar = problem.solution(theta)
    B, alpha = _one_step_closed_form(problem, solver, theta, x_bar)
    # Invert the last (affine) step x_k = (I - alpha H) x_{k-1} + alpha A^T diag(theta) y.
    M = jnp.eye(N_FEATURES) - alpha * problem.hessian(theta)
    x_prev = jnp.linalg.solve(M, x_k - alpha * problem.A.T @ (theta * problem.y))
    rho = float(
        jnp.max(jnp.abs(1 - alpha * jnp.linalg.eigvalsh(problem.hessian(theta))))
    )
    # theta scales the data term, so J_theta F = alpha A^T diag(y - A x): L_F is
    # its norm at the solution (Lemma 2's ||B||), not Example 1's "<= 1", and
    # L_J = alpha ||A|| max_i ||a_i|| bounds x -> J_theta F's Lipschitz constant.
    L_F = float(jnp.linalg.norm(B, ord=2))
    L_J = float(
        alpha
        * jnp.linalg.norm(problem.A, ord=2)
        * jnp.max(jnp.linalg.norm(problem.A, axis=1))
    )
    bound = rho * L_F / (1 - rho) + L_J * float(jnp.linalg.norm(x_prev - x_bar))
    return error, bound, rho


def test_gd_one_step_error_shrinks_with_rho():
    error_fast, bound_fast, rho_fast = _one_step_error_and_bound(5.0)
    error_slow, bound_slow, rho_slow = _one_step_error_and_bound(50.0)
    assert rho_fast < rho_slow
    assert error_fast < error_slow
    assert error_fast <= bound_fast
    assert error_slow <= bound_slow


def test_gd_truncated_reaches_implicit_accuracy():
    problem, theta = _ridge(5.0)
    solver = _gd(problem, theta, stepsize="2/(L+mu)")
    L, mu = problem.smoothness(theta)
    rho = float((L - mu) / (L + mu))
    K = math.ceil(math.log(RTOL_TRUNCATED_TARGET) / math.log(rho))
    x0 = jnp.zeros(N_FEATURES)
    J_bar = problem.jacobian(theta)
    errors = {
        name: relative_error(
            jax.jit(jax.jacrev(_solution_map(solver, est, x0)))(theta), J_bar
        )
        for name, est in [
            ("implicit", ig.Implicit()),
            ("truncated", ig.Truncated(K)),
            ("short", ig.Truncated(max(K // 4, 1))),
        ]
    }
    assert errors["implicit"] < RTOL_CLOSED_FORM
    assert errors["truncated"] < 10 * RTOL_TRUNCATED_TARGET
    assert errors["short"] > 100 * errors["truncated"]


def test_heavy_ball_implicit(ridge, fd_jacobian):
    problem, theta = ridge
    L, mu = (float(c) for c in problem.smoothness(theta))
    # Polyak's parameters.
    stepsize = 4.0 / (math.sqrt(L) + math.sqrt(mu)) ** 2
    momentum = ((math.sqrt(L / mu) - 1) / (math.sqrt(L / mu) + 1)) ** 2
    solver = ig.HeavyBall(problem.objective, stepsize, momentum)
    x0 = jnp.zeros(N_FEATURES)
    solve = eqx.filter_jit(ig.solve)
    kwargs = dict(max_steps=MAX_STEPS, rtol=SOLVE_TOL, atol=SOLVE_TOL)
    sol = solve(solver, x0, theta, **kwargs)
    assert sol.result == ig.RESULTS.successful
    assert relative_error(sol.value, problem.solution(theta)) < RTOL_CLOSED_FORM
    assert sol.steps < solve(_gd(problem, theta), x0, theta, **kwargs).steps
    for estimator in (ig.Implicit(), ig.Implicit(condition="fixed_point")):
        J = jax.jit(jax.jacrev(_solution_map(solver, estimator, x0)))(theta)
        assert relative_error(J, problem.jacobian(theta)) < RTOL_CLOSED_FORM
        assert relative_error(J, fd_jacobian) < RTOL_FD


def test_gd_jit_vmap(ridge):
    problem, theta = ridge
    estimator = ig.Implicit()
    solver = _gd(problem, theta)
    # Step 1/L at the base weights stays below 2/L at weights up to 1.3x.
    thetas = theta[None, :] * jnp.array([1.0, 1.1, 1.3])[:, None]

    @eqx.debug.assert_max_traces(max_traces=1)
    def batched(ts):
        return jax.vmap(
            jax.jacrev(_solution_map(solver, estimator, jnp.zeros(N_FEATURES)))
        )(ts)

    jitted = jax.jit(batched)
    Js = jitted(thetas)
    jitted(thetas + 0.01)
    for J, t in zip(Js, thetas, strict=True):
        assert relative_error(J, problem.jacobian(t)) < RTOL_CLOSED_FORM


def test_gd_pytree_iterate(ridge):
    problem, theta = ridge

    def objective(x, t):
        return problem.objective(jnp.concatenate([x["head"], x["tail"]]), t)

    L, _ = problem.smoothness(theta)
    solver = ig.GradientDescent(objective, "1/L", L=L)
    x0 = {"head": jnp.zeros(2), "tail": jnp.zeros(N_FEATURES - 2)}

    def x_of(t):
        x = _solution_map(solver, ig.Implicit(), x0)(t)
        return jnp.concatenate([x["head"], x["tail"]])

    J = jax.jit(jax.jacfwd(x_of))(theta)
    assert relative_error(J, problem.jacobian(theta)) < RTOL_CLOSED_FORM


def test_stepsize_validation():
    f = lambda x, t: jnp.sum(x**2)  # noqa: E731
    with pytest.raises(ValueError, match="needs the smoothness constants"):
        ig.GradientDescent(f, "1/L")
    with pytest.raises(ValueError, match="mu"):
        ig.GradientDescent(f, "2/(L+mu)", L=2.0)
    with pytest.raises(ValueError, match="`L` > 0"):
        ig.GradientDescent(f, "1/L", L=-1.0)
    with pytest.raises(ValueError, match="mu <= L"):
        ig.GradientDescent(f, "2/(L+mu)", L=1.0, mu=2.0)
    with pytest.raises(ValueError, match="one of"):
        ig.GradientDescent(f, "1/mu", L=1.0)
    with pytest.raises(ValueError, match="positive"):
        ig.GradientDescent(f, -0.1)
    with pytest.raises(ValueError, match="momentum"):
        ig.HeavyBall(f, 0.1, 1.0)
    with pytest.raises(ValueError, match="x0"):
        ig.solve(ig.GradientDescent(f, 0.1), None, jnp.ones(2))
    # A rule with concrete constants resolves to the documented step.
    solver = ig.GradientDescent(f, "2/(L+mu)", L=3.0, mu=1.0)
    np.testing.assert_allclose(
        solver.step(jnp.ones(2), None, None)[0], 1 - 0.5 * 2 * jnp.ones(2)
    )
