"""`ig.hypergradient_descent` (eq. 10) on held-out ridge regularization, with
the closed-form solution as reference, and Corollary 4/5's bounds."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import itergrad as ig

GAP_TOL = 1e-4  # relative validation-loss gap to the grid-search optimum
N_FEATURES, N_TRAIN, N_VAL = 8, 12, 40


def _ridge_bilevel():
    """Inner: f(x, theta) = 1/2 |A x - y|^2 + e^theta / 2 |x|^2 (theta = log
    lambda); outer: the mean squared error on held-out data. Few noisy
    training samples, so the best lambda is interior."""
    k1, k2, k3, k4, k5 = jr.split(jr.key(0), 5)
    x_star = 0.5 * jr.normal(k1, (N_FEATURES,))
    A = jr.normal(k2, (N_TRAIN, N_FEATURES))
    y = A @ x_star + 1.5 * jr.normal(k3, (N_TRAIN,))
    A_val = jr.normal(k4, (N_VAL, N_FEATURES))
    y_val = A_val @ x_star + 1.5 * jr.normal(k5, (N_VAL,))

    def inner(x, theta):
        return 0.5 * jnp.sum((A @ x - y) ** 2) + 0.5 * jnp.exp(theta) * jnp.dot(x, x)

    def outer(x, theta):
        return 0.5 * jnp.mean((A_val @ x - y_val) ** 2)

    def x_bar(theta):
        H = A.T @ A + jnp.exp(theta) * jnp.eye(N_FEATURES)
        return jnp.linalg.solve(H, A.T @ y)

    grid = jnp.linspace(-6.0, 8.0, 4001)
    best = float(jnp.min(jax.vmap(lambda t: outer(x_bar(t), t))(grid)))
    return inner, outer, x_bar, A, A_val, best


def _example(name):
    path = pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_newton_onestep_finds_heldout_optimal_lambda():
    # examples/ridge_regularization.py: Newton inner solver, theta = log lambda,
    # gap to a 4001-point grid search of the closed-form validation loss.
    results = _example("ridge_regularization").main(quick=True)
    for name in ("OneStep", "Implicit", "Unroll"):
        assert results[name]["gap"] <= GAP_TOL, (name, results[name])
    assert abs(results["OneStep"]["theta"] - results["Implicit"]["theta"]) < 1e-6


def test_logistic_weights_example_downweights_flipped_labels():
    results = _example("logistic_weights").main(quick=True)
    for name in ("OneStep", "Implicit", "Unroll"):
        r = results[name]
        assert r["loss"] < results["uniform"]["loss"]
        assert r["flipped_weight"] < 0.5 * r["clean_weight"]
    # Newton converges quadratically: one-step and implicit agree (Corollary 3).
    np.testing.assert_allclose(
        results["OneStep"]["loss"], results["Implicit"]["loss"], rtol=1e-6
    )


def test_gd_onestep_hypergradient_error_within_corollary5_epsilon():
    inner, outer, x_bar, A, A_val, best = _ridge_bilevel()
    eigs = jnp.linalg.eigvalsh(A.T @ A)
    alpha = float(1.0 / (eigs[-1] + math.exp(3.0)))  # 1/L for every lambda <= e^3
    solver = ig.GradientDescent(inner, alpha)
    k = 30  # a fixed number of inner steps, as in Corollary 5
    fixed_k = dict(max_steps=k, rtol=0.0, atol=0.0, throw=False)
    history = ig.hypergradient_descent(
        outer,
        solver,
        jnp.array(0.0),
        jnp.zeros(N_FEATURES),
        optimizer=optax.adam(0.1),
        steps=150,
        progress=False,
        **fixed_k,
    )
    theta, x0 = history.theta[-1], history.x
    assert float(theta) < 3.0
    assert np.all(np.asarray(history.steps) == k)

    def onestep_objective(theta):
        return outer(ig.solve(solver, x0, theta, **fixed_k).value, theta)

    g_onestep = jax.grad(onestep_objective)(theta)
    g_true = jax.grad(lambda t: outer(x_bar(t), t))(theta)
    error = float(jnp.abs(g_onestep - g_true))

    # Constants of Corollaries 4/5 at the final theta, in closed form:
    # J_x F = I - alpha H, J_theta F(x) = -alpha lambda x.
    lam = math.exp(float(theta))
    rho = 1.0 - alpha * (float(eigs[0]) + lam)
    iterates = [x0]
    for _ in range(k):
        iterates.append(solver.step(iterates[-1], theta))
    xb = x_bar(theta)
    L_F = (
        alpha
        * lam
        * max(float(jnp.linalg.norm(xb)), float(jnp.linalg.norm(iterates[-2])))
    )
    L_J = alpha * lam
    l_g = float(jnp.linalg.norm(jax.grad(outer)(xb, theta)))  # ||grad g(x_bar)||
    l_nabla = float(jnp.linalg.norm(A_val.T @ A_val / N_VAL, 2))
    M = float(jnp.linalg.norm(iterates[1] - iterates[0]))
    epsilon = ig.hypergradient_epsilon(rho, L_F, L_J, l_g, l_nabla, M, k)
    assert error <= epsilon, (error, epsilon)
    # OneStep's fixed point is biased: the true hypergradient does not vanish.
    assert error > 1e-6
    # diagnose finds the same constants matrix-free.
    sol = ig.solve(solver, x0, theta, **fixed_k)
    report = ig.diagnose(solver, sol, theta, key=jr.key(0))
    np.testing.assert_allclose(float(report.rho), rho, rtol=1e-3)
    np.testing.assert_allclose(float(report.L_J), L_J, rtol=1e-6)


def test_corollary5_formulas():
    rho, L_F, L_J, l_g, l_nabla, M, k = 0.5, 2.0, 3.0, 0.5, 4.0, 1.5, 6
    a = L_F / (1 - rho)
    L = (L_J / (1 - rho) * (a + 1) * l_g + l_nabla * a) * a
    assert math.isclose(ig.hypergradient_stepsize(rho, L_F, L_J, l_g, l_nabla), 1 / L)
    eps = (
        rho / (1 - rho) * (L_F * l_g + (L_J * l_g + L_F * l_nabla) * M * rho ** (k - 2))
    )
    assert math.isclose(
        ig.hypergradient_epsilon(rho, L_F, L_J, l_g, l_nabla, M, k), eps
    )
    with pytest.raises(ValueError, match="contraction factor"):
        ig.hypergradient_stepsize(1.0, L_F, L_J, l_g, l_nabla)
    with pytest.raises(ValueError, match="k >= 2"):
        ig.hypergradient_epsilon(rho, L_F, L_J, l_g, l_nabla, M, 1)


def _halving_map(x, theta):
    # F(x, theta) = x/2 + theta["b"]: fixed point 2 b; rho = 1/2, L_F = 1, L_J = 0.
    return {"u": 0.5 * x["u"] + theta["b"]}


def _distance_to_one(x, theta):
    return 0.5 * jnp.sum((x["u"] - 1.0) ** 2)


def test_corollary5_stepsize_option():
    theta0, x0 = {"b": jnp.zeros(2)}, {"u": jnp.zeros(2)}
    constants = dict(rho=0.5, L_F=1.0, L_J=0.0, l_g=2.0, l_nabla=1.0)
    common = dict(
        stepsize="corollary5", steps=10, progress=False, rtol=1e-12, atol=1e-12
    )
    history = ig.hypergradient_descent(
        _distance_to_one, _halving_map, theta0, x0, constants=constants, **common
    )
    assert history.stats["stepsize"] == ig.hypergradient_stepsize(**constants)
    # Missing constants are estimated at theta0 (diagnose, |grad g|, |hess g|).
    history = ig.hypergradient_descent(
        _distance_to_one, _halving_map, theta0, x0, **common
    )
    # rho = 1/2, L_F = 1, L_J = 0, l_g = |grad g(0)| = sqrt(2), l_nabla = 1.
    expected = ig.hypergradient_stepsize(0.5, 1.0, 0.0, math.sqrt(2.0), 1.0)
    np.testing.assert_allclose(history.stats["stepsize"], expected, rtol=1e-6)
    assert float(history.losses[-1]) < float(history.losses[0])


def test_plain_step_map_pytree_warm_start_and_progress():
    F, outer = _halving_map, _distance_to_one
    theta0 = {"b": jnp.zeros(2)}
    x0 = {"u": jnp.zeros(2)}
    kwargs = dict(
        estimator=ig.Implicit(), stepsize=0.1, steps=40, rtol=1e-12, atol=1e-12
    )
    warm = ig.hypergradient_descent(outer, F, theta0, x0, progress=True, **kwargs)
    cold = ig.hypergradient_descent(
        outer, F, theta0, x0, progress=False, warm_start=False, **kwargs
    )
    np.testing.assert_allclose(warm.theta["b"][-1], 0.5, atol=1e-6)
    assert warm.theta["b"].shape == (41, 2)
    assert warm.losses.shape == warm.steps.shape == (40,)
    assert warm.hypergradient_norms.shape == (40,)
    assert int(warm.steps[-1]) < int(cold.steps[-1])
    assert warm.stats["traces"] == 1


def test_argument_errors():
    inner, outer, *_ = _ridge_bilevel()
    solver = ig.Newton(inner)
    with pytest.raises(ValueError, match="not both"):
        ig.hypergradient_descent(
            outer,
            solver,
            0.0,
            jnp.zeros(N_FEATURES),
            optimizer=optax.sgd(1.0),
            stepsize=1.0,
        )
    with pytest.raises(ValueError, match="`steps` must be a positive integer"):
        ig.hypergradient_descent(outer, solver, 0.0, jnp.zeros(N_FEATURES), steps=0)
    with pytest.raises(ValueError, match="Unknown `constants`"):
        ig.hypergradient_descent(
            outer,
            solver,
            0.0,
            jnp.zeros(N_FEATURES),
            stepsize="corollary5",
            constants={"kappa": 1.0},
        )
