"""`ig.hypergradient_descent` and its step `ig.HypergradientDescent` (eq. 10)
on held-out ridge regularization, with the closed-form solution as reference,
and Corollary 4/5's bounds checked on problems whose constants are known."""

import importlib.util
import math
import pathlib

import equinox as eqx
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


# The end-to-end example (~25 s of compilation): the README's and the bilevel
# tutorial's Newton hypergradient loops (tests/test_readme.py, test_docs.py) and
# test_step_in_a_user_loop_matches_the_convenience_loop cover the same path.
@pytest.mark.slow
def test_newton_onestep_finds_heldout_optimal_lambda():
    # examples/ridge_regularization.py: Newton inner solver, theta = log lambda,
    # gap to a 4001-point grid search of the closed-form validation loss.
    results = _example("ridge_regularization").main(quick=True)
    for name in ("OneStep", "Implicit", "Unroll"):
        assert results[name]["gap"] <= GAP_TOL, (name, results[name])
    assert abs(results["OneStep"]["theta"] - results["Implicit"]["theta"]) < 1e-6


@pytest.mark.slow  # the end-to-end example (~30 s); the ridge example above stays
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
        # OneStep's bias on gradient descent is what this test measures: its
        # error estimate (~1) would warn on every run.
        error_estimate=False,
        **fixed_k,
    )
    theta, x0 = history.theta[-1], history.x
    assert float(theta) < 3.0
    assert np.all(np.asarray(history.steps) == k)

    def onestep_objective(theta):
        return outer(ig.solve(solver, x0, theta, **fixed_k).value, theta)

    g_onestep = jax.jit(jax.grad(onestep_objective))(theta)  # one compilation
    g_true = jax.grad(lambda t: outer(x_bar(t), t))(theta)
    error = float(jnp.abs(g_onestep - g_true))

    # Constants of Corollaries 4/5 at the final theta, in closed form:
    # J_x F = I - alpha H, J_theta F(x) = -alpha lambda x.
    lam = math.exp(float(theta))
    rho = 1.0 - alpha * (float(eigs[0]) + lam)
    # The inner iterates, by the gradient step written out (not solver.step).
    grad_inner = jax.jit(jax.grad(inner))  # compiled once, not dispatched op by op
    iterates = [x0]
    for _ in range(k):
        iterates.append(iterates[-1] - alpha * grad_inner(iterates[-1], theta))
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
    # Solve and diagnose in one compilation (only rho and L_J are read).
    report = eqx.filter_jit(lambda x0, theta: ig.diagnose(
        solver, ig.solve(solver, x0, theta, **fixed_k), theta, key=jr.key(0),
        allow_unconverged=True))(x0, theta)  # k fixed on purpose
    np.testing.assert_allclose(float(report.rho), rho, rtol=1e-3)
    np.testing.assert_allclose(float(report.L_J), L_J, rtol=1e-6)


# Corollary 5 on a problem where every constant is a global bound and the
# hypergradient is known in closed form: F(x, theta) = rho x + (c/w) sin(w theta)
# (a rho-contraction; |J_theta F| <= c; J_(x,theta) F = [rho, c cos(w theta)] is
# c w Lipschitz), g(x) = x (l_g = 1, l_nabla = 0). Then x_bar = (c/w) sin(w
# theta) / (1 - rho), the hypergradient is h = c cos(w theta) / (1 - rho), and
# its Lipschitz constant is c w / (1 - rho) = L_J l_g / (1 - rho).
SINE = dict(rho=0.1, c=0.1, w=10.0)


def _sine_problem():
    rho, c, w = SINE["rho"], SINE["c"], SINE["w"]
    constants = dict(rho=rho, L_F=c, L_J=c * w, l_g=1.0, l_nabla=0.0)

    def F(x, theta):
        return rho * x + (c / w) * jnp.sin(w * theta)

    def outer(x, theta):
        return x

    def h(theta):  # g o x_bar, in closed form
        return (c / w) * jnp.sin(w * theta) / (1 - rho)

    return F, outer, h, constants


