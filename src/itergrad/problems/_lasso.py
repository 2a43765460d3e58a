"""The Lasso and the elastic net with the regularisation strength as
$\\theta = \\log\\lambda$: objective split for `ProximalGradient`, data
(synthetic sparse, diabetes, cpusmall) and the closed-form derivative of the
solution on its support."""

import os
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from .. import prox as _prox
from .._validate import in_closed_interval, positive_int
from ._svmlight import load_svmlight, standardize


class Lasso(eqx.Module):
    """The elastic net (the Lasso for `l1_ratio = 1`) in scikit-learn's
    scaling, with $\\theta = \\log\\lambda$:
    $$\\min_x \\underbrace{\\frac{1}{2N}\\|Ax - b\\|_2^2}_{f(x)} +
    \\underbrace{\\lambda\\Big(\\alpha\\|x\\|_1 + \\frac{1-\\alpha}{2}\\|x\\|_2^2\\Big)}_{g(x, \\theta)},
    \\qquad \\lambda = e^\\theta,\\ \\alpha = $$ `l1_ratio`.

    Use `ig.ProximalGradient(problem.smooth, problem.prox, 1 / problem.lipschitz())`
    with `x0 = jnp.zeros(problem.n)` and a scalar `theta`.

    **Closed form on the support.** With $S$ the support of the solution,
    $s = \\mathrm{sign}(\\bar x_S)$ and
    $M = A_S^\\top A_S / N + \\lambda(1-\\alpha) I$, the optimality condition
    on $S$ is $M \\bar x_S = A_S^\\top b / N - \\lambda\\alpha s$, so
    $$\\frac{d\\bar x_S}{d\\theta} = -\\lambda M^{-1}\\big(\\alpha s + (1-\\alpha)\\bar x_S\\big),
    \\qquad \\frac{d\\bar x_{S^c}}{d\\theta} = 0$$
    (`jacobian_on_support`), valid where the support is locally constant.

    **Fields:**

    - `A`: the design, shape `(N, n)`.
    - `b`: the targets, shape `(N,)`.
    - `l1_ratio`: $\\alpha \\in (0, 1]$ (default 1: the Lasso).
    """

    A: Float[Array, "N n"]
    b: Float[Array, " N"]
    l1_ratio: float = 1.0

    def __check_init__(self):
        if isinstance(self.l1_ratio, int | float):
            if not 0 < self.l1_ratio <= 1:
                raise ValueError(
                    f"Lasso(l1_ratio=...) must lie in (0, 1], got {self.l1_ratio}."
                )

    @property
    def n(self) -> int:
        """The number of unknowns (columns of `A`)."""
        return self.A.shape[1]

    def smooth(self, x: Float[Array, " n"], theta: Scalar) -> Scalar:
        """$f(x) = \\|Ax - b\\|^2 / (2N)$ (independent of $\\theta$)."""
        del theta
        residual = self.A @ x - self.b
        return 0.5 * jnp.dot(residual, residual) / self.b.shape[0]

    def prox(
        self, x: Float[Array, " n"], step: Scalar, theta: Scalar
    ) -> Float[Array, " n"]:
        """$\\mathrm{prox}_{\\mathrm{step}\\cdot g(\\cdot, \\theta)}(x)$
        (`itergrad.prox.elastic_net`)."""
        lam = jnp.exp(theta)
        return _prox.elastic_net(
            x, step, lam * self.l1_ratio, lam * (1 - self.l1_ratio)
        )

    def objective(self, x: Float[Array, " n"], theta: Scalar) -> Scalar:
        """$f(x) + g(x, \\theta)$."""
        lam = jnp.exp(theta)
        penalty = self.l1_ratio * jnp.sum(jnp.abs(x)) + 0.5 * (
            1 - self.l1_ratio
        ) * jnp.dot(x, x)
        return self.smooth(x, theta) + lam * penalty

    def lipschitz(self) -> Scalar:
        """$L = \\|A\\|_2^2 / N$, the Lipschitz constant of $\\nabla f$
        (the $\\ell_2$ part of $g$ is handled by the prox)."""
        return jnp.linalg.norm(self.A, ord=2) ** 2 / self.b.shape[0]

    def lambda_max(self) -> Scalar:
        """$\\lambda_{\\max} = \\|A^\\top b\\|_\\infty / (N\\alpha)$: for
        $\\lambda \\ge \\lambda_{\\max}$ the solution is 0."""
        return jnp.max(jnp.abs(self.A.T @ self.b)) / (self.b.shape[0] * self.l1_ratio)

    def jacobian_on_support(
        self, x: Float[Array, " n"], theta: Scalar
    ) -> Float[Array, " n"]:
        """$d\\bar x / d\\theta$ from the closed form on the support of `x`
        (a solution at `theta`; entries with $|x_i| > 0$ form $S$). Not
        jittable: the support is read from the concrete `x`."""
        x_np = np.asarray(x)
        support = np.flatnonzero(x_np != 0)
        lam = float(jnp.exp(theta))
        A_S = np.asarray(self.A)[:, support]
        N = self.b.shape[0]
        M = A_S.T @ A_S / N + lam * (1 - self.l1_ratio) * np.eye(support.size)
        rhs = (
            self.l1_ratio * np.sign(x_np[support]) + (1 - self.l1_ratio) * x_np[support]
        )
        out = np.zeros_like(x_np)
        out[support] = -lam * np.linalg.solve(M, rhs)
        return jnp.asarray(out)

    def split(self, n_train: int) -> tuple["Lasso", "Lasso"]:
        """`(train, validation)`: the first `n_train` rows and the rest."""
        n_train = positive_int(n_train, "n_train")
        if n_train >= self.b.shape[0]:
            raise ValueError(
                f"split(n_train) needs n_train < N = {self.b.shape[0]}, got {n_train}."
            )
        first = Lasso(self.A[:n_train], self.b[:n_train], self.l1_ratio)
        rest = Lasso(self.A[n_train:], self.b[n_train:], self.l1_ratio)
        return first, rest


