"""itergrad's InteriorPointQP on the Maros–Meszaros QPs (dense subset, 48
problems) next to PIQP, ProxQP (proxsuite), OSQP, Clarabel and qpax, and the
paper's random QPs against qpax.

Success is qpbenchmark's: primal residual, dual residual and duality gap of the
ORIGINAL problem `l <= [C; I] x <= u`, all absolute and at most the tolerance,
computed here in numpy from each solver's primal and multipliers. Times are
medians over `--repeats` calls after one warm-up (compilation reported
apart). itergrad solves problems padded to a few shapes (see `GRID`) so that
the 48 problems need ~17 compilations, not 48; its times are those of the
padded problems.

    nice .venv/bin/python benchmarks/maros_meszaros.py            # everything
    nice .venv/bin/python benchmarks/maros_meszaros.py --only HS21 QAFIRO --no-grad
"""

import argparse
import csv
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.io  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import itergrad as ig  # noqa: E402
from itergrad.problems import random_qp  # noqa: E402
from itergrad.problems._maros_meszaros import (  # noqa: E402
    load_maros_meszaros,
    maros_meszaros_names,
)
from itergrad.solvers._interior_point import kkt_residual  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "maros_meszaros"
GRID = (32, 128, 256, 384, 512, 768, 1024)
MAX_STEPS = 200
SOLVER = ig.InteriorPointQP()


def bucket(v):
    return next(g for g in GRID if g >= v)


class Raw:
    """The original problem `l <= A x <= u`, `A = [C; I]`, in numpy."""

    def __init__(self, path):
        d = scipy.io.loadmat(path)
        self.n = int(np.asarray(d["n"]).ravel()[0])
        self.m = int(np.asarray(d["m"]).ravel()[0])
        self.P = d["P"].toarray()
        self.q = np.asarray(d["q"], float).ravel()
        self.A = d["A"].toarray()
        lo, hi = (np.asarray(d[k], float).ravel() for k in ("l", "u"))
        self.l = np.where(lo <= -9e19, -np.inf, lo)
        self.u = np.where(hi >= 9e19, np.inf, hi)
        self.k = self.m - self.n
        self.eq = np.isfinite(self.l) & np.isfinite(self.u) & (self.u - self.l < 1e-10)

    def residuals(self, x, y):
        """qpbenchmark's (primal, dual, gap) at `x` and multipliers `y` of the
        rows of A (positive on an active upper side)."""
        Ax = self.A @ x
        primal = max(np.max(np.maximum(Ax - self.u, 0)), np.max(np.maximum(self.l - Ax, 0)))
        dual = np.max(np.abs(self.P @ x + self.q + self.A.T @ y))
        up = np.where(np.isfinite(self.u), self.u, 0.0) @ np.maximum(y, 0)
        low = np.where(np.isfinite(self.l), self.l, 0.0) @ np.minimum(y, 0)
        gap = abs(x @ self.P @ x + self.q @ x + up + low)
        return float(primal), float(dual), float(gap)


def timed(fn, repeats):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, first, times


# -- itergrad -----------------------------------------------------------------

_ITERGRAD = {}


def itergrad_solve_fn(tol):
    if tol not in _ITERGRAD:
        _ITERGRAD[tol] = eqx.filter_jit(
            lambda qp: ig.solve(SOLVER, None, qp, throw=False, rtol=0.0, atol=tol,
                                max_steps=MAX_STEPS)
        )
    return _ITERGRAD[tol]


def itergrad_grad_fn(estimator, tol):
    """`(qp, v) -> ((vᵀx, result), gradient in qp)`, compiled once per shape."""
    key = (type(estimator).__name__, tol)
    if key not in _ITERGRAD:
        def loss(qp, v):
            sol = ig.solve(SOLVER, None, qp, estimator=estimator, throw=False, rtol=0.0,
                           atol=tol, max_steps=MAX_STEPS)
            return jnp.dot(v, sol.value), sol.result

        _ITERGRAD[key] = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    return _ITERGRAD[key]


