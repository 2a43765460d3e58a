"""Every estimator against the closed forms of the linear contraction oracle
F(x, theta) = A x + B theta + c (DESIGN.md §7)."""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import itergrad as ig

from .helpers import (
    central_difference_jacobian,
    jacobian_fn,
    linear_contraction,
    truncated_jacobian,
)

N, M, RHO, K_STEPS = 6, 4, 0.5, 80
EXACT_TOL = 1e-12  # OneStep / Truncated: the same arithmetic as the closed form
SOLVE_TOL = 1e-10  # Implicit / Unroll: a linear solve or 80 accumulated products


def _linear_problem():
    F, A, B, c = linear_contraction(jr.key(0), N, M, RHO)
    theta = jr.normal(jr.key(1), (M,))
    return F, A, B, c, theta


def _value_fn(F, estimator, max_steps=K_STEPS):
    # rtol = atol = 0: exactly `max_steps` steps, as in the paper's fixed-k runs;
    # the loop then honestly reports max_steps_reached, hence throw=False.
    def value(theta):
        sol = ig.iterate(
            F, jnp.zeros(N), theta, estimator=estimator, max_steps=max_steps,
            rtol=0.0, atol=0.0, throw=False,
        )
        return sol.value

    return value


def _closed_forms(A, B):
    eye = jnp.eye(N)
    return {
        "onestep": B,
        "truncated3": truncated_jacobian(A, B, 3),
        "unroll": truncated_jacobian(A, B, K_STEPS),
        "implicit": jnp.linalg.solve(eye - A, B),
    }


CASES = [
    ("onestep", ig.OneStep(), ("fwd", "rev"), EXACT_TOL),
    ("truncated3", ig.Truncated(3), ("fwd", "rev"), EXACT_TOL),
    ("implicit", ig.Implicit(), ("fwd", "rev"), SOLVE_TOL),
    ("implicit", ig.Implicit(condition="fixed_point"), ("fwd", "rev"), SOLVE_TOL),
    ("unroll", ig.Unroll("reverse"), ("rev",), SOLVE_TOL),
    ("unroll", ig.Unroll("forward"), ("fwd",), SOLVE_TOL),
    ("unroll", ig.Unroll("reverse", checkpoints=3), ("rev",), SOLVE_TOL),
]


@pytest.mark.parametrize("name, estimator, modes, tol", CASES)
def test_linear_oracle_closed_form(name, estimator, modes, tol):
    F, A, B, _, theta = _linear_problem()
    expected = _closed_forms(A, B)[name]
    for mode in modes:
        # Jitted: one compilation instead of op-by-op dispatch.
        jac = jax.jit(jacobian_fn(_value_fn(F, estimator), mode))(theta)
        assert jnp.max(jnp.abs(jac - expected)) < tol, (name, mode)


@pytest.mark.parametrize("name, estimator, modes, tol", CASES)
def test_forward_pass_is_the_same_for_every_estimator(name, estimator, modes, tol):
    F, *_, theta = _linear_problem()

    def run(est):
        return jax.jit(
            lambda t: ig.iterate(F, jnp.zeros(N), t, estimator=est, max_steps=500)
        )(theta)

    reference, sol = run(ig.Unroll("forward")), run(estimator)
    assert int(sol.steps) == int(reference.steps)
    assert sol.result == ig.RESULTS.successful
    # Same loop, but each estimator is a different XLA program whose fusion may
    # reorder float operations: agreement to rounding, not bit-for-bit.
    assert jnp.max(jnp.abs(sol.value - reference.value)) < 1e-13


def test_onestep_equals_truncated_one():
    F, *_, theta = _linear_problem()
    j1 = jax.jacrev(_value_fn(F, ig.OneStep()))(theta)
    j2 = jax.jacrev(_value_fn(F, ig.Truncated(1)))(theta)
    assert jnp.array_equal(j1, j2)


def test_truncated_converges_to_implicit_as_K_grows():
    F, A, B, _, theta = _linear_problem()
    exact = jnp.linalg.solve(jnp.eye(N) - A, B)
    errors = [
        float(jnp.linalg.norm(
            jax.jit(jax.jacfwd(_value_fn(F, ig.Truncated(K))))(theta) - exact, 2))
        for K in (1, 2, 4, 8, 16)
    ]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    # The tail sum_{i>=K} A^i B is bounded by rho^K ||B|| / (1 - rho).
    bound = RHO**16 * float(jnp.linalg.norm(B, 2)) / (1 - RHO)
    assert errors[-1] <= bound


def test_truncated_with_fewer_steps_than_K_is_unroll():
    F, A, B, _, theta = _linear_problem()
    jac = jax.jit(jax.jacrev(_value_fn(F, ig.Truncated(10), max_steps=4)))(theta)
    assert jnp.max(jnp.abs(jac - truncated_jacobian(A, B, 4))) < EXACT_TOL


