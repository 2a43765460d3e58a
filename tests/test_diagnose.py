"""`ig.diagnose` and `Truncated("auto")` against closed forms: linear
contractions (DESIGN.md §7) and weighted ridge regression with gradient
descent."""

import io
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from rich.console import Console
from rich.protocol import is_renderable

import itergrad as ig

from .helpers import linear_contraction, relative_error, truncated_jacobian

NORM_RTOL = 0.05  # rho and L_F within 5% of the true operator norms
BOUND_SLACK = 1e-9  # the bound may touch the true error (n = 1): rounding only
AUTO_FACTOR = 3.0  # Truncated("auto") may miss its target by this factor


class Linear(eqx.Module):
    """F(x, theta) = A x + B theta + c as a module, so that jitted diagnoses of
    instances with equal shapes share one compilation."""

    A: jax.Array
    B: jax.Array
    c: jax.Array

    def __call__(self, x, theta):
        return self.A @ x + self.B @ theta + self.c


@eqx.filter_jit
def _solve_and_diagnose(F, theta, key):
    n = F.A.shape[0]
    sol = ig.iterate(F, jnp.zeros(n), theta, max_steps=2000, rtol=1e-12, atol=1e-12)
    return ig.diagnose(F, sol, theta, key=key, power_iterations=100)


def _true_onestep_error(A, B):
    A, B = np.asarray(A), np.asarray(B)
    J = np.linalg.solve(np.eye(A.shape[0]) - A, B)
    return np.linalg.norm(B - J, 2), J


@pytest.mark.parametrize("rho", [0.2, 0.6, 0.9])
def test_linear_contraction_norms_and_bound(rho):
    _, A, B, c = linear_contraction(jr.key(3), 8, 3, rho)
    theta = jr.normal(jr.key(4), (3,))
    report = _solve_and_diagnose(Linear(A, B, c), theta, jr.key(5))
    true_rho, true_LF = np.linalg.norm(A, 2), np.linalg.norm(B, 2)
    assert abs(float(report.rho) / true_rho - 1) <= NORM_RTOL
    assert abs(float(report.L_F) / true_LF - 1) <= NORM_RTOL
    error, J = _true_onestep_error(A, B)
    assert float(report.onestep_bound) >= error * (1 - BOUND_SLACK)
    # The measured disagreement is the one-step relative error on the probes.
    assert 0 < float(report.disagreement) <= error / np.linalg.norm(J, 2) * 10
    # A linear F has a constant J_theta F.
    assert float(report.L_J) <= 1e-10
    # The recommendation meets the target on the true Jacobian.
    estimator = report.recommended
    K = {ig.OneStep: 1}.get(type(estimator), getattr(estimator, "K", None))
    assert isinstance(K, int), report.reason
    reached = relative_error(truncated_jacobian(A, B, K), J)
    assert reached <= report.target, (K, reached)