def lasso_data(
    key: PRNGKeyArray,
    n_samples: int = 200,
    n_features: int = 2000,
    *,
    n_informative: int = 10,
    noise: float = 0.5,
    l1_ratio: float = 1.0,
    dtype=None,
) -> tuple[Lasso, Float[Array, " n"]]:
    """A synthetic sparse regression: $A_{ij} \\sim \\mathcal N(0, 1)$,
    $x^\\star$ with `n_informative` non-zero entries $\\pm(1 + U[0, 1])$ at
    random positions, $b = A x^\\star + \\sigma\\varepsilon$,
    $\\varepsilon \\sim \\mathcal N(0, I)$.

    **Returns:** `(problem, x_star)`.
    """
    n_samples = positive_int(n_samples, "n_samples")
    n_features = positive_int(n_features, "n_features")
    n_informative = positive_int(n_informative, "n_informative")
    if n_informative > n_features:
        raise ValueError(
            f"lasso_data needs n_informative <= n_features, got {n_informative} > "
            f"{n_features}."
        )
    noise = float(noise)
    if not noise >= 0:
        raise ValueError(f"lasso_data(noise=...) must be >= 0, got {noise}.")
    l1_ratio = in_closed_interval(l1_ratio, "l1_ratio", 0, 1)
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    k_a, k_pos, k_sign, k_mag, k_eps = jr.split(key, 5)
    A = jr.normal(k_a, (n_samples, n_features), dtype)
    positions = jr.permutation(k_pos, n_features)[:n_informative]
    signs = jnp.where(jr.bernoulli(k_sign, 0.5, (n_informative,)), 1.0, -1.0)
    magnitudes = 1 + jr.uniform(k_mag, (n_informative,))
    x_star = (
        jnp.zeros(n_features, dtype)
        .at[positions]
        .set((signs * magnitudes).astype(dtype))
    )
    b = A @ x_star + noise * jr.normal(k_eps, (n_samples,), dtype)
    return Lasso(A, b, l1_ratio), x_star


def _standardized(X: Any, y: Any, l1_ratio: float, dtype) -> Lasso:
    X = standardize(np.asarray(X, np.float64))
    y = np.asarray(y, np.float64)
    y = (y - y.mean()) / y.std()
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    return Lasso(jnp.asarray(X, dtype), jnp.asarray(y, dtype), l1_ratio)


def lasso_diabetes(l1_ratio: float = 1.0, dtype=None) -> Lasso:
    """scikit-learn's `load_diabetes` (442 samples, 10 features), features
    and target standardized. Needs scikit-learn (the `experiments` extra)."""
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as error:  # pragma: no cover
        raise ImportError(
            "lasso_diabetes needs scikit-learn: pip install scikit-learn "
            "(or itergrad[experiments])."
        ) from error
    X, y = load_diabetes(return_X_y=True)
    return _standardized(X, y, in_closed_interval(l1_ratio, "l1_ratio", 0, 1), dtype)


def lasso_cpusmall(path: str | os.PathLike, l1_ratio: float = 1.0, dtype=None) -> Lasso:
    """The LibSVM `cpusmall` regression data (8192 samples, 12 features) read
    from `path` (e.g. `../shared/data/cpusmall`), features and target
    standardized."""
    X, y = load_svmlight(path)
    return _standardized(X, y, in_closed_interval(l1_ratio, "l1_ratio", 0, 1), dtype)
