"""The bad-input catalogue (../shared/reliability/catalogue.md) as tests: each
case ends in the right number or a clear refusal, never a wrong number
reported as `successful`. Numbered as in the catalogue; cases not yet covered
here are listed in the catalogue and tracked in the trust issue."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import itergrad as ig

ESTIMATORS = {
    "OneStep": (ig.OneStep(), (jax.grad, jax.jacfwd)),
    "Truncated3": (ig.Truncated(3), (jax.grad, jax.jacfwd)),
    "Implicit": (ig.Implicit(), (jax.grad, jax.jacfwd)),
    "UnrollReverse": (ig.Unroll(), (jax.grad,)),
    "UnrollForward": (ig.Unroll("forward"), (jax.jacfwd,)),
}
CASES = [(name, est, d) for name, (est, ds) in ESTIMATORS.items() for d in ds]


def _slow(x, t):
    return 0.999 * x + t


@pytest.mark.parametrize("name, estimator, derivative", CASES,
                         ids=[f"{n}-{d.__name__}" for n, _, d in CASES])
def test_S1_failed_solve_raises_under_jit_of_a_derivative(name, estimator, derivative):
    # Only the derivative of the output is used: the check must survive XLA's
    # dead-code elimination of the primal output.
    def loss(t):
        return jnp.sum(ig.iterate(_slow, jnp.zeros(2), t, estimator=estimator,
                                  max_steps=20).value)

    with pytest.raises(Exception, match="did not converge within `max_steps`"):
        jax.block_until_ready(jax.jit(derivative(loss))(jnp.ones(2)))
    # With throw=False the same program returns, flagged.
    sol = jax.jit(lambda t: ig.iterate(_slow, jnp.zeros(2), t, estimator=estimator,
                                       max_steps=20, throw=False))(jnp.ones(2))
    assert sol.result == ig.RESULTS.max_steps_reached


@pytest.mark.parametrize("name, estimator, derivative", CASES,
                         ids=[f"{n}-{d.__name__}" for n, _, d in CASES])
def test_S2_nan_theta_raises_under_jit_of_a_derivative(name, estimator, derivative):
    def loss(t):
        return jnp.sum(ig.iterate(lambda x, s: 0.5 * x + s, jnp.zeros(2), t,
                                  estimator=estimator).value)

    with pytest.raises(Exception, match="non-finite value"):
        jax.block_until_ready(jax.jit(derivative(loss))(jnp.array([1.0, jnp.nan])))


def test_S2_infeasible_qp_raises_under_jit_of_grad():
    # x >= 1 and x <= 0: infeasible.
    def loss(h):
        qp = ig.QP(Q=jnp.eye(1), q=jnp.zeros(1), G=jnp.array([[-1.0], [1.0]]), h=h)
        return jnp.sum(ig.solve(ig.InteriorPointQP(), None, qp, max_steps=50).value)

    with pytest.raises(Exception, match="infeasible|did not converge"):
        jax.block_until_ready(jax.jit(jax.grad(loss))(jnp.array([-1.0, 0.0])))


def test_successful_solves_are_unchanged_by_the_derivative_guard():
    def loss(t):
        return jnp.sum(ig.iterate(lambda x, s: 0.5 * x + s, jnp.zeros(2), t).value)

    g = jax.jit(jax.grad(loss))(jnp.ones(2))
    # x = 2 t at the fixed point: d/dt sum(x) = 1 for OneStep (x = x/2 + t).
    assert jnp.allclose(g, 1.0)
    assert isinstance(eqx.filter_jit(jax.jacfwd(loss))(jnp.ones(2)), jax.Array)


def _ridge_gd(kappa, n=8):
    """Quadratic ridge-like problem with Hessian eigenvalues geomspace(1,
    kappa), gradient descent with step 1/L: rho = 1 - 1/kappa."""
    Q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (n, n)))
    H = Q @ jnp.diag(jnp.geomspace(1.0, kappa, n)) @ Q.T
    solver = ig.GradientDescent(lambda x, t: 0.5 * x @ H @ x - t @ x, 1.0 / kappa)
    return solver, (lambda t: jnp.linalg.solve(H, t)), jnp.linspace(1.0, 2.0, n)


@pytest.mark.parametrize("kappa", [100, 1000])
def test_S8_auto_truncation_meets_its_target(kappa):
    solver, solution, theta = _ridge_gd(kappa)
    estimator = ig.Truncated("auto", target=1e-4)

    def x_of(t):
        return ig.solve(solver, jnp.zeros(theta.size), t, estimator=estimator,
                        max_steps=100_000, rtol=1e-14, atol=1e-14).value

    J = jax.jacrev(x_of)(theta)
    exact = jax.jacfwd(solution)(theta)
    error = float(jnp.linalg.norm(J - exact) / jnp.linalg.norm(exact))
    assert error <= 1e-4
    sol = ig.solve(solver, jnp.zeros(theta.size), theta, estimator=estimator,
                   max_steps=100_000, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(float(sol.stats["contraction"]), 1 - 1 / kappa, rtol=1e-4)
    # Beyond the 100 stored states: the Neumann tail carried the sum.
    assert int(sol.stats["differentiated_steps"]) > 100


def test_S8_unreachable_target_is_refused():
    def F(x, t):
        return 0.99995 * x + t

    sol = ig.iterate(F, jnp.zeros(2), jnp.ones(2), estimator=ig.Truncated("auto"),
                     max_steps=10**6, throw=False)
    assert sol.result == ig.RESULTS.truncation_target_unreachable
    with pytest.raises(Exception, match="cannot meet its target"):
        ig.iterate(F, jnp.zeros(2), jnp.ones(2), estimator=ig.Truncated("auto"),
                   max_steps=10**6)


def test_S12_repelling_fixed_point_is_flagged_by_auto_truncation():
    # F = 2x + t is repelling; started at its fixed point x = -t the loop
    # stops at once. The derivative of the fixed point is -1, what one-step
    # gives (1) and truncated sums diverge: refuse.
    def F(x, t):
        return 2.0 * x + t

    sol = ig.iterate(F, -jnp.ones(2), jnp.ones(2), estimator=ig.Truncated("auto"),
                     throw=False)
    assert sol.result == ig.RESULTS.not_contracting
    np.testing.assert_allclose(float(sol.stats["contraction"]), 2.0, rtol=1e-6)


def test_S10_neumann_needs_the_fixed_point_condition():
    with pytest.raises(ValueError, match="condition='fixed_point'"):
        ig.Implicit(linear_solver=ig.Neumann(30))