def padded_shape(raw):
    """(variables, rows) of the padded problem itergrad solves."""
    return bucket(raw.n), bucket(max(raw.k, 1))


def run_itergrad(raw, path, tol, repeats):
    qp = load_maros_meszaros(path, pad=padded_shape(raw))
    f = itergrad_solve_fn(tol)

    def call():
        sol = f(qp)
        jax.block_until_ready(sol.value)
        return sol

    sol, first, times = timed(call, repeats)
    r = kkt_residual(sol.state.z, qp)
    x = np.asarray(sol.value)[: raw.n]
    y = np.concatenate([np.asarray(r.lam)[: raw.k], np.asarray(r.blam)[: raw.n]])
    return x, y, first, times, dict(steps=int(sol.steps), qp=qp, sol=sol)


# -- other solvers ------------------------------------------------------------


def run_piqp(raw, tol, repeats):
    import piqp

    C, lc, uc = raw.A[: raw.k], raw.l[: raw.k], raw.u[: raw.k]
    lb, ub = raw.l[raw.k :], raw.u[raw.k :]
    eq = raw.eq[: raw.k]

    def call():
        s = piqp.DenseSolver()
        s.settings.eps_abs = tol
        s.settings.eps_rel = 0.0
        s.settings.eps_duality_gap_abs = tol
        s.settings.eps_duality_gap_rel = 0.0
        s.settings.check_duality_gap = True
        s.settings.max_iter = 1000
        s.setup(np.asfortranarray(raw.P), raw.q,
                np.asfortranarray(C[eq]) if eq.any() else None, lc[eq] if eq.any() else None,
                np.asfortranarray(C[~eq]) if (~eq).any() else None,
                lc[~eq] if (~eq).any() else None, uc[~eq] if (~eq).any() else None,
                lb, ub)
        s.solve()
        return s

    s, first, times = timed(call, repeats)
    res = s.result
    y = np.zeros(raw.m)
    y[: raw.k][eq] = res.y
    y[: raw.k][~eq] = res.z_u - res.z_l
    y[raw.k :] = res.z_bu - res.z_bl
    return np.asarray(res.x), y, first, times, {}


def run_proxqp(raw, tol, repeats):
    import proxsuite

    C, lc, uc = raw.A[: raw.k], raw.l[: raw.k], raw.u[: raw.k]
    eq = raw.eq[: raw.k]
    big = 1e20
    lb, ub = np.maximum(raw.l[raw.k :], -big), np.minimum(raw.u[raw.k :], big)

    def call():
        qp = proxsuite.proxqp.dense.QP(raw.n, int(eq.sum()), int((~eq).sum()), True)
        qp.settings.eps_abs = tol
        qp.settings.eps_rel = 0.0
        qp.settings.check_duality_gap = True
        qp.settings.eps_duality_gap_abs = tol
        qp.settings.eps_duality_gap_rel = 0.0
        qp.settings.max_iter = 10000
        qp.init(raw.P, raw.q, C[eq], lc[eq], C[~eq], np.maximum(lc[~eq], -big),
                np.minimum(uc[~eq], big), lb, ub)
        qp.solve()
        return qp

    qp, first, times = timed(call, repeats)
    r = qp.results
    k_in = int((~eq).sum())
    y = np.zeros(raw.m)
    y[: raw.k][eq] = r.y
    y[: raw.k][~eq] = r.z[:k_in]
    y[raw.k :] = r.z[k_in:]
    return np.asarray(r.x), y, first, times, {}


def run_osqp(raw, tol, repeats):
    import osqp

    P = sp.triu(sp.csc_matrix(raw.P), format="csc")
    A = sp.csc_matrix(raw.A)

    def call():
        s = osqp.OSQP()
        s.setup(P, raw.q, A, raw.l, raw.u, eps_abs=tol, eps_rel=0.0, verbose=False,
                polishing=True, max_iter=100000)
        return s.solve()

    r, first, times = timed(call, repeats)
    if r.x is None or r.x[0] is None:
        return None, None, first, times, {}
    return np.asarray(r.x), np.asarray(r.y), first, times, {}