def test_corollary5_stepsize_bounds_the_hypergradient_lipschitz_constant():
    F, outer, h, constants = _sine_problem()
    alpha = ig.hypergradient_stepsize(**constants)
    grid = jnp.linspace(-1.0, 1.0, 20001)
    hypergradient = jax.vmap(jax.grad(h))(grid)
    lipschitz = float(jnp.max(jnp.abs(jax.vmap(jax.grad(jax.grad(h)))(grid))))
    np.testing.assert_allclose(lipschitz, constants["L_J"] / 0.9, rtol=1e-6)
    assert lipschitz <= 1 / alpha
    assert lipschitz >= 0.5 / alpha  # and not a vacuous bound
    # The consequence Corollary 5 needs (Lemma 3's descent step): an exact
    # gradient step of length alpha decreases h by at least alpha/2 |h'|^2.
    stepped = jax.vmap(h)(grid - alpha * hypergradient)
    decrease = jax.vmap(h)(grid) - stepped
    assert bool(jnp.all(decrease >= 0.5 * alpha * hypergradient**2 - 1e-15))
    # The paper's printed constant (a = L_F/(1 - rho) where sqrt(1 + a^2)
    # belongs, see `hypergradient_stepsize`) is 8 times too small here, and
    # its step overshoots: this test is what caught it.
    rho, L_F, L_J = constants["rho"], constants["L_F"], constants["L_J"]
    a = L_F / (1 - rho)
    paper_alpha = 1 / (L_J / (1 - rho) * (a + 1) * constants["l_g"] * a)
    assert lipschitz > 8 / paper_alpha
    paper_decrease = jax.vmap(h)(grid) - jax.vmap(h)(grid - paper_alpha * hypergradient)
    assert float(jnp.min(paper_decrease)) < 0