@settings(derandomize=True, max_examples=10, deadline=None)
@given(
    n=st.sampled_from([1, 5]),
    rho=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_corollary1_bound_never_below_true_error(n, rho, seed):
    _, A, B, c = linear_contraction(jr.key(seed), n, 3, rho)
    theta = jr.normal(jr.key(seed + 1), (3,))
    report = _solve_and_diagnose(Linear(A, B, c), theta, jr.key(seed + 2))
    error, _ = _true_onestep_error(A, B)
    assert float(report.onestep_bound) >= error * (1 - BOUND_SLACK)
    assert float(report.corollary1_bound) == float(report.onestep_bound)


def test_diagnose_under_jit_and_printing():
    F, A, B, c = linear_contraction(jr.key(0), 6, 2, 0.5)
    theta = jnp.ones(2)
    sol = ig.iterate(F, jnp.zeros(6), theta, rtol=1e-12, atol=1e-12)
    key = jr.key(1)

    def inside(theta, key):
        report = ig.diagnose(F, sol, theta, key=key)
        with pytest.raises(ValueError, match="concrete numbers"):
            _ = report.recommended
        return report

    jitted = jax.jit(inside)(theta, key)
    np.testing.assert_allclose(jitted.rho, 0.5, rtol=1e-6)
    np.testing.assert_allclose(jitted.L_F, np.linalg.norm(B, 2), rtol=1e-6)
    error, J = _true_onestep_error(A, B)
    assert float(jitted.onestep_bound) >= error
    text = str(jitted)
    for name in ("rho", "L_F", "onestep_bound", "disagreement", "recommended"):
        assert name in text
    for value in (jitted.rho, jitted.L_F, jitted.onestep_bound):
        assert f"{float(value):.4g}" in text
    assert repr(jitted.recommended) in text
    # `__rich__` itself (what rich calls, e.g. in a notebook or a Live display)
    # is a renderable whose rendering carries the same rows and numbers.
    renderable = jitted.__rich__()
    assert is_renderable(renderable)
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(renderable)
    rendered = console.export_text()
    for name, value in (("rho", jitted.rho), ("L_F", jitted.L_F)):
        row = next(line for line in rendered.splitlines() if f" {name} " in line)
        assert f"{float(value):.4g}" in row, (name, row)
    assert f"recommended: {jitted.recommended!r}" in rendered


def test_diagnose_argument_errors():
    F, *_ = linear_contraction(jr.key(0), 3, 2, 0.5)
    sol = ig.iterate(F, jnp.zeros(3), jnp.ones(2))
    with pytest.raises(ValueError, match="`probes` must be a positive integer"):
        ig.diagnose(F, sol, jnp.ones(2), key=jr.key(0), probes=0)
    with pytest.raises(TypeError, match="`sol` must be"):
        ig.diagnose(F, sol.value, jnp.ones(2), key=jr.key(0))
    with pytest.raises(TypeError, match="F_or_solver"):
        ig.diagnose(3, sol, jnp.ones(2), key=jr.key(0))


# Weighted ridge, f_theta(x) = 1/2 sum_i theta_i (y_i - <a_i, x>)^2 + lam/2 |x|^2:
# closed-form solution H^{-1} A^T diag(theta) y and Jacobian
# H^{-1} A^T diag(y - A x_bar), H = A^T diag(theta) A + lam I.


def _ridge(key, N=30, n=5, lam=1.0):
    ka, ky, kt = jr.split(key, 3)
    A = jr.normal(ka, (N, n)) / jnp.sqrt(N)
    y = jr.normal(ky, (N,))
    theta = jr.uniform(kt, (N,), minval=0.5, maxval=1.5)

    def objective(x, theta):
        return 0.5 * jnp.dot(theta, (y - A @ x) ** 2) + 0.5 * lam * jnp.dot(x, x)

    H = A.T @ (theta[:, None] * A) + lam * jnp.eye(n)
    x_bar = jnp.linalg.solve(H, A.T @ (theta * y))
    J = jnp.linalg.solve(H, A.T * (y - A @ x_bar)[None, :])
    eigs = jnp.linalg.eigvalsh(H)
    return objective, theta, x_bar, J, float(eigs[-1]), float(eigs[0])


@eqx.filter_jit
def _solve_and_diagnose_solver(solver, theta, n=5):
    sol = ig.solve(solver, jnp.zeros(n), theta, max_steps=3000, rtol=1e-13, atol=1e-13)
    return ig.diagnose(solver, sol, theta, key=jr.key(0))


def test_truncated_auto_on_weighted_ridge():
    objective, theta, x_bar, J, L, mu = _ridge(jr.key(7), lam=0.2)
    solver = ig.GradientDescent(objective, "1/L", L=L)
    target = 1e-4

    def value(estimator):
        def fn(theta):
            return ig.solve(
                solver,
                jnp.zeros(5),
                theta,
                estimator=estimator,
                max_steps=3000,
                rtol=1e-13,
                atol=1e-13,
            ).value

        return fn

    auto = ig.Truncated("auto", target=target, max_K=150)
    # Reverse mode through the masked replay with a traced K.
    J_auto = jax.jit(jax.jacrev(value(auto)))(theta)
    error = relative_error(J_auto, J)
    assert error <= AUTO_FACTOR * target, error
    # The one-step estimator is far off here (rho = 1 - mu/L), so the auto K
    # did real work; diagnose's rho is the contraction factor of GD with 1/L.
    report = _solve_and_diagnose_solver(solver, theta)
    assert float(report.disagreement) > 100 * target
    assert abs(float(report.rho) / (1 - mu / L) - 1) <= NORM_RTOL
    assert isinstance(report.recommended, ig.Truncated | ig.Implicit)
    # The chosen K is reported: the smallest K with rho^K / (1 - rho^K) <=
    # target for the true rho = 1 - mu/L (1 more allowed: rho is estimated).
    sol = jax.jit(lambda t: ig.solve(
        solver, jnp.zeros(5), t, estimator=auto, max_steps=3000, rtol=1e-13, atol=1e-13
    ))(theta)
    rho = 1 - mu / L
    K_exact = math.ceil(math.log(target / (1 + target)) / math.log(rho))
    assert K_exact <= int(sol.stats["differentiated_steps"]) <= K_exact + 1
    few = dict(max_steps=10, throw=False)
    one_step = ig.solve(solver, jnp.zeros(5), theta, estimator=ig.OneStep(), **few)
    assert int(one_step.stats["differentiated_steps"]) == 1
    implicit = ig.solve(solver, jnp.zeros(5), theta, estimator=ig.Implicit(), **few)
    assert "differentiated_steps" not in implicit.stats


def test_truncated_validation_messages():
    assert ig.Truncated(3).K == 3
    with pytest.raises(ValueError, match="positive integer K or 'auto'"):
        ig.Truncated(0)
    with pytest.raises(ValueError, match="only apply to Truncated\\('auto'\\)"):
        ig.Truncated(3, max_K=10)
    with pytest.raises(ValueError, match="max_K"):
        ig.Truncated("auto", max_K=0)
    with pytest.raises(ValueError, match="target"):
        ig.Truncated("auto", target=-1.0)


def test_newton_is_superlinear_and_onestep_recommended():
    def objective(x, theta):
        return jnp.sum(jnp.logaddexp(x - theta, theta - x)) + 0.5 * jnp.dot(x, x)

    theta = jnp.array([0.3, -1.0, 2.0])
    report = _solve_and_diagnose_solver(ig.Newton(objective), theta, n=3)
    assert report.superlinear
    assert float(report.rho) < 1e-6
    assert np.isfinite(float(report.corollary3_bound))
    assert isinstance(report.recommended, ig.OneStep), report.reason