def run_clarabel(raw, tol, repeats):
    import clarabel

    rows, rhs, cones, back = [], [], [], []
    eq = raw.eq
    idx_eq = np.where(eq)[0]
    if idx_eq.size:
        rows.append(raw.A[idx_eq])
        rhs.append(raw.l[idx_eq])
        cones.append(clarabel.ZeroConeT(idx_eq.size))
        back.append((idx_eq, 1.0))
    up = np.where(~eq & np.isfinite(raw.u))[0]
    lo = np.where(~eq & np.isfinite(raw.l))[0]
    if up.size + lo.size:
        rows += [raw.A[up], -raw.A[lo]]
        rhs += [raw.u[up], -raw.l[lo]]
        cones.append(clarabel.NonnegativeConeT(up.size + lo.size))
        back += [(up, 1.0), (lo, -1.0)]
    A = sp.csc_matrix(np.vstack(rows))
    b = np.concatenate(rhs)
    P = sp.triu(sp.csc_matrix(raw.P), format="csc")

    def call():
        st = clarabel.DefaultSettings()
        st.verbose = False
        st.tol_gap_abs = tol
        st.tol_gap_rel = 0.0
        st.tol_feas = tol
        st.tol_ktratio = 1e-6
        st.max_iter = 500
        s = clarabel.DefaultSolver(P, raw.q, A, b, cones, st)
        return s.solve()

    r, first, times = timed(call, repeats)
    z = np.asarray(r.z)
    y = np.zeros(raw.m)
    pos = 0
    for idx, sign in back:
        y[idx] += sign * z[pos : pos + idx.size]
        pos += idx.size
    return np.asarray(r.x), y, first, times, {}


def qpax_form(raw):
    """qpax's `Ax = b, Gx <= h` from the finite sides (bounds as rows)."""
    eq = raw.eq
    up = np.where(~eq & np.isfinite(raw.u))[0]
    lo = np.where(~eq & np.isfinite(raw.l))[0]
    A, b = raw.A[eq], raw.l[eq]
    G = np.vstack([raw.A[up], -raw.A[lo]])
    h = np.concatenate([raw.u[up], -raw.l[lo]])
    return A, b, G, h, eq, up, lo


def run_qpax(raw, tol, repeats):
    import qpax

    A, b, G, h, eq, up, lo = qpax_form(raw)
    # The data as arguments, not constants folded into the executable.
    f = jax.jit(lambda *data: qpax.solve_qp(*data, solver_tol=tol))
    data = tuple(jnp.asarray(a) for a in (raw.P, raw.q, A, b, G, h))

    def call():
        out = f(*data)
        jax.block_until_ready(out)
        return out

    out, first, times = timed(call, repeats)
    x, s, z, yq, converged, iters = out
    y = np.zeros(raw.m)
    y[eq] = np.asarray(yq)
    y[up] += np.asarray(z)[: up.size]
    y[lo] -= np.asarray(z)[up.size :]
    return np.asarray(x), y, first, times, {}


SOLVERS = {
    "itergrad": None,
    "piqp": run_piqp,
    "proxqp": run_proxqp,
    "osqp": run_osqp,
    "clarabel": run_clarabel,
    "qpax": run_qpax,
}


def shifted_geomean(times, shift=10.0):
    """qpbenchmark's shifted geometric mean (times in ms, shift 10 ms)."""
    return math.exp(statistics.fmean(math.log(t + shift) for t in times)) - shift


# -- derivatives --------------------------------------------------------------


def margin(sol):
    w = sol.state.z
    pairs = [(w.s, w.z), (w.rows.sl, w.rows.zl), (w.rows.su, w.rows.zu),
             (w.bounds.sl, w.bounds.zl), (w.bounds.su, w.bounds.zu)]
    return min(float(jnp.min(jnp.maximum(s, z))) for s, z in pairs if s.size)