def test_dependence_of_x0_on_theta_is_kept_by_unroll_only():
    F, A, B, _, theta = _linear_problem()
    P = jr.normal(jr.key(5), (N, M))

    def value(estimator, steps):
        def f(t):
            return ig.iterate(
                F, P @ t, t, estimator=estimator, max_steps=steps,
                rtol=0.0, atol=0.0, throw=False,
            ).value
        return f

    k = 3
    unrolled = jax.jit(jax.jacrev(value(ig.Unroll(), k)))(theta)
    expected = truncated_jacobian(A, B, k) + jnp.linalg.matrix_power(A, k) @ P
    assert jnp.max(jnp.abs(unrolled - expected)) < EXACT_TOL
    onestep = jax.jit(jax.jacrev(value(ig.OneStep(), k)))(theta)
    assert jnp.max(jnp.abs(onestep - B)) < EXACT_TOL


def _nonlinear_F(x, theta):
    # A smooth contraction: ||J_x F|| <= 0.5 * max|sech^2| * ||W|| < 1.
    W = jnp.array([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3], [-0.2, 0.1, 0.2]])
    return 0.5 * jnp.tanh(W @ x + theta[:3]) + theta[3] * jnp.sin(x)


@pytest.mark.parametrize(
    "estimator, mode",
    [(ig.Implicit(), "rev"), (ig.Implicit(), "fwd"), (ig.Unroll(), "rev"),
     (ig.Unroll("forward"), "fwd"), (ig.Truncated(60), "rev")],
)
def test_nonlinear_step_map_against_finite_differences(estimator, mode):
    theta = jnp.array([0.3, -0.5, 0.8, 0.2])

    def value(t):
        return ig.iterate(
            _nonlinear_F, jnp.zeros(3), t, estimator=estimator, max_steps=200,
            rtol=1e-14, atol=1e-14,
        ).value

    # Jitted: each compiled once (the differences evaluate `value` 8 times).
    jac = jax.jit(jacobian_fn(value, mode))(theta)
    fd = central_difference_jacobian(jax.jit(value), theta, eps=1e-6)
    assert jnp.max(jnp.abs(jac - fd)) < 1e-8


def test_nonlinear_onestep_error_is_within_corollary_1():
    theta = jnp.array([0.3, -0.5, 0.8, 0.2])

    def value(estimator):
        return lambda t: ig.iterate(
            _nonlinear_F, jnp.zeros(3), t, estimator=estimator, max_steps=200,
            rtol=1e-14, atol=1e-14,
        ).value

    exact = jax.jit(jax.jacfwd(value(ig.Implicit())))(theta)
    onestep = jax.jit(jax.jacfwd(value(ig.OneStep())))(theta)
    x_bar = jax.jit(value(ig.OneStep()))(theta)
    rho = float(jnp.linalg.norm(jax.jacfwd(_nonlinear_F)(x_bar, theta), 2))
    L_F = float(jnp.linalg.norm(jax.jacfwd(_nonlinear_F, argnums=1)(x_bar, theta), 2))
    error = float(jnp.linalg.norm(onestep - exact, 2))
    # At convergence the L_J term vanishes; Lemma 2 with A, B at x_bar.
    assert 0 < error <= rho * L_F / (1 - rho) + 1e-12


@functools.cache
def _onestep_and_implicit(n, m):
    """Jitted `(A, B, c, theta) -> (one-step, implicit Jacobian)` of the iterate
    of F(x, theta) = A x + B theta + c from itergrad; the matrices are
    arguments, so one compilation serves every example of a shape."""

    def jacobians(A, B, c, theta):
        def F(x, t):
            return A @ x + B @ t + c

        def value(estimator):
            return lambda t: ig.iterate(
                F, jnp.zeros(n), t, estimator=estimator, max_steps=K_STEPS,
                rtol=0.0, atol=0.0, throw=False,
            ).value

        return jax.jacfwd(value(ig.OneStep()))(theta), jax.jacrev(value(ig.Implicit()))(theta)

    return jax.jit(jacobians)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rho=st.floats(0.0, 0.95),
    # A few shapes only: each new shape is a compilation.
    n=st.sampled_from([1, 3, 6]),
    m=st.sampled_from([1, 4]),
)
def test_corollary_1_bound_holds_on_random_linear_contractions(seed, rho, n, m):
    # Corollary 1 for F = A x + B theta + c: L_F = ||B||, L_J = 0, so the
    # one-step error is at most rho ||B|| / (1 - rho), checked on what itergrad
    # returns against the true Jacobian from itergrad's Implicit and from the
    # closed form (I - A)^{-1} B.
    _, A, B, c = linear_contraction(jr.key(seed), n, m, rho)
    theta = jr.normal(jr.key(seed + 1), (m,))
    onestep, implicit = _onestep_and_implicit(n, m)(A, B, c, theta)
    exact = np.linalg.solve(np.eye(n) - np.asarray(A), np.asarray(B))
    # Each Jacobian is its estimator's closed form (so a wrong one fails here
    # even when it happens to satisfy the bound).
    np.testing.assert_allclose(onestep, B, rtol=0, atol=EXACT_TOL)
    np.testing.assert_allclose(implicit, exact, rtol=0, atol=SOLVE_TOL * (1 + np.abs(exact).max()))
    rho_A = float(jnp.linalg.norm(A, 2))
    assert rho_A <= rho * (1 + 1e-12)
    bound = rho_A * float(jnp.linalg.norm(B, 2)) / (1 - rho_A)
    for true_jacobian in (np.asarray(implicit), exact):
        error = np.linalg.norm(np.asarray(onestep) - true_jacobian, 2)
        assert error <= bound * (1 + 1e-10) + 1e-12, (error, bound)
