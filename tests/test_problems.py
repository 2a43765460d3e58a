"""The problems module: weighted ridge closed forms, logistic regression data,
the svmlight reader, the random QP generator's arguments."""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import itergrad as ig
from itergrad.problems import (
    WeightedRidge,
    flip_labels,
    load_svmlight,
    logistic_data,
    random_qp,
    ridge_data,
    ridge_lambda,
    standardize,
)

from .helpers import central_difference_jacobian, relative_error

RTOL = 1e-10  # closed forms vs autodiff (float64)
RTOL_FD = 1e-7  # vs central differences
CPUSMALL = Path(__file__).parents[2] / "shared/data/cpusmall"
CPUSMALL_LABEL_MEAN = 83.9689


@pytest.fixture(scope="module")
def ridge():
    k_a, k_y, k_t = jr.split(jr.key(0), 3)
    A = jr.normal(k_a, (25, 4)) * jnp.array([1.0, 0.5, 0.1, 0.02])
    y = jr.normal(k_y, (25,))
    theta = jr.uniform(k_t, (25,), minval=0.5, maxval=1.5)
    return WeightedRidge(A, y, 0.01), theta


def test_ridge_solution_and_jacobian(ridge):
    problem, theta = ridge
    solution = eqx.filter_jit(problem.solution)
    x_bar = solution(theta)
    grad = jax.jit(jax.grad(problem.objective))(x_bar, theta)
    assert float(jnp.linalg.norm(grad)) < RTOL * float(
        jnp.linalg.norm(problem.A.T @ problem.y)
    )
    J = problem.jacobian(theta)
    assert J.shape == (4, 25)
    # Two references: autodiff through the linear solve, and finite differences.
    assert relative_error(J, jax.jit(jax.jacfwd(problem.solution))(theta)) < RTOL
    assert relative_error(J, central_difference_jacobian(solution, theta)) < RTOL_FD


def test_ridge_smoothness(ridge):
    problem, theta = ridge
    L, mu = problem.smoothness(theta)
    hessian = jax.jit(jax.hessian(problem.objective))(jnp.zeros(4), theta)
    eigenvalues = jnp.linalg.eigvalsh(hessian)
    np.testing.assert_allclose([L, mu], [eigenvalues[-1], eigenvalues[0]], rtol=RTOL)


@pytest.mark.parametrize("kappa", [100.0, 1000.0])
def test_ridge_lambda_reaches_kappa(ridge, kappa):
    problem, theta = ridge
    lam = ridge_lambda(problem.A, kappa, theta)
    L, mu = WeightedRidge(problem.A, problem.y, lam).smoothness(theta)
    assert float(L / mu) == pytest.approx(kappa, rel=1e-8)


def test_ridge_lambda_errors(ridge):
    problem, _ = ridge
    with pytest.raises(ValueError, match="already has condition number"):
        ridge_lambda(jnp.eye(3), 2.0)
    with pytest.raises(ValueError, match="kappa"):
        ridge_lambda(problem.A, 1.0)


def test_ridge_data_default_shape():
    problem = ridge_data(jr.key(0), kappa=1000.0)
    assert problem.A.shape == (8192, 12) and problem.y.shape == (8192,)
    L, mu = problem.smoothness(jnp.ones(8192))
    assert float(L / mu) == pytest.approx(1000.0, rel=1e-6)


def test_logistic_objective():
    problem = logistic_data(jr.key(0), 50, 3, lam=0.5)
    assert problem.A.shape == (50, 4) and problem.n == 4
    assert bool(jnp.all(problem.A[:, 0] == 1.0))
    assert set(np.unique(np.asarray(problem.y))) == {-1.0, 1.0}
    theta = jr.uniform(jr.key(1), (50,))
    x = jnp.array([0.3, -0.2, 0.5, 0.1])
    naive = jnp.sum(theta * jnp.log1p(jnp.exp(-problem.y * (problem.A @ x))))
    naive = naive + 0.5 * jnp.sum(x[1:] ** 2)
    assert float(problem.objective(x, theta)) == pytest.approx(float(naive), rel=RTOL)
    # Stable for huge margins, where the naive formula overflows.
    assert bool(jnp.isfinite(problem.objective(1e4 * x, theta)))
    assert bool(jnp.all(jnp.isfinite(jax.grad(problem.objective)(1e4 * x, theta))))
    # The intercept is not penalized: with zero weights only the penalty remains.
    zero = jnp.zeros(50)
    shifted = x.at[0].add(7.0)
    assert float(problem.objective(shifted, zero)) == float(problem.objective(x, zero))


