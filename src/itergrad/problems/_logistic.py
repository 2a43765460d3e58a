"""Weighted, regularized logistic regression (eq. 11 of the paper) and its
synthetic data (Gaussian class-conditional distributions, §4)."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray, Scalar

from .._validate import in_closed_interval, positive_float, positive_int


def check_weights(problem: str, A: Array, x: Array | None, theta: Array) -> None:
    """Check, while tracing, that `theta` holds one weight per sample (a
    vector of length `N = A.shape[0]`) and `x` one entry per column of `A`:
    raise a `ValueError` naming the argument otherwise (instead of a
    `dot_general` error, or a non-scalar objective from a broadcast scalar)."""
    N, n = A.shape
    shape = getattr(theta, "shape", None)
    if shape != (N,):
        raise ValueError(
            f"{problem}: `theta` must hold one weight per sample, shape ({N},) "
            f"(the data has N={N} samples), got "
            f"{'shape ' + str(shape) if shape is not None else type(theta).__name__}."
            " For a scalar weight use `w * jnp.ones(N)`."
        )
    if x is not None and getattr(x, "shape", None) != (n,):
        raise ValueError(
            f"{problem}: `x` (the iterate, e.g. `x0`) must have shape ({n},) (one "
            f"entry per column of the design), got shape {getattr(x, 'shape', None)}."
        )


class LogisticRegression(eqx.Module):
    """The weighted regularized logistic regression of eq. (11),
    $f(x, \\theta) = \\sum_{i=1}^N \\theta_i\\, \\ell(y_i \\langle a_i, x\\rangle)
    + \\lambda \\|x_{-1}\\|^2$, $\\ell(t) = \\log(1 + e^{-t})$.

    The first column of `A` is the intercept (ones) and $x_{-1}$ drops the
    first coordinate: the intercept is not penalized. `theta` holds one
    non-negative weight per sample. The objective is strongly convex in $x$
    for $\\lambda > 0$ as long as both labels carry positive weight.

    **Fields:**

    - `A`: the design matrix, shape `(N, n)`, first column ones.
    - `y`: the labels in $\\{-1, 1\\}$, shape `(N,)`.
    - `lam`: the regularization $\\lambda > 0$.

    Use `problem.objective` with a solver, e.g.
    `ig.Newton(problem.objective)` and `x0 = jnp.zeros(problem.n)`.
    """

    A: Float[Array, "N n"]
    y: Float[Array, " N"]
    lam: float | Float[Array, ""]

    @property
    def n(self) -> int:
        """The number of unknowns (features plus intercept)."""
        return self.A.shape[1]

    def objective(self, x: Float[Array, " n"], theta: Float[Array, " N"]) -> Scalar:
        """$\\sum_i \\theta_i \\ell(y_i \\langle a_i, x \\rangle) + \\lambda \\|x_{-1}\\|^2$.

        **Raises:** `ValueError` (while tracing) when `theta` is not a vector
        of `N` sample weights or `x` not a vector of `n` coefficients.
        """
        check_weights("LogisticRegression", self.A, x, theta)
        margins = self.y * (self.A @ x)
        # logaddexp(0, -t) = log(1 + e^{-t}) without overflow for t << 0 nor
        # cancellation for t >> 0.
        loss = jnp.logaddexp(0.0, -margins)
        return jnp.dot(theta, loss) + self.lam * jnp.sum(x[1:] ** 2)

    def predict(self, x: Float[Array, " n"]) -> Float[Array, " N"]:
        """The predicted probabilities $P(y_i = 1) = \\sigma(\\langle a_i, x\\rangle)$."""
        return 1.0 / (1.0 + jnp.exp(-(self.A @ x)))


def logistic_data(
    key: PRNGKeyArray,
    n_samples: int,
    n_features: int,
    *,
    separation: float = 1.0,
    lam: float = 1.0,
    dtype=None,
) -> LogisticRegression:
    """Synthetic data for eq. (11) with Gaussian class-conditional
    distributions: $y_i = \\pm 1$ with probability $1/2$ each, and features
    $a_i \\sim \\mathcal N(y_i \\, \\tfrac{s}{2} u, I)$ for a random unit vector
    $u$, so that the two class means are at distance $s$ (`separation`).

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `n_samples`: $N$.
    - `n_features`: the number of random features; `A` gets one more column
      (the intercept), so $x \\in \\mathbb R^{n_\\mathrm{features} + 1}$.
    - `separation`: the distance $s \\ge 0$ between the class means.
    - `lam`: the regularization $\\lambda > 0$.
    - `dtype`: the floating dtype (default: JAX's default float).

    **Returns:** a `LogisticRegression`.
    """
    n_features = positive_int(n_features, "n_features")
    if positive_int(n_samples, "n_samples") < 2:
        raise ValueError(
            "logistic_data needs n_samples >= 2 (one sample of each label), got "
            f"n_samples={n_samples}."
        )
    lam = positive_float(lam, "lam")
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    k_label, k_dir, k_noise = jr.split(key, 3)
    y = jnp.where(jr.bernoulli(k_label, 0.5, (n_samples,)), 1.0, -1.0).astype(dtype)
    # Both classes present, so that the intercept direction is strictly convex.
    y = y.at[0].set(1.0).at[1].set(-1.0)
    direction = jr.normal(k_dir, (n_features,), dtype)
    direction = direction / jnp.linalg.norm(direction)
    features = jr.normal(k_noise, (n_samples, n_features), dtype)
    features = features + (0.5 * separation) * y[:, None] * direction
    A = jnp.concatenate([jnp.ones((n_samples, 1), dtype), features], axis=1)
    return LogisticRegression(A=A, y=y, lam=lam)


def flip_labels(
    problem: LogisticRegression, key: PRNGKeyArray, fraction: float
) -> tuple[LogisticRegression, Bool[Array, " N"]]:
    """Corrupt a random `fraction` of the labels ($y_i \\to -y_i$), e.g. for a
    bilevel problem that learns per-sample weights $\\theta$ to down-weight
    them.

    **Returns:** `(corrupted problem, mask)` where `mask[i]` is `True` for the
    flipped samples (exactly `round(fraction * N)` of them).
    """
    fraction = in_closed_interval(fraction, "fraction", 0, 1)
    n_samples = problem.y.shape[0]
    n_flip = round(fraction * n_samples)
    chosen = jr.permutation(key, n_samples)[:n_flip]
    mask = jnp.zeros(n_samples, bool).at[chosen].set(True)
    y = jnp.where(mask, -problem.y, problem.y)
    return eqx.tree_at(lambda p: p.y, problem, y), mask
