"""`ig.Auto`: the estimator chosen at run time from the measured contraction,
each branch checked against a closed form and against finite differences (or
another estimator), under jit, vmap, jacfwd and jacrev."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import itergrad as ig

jax.config.update("jax_enable_x64", True)

ONE_STEP, TRUNCATED, IMPLICIT = 0, 1, 2


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _scaled_tanh(x, theta):
    # F(x) = a tanh(x) + c with theta = (a, c): rho = a at x = 0, and
    # J_c x̄ = (I - a diag(sech^2 x̄))^{-1}.
    return theta[0] * jnp.tanh(x) + theta[1:]


def _tanh_closed_form(theta, x_bar):
    return jnp.linalg.inv(jnp.eye(3) - theta[0] * jnp.diag(1 / jnp.cosh(x_bar) ** 2))


def _tanh_value(estimator, **kw):
    return lambda theta: ig.iterate(_scaled_tanh, jnp.zeros(3), theta,
                                    estimator=estimator, max_steps=20_000,
                                    rtol=1e-13, atol=1e-13, **kw).value


@pytest.mark.parametrize("kappa", [
    pytest.param(100.0, marks=pytest.mark.slow),  # CI time budget
    1000.0,
])
def test_ridge_gradient_descent_meets_the_target(kappa):
    # The trust issue's case: GD with step 1/L, rho = 1 - 1/kappa; the
    # needed K (~920, ~9200) is beyond max_K, so Auto solves implicitly.
    problem = ig.problems.ridge_data(jr.key(0), 64, 6, kappa=kappa, design_condition=1e5)
    w = jnp.ones(64)
    solver = ig.GradientDescent(problem.objective, stepsize="1/L",
                                L=float(problem.smoothness(w)[0]))

    def solve(t):
        return ig.solve(solver, jnp.zeros(6), t, estimator=ig.Auto(target=1e-4),
                        max_steps=200_000, rtol=1e-12, atol=1e-12, error_estimate=True)

    def value_and_stats(t):
        sol = solve(t)
        return sol.value, sol.stats

    J, stats = jax.jit(jax.jacfwd(value_and_stats, has_aux=True))(w)
    assert int(stats["estimator"]) == IMPLICIT
    assert abs(float(stats["contraction"]) - (1 - 1 / kappa)) < 0.2 / kappa
    exact = problem.jacobian(w)
    assert _rel(J, exact) <= 1e-6
    # Finite differences of the solution along a random direction.
    v = jr.normal(jr.key(1), (64,))
    h = 1e-4
    value = jax.jit(lambda t: solve(t).value)
    fd = (value(w + h * v) - value(w - h * v)) / (2 * h)
    assert _rel(J @ v, fd) <= 1e-6
    assert float(stats["derivative_error_bound"]) >= _rel(J, exact)


def test_moderate_contraction_truncates_to_the_needed_K():
    theta = jnp.array([0.6, 0.1, -0.2, 0.3])
    sol = ig.iterate(_scaled_tanh, jnp.zeros(3), theta, estimator=ig.Auto(),
                     max_steps=20_000, rtol=1e-13, atol=1e-13, error_estimate=True)
    assert int(sol.stats["estimator"]) == TRUNCATED
    rho = float(sol.stats["contraction"])
    K = int(sol.stats["differentiated_steps"])
    # The smallest K with rho^K / (1 - rho^K) <= 1e-4.
    assert rho ** K / (1 - rho ** K) <= 1e-4 < rho ** (K - 1) / (1 - rho ** (K - 1))
    # The same derivative as Truncated(K), forward and reverse.
    J_fwd = jax.jit(jax.jacfwd(_tanh_value(ig.Auto())))(theta)[:, 1:]
    J_rev = jax.jit(jax.jacrev(_tanh_value(ig.Auto())))(theta)[:, 1:]
    J_trunc = jax.jit(jax.jacfwd(_tanh_value(ig.Truncated(K))))(theta)[:, 1:]
    np.testing.assert_allclose(J_fwd, J_trunc, rtol=0, atol=1e-14)
    np.testing.assert_allclose(J_rev, J_trunc, rtol=0, atol=1e-14)
    # Within the target of the closed form, and the estimate bounds the error.
    exact = _tanh_closed_form(theta, sol.value)
    error = _rel(J_fwd, exact)
    assert 1e-8 < error <= 1e-4
    assert float(sol.stats["derivative_error_bound"]) >= error


def test_superlinear_solver_gets_one_step():
    problem = ig.problems.logistic_data(jr.key(1), 40, 4)
    solver = ig.Newton(problem.objective)

    def loss(w, estimator):
        sol = ig.solve(solver, jnp.zeros(problem.n), w, estimator=estimator,
                       rtol=1e-12, atol=1e-12)
        return 0.5 * jnp.sum(sol.value**2), sol.stats

    w = jnp.ones(40)
    g_auto, stats = jax.jit(jax.grad(lambda w: loss(w, ig.Auto()), has_aux=True))(w)
    assert int(stats["estimator"]) == ONE_STEP
    assert float(stats["contraction"]) < 1e-8
    # Another estimator (the one chosen) and finite differences.
    g_one, _ = jax.jit(jax.grad(lambda w: loss(w, ig.OneStep()), has_aux=True))(w)
    np.testing.assert_allclose(g_auto, g_one, rtol=0, atol=1e-15)
    v = jr.normal(jr.key(2), (40,))
    h = 1e-5
    value = jax.jit(lambda w: loss(w, ig.OneStep())[0])
    fd = (value(w + h * v) - value(w - h * v)) / (2 * h)
    assert abs(float(g_auto @ v - fd)) <= 1e-6 * abs(float(fd))


@pytest.mark.slow  # CI time budget; the ridge cases cover the Implicit branch
def test_norm_above_one_falls_back_to_implicit():
    # Heavy ball's phase-space map has ||T|| > 1 although it converges: no K
    # is certified, so Auto solves implicitly (exact) instead of refusing.
    problem = ig.problems.ridge_data(jr.key(3), 40, 5, kappa=50.0, design_condition=1e3)
    w = jnp.ones(40)
    L, mu = (float(v) for v in problem.smoothness(w))
    k = (L / mu) ** 0.5
    solver = ig.HeavyBall(problem.objective, stepsize=4 / (L**0.5 + mu**0.5) ** 2,
                          momentum=((k - 1) / (k + 1)) ** 2)

    def value(t):
        return ig.solve(solver, jnp.zeros(5), t, estimator=ig.Auto(), max_steps=10_000,
                        rtol=1e-12, atol=1e-12).value

    sol = ig.solve(solver, jnp.zeros(5), w, estimator=ig.Auto(), max_steps=10_000,
                   rtol=1e-12, atol=1e-12)
    assert float(sol.stats["contraction"]) >= 1
    assert int(sol.stats["estimator"]) == IMPLICIT
    assert _rel(jax.jit(jax.jacrev(value))(w), problem.jacobian(w)) <= 1e-8


def test_vmap_gives_each_instance_its_own_choice_and_derivative():
    # a = 1e-6: OneStep (rho <= t/(1+t)); 0.6: Truncated; 0.999 near x = 0:
    # rho = 0.999 sech^2(0.1) = 0.989, Implicit (K ~ 830 > max_K).
    thetas = jnp.array([[1e-6, 0.1, -0.2, 0.3],
                        [0.6, 0.1, -0.2, 0.3],
                        [0.999, 1e-4, -1e-4, 2e-4]])
    run = jax.jit(jax.vmap(lambda t: ig.iterate(
        _scaled_tanh, jnp.zeros(3), t, estimator=ig.Auto(), max_steps=200_000,
        rtol=1e-13, atol=1e-13)))
    sols = run(thetas)
    assert sols.stats["estimator"].tolist() == [ONE_STEP, TRUNCATED, IMPLICIT]
    J_batch = jax.jit(jax.vmap(jax.jacfwd(_tanh_value(ig.Auto()))))(thetas)
    for i, theta in enumerate(thetas):
        J_solo = jax.jacfwd(_tanh_value(ig.Auto()))(theta)
        np.testing.assert_allclose(J_batch[i], J_solo, rtol=0, atol=1e-12)
        exact = _tanh_closed_form(theta, sols.value[i])
        assert _rel(J_batch[i][:, 1:], exact) <= 1e-4


@pytest.mark.parametrize("kwargs, match", [
    ({"target": 0.0}, "target"),
    ({"target": 2.0}, "target"),
    ({"max_K": 0}, "max_K"),
    ({"condition": "bogus"}, "condition"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ig.Auto(**kwargs)
