"""Convex quadratic programs (eq. 12 of the paper, and the two-sided form of
real QPs) and their random generator (Appendix B.1)."""

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from .._validate import nonnegative_float, nonnegative_int, positive_int


def _split_infinite(v: Array, sign: float) -> tuple[Array, Array]:
    """`(v with its infinite entries of the given sign replaced by 0, finite
    mask)`. NaN counts as finite, so that it is reported, not masked."""
    infinite = (v == sign * jnp.inf)
    return jnp.where(infinite, 0.0, v).astype(v.dtype), ~infinite


class QP(eqx.Module):
    """The data of a convex quadratic program,

    $$\\min_{x} \\tfrac12 x^\\top Q x + q^\\top x \\quad\\text{s.t.}\\quad
    A x = b,\\ G x \\le h,\\ l \\le C x \\le u,\\ l_b \\le x \\le u_b,$$

    eq. (12) of the paper (`A`, `b`, `G`, `h`) with the two-sided rows and
    bounds real QPs come with (`C`, `l`, `u`, `lb`, `ub`; infinite entries
    allowed). Rows of `C` with $l_i = u_i$ are equalities, bounds with
    $l_{b,j} = u_{b,j}$ fix $x_j$.

    A `QP` is a pytree whose floating-point leaves are the data, so it is
    passed as `theta` to `itergrad.solve(ig.InteriorPointQP(), None, qp)` and
    any field can be differentiated (the paper differentiates with respect to
    `b`). Infinite entries of `l`, `u`, `lb`, `ub` are stored as 0 next to
    boolean masks (`l_finite`, ...): the solver sees finite arrays of fixed
    shapes, so problems of one shape share one compilation whatever their
    infinite entries.

    **Arguments:**

    - `Q`: the `(n, n)` symmetric positive semidefinite cost matrix.
    - `q`: the `(n,)` linear cost.
    - `A`, `b`: the `(m, n)` equality matrix and `(m,)` right-hand side. Both
      `None` (default) for no equality constraints; stored as `m = 0` rows.
    - `G`, `h`: the `(p, n)` inequality matrix and `(p,)` right-hand side. Both
      `None` (default) for none; stored as `p = 0` rows.
    - `C`, `l`, `u` (keyword only): the `(k, n)` matrix of two-sided rows
      $l \\le Cx \\le u$; `l` or `u` may be left `None` (all $\\mp\\infty$).
      Default: no such rows.
    - `lb`, `ub` (keyword only): `(n,)` bounds on $x$, entries may be
      $\\mp\\infty$; one may be left `None`. Default: no bounds (stored with
      shape `(0,)`). Bounds enter the Newton system as diagonal terms.

    All arrays are converted to one common floating dtype. Shapes are checked
    on construction and raise a `ValueError` naming the field. When the arrays
    are concrete (not traced under `jit`/`vmap`/`grad`), NaN entries, and
    infinite entries of `Q`, `q`, `A`, `b`, `G`, `h`, `C` raise a
    `ValueError` too; under `jit` they are reported by the solve as
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
    C: Float[Array, "k n"]
    l: Float[Array, " k"]  # noqa: E741  (the name of the standard form)
    u: Float[Array, " k"]
    lb: Float[Array, " nb"]
    ub: Float[Array, " nb"]
    l_finite: Bool[Array, " k"]
    u_finite: Bool[Array, " k"]
    lb_finite: Bool[Array, " nb"]
    ub_finite: Bool[Array, " nb"]

    def __init__(
        self,
        Q: ArrayLike,
        q: ArrayLike,
        A: ArrayLike | None = None,
        b: ArrayLike | None = None,
        G: ArrayLike | None = None,
        h: ArrayLike | None = None,
        *,
        C: ArrayLike | None = None,
        l: ArrayLike | None = None,  # noqa: E741
        u: ArrayLike | None = None,
        lb: ArrayLike | None = None,
        ub: ArrayLike | None = None,
    ):
        for mat, vec, mname, vname in ((A, b, "A", "b"), (G, h, "G", "h")):
            if (mat is None) != (vec is None):
                raise ValueError(
                    f"QP: `{mname}` and `{vname}` must be given together (or both "
                    f"left as None for no such constraints); got `{mname}` "
                    f"{'None' if mat is None else 'an array'} and `{vname}` "
                    f"{'None' if vec is None else 'an array'}."
                )
        if (C is None) != (l is None and u is None):
            raise ValueError(
                "QP: `C` needs `l` and/or `u` (and `l`, `u` need `C`); got `C` "
                f"{'None' if C is None else 'an array'} with `l` "
                f"{'None' if l is None else 'an array'} and `u` "
                f"{'None' if u is None else 'an array'}."
            )
        arrays = {
            k: None if v is None else jnp.asarray(v)
            for k, v in dict(Q=Q, q=q, A=A, b=b, G=G, h=h, C=C, l=l, u=u, lb=lb, ub=ub).items()
        }
        given = [x for x in arrays.values() if x is not None]
        dtype = jnp.result_type(*given)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(dtype, float)
        a = {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}
        Qa = a["Q"]
        assert Qa is not None
        n = Qa.shape[-1] if Qa.ndim >= 1 else 0
        _check_finite(a)

        def empty(*shape):
            return jnp.zeros(shape, dtype)

        def pair(lo, hi, size):
            if lo is None and hi is None:
                return empty(0), empty(0)
            lo = jnp.full((size,), -jnp.inf, dtype) if lo is None else lo
            hi = jnp.full((size,), jnp.inf, dtype) if hi is None else hi
            return lo, hi

        self.Q, self.q = Qa, a["q"]  # pyright: ignore[reportAttributeAccessIssue]
        self.A, self.b = (empty(0, n), empty(0)) if A is None else (a["A"], a["b"])  # pyright: ignore
        self.G, self.h = (empty(0, n), empty(0)) if G is None else (a["G"], a["h"])  # pyright: ignore
        C_ = empty(0, n) if C is None else a["C"]
        assert C_ is not None
        k = C_.shape[0] if C_.ndim == 2 else 0
        l_, u_ = pair(a["l"], a["u"], k)
        lb_, ub_ = pair(a["lb"], a["ub"], n)
        self.C = C_
        self.l, self.l_finite = _split_infinite(l_, -1.0)
        self.u, self.u_finite = _split_infinite(u_, 1.0)
        self.lb, self.lb_finite = _split_infinite(lb_, -1.0)
        self.ub, self.ub_finite = _split_infinite(ub_, 1.0)
        check_qp(self)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """`(n, m, p)`: variables, equality and inequality constraints of
        eq. (12) (`A` and `G` rows; see `rows` for the two-sided ones)."""
        return self.Q.shape[0], self.A.shape[0], self.G.shape[0]

    @property
    def rows(self) -> int:
        """`k`: the number of two-sided rows `C`."""
        return self.C.shape[0]

    @property
    def has_bounds(self) -> bool:
        """Whether the problem carries bounds `lb <= x <= ub` (a static
        property of its shapes)."""
        return self.lb.shape[0] > 0

    def astype(self, dtype) -> "QP":
        """The same QP with its floating-point fields cast to `dtype` (e.g.
        `jnp.float32` for a float32 QP layer); the boolean masks of the
        infinite bounds are kept. Works on a batch of QPs stacked along a
        leading axis too."""
        return jax.tree_util.tree_map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            self,
        )


def _check_finite(arrays: dict) -> None:
    """NaN anywhere, or an infinite entry where none makes sense, raise (for
    concrete arrays)."""
    for name, x in arrays.items():
        if x is None or isinstance(x, jax.core.Tracer) or x.size == 0:
            continue
        x = np.asarray(x)
        if name in ("l", "u", "lb", "ub"):
            bad = np.isnan(x) | (x == (np.inf if name in ("l", "lb") else -np.inf))
            if np.any(bad):
                raise ValueError(
                    f"QP: `{name}` contains NaN or "
                    f"{'+' if name in ('l', 'lb') else '-'}Inf entries (a lower bound "
                    "may be -Inf, an upper bound +Inf)."
                )
        elif not np.all(np.isfinite(x)):
            raise ValueError(f"QP: `{name}` contains NaN or Inf entries.")


def check_qp(qp: QP) -> None:
    """Validate the shapes of a `QP` (and, for concrete arrays, that they are
    finite); raise a `ValueError` naming the offending field."""
    if not isinstance(qp, QP):
        raise TypeError(f"`theta` must be an `itergrad.problems.QP`, got {type(qp).__name__}.")
    Q, q = qp.Q, qp.q
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
    for mat, vecs, mname, vnames in (
        (qp.A, (qp.b,), "A", ("b",)),
        (qp.G, (qp.h,), "G", ("h",)),
        (qp.C, (qp.l, qp.u), "C", ("l", "u")),
    ):
        if mat.ndim != 2 or mat.shape[1] != n:
            raise ValueError(
                f"QP: `{mname}` must be a matrix with n = {n} columns (matching `Q` "
                f"of shape {Q.shape}), got shape {mat.shape}."
            )
        for vec, vname in zip(vecs, vnames, strict=True):
            if vec.shape != (mat.shape[0],):
                raise ValueError(
                    f"QP: `{vname}` must have shape ({mat.shape[0]},), one entry per row "
                    f"of `{mname}` (shape {mat.shape}), got {vec.shape}."
                )
    for name, vec in (("lb", qp.lb), ("ub", qp.ub)):
        if vec.shape not in ((n,), (0,)):
            raise ValueError(f"QP: `{name}` must have shape (n,) = ({n},), got {vec.shape}.")
    for name in "QqAbGhC":
        x = getattr(qp, name)
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
