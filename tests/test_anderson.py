"""Anderson acceleration: forward pass, every estimator against finite
differences and a closed form, float32, jit/vmap, bad inputs.

Oracle: the contraction F(x, theta) = tanh(W x + U theta + b), ||W|| < 1, whose
fixed point has Jacobian (I - J_x F)^{-1} J_theta F (eq. 3); one-step gives
J_theta F(x̄) and K-step truncation sum_{i<K} J_x F^i J_theta F at the fixed
point (the step's derivative is the plain map's, see `Anderson`).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest
from helpers import central_difference_jacobian, relative_error

import itergrad as ig
from itergrad.solvers._anderson import anderson_coefficients

N, M = 6, 3
TOL = 1e-12  # forward tolerance (float64)
FD_EPS = 1e-6

# Expected relative errors (float64). Closed-form references are exact formulas
# at the fixed point: only the forward tolerance and round-off separate them.
# Finite differences (central, eps 1e-6) add ~1e-9.
CLOSED_RTOL = 1e-8
FD_RTOL = 1e-7
# Truncated("auto") meets its relative target 1e-4 (bias bound rho^K).
AUTO_TARGET = 1e-4
# Unroll differentiates k plain steps along the Anderson iterates: its error
# decays like rho^k (see `Anderson`); with rho ~ 0.6 and k ~ 20 steps, < 1e-4.
UNROLL_RTOL = 1e-4


def _problem(dtype=jnp.float64, norm=0.9, n=N, m=M, seed=0, scale=1.0):
    # Drawn in float64 and cast, so that the float32 problem is the same one.
    kw, ku, kb = jr.split(jr.PRNGKey(seed), 3)
    W = jr.normal(kw, (n, n), jnp.float64)
    W = (norm * W / jnp.linalg.norm(W, ord=2)).astype(dtype)
    U = (scale * jr.normal(ku, (n, m), jnp.float64)).astype(dtype)
    b = (scale * jr.normal(kb, (n,), jnp.float64)).astype(dtype)

    def F(x, theta):
        return jnp.tanh(W @ x + U @ theta + b)

    theta = jnp.linspace(-1.0, 1.0, m, dtype=dtype)
    return F, theta


F, THETA = _problem()
X0 = jnp.zeros(N)


def _solve(theta, estimator=ig.OneStep(), **kwargs):
    kwargs = {"max_steps": 100, "rtol": TOL, "atol": TOL} | kwargs
    return ig.solve(ig.Anderson(F), X0, theta, estimator=estimator, **kwargs)


@jax.jit
def _fixed_point(theta):
    return _solve(theta).value


XBAR = _fixed_point(THETA)
JX = jax.jacfwd(F, 0)(XBAR, THETA)
JT = jax.jacfwd(F, 1)(XBAR, THETA)
RHO = float(jnp.linalg.norm(JX, ord=2))


def _truncated_closed_form(K):
    total, term = jnp.zeros_like(JT), JT
    for _ in range(K):
        total, term = total + term, JX @ term
    return total


def _fd_solution():
    return central_difference_jacobian(_fixed_point, THETA, FD_EPS)


def _fd_truncated(K):
    # Finite differences of theta -> F_theta^K(x̄(THETA)): the K-step estimator
    # at the fixed point, computed without any Jacobian.
    def FK(theta):
        x = XBAR
        for _ in range(K):
            x = F(x, theta)
        return x

    return central_difference_jacobian(FK, THETA, FD_EPS)


IMPLICIT = (jnp.linalg.solve(jnp.eye(N) - JX, JT), _fd_solution())

# (estimator, AD mode, references (closed form, finite differences), rtol)
CASES = {
    "onestep": (ig.OneStep(), "rev", (JT, _fd_truncated(1)), CLOSED_RTOL),
    "truncated3": (
        ig.Truncated(3),
        "rev",
        (_truncated_closed_form(3), _fd_truncated(3)),
        CLOSED_RTOL,
    ),
    "truncated_auto": (
        ig.Truncated("auto", target=AUTO_TARGET),
        "rev",
        IMPLICIT,
        AUTO_TARGET,
    ),
    "implicit": (ig.Implicit(), "rev", IMPLICIT, CLOSED_RTOL),
    "implicit_fixed_point_fwd": (
        ig.Implicit(condition="fixed_point"),
        "fwd",
        IMPLICIT,
        CLOSED_RTOL,
    ),
    "implicit_gmres": (
        ig.Implicit(
            linear_solver=lx.GMRES(rtol=1e-12, atol=1e-12), condition="fixed_point"
        ),
        "rev",
        IMPLICIT,
        CLOSED_RTOL,
    ),
    "implicit_bicgstab_fwd": (
        ig.Implicit(linear_solver=lx.BiCGStab(rtol=1e-12, atol=1e-12)),
        "fwd",
        IMPLICIT,
        CLOSED_RTOL,
    ),
    "unroll_reverse": (ig.Unroll("reverse"), "rev", IMPLICIT, UNROLL_RTOL),
    "unroll_forward": (ig.Unroll("forward"), "fwd", IMPLICIT, UNROLL_RTOL),
}


@functools.cache
def _jacobian(name):
    estimator, mode, _, _ = CASES[name]
    jac = {"rev": jax.jacrev, "fwd": jax.jacfwd}[mode]
    return jax.jit(jac(lambda t: _solve(t, estimator).value))(THETA)


@pytest.mark.parametrize("name", list(CASES))
def test_estimator_against_closed_form_and_finite_differences(name):
    _, _, (closed, fd), rtol = CASES[name]
    jac = _jacobian(name)
    assert relative_error(jac, closed) < rtol
    assert relative_error(jac, fd) < max(rtol, FD_RTOL)


def test_onestep_bias_is_within_corollary_1():
    # ||J_OS - J̄|| <= rho L_F / (1 - rho) + L_J ||x_{k-1} - x̄||; the second
    # term is ~TOL here. The relative bias at the fixed point is <= rho.
    jac = _jacobian("onestep")
    reference = IMPLICIT[0]
    L_F = float(jnp.linalg.norm(JT, ord=2))
    bias = float(jnp.linalg.norm(jac - reference, ord=2))
    assert 1e-3 < bias <= RHO * L_F / (1 - RHO) + 1e-8
    assert bias / float(jnp.linalg.norm(reference, ord=2)) <= RHO


def test_forward_matches_plain_iteration_in_fewer_steps():
    # A slow contraction: W symmetric with spectrum in [0, 0.99] and small
    # inputs (tanh nearly linear). Anderson's reason to exist.
    n = 40
    kq, ku, kb = jr.split(jr.PRNGKey(1), 3)
    Q, _ = jnp.linalg.qr(jr.normal(kq, (n, n)))
    W = Q @ jnp.diag(jnp.linspace(0.0, 0.99, n)) @ Q.T
    U, b = 0.1 * jr.normal(ku, (n, M)), 0.1 * jr.normal(kb, (n,))

    def F_slow(x, theta):
        return jnp.tanh(W @ x + U @ theta + b)

    x0 = jnp.zeros(n)
    kwargs = {"max_steps": 2000, "rtol": 1e-10, "atol": 1e-10}
    plain, accel = jax.jit(
        lambda t: (
            ig.iterate(F_slow, x0, t, **kwargs),
            ig.solve(ig.Anderson(F_slow), x0, t, **kwargs),
        )
    )(THETA)
    np.testing.assert_allclose(accel.value, plain.value, rtol=0, atol=1e-7)
    assert accel.result == ig.RESULTS.successful
    # Measured: 44 Anderson steps (memory 5) against 152 plain ones.
    assert int(accel.steps) * 3 < int(plain.steps)
    # Both stop on the same residual ||F(x) - x||.
    assert float(accel.residual) <= 1e-10 * (1 + float(jnp.linalg.norm(accel.value)))


def test_float32():
    F32, theta = _problem(dtype=jnp.float32)
    x0 = jnp.zeros(N, jnp.float32)

    def values(t):
        xs = [
            ig.solve(ig.Anderson(F32), x0, t, estimator=e, rtol=1e-6, atol=1e-6).value
            for e in (ig.OneStep(), ig.Implicit())
        ]
        return xs, xs[0]

    # One compilation for the value and both estimators' Jacobians.
    (onestep, implicit), x = jax.jit(jax.jacrev(values, has_aux=True))(theta)
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(x, XBAR, atol=1e-5)
    assert onestep.dtype == implicit.dtype == jnp.float32
    assert relative_error(onestep, JT) < 1e-4
    assert relative_error(implicit, IMPLICIT[0]) < 1e-4


def test_jit_and_vmap():
    thetas = THETA + 0.1 * jnp.arange(4.0)[:, None]

    @eqx.debug.assert_max_traces(max_traces=1)
    def grad_batch(thetas):
        def loss(t):
            sol = _solve(t, ig.Implicit(linear_solver=lx.GMRES(rtol=1e-12, atol=1e-12)))
            return jnp.sum(sol.value**2), sol.steps

        return jax.vmap(jax.grad(loss, has_aux=True))(thetas)

    grads, steps = jax.jit(grad_batch)(thetas)
    grads_again, _ = jax.jit(grad_batch)(thetas + 0.0)  # no retrace
    # Instance 0 is THETA: d/dθ ||x̄||² = 2 J̄^T x̄ (closed form).
    np.testing.assert_allclose(grads[0], 2 * IMPLICIT[0].T @ XBAR, rtol=1e-8)
    # Each instance keeps its own derivative and step count.
    assert steps.shape == (4,)
    assert bool(jnp.all(jnp.linalg.norm(grads[1:] - grads[0], axis=1) > 1e-3))
    np.testing.assert_array_equal(grads, grads_again)


def test_pytree_unknowns():
    def F_tree(x, theta):
        flat = F(jnp.concatenate([x["a"], x["b"]]), theta)
        return {"a": flat[:2], "b": flat[2:]}

    x0 = {"a": jnp.zeros(2), "b": jnp.zeros(N - 2)}

    def value(t):
        sol = ig.solve(
            ig.Anderson(F_tree, memory=3),
            x0,
            t,
            estimator=ig.Implicit(),
            rtol=TOL,
            atol=TOL,
        )
        return sol.value, sol.value

    jac, x = jax.jit(jax.jacrev(value, has_aux=True))(THETA)
    np.testing.assert_allclose(jnp.concatenate([x["a"], x["b"]]), XBAR, atol=1e-10)
    np.testing.assert_allclose(
        jnp.concatenate([jac["a"], jac["b"]]), IMPLICIT[0], rtol=1e-8
    )


def test_degenerate_history_gives_no_nan():
    # F constant in x: the residual vanishes after one step and every later
    # difference is zero; memory=1 and a stalled iteration must not divide by 0.
    theta = jnp.arange(3.0, dtype=jnp.float32)
    sol = jax.jit(
        lambda t: ig.solve(
            ig.Anderson(lambda x, t: t, memory=1), jnp.zeros(3, t.dtype), t
        )
    )(theta)
    np.testing.assert_array_equal(sol.value, theta)
    coefficients = jax.jit(anderson_coefficients, static_argnums=3)
    for dtype in (jnp.float32, jnp.float64):
        dg = jnp.zeros((4, 5), dtype).at[0].set(1.0).at[1].set(1.0)
        gamma = coefficients(dg, jnp.ones(5, dtype), jnp.array([True] * 4), 0.0)
        assert bool(jnp.all(jnp.isfinite(gamma)))
        # Two identical rows: the regularised solution splits the weight.
        gamma = coefficients(dg, jnp.ones(5, dtype), jnp.array([True] * 4), 1e-4)
        np.testing.assert_allclose(gamma[:2], [0.5, 0.5], rtol=1e-3)
        np.testing.assert_array_equal(gamma[2:], 0)
        # Masked rows are ignored whatever they hold.
        gamma = coefficients(
            dg, jnp.ones(5, dtype), jnp.array([True, False, False, False]), 0.0
        )
        np.testing.assert_allclose(gamma, [1, 0, 0, 0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"memory": 0}, "memory"),
        ({"memory": 2.5}, "memory"),
        ({"mixing": 0.0}, "mixing"),
        ({"mixing": 2.0}, "mixing"),
        ({"regularization": -1.0}, "regularization"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ig.Anderson(F, **kwargs)


def test_bad_step_map_and_iterate():
    with pytest.raises(TypeError, match="callable"):
        ig.Anderson(3.0)
    with pytest.raises(ValueError, match="initial iterate"):
        ig.solve(ig.Anderson(F), None, THETA)
    with pytest.raises(TypeError, match="floating-point"):
        ig.solve(ig.Anderson(F), jnp.zeros(N, jnp.int32), THETA)
