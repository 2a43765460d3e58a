"""Convex quadratic programs (eq. 12 of the paper) and their random generator
(Appendix B.1)."""

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._validate import nonnegative_float, nonnegative_int, positive_int


class QP(eqx.Module):
    """The data of a convex quadratic program (eq. 12),

    $$\\min_{x} \\tfrac12 x^\\top Q x + q^\\top x \\quad\\text{s.t.}\\quad
    A x = b,\\ G x \\le h.$$

    A `QP` is a pytree whose leaves are the six arrays, so it is passed as
    `theta` to `itergrad.solve(ig.InteriorPointQP(), None, qp)` and any field
    can be differentiated (the paper differentiates with respect to `b`).

    **Arguments:**

    - `Q`: the `(n, n)` symmetric positive semidefinite cost matrix (positive
      definite on the null space of `A` for a unique solution).
    - `q`: the `(n,)` linear cost.
    - `A`, `b`: the `(m, n)` equality matrix and `(m,)` right-hand side. Both
      `None` (default) for no equality constraints; stored as `m = 0` rows.
    - `G`, `h`: the `(p, n)` inequality matrix and `(p,)` right-hand side. Both
      `None` (default) for no inequality constraints; stored as `p = 0` rows.

    All arrays are converted to one common floating dtype. Shapes are checked
    on construction and raise a `ValueError` naming the field. When the arrays
    are concrete (not traced under `jit`/`vmap`/`grad`), NaN or Inf entries
    raise a `ValueError` too; under `jit` they are reported by the solve as
    `RESULTS.nonfinite`.

    !!! warning

        To batch problems, build the `QP` inside the function you `jax.vmap`
        (e.g. `jax.vmap(lambda b: solve(..., QP(Q, q, A, b, G, h)))`), or stack
        unbatched `QP`s with `jax.tree_util.tree_map(jnp.stack, ...)`: the
        constructor itself only accepts unbatched shapes.
    """

    Q: Float[Array, "n n"]
    q: Float[Array, " n"]
    A: Float[Array, "m n"]
    b: Float[Array, " m"]
    G: Float[Array, "p n"]
    h: Float[Array, " p"]

    def __init__(
        self,
        Q: ArrayLike,
        q: ArrayLike,
        A: ArrayLike | None = None,
        b: ArrayLike | None = None,
        G: ArrayLike | None = None,
        h: ArrayLike | None = None,
    ):
        for mat, vec, mname, vname in ((A, b, "A", "b"), (G, h, "G", "h")):
            if (mat is None) != (vec is None):
                raise ValueError(
                    f"QP: `{mname}` and `{vname}` must be given together (or both "
                    f"left as None for no such constraints); got `{mname}` "
                    f"{'None' if mat is None else 'an array'} and `{vname}` "
                    f"{'None' if vec is None else 'an array'}."
                )
        Q, q = jnp.asarray(Q), jnp.asarray(q)
        A, b, G, h = (None if v is None else jnp.asarray(v) for v in (A, b, G, h))
        given = [x for x in (Q, q, A, b, G, h) if x is not None]
        dtype = jnp.result_type(*given)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(dtype, float)
        n = Q.shape[-1] if Q.ndim >= 1 else 0
        if A is None:
            A, b = jnp.zeros((0, n), dtype), jnp.zeros((0,), dtype)
        if G is None:
            G, h = jnp.zeros((0, n), dtype), jnp.zeros((0,), dtype)
        self.Q, self.q, self.A, self.b, self.G, self.h = (
            jnp.asarray(x, dtype) for x in (Q, q, A, b, G, h)
        )
        check_qp(self)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """`(n, m, p)`: variables, equality and inequality constraints."""
        return self.Q.shape[0], self.A.shape[0], self.G.shape[0]