# Strict complementarity below which the active set is not taken as stable
# (a pair with both s and z ~ 0 is weakly active: the solution is not
# differentiable there, and central differences straddle two pieces).
STABLE_MARGIN = 1e-6
# Finite differences: the QP solution is piecewise affine in (q, l, u), so a
# step well inside the active set's piece is exact up to the solves' accuracy;
# the perturbed problems are solved to FD_TOL, the noise is ~FD_TOL / FD_STEP.
# (A step of 1e-5 left VALUES' piece, margin 1.1e-5: FD -259 against -390.7;
# with 1e-6 the two agree to 7 digits.)
FD_STEP, FD_TOL = 1e-6, 1e-11
# A directional derivative below ZERO_FLOOR ‖v‖ ‖d‖ is zero up to rounding
# (∂x/∂q = 0 at an LP vertex: LOTSCHD's AD gives 3e-16, FD 0): the error is
# measured against that floor, not relative to rounding.
ZERO_FLOOR = 1e-9


def result_name(result):
    """`stalled` from `RESULTS<stalled: message>`."""
    code = re.search(r"<(\w+)", str(result))
    return code.group(1) if code else str(result)


def derivative_check(raw, info, tol, seed=0):
    """OneStep vs Implicit on vᵀx (all fields), and Implicit vs central
    differences along random directions in q, b (equality rows, moving l and u
    together), h (the sides of the inequality rows that are active, i.e.
    with a nonzero multiplier: an inactive row's derivative is 0 on both
    sides and compares only rounding) and the active bounds (lb, ub). Rows
    whose solve with an estimator
    did not end `successful` record that code instead of a gradient (the
    gradient of a flagged solve is not an answer)."""
    qp, sol = info["qp"], info["sol"]
    n_pad = qp.Q.shape[0]
    key = jax.random.PRNGKey(seed)
    kv, kq, kb, kh = jax.random.split(key, 4)
    v = jnp.zeros(n_pad).at[: raw.n].set(jax.random.normal(kv, (raw.n,)))
    row = np.arange(qp.l.shape[0]) < raw.k
    eq_rows = jnp.asarray(np.concatenate([raw.eq[: raw.k], np.zeros(qp.l.shape[0] - raw.k, bool)]))
    kkt = kkt_residual(sol.state.z, qp)

    def active(multipliers):
        a = np.abs(np.asarray(multipliers))
        return a > 1e-8 * max(1.0, a.max(initial=0.0))

    active_rows = jnp.asarray(row & ~np.asarray(eq_rows) & active(kkt.lam))
    active_bounds = jnp.asarray((np.arange(n_pad) < raw.n) & active(kkt.blam))
    out = dict(margin=margin(sol))
    out["stable"] = out["margin"] >= STABLE_MARGIN

    def solve_and_grad(estimator):
        fn = itergrad_grad_fn(estimator, tol)

        def call():
            (_, result), g = fn(qp, v)
            jax.block_until_ready(g)
            return result, g

        # Warm medians: the first call compiles (once per padded shape).
        (result, g), _, times = timed(call, 3)
        return result, g, statistics.median(times)

    result, g_os, out["t_onestep"] = solve_and_grad(ig.OneStep())
    if result != ig.RESULTS.successful:
        out["status"] = f"OneStep solve: {result_name(result)}"
        return out
    try:
        result, g_im, out["t_implicit"] = solve_and_grad(ig.Implicit())
    except Exception as err:  # Implicit refuses a singular optimality condition
        code = re.search(r"\b([a-z_]+): [A-Z]", str(err))
        out["status"] = f"Implicit refused: {code.group(1) if code else type(err).__name__}"
        out["stable"] = False
        return out
    if result != ig.RESULTS.successful:
        out["status"] = f"Implicit solve: {result_name(result)}"
        return out
    out["status"] = "ok"

    def flat(g):
        return np.concatenate([np.ravel(np.asarray(getattr(g, f))) for f in ("Q", "q", "C", "l", "u", "lb", "ub")])

    a, b = flat(g_os), flat(g_im)
    out["onestep_vs_implicit"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
    f = itergrad_solve_fn(FD_TOL)

    def value(qp_t):
        return float(jnp.dot(v, f(qp_t).value))

    def perturbed(fields, deltas):
        return lambda t: eqx.tree_at(
            lambda p: tuple(getattr(p, k) for k in fields), qp,
            tuple(getattr(qp, k) + t * dk for k, dk in zip(fields, deltas)),
        )

    dq = jax.random.normal(kq, qp.q.shape) * (jnp.arange(n_pad) < raw.n)
    db = jax.random.normal(kb, qp.l.shape) * eq_rows
    dl = jax.random.normal(kh, qp.l.shape) * active_rows * qp.l_finite
    du = jax.random.normal(jax.random.fold_in(kh, 1), qp.u.shape) * active_rows * qp.u_finite
    kx = jax.random.fold_in(kh, 2)
    dlb = jax.random.normal(kx, qp.lb.shape) * active_bounds * qp.lb_finite
    dub = jax.random.normal(jax.random.fold_in(kx, 1), qp.ub.shape) * active_bounds * qp.ub_finite
    directions = {
        "q": (("q",), (dq,)),
        "b": (("l", "u"), (db, db)),  # an equality row's l = u moves as one
        "h": (("l", "u"), (dl, du)),
        "bounds": (("lb", "ub"), (dlb, dub)),
    }
    out["fd"] = {}
    for name, (fields, deltas) in directions.items():
        if not any(float(jnp.max(jnp.abs(d))) for d in deltas):
            continue
        ad = float(sum(jnp.vdot(getattr(g_im, k), d) for k, d in zip(fields, deltas)))
        move = perturbed(fields, deltas)
        fd = (value(move(FD_STEP)) - value(move(-FD_STEP))) / (2 * FD_STEP)
        floor = ZERO_FLOOR * float(jnp.linalg.norm(v)) * float(
            jnp.sqrt(sum(jnp.sum(d**2) for d in deltas)))
        out["fd"][name] = abs(fd - ad) / max(abs(ad), abs(fd), floor)
    return out


# -- random QPs ---------------------------------------------------------------


def random_qp_comparison(sizes, repeats, out_rows):
    import qpax

    for n in sizes:
        m, p = n // 4, n // 2
        qp = random_qp(jax.random.PRNGKey(0), n, m, p)
        Q, q, A, b, G, h = (np.asarray(x) for x in (qp.Q, qp.q, qp.A, qp.b, qp.G, qp.h))

        def loss_ig(b_, estimator):
            x = ig.solve(SOLVER, None, eqx.tree_at(lambda t: t.b, qp, b_), estimator=estimator,
                         rtol=1e-12, atol=1e-12).value
            return 0.5 * jnp.dot(x, x)

        ref = eqx.filter_jit(jax.grad(lambda b_: loss_ig(b_, ig.Implicit())))(qp.b)
        methods = {
            "itergrad OneStep (tol 1e-12)": jax.jit(jax.grad(lambda b_: loss_ig(b_, ig.OneStep()))),
            "itergrad Implicit (tol 1e-12)": jax.jit(jax.grad(lambda b_: loss_ig(b_, ig.Implicit()))),
        }
        for tol_, kappa in ((1e-5, 1e-3), (1e-10, 1e-8)):
            def loss_qpax(b_, tol_=tol_, kappa=kappa):
                x = qpax.solve_qp_primal(Q, q, A, b_, G, h, solver_tol=tol_, target_kappa=kappa)
                return 0.5 * jnp.dot(x, x)
            methods[f"qpax (solver_tol {tol_:g}, target_kappa {kappa:g})"] = jax.jit(jax.grad(loss_qpax))
        for name, fn in methods.items():
            def call(fn=fn):
                g = fn(qp.b)
                jax.block_until_ready(g)
                return g

            g, first, times = timed(call, repeats)
            err = float(np.linalg.norm(np.asarray(g) - np.asarray(ref)) / np.linalg.norm(ref))
            med = statistics.median(times) * 1e3
            q1, q3 = np.percentile(np.asarray(times) * 1e3, [25, 75])
            out_rows.append(dict(size=f"n={n},m={m},p={p}", method=name, solve_grad_ms=med,
                                 iqr=f"{q1:.3g}-{q3:.3g}", rel_error=err, first_s=first))
            print(f"random n={n} {name}: {med:.1f} ms (IQR {q1:.3g}-{q3:.3g}) err {err:.1e}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--solvers", nargs="*", default=list(SOLVERS))
    ap.add_argument("--tols", nargs="*", type=float, default=[1e-6, 1e-9])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-grad", action="store_true")
    ap.add_argument("--random", nargs="*", type=int, default=[100, 300, 1000])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    load_start = os.getloadavg()
    names = args.only or maros_meszaros_names(args.data)
    raws = {name: Raw(args.data / f"{name}.mat") for name in names}
    # One padded shape at a time, its compiled functions dropped afterwards:
    # kept for the whole run (~70 itergrad executables and ~100 of qpax), they
    # exhausted the process's memory maps (vm.max_map_count = 65530) half-way
    # ("LLVM compilation error: Cannot allocate memory").
    names = sorted(names, key=lambda nm: (padded_shape(raws[nm]), nm))
    rows, grad_rows, random_rows = [], [], []
    shape = None
    for name in names:
        path = args.data / f"{name}.mat"
        raw = raws[name]
        if padded_shape(raw) != shape:
            shape = padded_shape(raw)
            _ITERGRAD.clear()
            jax.clear_caches()
        for tol in args.tols:
            for solver in args.solvers:
                try:
                    if solver == "itergrad":
                        x, y, first, times, info = run_itergrad(raw, path, tol, args.repeats)
                    else:
                        x, y, first, times, info = SOLVERS[solver](raw, tol, args.repeats)
                    if x is None or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
                        res = (math.inf, math.inf, math.inf)
                    else:
                        res = raw.residuals(x, y)
                except Exception as err:  # a solver crashing counts as a failure
                    print(f"{name} {solver} {tol:g}: {type(err).__name__}: {err}", flush=True)
                    res, first, times, info = (math.inf,) * 3, math.nan, [math.nan], {}
                ok = max(res) <= tol
                med = statistics.median(times) * 1e3
                rows.append(dict(problem=name, n=raw.n, k=raw.k, solver=solver, tol=tol,
                                 success=ok, primal=res[0], dual=res[1], gap=res[2],
                                 ms=med, first_s=first, steps=info.get("steps", "")))
                print(f"{name:9s} {solver:8s} {tol:g} {'OK ' if ok else 'FAIL'} "
                      f"p={res[0]:.1e} d={res[1]:.1e} g={res[2]:.1e} {med:.2f} ms "
                      f"(first {first:.1f} s)", flush=True)
                if solver == "itergrad" and ok and not args.no_grad and tol == min(args.tols):
                    dc = derivative_check(raw, info, tol)
                    grad_rows.append(dict(problem=name, n=raw.n, **{k: v for k, v in dc.items() if k != "fd"},
                                          **{f"fd_{k}": v for k, v in dc.get("fd", {}).items()}))
                    print(f"  grad: {dc['status']} onestep-implicit {dc.get('onestep_vs_implicit', math.nan):.1e} "
                          f"fd {dc.get('fd')} margin {dc['margin']:.1e}", flush=True)
    if args.random:
        random_qp_comparison(args.random, args.repeats, random_rows)
    elapsed = time.perf_counter() - start
    write(args, rows, grad_rows, random_rows, elapsed, load_start)


def write(args, rows, grad_rows, random_rows, elapsed, load_start):
    args.out.mkdir(parents=True, exist_ok=True)
    for fname, data in (("maros_meszaros.csv", rows), ("maros_meszaros_gradients.csv", grad_rows),
                        ("maros_meszaros_random_qp.csv", random_rows)):
        if data:
            keys = list(dict.fromkeys(k for r in data for k in r))
            with open(args.out / fname, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys)
                w.writeheader()
                w.writerows(data)
    lines = ["# Maros–Meszaros benchmark", "",
             f"`{' '.join(sys.argv)}`; {platform.platform()}, {os.cpu_count()} CPUs; "
             f"jax {jax.__version__}; run time {elapsed / 60:.1f} min (compilation included); "
             f"load average at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f}.", "",
             "| solver | tol | solved | shifted geomean ms (solved by all) | failures |", "|---|---|---:|---:|---|"]
    for tol in args.tols:
        sub = [r for r in rows if r["tol"] == tol]
        names = sorted({r["problem"] for r in sub})
        common = [nm for nm in names if all(r["success"] for r in sub if r["problem"] == nm)]
        for solver in args.solvers:
            rs = [r for r in sub if r["solver"] == solver]
            solved = sum(r["success"] for r in rs)
            t = [r["ms"] for r in rs if r["problem"] in common]
            fails = ", ".join(r["problem"] for r in rs if not r["success"])
            sgm = shifted_geomean(t) if t else math.nan
            lines.append(f"| {solver} | {tol:g} | {solved}/{len(rs)} | {sgm:.3g} | {fails} |")
    if grad_rows:
        stable = [r for r in grad_rows if r["stable"] and r["status"] == "ok"]
        worst = {k: max((r.get(k, 0.0) for r in stable), default=math.nan)
                 for k in ("onestep_vs_implicit", "fd_q", "fd_b", "fd_h", "fd_bounds")}
        lines += ["", "## Derivatives (itergrad, problems solved at the tightest tolerance)", "",
                  f"Stable active set: strict-complementarity margin min_i max(s_i, z_i) >= "
                  f"{STABLE_MARGIN:g} and `Implicit` accepts the optimality condition. "
                  f"Over the {len(stable)} stable rows: OneStep vs Implicit <= "
                  f"{worst['onestep_vs_implicit']:.1e}; Implicit vs central differences "
                  f"(step {FD_STEP:g}, perturbed solves to {FD_TOL:g}; relative, or against "
                  f"{ZERO_FLOOR:g} ‖v‖ ‖d‖ for a zero derivative) <= "
                  f"{max(worst['fd_q'], worst['fd_b'], worst['fd_h'], worst['fd_bounds']):.1e}. Times: warm medians "
                  "of solve + gradient.", "",
                  "| problem | n | status | margin | stable | OneStep vs Implicit | FD q | FD b | FD h | FD bounds "
                  "| solve + OneStep ms | solve + Implicit ms |",
                  "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(grad_rows, key=lambda r: r["problem"]):
            lines.append(
                f"| {r['problem']} | {r['n']} | {r['status']} | {r['margin']:.1e} | "
                f"{'yes' if r['stable'] else 'no'} | {r.get('onestep_vs_implicit', math.nan):.1e} | "
                + " | ".join(f"{r.get(f'fd_{k}', math.nan):.1e}" for k in ("q", "b", "h", "bounds"))
                + f" | {r.get('t_onestep', math.nan) * 1e3:.3g} | {r.get('t_implicit', math.nan) * 1e3:.3g} |")
    if random_rows:
        lines += ["", "## Random QPs (App. B.1): solve + gradient of ‖x(b)‖²/2 in b", "",
                  "| size | method | ms (IQR) | rel. error vs Implicit |", "|---|---|---:|---:|"]
        for r in random_rows:
            lines.append(f"| {r['size']} | {r['method']} | {r['solve_grad_ms']:.3g} ({r['iqr']}) | {r['rel_error']:.1e} |")
    (args.out / "maros_meszaros.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
