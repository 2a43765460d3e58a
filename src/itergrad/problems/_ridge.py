"""Weighted ridge regression (§4, Figure 4): objective, closed-form solution and
Jacobian, smoothness constants and a conditioning control."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Scalar

from ._logistic import check_weights


class WeightedRidge(eqx.Module):
    """Weighted ridge regression,
    $f_\\theta(x) = \\tfrac12 \\sum_{i=1}^N \\theta_i (y_i - \\langle a_i, x\\rangle)^2
    + \\tfrac\\lambda2 \\|x\\|^2$, with non-negative sample weights $\\theta$.

    With $H(\\theta) = A^\\top \\mathrm{diag}(\\theta) A + \\lambda I$ (the Hessian):

    - solution: $\\bar x(\\theta) = H(\\theta)^{-1} A^\\top \\mathrm{diag}(\\theta)\\, y$;
    - Jacobian: differentiating $H(\\theta)\\bar x(\\theta) = A^\\top \\mathrm{diag}(\\theta) y$
      along $\\theta_i$ gives $a_i a_i^\\top \\bar x + H \\partial_i \\bar x = a_i y_i$, so
      $J_\\theta \\bar x(\\theta) = H(\\theta)^{-1} A^\\top \\mathrm{diag}(y - A\\bar x(\\theta))$,
      an $n \\times N$ matrix whose column $i$ is $H^{-1} a_i r_i$ with the
      residual $r = y - A\\bar x$;
    - smoothness: $L = \\lambda_{\\max}(H(\\theta))$, $\\mu = \\lambda_{\\min}(H(\\theta))$.

    For gradient descent $F(x, \\theta) = x - \\alpha \\nabla f_\\theta(x)$ the
    partial Jacobian in $\\theta$ is
    $J_\\theta F(x, \\theta) = \\alpha A^\\top \\mathrm{diag}(y - A x)$: it grows
    with the residual, so Corollary 1's $L_F$ is
    $\\alpha \\|A^\\top \\mathrm{diag}(y - A\\bar x)\\|_{op}$ at the solution (not the
    $L_F \\le 1$ of Example 1, where $\\theta$ does not scale the data term), and
    $L_J = \\alpha \\|A\\|_{op} \\max_i \\|a_i\\|$.

    **Fields:**

    - `A`: the design, shape `(N, n)`.
    - `y`: the targets, shape `(N,)`.
    - `lam`: $\\lambda > 0$.
    """

    A: Float[Array, "N n"]
    y: Float[Array, " N"]
    lam: float | Float[Array, ""]

    def objective(self, x: Float[Array, " n"], theta: Float[Array, " N"]) -> Scalar:
        """$f_\\theta(x)$.

        **Raises:** `ValueError` (while tracing) when `theta` is not a vector
        of `N` sample weights or `x` not a vector of `n` coefficients.
        """
        check_weights("WeightedRidge", self.A, x, theta)
        residual = self.y - self.A @ x
        return 0.5 * jnp.dot(theta, residual**2) + 0.5 * self.lam * jnp.dot(x, x)

    def hessian(self, theta: Float[Array, " N"]) -> Float[Array, "n n"]:
        """$H(\\theta) = A^\\top \\mathrm{diag}(\\theta) A + \\lambda I$."""
        check_weights("WeightedRidge", self.A, None, theta)
        n = self.A.shape[1]
        return self.A.T @ (theta[:, None] * self.A) + self.lam * jnp.eye(
            n, dtype=self.A.dtype
        )

    def solution(self, theta: Float[Array, " N"]) -> Float[Array, " n"]:
        """The minimiser $\\bar x(\\theta) = H(\\theta)^{-1} A^\\top \\mathrm{diag}(\\theta) y$."""
        return jnp.linalg.solve(self.hessian(theta), self.A.T @ (theta * self.y))

    def jacobian(self, theta: Float[Array, " N"]) -> Float[Array, "n N"]:
        """The closed-form $J_\\theta \\bar x(\\theta) = H(\\theta)^{-1} A^\\top
        \\mathrm{diag}(y - A \\bar x(\\theta))$."""
        residual = self.y - self.A @ self.solution(theta)
        return jnp.linalg.solve(self.hessian(theta), self.A.T * residual[None, :])

    def smoothness(self, theta: Float[Array, " N"]) -> tuple[Scalar, Scalar]:
        """`(L, mu)`: the largest and smallest eigenvalues of $H(\\theta)$,
        i.e. the gradient's Lipschitz constant and the strong convexity
        constant of $f_\\theta$ (for $\\theta \\ge 0$)."""
        eigenvalues = jnp.linalg.eigvalsh(self.hessian(theta))
        return eigenvalues[-1], eigenvalues[0]


def ridge_lambda(A: ArrayLike, kappa: float, theta: ArrayLike | None = None) -> float:
    """The $\\lambda$ for which $f_\\theta$ has condition number
    $\\kappa = L/\\mu$: with $s_{\\max}, s_{\\min}$ the extreme eigenvalues of
    $A^\\top \\mathrm{diag}(\\theta) A$,
    $\\lambda = (s_{\\max} - \\kappa s_{\\min}) / (\\kappa - 1)$.

    Computed in float64 NumPy (a set-up helper, not differentiable).

    **Arguments:**

    - `A`: the design, shape `(N, n)`.
    - `kappa`: the target condition number, $> 1$ (Figure 4 uses 100 and 1000).
    - `theta`: the sample weights (default all ones).

    **Raises:** `ValueError` when the unregularized problem is already better
    conditioned than `kappa` (no $\\lambda > 0$ reaches it).
    """
    if not kappa > 1:
        raise ValueError(f"ridge_lambda(kappa=...) must be > 1, got {kappa}.")
    A = np.asarray(A, np.float64)
    theta = np.ones(A.shape[0]) if theta is None else np.asarray(theta, np.float64)
    eigenvalues = np.linalg.eigvalsh(A.T @ (theta[:, None] * A))
    s_min, s_max = eigenvalues[0], eigenvalues[-1]
    lam = (s_max - kappa * s_min) / (kappa - 1)
    if not lam > 0:
        current = s_max / s_min if s_min > 0 else np.inf
        raise ValueError(
            f"ridge_lambda: the design already has condition number {current:.4g} "
            f"<= kappa={kappa} without regularization; adding lambda > 0 can only "
            "lower it. Choose a larger kappa or a worse-conditioned design."
        )
    return float(lam)


def ridge_data(
    key: PRNGKeyArray,
    n_samples: int = 8192,
    n_features: int = 12,
    *,
    kappa: float = 100.0,
    design_condition: float = 1e6,
    noise: float = 0.1,
    dtype=None,
) -> WeightedRidge:
    """A synthetic weighted ridge problem, by default of the shape of
    `cpusmall` (8192 x 12), for when no data file is at hand.

    The design is $A = \\sqrt N\\, U \\mathrm{diag}(\\sigma) V^\\top$ with random
    orthonormal $U, V$ and singular values decaying geometrically so that
    $A^\\top A$ has condition number `design_condition`; targets are
    $y = A x^\\star + $ `noise` $\\cdot \\mathcal N(0, I)$; $\\lambda$ is
    `ridge_lambda(A, kappa)`, so that $f_\\theta$ has condition number `kappa`
    at $\\theta = 1$.

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `n_samples`, `n_features`: $N \\ge n$ (defaults 8192, 12).
    - `kappa`: the condition number of $f_1$, $1 <$ `kappa` $<$ `design_condition`.
    - `design_condition`: the condition number of $A^\\top A$.
    - `noise`: the standard deviation of the target noise.
    - `dtype`: the floating dtype (default: JAX's default float).
    """
    if n_samples < n_features:
        raise ValueError(
            f"ridge_data needs n_samples >= n_features, got {n_samples} < {n_features}."
        )
    if not 1 < kappa < design_condition:
        raise ValueError(
            "ridge_data needs 1 < kappa < design_condition, got "
            f"kappa={kappa}, design_condition={design_condition}."
        )
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    k_u, k_v, k_x, k_noise = jr.split(key, 4)
    U, _ = jnp.linalg.qr(jr.normal(k_u, (n_samples, n_features), dtype))
    V, _ = jnp.linalg.qr(jr.normal(k_v, (n_features, n_features), dtype))
    sigma = jnp.sqrt(n_samples) * jnp.geomspace(
        1.0, 1.0 / np.sqrt(design_condition), n_features
    ).astype(dtype)
    A = (U * sigma) @ V.T
    x_star = jr.normal(k_x, (n_features,), dtype)
    y = A @ x_star + noise * jr.normal(k_noise, (n_samples,), dtype)
    return WeightedRidge(A=A, y=y, lam=ridge_lambda(A, kappa))
