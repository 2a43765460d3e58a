"""Figure 3: time to solve and differentiate $\\theta \\mapsto \\|x(\\theta)\\|^2/2$
against the number of problem parameters, for the interior-point QP solver
(gradient in $b$) and Newton's method on logistic regression (gradient in
the per-sample weights), with the one-step vs implicit disagreement."""

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
    time_samples,
)

NAME = "fig3"
TITLE = "Figure 3 — time of solve + gradient vs number of parameters"
COLUMNS = [
    "problem", "size", "n", "m", "p", "N", "params", "method", "time_median",
    "time_std", "time_q25", "time_q75", "repeats", "steps", "result", "os_vs_id_abs", "os_vs_id_rel",
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


# Newton converges quadratically: with this tolerance the last step is taken
# from an iterate within ~1e-13 of the solution, so one-step and implicit
# agree to round-off (the paper's 1e-12); at 1e-10 Newton may stop one step
# earlier and their gap is the iterate's error (1e-10), not the estimator's.
LOGISTIC_TOL = 1e-13
QP_TOL = 1e-10


def _logistic_case(key, N):
    n_features = max(1, N // 2)  # the paper's largest size: 2000 x 1000
    problem = ig.problems.logistic_data(key, N, n_features, separation=1.0, lam=1.0)
    x0 = jnp.zeros(problem.n)

    # The data travel as arguments of the compiled function, not as constants
    # closed into it: XLA constant-folds large closed-over arrays (seconds of
    # compile time and "constant folding" alarms at N = 2000).
    def solution(estimator, weights, problem):
        return ig.solve(ig.Newton(problem.objective), x0, weights, estimator=estimator,
                        max_steps=50, rtol=LOGISTIC_TOL, atol=LOGISTIC_TOL, throw=False)

    sizes = dict(n=problem.n, m=0, p=0, N=N, params=problem.n * N)
    return solution, jnp.ones(N), problem, sizes


def _qp_case(key, n):
    m, p = max(1, n // 4), max(1, n // 2)
    qp = ig.problems.random_qp(key, n, m, p)

    def solution(estimator, b, qp):
        data = eqx.tree_at(lambda q: q.b, qp, b)
        return ig.solve(ig.InteriorPointQP(), None, data, estimator=estimator,
                        max_steps=100, rtol=QP_TOL, atol=QP_TOL, throw=False)

    sizes = dict(n=n, m=m, p=p, N=0, params=n * (n + 1) + (n + 1) * m + (n + 1) * p)
    return solution, qp.b, qp, sizes


def _measure(ctx, problem, size, case, repeats):
    """Rows of the four methods at one size (with the one-step / implicit /
    autodiff gaps filled in)."""
    solution, theta, data, sizes = case
    grads, rows = {}, []
    for method, estimator in METHODS.items():
        def loss(u, data, estimator=estimator):
            sol = solution(estimator, u, data)
            return 0.5 * jnp.sum(sol.value**2), (sol.steps, sol.result)

        def forward(t, data, loss=loss):
            value, (steps, result) = loss(t, data)
            return value, steps, result

        def gradient(t, data, loss=loss):
            g, (steps, result) = jax.grad(loss, has_aux=True)(t, data)
            return g, steps, result

        fn = forward if method == "None" else gradient
        times, (value, steps, result) = time_samples(
            eqx.filter_jit(fn), theta, data, repeats=repeats
        )
        if method != "None":
            grads[method] = np.asarray(value)
        rows.append(dict(problem=problem, size=size, **sizes, method=method,
                         time_median=float(np.median(times)), time_std=float(times.std()),
                         time_q25=float(np.quantile(times, 0.25)),
                         time_q75=float(np.quantile(times, 0.75)), repeats=repeats,
                         steps=int(steps), result=ig.result_name(result)))
        ctx.advance()
    g_id = grads["Implicit"]
    scale = np.linalg.norm(g_id)
    gaps = dict(
        os_vs_id_abs=float(np.max(np.abs(grads["One step"] - g_id))),
        os_vs_id_rel=float(np.linalg.norm(grads["One step"] - g_id) / scale),
        ad_vs_id_rel=float(np.linalg.norm(grads["Autodiff"] - g_id) / scale),
    )
    return [{**row, **gaps} for row in rows]


def run(ctx: Context):
    repeats = ctx.pick(tiny=2, quick=5, full=10)
    # Quick: two sizes per problem (each size compiles four functions, and
    # compilation is most of a quick run); the full run has the paper's grid.
    logistic_sizes = ctx.pick(tiny=[16], quick=[100, 400],
                              full=[100, 250, 500, 1000, 2000])
    qp_sizes = ctx.pick(tiny=[8], quick=[20, 100],
                        full=[10, 25, 50, 100, 250, 500, 1000])
    qp = _qp_available()
    if not qp:
        ctx.notes.append(
            "`ig.InteriorPointQP` / `ig.problems.random_qp` not available in this "
            "checkout: the QP half of Figure 3 was skipped."
        )
    todo = [("logistic", N) for N in logistic_sizes]
    if qp:
        todo = [("qp", n) for n in qp_sizes] + todo
    ctx.set_total(len(METHODS) * len(todo))
    # Sizes finished by an interrupted run (all four methods present) are kept.
    rows = [r for r in ctx.resume_rows
            if sum(q["problem"] == r["problem"] and q["size"] == r["size"]
                   for q in ctx.resume_rows) == len(METHODS)]
    done = {(r["problem"], r["size"]) for r in rows}
    key = jr.key(ctx.seed)
    for problem, size in todo:
        if (problem, size) in done:
            for _ in METHODS:
                ctx.advance()
            continue
        case = (_qp_case(jr.fold_in(key, size), size) if problem == "qp"
                else _logistic_case(jr.fold_in(key, 10_000 + size), size))
        rows += _measure(ctx, problem, size, case, repeats)
        ctx.checkpoint(rows)
    meta = dict(repeats=repeats, qp_available=qp, marginal=MARGINAL,
                logistic_tol=LOGISTIC_TOL, qp_tol=QP_TOL)
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
            median = np.array([r["time_median"] for r in sel])
            ax.plot(x, median, label=method, **STYLE[method])
            # The interquartile range of the repeats: positive, so it means
            # something on a log axis (median ± std dipped below zero).
            if all(isinstance(r.get("time_q25"), float) for r in sel):
                ax.fill_between(x, [r["time_q25"] for r in sel], [r["time_q75"] for r in sel],
                                color=STYLE[method]["color"], alpha=0.25, linewidth=0)
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
    gap_ok = {"qp": 1e-5, "logistic": 1e-12}
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
        if problem == "logistic":
            claims.append(("Newton/logistic: one-step slightly faster than implicit",
                           "slight advantage", f"one step {fmt(sel['One step']['time_median'])} s "
                           f"vs implicit {fmt(sel['Implicit']['time_median'])} s",
                           sel["One step"]["time_median"] <= sel["Implicit"]["time_median"]))
        lines = [f"**{label}** — time over the solve-only time, and one-step vs implicit gap:",
                 "", "| size | params | steps | None (s) | Autodiff | Implicit | One step | "
                 "OS−ID max abs | OS−ID rel | AD−ID rel |", "|---|---|---|---|---|---|---|---|---|---|"]
        for size, (ratio, sel) in ratios.items():
            g = sel["None"]
            lines.append(
                f"| {size} | {g['params']} | {g['steps']} | {fmt(g['time_median'])} | "
                f"{fmt(ratio['Autodiff']) + '×' if 'Autodiff' in ratio else 'n/a'} | "
                f"{fmt(ratio['Implicit'])}× | {fmt(ratio['One step'])}× | "
                f"{fmt(g['os_vs_id_abs'])} | {fmt(g['os_vs_id_rel'])} | "
                f"{fmt(g.get('ad_vs_id_rel'))} |")
        parts.append("\n".join(lines))
    intro = (
        "Time of solve + gradient of ½‖x(θ)‖² (QP: θ = b; logistic: θ = per-sample "
        "weights, n = N/2 features), compiled once (the data are arguments of the "
        "compiled function, not constants), warm-up excluded; median over "
        f"{meta.get('repeats')} repeats, shading the interquartile range. 'None' is the "
        "solve alone; 'Autodiff' is reverse mode through the checkpointed loop at every "
        "size. QP sizes m = n/4, p = n/2 (App. B.1 generator), rtol = atol = "
        f"{meta.get('qp_tol', 1e-10):g}; Newton with Armijo backtracking, rtol = atol = "
        f"{meta.get('logistic_tol', 1e-10):g}. "
    )
    if not meta.get("qp_available", True):
        intro += "**The QP half was skipped: `ig.InteriorPointQP` was not available.** "
    return intro + "\n\n" + claims_table(claims) + "\n\n" + "\n\n".join(parts) + "\n"