def check_qp(qp: QP) -> None:
    """Validate the shapes of a `QP` (and, for concrete arrays, that they are
    finite); raise a `ValueError` naming the offending field."""
    if not isinstance(qp, QP):
        raise TypeError(f"`theta` must be an `itergrad.problems.QP`, got {type(qp).__name__}.")
    Q, q, A, b, G, h = qp.Q, qp.q, qp.A, qp.b, qp.G, qp.h
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"QP: `Q` must be a square (n, n) matrix, got shape {Q.shape}.")
    n = Q.shape[0]
    if n == 0:
        raise ValueError("QP: `Q` has shape (0, 0); the problem needs at least one variable.")
    if q.shape != (n,):
        raise ValueError(
            f"QP: `q` must have shape (n,) = ({n},) to match `Q` of shape {Q.shape}, "
            f"got {q.shape}."
        )
    for mat, vec, mname, vname in ((A, b, "A", "b"), (G, h, "G", "h")):
        if mat.ndim != 2 or mat.shape[1] != n:
            raise ValueError(
                f"QP: `{mname}` must be a matrix with n = {n} columns (matching `Q` "
                f"of shape {Q.shape}), got shape {mat.shape}."
            )
        if vec.shape != (mat.shape[0],):
            raise ValueError(
                f"QP: `{vname}` must have shape ({mat.shape[0]},), one entry per row "
                f"of `{mname}` (shape {mat.shape}), got {vec.shape}."
            )
    for name, x in zip("QqAbGh", (Q, q, A, b, G, h), strict=True):
        if isinstance(x, jax.core.Tracer) or x.size == 0:
            continue
        if not np.all(np.isfinite(np.asarray(x))):
            raise ValueError(f"QP: `{name}` contains NaN or Inf entries.")


def random_qp(
    key: PRNGKeyArray,
    n: int,
    m: int,
    p: int,
    *,
    dtype: jnp.dtype | type = jnp.float64,
    regularization: float = 0.0,
) -> QP:
    """A random feasible QP, the generator of Appendix B.1.

    $Q = M^\\top M + \\lambda I$ with $M \\in \\mathbb{R}^{n\\times n}$, and $A$,
    $G$, $q$ with i.i.d. entries uniform in $[-1, 1]$. Feasibility (with a
    strictly feasible inequality set) holds by construction: for a random
    $x_0 \\sim U[-1, 1]^n$ and slack $s_0 \\sim U[0, 1]^p$ (positive with
    probability one), $b = A x_0$ and $h = G x_0 + s_0$. With probability one
    $Q$ is positive definite, $A$ has full row rank and the solution is unique
    and strictly complementary.

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `n`, `m`, `p`: the number of variables, equality and inequality
      constraints; `0 <= m <= n`, `p >= 0`.
    - `dtype`: the floating dtype (default `jnp.float64`, which needs
      `jax_enable_x64`; otherwise JAX uses float32).
    - `regularization`: $\\lambda \\ge 0$ added to the diagonal of $Q$ (default
      0), for a better conditioned $Q$ (e.g. in float32).
    """
    n = positive_int(n, "n")
    m = nonnegative_int(m, "m")
    p = nonnegative_int(p, "p")
    regularization = nonnegative_float(regularization, "regularization")
    if m > n:
        raise ValueError(
            f"random_qp: `m` must satisfy 0 <= m <= n = {n} (more equality "
            f"constraints than variables are rank deficient), got {m!r}."
        )
    kM, kq, kA, kG, kx, ks = jr.split(key, 6)

    def uniform(k, shape, low=-1.0):
        return jr.uniform(k, shape, dtype, minval=low, maxval=1.0)

    M = uniform(kM, (n, n))
    Q = M.T @ M + regularization * jnp.eye(n, dtype=dtype)
    q = uniform(kq, (n,))
    A = uniform(kA, (m, n))
    G = uniform(kG, (p, n))
    x0 = uniform(kx, (n,))
    s0 = uniform(ks, (p,), low=0.0)
    return QP(Q=Q, q=q, A=A, b=A @ x0, G=G, h=G @ x0 + s0)