def test_flip_labels():
    problem = logistic_data(jr.key(0), 40, 2)
    corrupted, mask = flip_labels(problem, jr.key(1), 0.25)
    assert int(mask.sum()) == 10
    np.testing.assert_array_equal(corrupted.y, jnp.where(mask, -problem.y, problem.y))
    np.testing.assert_array_equal(corrupted.A, problem.A)
    with pytest.raises(ValueError, match=r"`fraction` must lie in \[0, 1\]"):
        flip_labels(problem, jr.key(1), 1.5)


def test_logistic_data_argument_errors():
    with pytest.raises(ValueError, match="`lam` must be a positive number"):
        logistic_data(jr.key(0), 10, 2, lam=0.0)
    with pytest.raises(ValueError, match="`n_features` must be a positive integer"):
        logistic_data(jr.key(0), 10, 0)
    with pytest.raises(ValueError, match="n_samples >= 2"):
        logistic_data(jr.key(0), 1, 2)


def test_random_qp_regularization_and_arguments():
    assert ig.QP is ig.problems.QP
    key = jr.key(0)
    plain = random_qp(key, 5, 2, 3)
    shifted = random_qp(key, 5, 2, 3, regularization=0.5)
    np.testing.assert_allclose(shifted.Q - plain.Q, 0.5 * np.eye(5), atol=1e-12)
    assert isinstance(plain, ig.QP) and plain.sizes == (5, 2, 3)
    with pytest.raises(ValueError, match="`regularization` must be a non-negative"):
        random_qp(key, 5, 2, 3, regularization=-1.0)
    with pytest.raises(ValueError, match="`n` must be a positive integer"):
        random_qp(key, 0, 0, 0)
    with pytest.raises(ValueError, match="`p` must be a non-negative integer"):
        random_qp(key, 3, 1, -1)
    with pytest.raises(ValueError, match="`m` must satisfy 0 <= m <= n = 3"):
        random_qp(key, 3, 4, 1)


SVMLIGHT_TEXT = """\
# a comment line
1.5 1:2.0 3:-1 # trailing comment
-2 2:0.5

+3 qid:7 1:1e-3 4:4
"""


def test_load_svmlight_inline(tmp_path):
    path = tmp_path / "small.svm"
    path.write_text(SVMLIGHT_TEXT)
    X, y = load_svmlight(path)
    np.testing.assert_array_equal(y, [1.5, -2.0, 3.0])
    np.testing.assert_array_equal(
        X, [[2.0, 0.0, -1.0, 0.0], [0.0, 0.5, 0.0, 0.0], [1e-3, 0.0, 0.0, 4.0]]
    )
    X, _ = load_svmlight(path, n_features=6, dtype=np.float32)
    assert X.shape == (3, 6) and X.dtype == np.float32
    with pytest.raises(ValueError, match="feature index 4 but n_features=3"):
        load_svmlight(path, n_features=3)


@pytest.mark.parametrize(
    "bad_line, why",
    [
        ("1 2:3 oops", "expected 'index:value'"),
        ("abc 1:2", "label"),
        ("1 0:2", "1-based"),
        ("1 3:1 2:1", "increase"),
        ("1 x:1", "numbers"),
    ],
)
def test_load_svmlight_malformed(tmp_path, bad_line, why):
    path = tmp_path / "bad.svm"
    path.write_text(f"1 1:1\n# comment\n{bad_line}\n")
    with pytest.raises(ValueError, match=rf"line 3: .*{why}"):
        load_svmlight(path)


def test_load_svmlight_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_svmlight(tmp_path / "absent.svm")


@pytest.mark.skipif(not CPUSMALL.is_file(), reason="cpusmall data set not present")
def test_load_cpusmall():
    X, y = load_svmlight(CPUSMALL)
    assert X.shape == (8192, 12) and y.shape == (8192,)
    assert float(y.mean()) == pytest.approx(CPUSMALL_LABEL_MEAN, abs=1e-4)
    Z = standardize(X)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(Z.std(axis=0), 1.0, rtol=1e-10)


def test_standardize_constant_column():
    X = np.array([[1.0, 5.0], [3.0, 5.0]])
    np.testing.assert_array_equal(standardize(X), [[-1.0, 0.0], [1.0, 0.0]])
