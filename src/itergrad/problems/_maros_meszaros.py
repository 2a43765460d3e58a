"""Reader for the Maros–Meszaros QP test set in the `qpbenchmark` `.mat`
format (the library never ships the data: pass the path)."""

import os

import numpy as np

from ._qp import QP

# qpbenchmark's conventions: |value| >= 9e19 is infinite; a row whose two
# sides are closer than 1e-10 is an equality.
_INFINITY = 9e19
_EQUALITY_WIDTH = 1e-10


def maros_meszaros_names(directory: str | os.PathLike) -> list[str]:
    """The problem names (file stems of the `.mat` files) in `directory`,
    sorted."""
    return sorted(
        f[:-4] for f in os.listdir(directory) if f.endswith(".mat")
    )


def load_maros_meszaros(
    path: str | os.PathLike, *, pad: tuple[int, int] | None = None, dtype=None
) -> QP:
    """Read one Maros–Meszaros problem from a `qpbenchmark` `.mat` file as a
    dense `QP`.

    The file holds $\\min \\tfrac12 x^\\top P x + q^\\top x$ s.t.
    $l \\le A x \\le u$ where the last $n$ rows of `A` are the identity (the
    bounds). The QP keeps that form: the general rows with $u - l < 10^{-10}$
    become equalities `A x = b` (with `b` the midpoint), the other general
    rows two-sided rows `l <= C x <= u` (rows with both sides infinite are
    dropped), the identity rows the bounds `lb <= x <= ub` (omitted when all
    infinite; sides closer than $10^{-10}$ are merged into a fixed variable).
    Entries with $|v| \\ge 9\\cdot 10^{19}$ are infinite.

    **Arguments:**

    - `path`: the `.mat` file.
    - `pad`: `None` (default) for the form above, or `(n_pad, k_pad)`: every
      general row in its original order as a two-sided row of `C` (equalities
      with `l = u`, free rows masked), bounds on every variable (infinite ones
      masked), then padded to `n_pad` variables and `k_pad` rows with
      decoupled placeholders (extra variables with cost $\\tfrac12 x_j^2$, no
      bounds; extra rows $-\\infty \\le 0 \\le \\infty$). Problems padded to
      the same sizes have the same shapes, so one compiled solve serves them
      all; the first $n$ entries of the solution and the first rows of the
      multipliers are those of the original problem.
    - `dtype`: the floating dtype of the arrays (default: JAX's default
      floating dtype, float64 when `jax_enable_x64` is on). Needs `scipy`.
    """
    try:
        import scipy.io
        import scipy.sparse
    except ImportError as err:  # pragma: no cover - scipy ships with the dev extras
        raise ImportError("load_maros_meszaros needs scipy (`pip install scipy`).") from err
    data = scipy.io.loadmat(os.fspath(path))
    n = int(np.asarray(data["n"]).ravel()[0])
    m = int(np.asarray(data["m"]).ravel()[0])

    def dense(M):
        return M.toarray() if scipy.sparse.issparse(M) else np.asarray(M, float)

    P = dense(data["P"]).astype(float)
    P = 0.5 * (P + P.T)
    q = np.asarray(data["q"], float).ravel()
    A = dense(data["A"]).astype(float)
    lo = np.asarray(data["l"], float).ravel()
    hi = np.asarray(data["u"], float).ravel()
    lo = np.where(lo <= -_INFINITY, -np.inf, lo)
    hi = np.where(hi >= _INFINITY, np.inf, hi)
    if A.shape != (m, n) or not np.allclose(A[m - n :], np.eye(n)):
        raise ValueError(f"{path}: expected A = [C; I] with shape ({m}, {n}), got {A.shape}.")
    C, lc, uc = A[: m - n], lo[: m - n], hi[: m - n]
    lb, ub = lo[m - n :], hi[m - n :]
    eq = np.isfinite(lc) & np.isfinite(uc) & (uc - lc < _EQUALITY_WIDTH)
    fixed = np.isfinite(lb) & np.isfinite(ub) & (ub - lb < _EQUALITY_WIDTH)
    ub = np.where(fixed, lb, ub)
    if pad is not None:
        n_pad, k_pad = pad
        k = m - n
        if n_pad < n or k_pad < k:
            raise ValueError(f"{path}: `pad={pad}` is smaller than (n, k) = ({n}, {k}).")
        uc = np.where(eq, lc, uc)
        Pp = np.zeros((n_pad, n_pad))
        Pp[:n, :n] = P
        Pp[np.arange(n, n_pad), np.arange(n, n_pad)] = 1.0
        Cp = np.zeros((k_pad, n_pad))
        Cp[:k, :n] = C
        inf = np.full(k_pad - k, np.inf)
        binf = np.full(n_pad - n, np.inf)
        qp = QP(
            Pp, np.concatenate([q, np.zeros(n_pad - n)]),
            C=Cp, l=np.concatenate([lc, -inf]), u=np.concatenate([uc, inf]),
            lb=np.concatenate([lb, -binf]), ub=np.concatenate([ub, binf]),
        )
        return _cast(qp, dtype)
    free = ~np.isfinite(lc) & ~np.isfinite(uc)
    ineq = ~eq & ~free
    kwargs = {}
    if ineq.any():
        kwargs.update(C=C[ineq], l=lc[ineq], u=uc[ineq])
    if np.isfinite(lb).any() or np.isfinite(ub).any():
        kwargs.update(lb=lb, ub=ub)
    qp = QP(
        P, q,
        A=C[eq] if eq.any() else None,
        b=0.5 * (lc[eq] + uc[eq]) if eq.any() else None,
        **kwargs,
    )
    return _cast(qp, dtype)


def _cast(qp: QP, dtype) -> QP:
    return qp if dtype is None else qp.astype(dtype)
