"""Figure 3: time to solve and differentiate $\\theta \\mapsto \\|x(\\theta)\\|^2/2$
against the number of problem parameters, for the interior-point QP solver
(gradient in $b$) and Newton's method on logistic regression (gradient in
the per-sample weights), with the one-step vs implicit disagreement."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import itergrad as ig

from ._report import (
    STYLE,
    Context,
    claims_table,
    fmt,
    new_figure,
    save_figure,
    tidy_log_axes,
    time_compiled,
)

NAME = "fig3"
TITLE = "Figure 3 — time of solve + gradient vs number of parameters"
COLUMNS = [
    "problem", "size", "n", "m", "p", "N", "params", "method", "time_median",
    "time_std", "repeats", "steps", "result", "os_vs_id_abs", "os_vs_id_rel",
    "ad_vs_id_rel",
]
METHODS = {
    # "None" runs the plain forward loop (no replayed step, no custom rule).
    "None": ig.Unroll("forward"),
    "Autodiff": ig.Unroll("reverse"),
    "Implicit": ig.Implicit(),
    "One step": ig.OneStep(),
}
# "marginal overhead" made measurable: at most this factor over the solve.
MARGINAL = 1.5


def _qp_available() -> bool:
    return hasattr(ig, "InteriorPointQP") and hasattr(ig.problems, "random_qp")


def _logistic_case(key, N):
    n_features = max(1, N // 2)  # the paper's largest size: 2000 x 1000
    problem = ig.problems.logistic_data(key, N, n_features, separation=1.0, lam=1.0)
    solver = ig.Newton(problem.objective)
    x0 = jnp.zeros(problem.n)
    theta = jnp.ones(N)

    def solution(estimator, weights):
        return ig.solve(solver, x0, weights, estimator=estimator, max_steps=50,
                        rtol=1e-10, atol=1e-10, throw=False)

    sizes = dict(n=problem.n, m=0, p=0, N=N, params=problem.n * N)
    return solution, theta, sizes


def _qp_case(key, n):
    m, p = max(1, n // 4), max(1, n // 2)
    qp = ig.problems.random_qp(key, n, m, p)
    solver = ig.InteriorPointQP()

    def solution(estimator, b):
        data = eqx.tree_at(lambda q: q.b, qp, b)
        return ig.solve(solver, None, data, estimator=estimator, max_steps=100,
                        rtol=1e-10, atol=1e-10, throw=False)

    sizes = dict(n=n, m=m, p=p, N=0, params=n * (n + 1) + (n + 1) * m + (n + 1) * p)
    return solution, qp.b, sizes


def _measure(ctx, problem, size, case, autodiff_cap, repeats, rows):
    solution, theta, sizes = case
    grads = {}
    for method, estimator in METHODS.items():
        if method == "Autodiff" and size > autodiff_cap:
            ctx.advance()
            continue
        def loss(u, estimator=estimator):
            sol = solution(estimator, u)
            return 0.5 * jnp.sum(sol.value**2), (sol.steps, sol.result)

        def forward(t, loss=loss):
            value, (steps, result) = loss(t)
            return value, steps, result

        def gradient(t, loss=loss):
            g, (steps, result) = jax.grad(loss, has_aux=True)(t)
            return g, steps, result

        fn = forward if method == "None" else gradient
        median, std, (value, steps, result) = time_compiled(
            eqx.filter_jit(fn), theta, repeats=repeats
        )
        if method != "None":
            grads[method] = np.asarray(value)
        rows.append(dict(problem=problem, size=size, **sizes, method=method,
                         time_median=median, time_std=std, repeats=repeats,
                         steps=int(steps), result=ig.result_name(result)))
        ctx.advance()
    g_id = grads["Implicit"]
    scale = np.linalg.norm(g_id)
    abs_gap = float(np.max(np.abs(grads["One step"] - g_id)))
    rel_gap = float(np.linalg.norm(grads["One step"] - g_id) / scale)
    ad_gap = (float(np.linalg.norm(grads["Autodiff"] - g_id) / scale)
              if "Autodiff" in grads else math.nan)
    for row in rows:
        if row["problem"] == problem and row["size"] == size:
            row.update(os_vs_id_abs=abs_gap, os_vs_id_rel=rel_gap, ad_vs_id_rel=ad_gap)


def run(ctx: Context):
    repeats = ctx.pick(tiny=2, quick=5, full=10)
    logistic_sizes = ctx.pick(tiny=[16], quick=[100, 200, 400],
                              full=[100, 250, 500, 1000, 2000])
    qp_sizes = ctx.pick(tiny=[8], quick=[20, 50, 100],
                        full=[10, 25, 50, 100, 250, 500, 1000])
    # Unrolling the interior-point solver stores every iterate's KKT
    # factorisation inputs: beyond this n it is too slow / memory-heavy here.
    qp_autodiff_cap = ctx.pick(tiny=10**9, quick=10**9, full=250)
    logistic_autodiff_cap = ctx.pick(tiny=10**9, quick=10**9, full=1000)
    qp = _qp_available()
    if not qp:
        ctx.notes.append(
            "`ig.InteriorPointQP` / `ig.problems.random_qp` not available in this "
            "checkout: the QP half of Figure 3 was skipped."
        )
    ctx.set_total(len(METHODS) * (len(logistic_sizes) + (len(qp_sizes) if qp else 0)))
    rows: list[dict] = []
    key = jr.key(ctx.seed)
    if qp:
        for n in qp_sizes:
            _measure(ctx, "qp", n, _qp_case(jr.fold_in(key, n), n), qp_autodiff_cap,
                     repeats, rows)
    for N in logistic_sizes:
        _measure(ctx, "logistic", N, _logistic_case(jr.fold_in(key, 10_000 + N), N),
                 logistic_autodiff_cap, repeats, rows)
    meta = dict(repeats=repeats, qp_available=qp, qp_autodiff_cap=qp_autodiff_cap,
                logistic_autodiff_cap=logistic_autodiff_cap, marginal=MARGINAL)
    return rows, meta


_PANELS = {
    "qp": ("Interior point QP (grad in b)",
           "parameters $n(n+1)+(n+1)m+(n+1)p$"),
    "logistic": ("Newton, logistic regression (grad in weights)",
                 "parameters $(n+1)N$"),
}


def plot(rows, meta, path):
    problems = [p for p in _PANELS if any(r["problem"] == p for r in rows)]
    fig, axes = new_figure(1, len(problems), width=5.2, height=4.0)
    for ax, problem in zip(axes[0], problems, strict=False):
        for method in METHODS:
            sel = sorted((r for r in rows if r["problem"] == problem and r["method"] == method),
                         key=lambda r: r["params"])
            if not sel:
                continue
            x = np.array([r["params"] for r in sel], float)
            mean = np.array([r["time_median"] for r in sel])
            std = np.array([r["time_std"] for r in sel])
            ax.plot(x, mean, label=method, **STYLE[method])
            ax.fill_between(x, np.maximum(mean - std, mean * 0.05), mean + std,
                            color=STYLE[method]["color"], alpha=0.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        title, xlabel = _PANELS[problem]
        ax.set_title(title)
        ax.set_xlabel(f"number of {xlabel}")
        ax.set_ylabel("time (s): solve + gradient")
        tidy_log_axes(ax)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _ratios(rows, problem):
    """Per size: time of each method over the solve-only time."""
    out = {}
    for size in sorted({r["size"] for r in rows if r["problem"] == problem}):
        sel = {r["method"]: r for r in rows if r["problem"] == problem and r["size"] == size}
        base = sel["None"]["time_median"]
        out[size] = {m: sel[m]["time_median"] / base for m in sel}, sel
    return out


def section(rows, meta):
    parts = []
    claims = []
    paper_gap = {"qp": "1e-6 (text, poster; Fig. 3 caption says 1e-16)", "logistic": "1e-12"}
    gap_ok = {"qp": 1e-5, "logistic": 1e-10}
    for problem in _PANELS:
        ratios = _ratios(rows, problem)
        if not ratios:
            continue
        largest = max(ratios)
        r_largest, sel = ratios[largest]
        gaps = [next(r for r in rows if r["problem"] == problem and r["size"] == s)
                for s in ratios]
        worst_abs = max(g["os_vs_id_abs"] for g in gaps)
        worst_rel = max(g["os_vs_id_rel"] for g in gaps)
        label = "QP" if problem == "qp" else "Newton/logistic"
        claims.append((f"{label}: one-step and implicit gradients agree", paper_gap[problem],
                       f"max abs Δ = {fmt(worst_abs)}, max relative {fmt(worst_rel)} over sizes",
                       worst_rel < gap_ok[problem]))
        os_r, id_r = r_largest.get("One step"), r_largest.get("Implicit")
        ad_r = r_largest.get("Autodiff")
        claims.append((f"{label}: one-step overhead over the solve is marginal (≤ {MARGINAL}×)",
                       "marginal", f"{fmt(os_r)}× at the largest size", os_r <= MARGINAL))
        claims.append((f"{label}: implicit overhead over the solve is marginal (≤ {MARGINAL}×)",
                       "marginal", f"{fmt(id_r)}×", id_r <= MARGINAL))
        if ad_r is not None:
            claims.append((f"{label}: autodiff is markedly slower than one-step",
                           "yes", f"autodiff {fmt(ad_r)}× vs one-step {fmt(os_r)}×",
                           ad_r > os_r))
        else:
            capped = max((s for s in ratios if "Autodiff" in ratios[s][0]), default=None)
            if capped is not None:
                ad_c, os_c = ratios[capped][0]["Autodiff"], ratios[capped][0]["One step"]
                claims.append((f"{label}: autodiff is markedly slower than one-step",
                               "yes", f"autodiff {fmt(ad_c)}× vs one-step {fmt(os_c)}× "
                               f"(largest size with autodiff, {capped})", ad_c > os_c))
        if problem == "logistic":
            claims.append(("Newton/logistic: one-step slightly faster than implicit",
                           "slight advantage", f"one step {fmt(sel['One step']['time_median'])} s "
                           f"vs implicit {fmt(sel['Implicit']['time_median'])} s",
                           sel["One step"]["time_median"] <= sel["Implicit"]["time_median"]))
        lines = [f"**{label}** — time over the solve-only time, and one-step vs implicit gap:",
                 "", "| size | params | steps | None (s) | Autodiff | Implicit | One step | "
                 "OS−ID max abs | OS−ID rel |", "|---|---|---|---|---|---|---|---|---|"]
        for size, (ratio, sel) in ratios.items():
            g = sel["None"]
            lines.append(
                f"| {size} | {g['params']} | {g['steps']} | {fmt(g['time_median'])} | "
                f"{fmt(ratio['Autodiff']) + '×' if 'Autodiff' in ratio else 'capped'} | "
                f"{fmt(ratio['Implicit'])}× | {fmt(ratio['One step'])}× | "
                f"{fmt(g['os_vs_id_abs'])} | {fmt(g['os_vs_id_rel'])} |")
        parts.append("\n".join(lines))
    intro = (
        "Time of solve + gradient of ½‖x(θ)‖² (QP: θ = b; logistic: θ = per-sample "
        f"weights, n = N/2 features), compiled once, warm-up excluded, median (shading ± std) over "
        f"{meta.get('repeats')} repeats (shaded). 'None' is the solve alone. QP sizes "
        "m = n/4, p = n/2 (App. B.1 generator); Newton with Armijo backtracking; "
        "tolerances rtol = atol = 1e-10. "
    )
    if meta.get("profile") == "full":
        intro += (f"Autodiff capped at QP n ≤ {meta.get('qp_autodiff_cap')} and logistic "
                  f"N ≤ {meta.get('logistic_autodiff_cap')} (too slow / memory-heavy beyond). ")
    if not meta.get("qp_available", True):
        intro += "**The QP half was skipped: `ig.InteriorPointQP` was not available.** "
    return intro + "\n\n" + claims_table(claims) + "\n\n" + "\n\n".join(parts) + "\n"