def test_onestep_hypergradient_error_within_corollary5_epsilon_on_sine():
    F, outer, h, constants = _sine_problem()
    k, x0 = 6, jnp.zeros(())
    # M >= |x0 - F(x0, theta)| = (c/w) |sin(w theta)| for every theta.
    M = SINE["c"] / SINE["w"]
    epsilon = ig.hypergradient_epsilon(**constants, M=M, k=k)

    def onestep(theta):
        sol = ig.iterate(F, x0, theta, max_steps=k, rtol=0.0, atol=0.0, throw=False)
        return outer(sol.value, theta)

    thetas = jnp.linspace(-1.0, 1.0, 41)
    errors = jnp.abs(
        jax.vmap(jax.grad(onestep))(thetas) - jax.vmap(jax.grad(h))(thetas)
    )
    assert float(jnp.max(errors)) <= epsilon
    # At cos(w theta) = 1 the error is rho c / (1 - rho), Corollary 4's first
    # term: epsilon is tight up to its rho^(k-2) term.
    assert float(jnp.max(errors)) >= 0.99 * epsilon / (
        1 + SINE["c"] * SINE["rho"] ** (k - 2)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corollary5_stepsize_for_linear_maps_is_attained(seed):
    # F(x, theta) = A x + B theta with ||A|| <= rho, g(x) = 1/2 x^T C x with
    # ||C|| = l_nabla: L_J = 0 and the Hessian of g o x_bar is
    # B^T (I - A)^-T C (I - A)^-1 B, of norm at most l_nabla (L_F/(1 - rho))^2,
    # with equality for A = rho I and C aligned with B's top singular vector.
    # (g is not globally Lipschitz, but l_g only enters multiplied by L_J = 0.)
    n, m, rho, l_nabla = 4, 3, 0.6, 2.0
    kA, kB, kC = jr.split(jr.key(seed), 3)
    A = jr.normal(kA, (n, n))
    A = rho * A / jnp.linalg.norm(A, 2)
    B = jr.normal(kB, (n, m))
    L_F = float(jnp.linalg.norm(B, 2))
    Q, _ = jnp.linalg.qr(jr.normal(kC, (n, n)))
    C = Q @ jnp.diag(jnp.linspace(-l_nabla, l_nabla, n)) @ Q.T
    alpha = ig.hypergradient_stepsize(rho, L_F, 0.0, 1.0, l_nabla)

    def hessian_norm(A, C):
        J = jnp.linalg.solve(jnp.eye(n) - A, B)
        return float(jnp.linalg.norm(J.T @ C @ J, 2))

    assert hessian_norm(A, C) <= 1 / alpha * (1 + 1e-12)
    u = jnp.linalg.svd(B)[0][:, 0]
    aligned = l_nabla * jnp.outer(u, u)
    np.testing.assert_allclose(
        hessian_norm(rho * jnp.eye(n), aligned), 1 / alpha, rtol=1e-12
    )


def test_corollary5_argument_errors():
    with pytest.raises(ValueError, match="contraction factor"):
        ig.hypergradient_stepsize(1.0, 2.0, 3.0, 0.5, 4.0)
    with pytest.raises(ValueError, match="k >= 2"):
        ig.hypergradient_epsilon(0.5, 2.0, 3.0, 0.5, 4.0, 1.5, 1)
    with pytest.raises(ValueError, match="`L_J` must be a non-negative number"):
        ig.hypergradient_stepsize(0.5, 2.0, -3.0, 0.5, 4.0)


def _halving_map(x, theta):
    # F(x, theta) = x/2 + theta["b"]: fixed point 2 b; rho = 1/2, L_F = 1, L_J = 0.
    return {"u": 0.5 * x["u"] + theta["b"]}


def _distance_to_one(x, theta):
    return 0.5 * jnp.sum((x["u"] - 1.0) ** 2)


def test_corollary5_stepsize_option():
    theta0, x0 = {"b": jnp.zeros(2)}, {"u": jnp.zeros(2)}
    constants = dict(rho=0.5, L_F=1.0, L_J=0.0, l_g=2.0, l_nabla=1.0)
    # error_estimate=False: OneStep's bias (rho = 1/2) is accepted here, the
    # test is about the step size.
    common = dict(
        stepsize="corollary5", steps=10, progress=False, rtol=1e-12, atol=1e-12,
        error_estimate=False,
    )
    history = ig.hypergradient_descent(
        _distance_to_one, _halving_map, theta0, x0, constants=constants, **common
    )
    assert history.stats["stepsize"] == ig.hypergradient_stepsize(**constants)
    # Missing constants are estimated at theta0 (diagnose, |grad g|, |hess g|).
    history = ig.hypergradient_descent(
        _distance_to_one, _halving_map, theta0, x0, key=jr.key(0), **common
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
    with pytest.raises(ValueError, match="pass `key="):
        ig.hypergradient_descent(
            outer, solver, 0.0, jnp.zeros(N_FEATURES), stepsize="corollary5"
        )
    with pytest.raises(ValueError, match="`stepsize` must be a positive number"):
        ig.hypergradient_descent(
            outer, solver, 0.0, jnp.zeros(N_FEATURES), stepsize=-1.0
        )
    with pytest.raises(TypeError, match="`optimizer` must be an optax"):
        ig.HypergradientDescent(outer, solver, 0.1)
    with pytest.raises(TypeError, match="`solver` must be an itergrad solver"):
        ig.HypergradientDescent(outer, 3, optax.sgd(0.1))
    with pytest.raises(ValueError, match="`max_steps` must be a positive integer"):
        ig.HypergradientDescent(outer, solver, optax.sgd(0.1), max_steps=0)
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


def test_step_in_a_user_loop_matches_the_convenience_loop():
    inner, outer, *_ = _ridge_bilevel()
    solver, steps = ig.Newton(inner), 12
    theta0, x0 = jnp.zeros(()), jnp.zeros(N_FEATURES)  # committed float64
    history = ig.hypergradient_descent(
        outer,
        solver,
        theta0,
        x0,
        optimizer=optax.adam(0.1),
        steps=steps,
        progress=False,
    )
    method = ig.HypergradientDescent(outer, solver, optax.adam(0.1))

    # A Python loop over the jitted step, traced once.
    step = eqx.debug.assert_max_traces(max_traces=1)(method.step)
    step = eqx.filter_jit(step)
    theta, state = theta0, method.init(theta0, x0)
    thetas, losses, inner_steps, norms = [theta0], [], [], []
    for _ in range(steps):
        theta, state, info = step(theta, state)
        thetas.append(theta)
        losses.append(info.loss)
        inner_steps.append(info.steps)
        norms.append(info.hypergradient_norm)
        assert ig.result_name(info.result) == "successful"
    np.testing.assert_array_equal(jnp.stack(thetas), history.theta)
    np.testing.assert_array_equal(jnp.stack(losses), history.losses)
    np.testing.assert_array_equal(jnp.stack(inner_steps), history.steps)
    np.testing.assert_array_equal(jnp.stack(norms), history.hypergradient_norms)
    np.testing.assert_array_equal(info.x, history.x)
    # Warm start: the next inner solve starts from the last solution.
    np.testing.assert_array_equal(state.x, info.x)

    # The whole outer loop compiled as one lax.scan.
    @eqx.filter_jit
    def run(theta, state):
        def body(carry, _):
            theta, state, info = method.step(*carry)
            return (theta, state), (theta, info.loss, info.steps)

        return jax.lax.scan(body, (theta, state), length=steps)

    (theta_last, _), (scan_thetas, scan_losses, scan_steps) = run(
        theta0, method.init(theta0, x0)
    )
    np.testing.assert_allclose(scan_thetas, history.theta[1:], rtol=1e-10)
    np.testing.assert_allclose(scan_losses, history.losses, rtol=1e-10)
    np.testing.assert_array_equal(scan_steps, history.steps)


def test_cold_start_keeps_x0():
    method = ig.HypergradientDescent(
        _distance_to_one,
        _halving_map,
        optax.sgd(0.1),
        ig.Implicit(),
        warm_start=False,
        rtol=1e-12,
        atol=1e-12,
    )
    theta, x0 = {"b": jnp.zeros(2)}, {"u": jnp.full(2, 3.0)}
    state = method.init(theta, x0)
    theta, state, info = eqx.filter_jit(method.step)(theta, state)
    np.testing.assert_array_equal(state.x["u"], x0["u"])
    np.testing.assert_allclose(info.x["u"], 0.0, atol=1e-10)  # fixed point 2 b
    # h(b) = 1/2 |2 b - 1|^2: hypergradient 2 (2 b - 1) = -2 at b = 0.
    np.testing.assert_allclose(info.hypergradient["b"], -2.0, rtol=1e-8)
    np.testing.assert_allclose(theta["b"], 0.2, rtol=1e-8)
