"""A batched QP layer: itergrad's `InteriorPointQP` under `jax.vmap` against
qpax under `jax.vmap`, solve and solve + gradient, float64 and float32.

    python benchmarks/batched_qp.py              # both batches, both dtypes
    python benchmarks/batched_qp.py --quick      # B = 16, n = 20 (a smoke run)

The setting of OptNet (Amos & Kolter 2017): one QP per example of a batch,
all with the same shapes. Two batches of the paper's random QPs
(`ig.problems.random_qp`, Appendix B.1; instance `i` from key `i`):
B = 128 with n = 50, m = 10, p = 50, and B = 32 with n = 200, m = 50,
p = 100. The output is the gradient of $\\sum_i \\|x_i(b_i)\\|^2/2$ with
respect to every instance's $b_i$ (what a layer's backward pass computes).

qpax has no batching of its own beyond `vmap` (its documentation batches
`solve_qp_primal` with `jax.vmap`), so both libraries are vmapped. qpax is
run at its defaults and at the (solver_tol, target_kappa) pair, out of the
same sweep as `benchmarks/run.py`, whose gradient is closest to the
reference; itergrad at its default tolerances for the dtype (the layer a
user gets without tuning: 1e-10 in float64, 1.2e-5 in float32) with
`OneStep` and `Implicit`.

Reference: per instance, the dense implicit-function gradient at an
interior-point solution converged to 1e-14 in float64 (`run.qp_reference`),
of the data each run saw (float32 runs: the float32-rounded data).
`grad error`: the batch's relative error (all gradients stacked);
`worst instance`: the largest per-instance relative error.

Timing as in `run.py` (`measure`): each function compiled once, warmed up,
then timed round-robin; medians and interquartile ranges; one process; speed
only as ratios measured in the same run. Results: `results/batched_qp.md`
and `results/batched_qp.csv`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from _host_devices import add_spare_host_devices  # noqa: E402

add_spare_host_devices()  # before jax is imported

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import itergrad as ig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    QPAX_DEFAULT,
    QPAX_SWEEP,
    atomic_write,
    measure,
    qp_qpax,
    qp_reference,
    value_and_grad_of,
)

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = [(128, 50, 10, 50), (32, 200, 50, 100)]
QUICK_BATCHES = [(16, 20, 5, 10)]
DTYPES = {"float64": jnp.float64, "float32": jnp.float32}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batch_of_qps(B: int, n: int, m: int, p: int, dtype) -> ig.QP:
    qps = [ig.problems.random_qp(jr.key(i), n, m, p, dtype=jnp.float64) for i in range(B)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *qps)
    return stacked.astype(dtype)


def itergrad_layer(estimator):
    def x_of(qp, b):
        sol = ig.solve(
            ig.InteriorPointQP(), None, eqx.tree_at(lambda q: q.b, qp, b),
            estimator=estimator, max_steps=100, throw=False,
        )
        return sol.value, (sol.steps, sol.result != ig.RESULTS.successful)

    return jax.vmap(x_of)


def qpax_layer(tol, kappa):
    def x_of(qp, b):
        x, steps = qp_qpax(qp, b, tol, kappa)
        # qpax reports no failure: a non-finite solution is counted as one.
        return x, (steps, ~jnp.all(jnp.isfinite(x)))

    return jax.vmap(x_of)


def relative(g, ref, keep=None) -> float:
    """Relative error of the stacked gradients of the instances `keep` (the
    solved ones; all when None)."""
    g, ref = jnp.asarray(g, jnp.float64), jnp.asarray(ref, jnp.float64)
    if keep is not None:
        g, ref = g[keep], ref[keep]
    return float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))


def worst_instance(g, ref, keep) -> float:
    g, ref = jnp.asarray(g, jnp.float64)[keep], jnp.asarray(ref, jnp.float64)[keep]
    per = jnp.linalg.norm(g - ref, axis=1) / jnp.linalg.norm(ref, axis=1)
    return float(jnp.max(per))


def bench(B, n, m, p, dtype_name, repeats, budget_s) -> list[dict]:
    dtype = DTYPES[dtype_name]
    qp = batch_of_qps(B, n, m, p, dtype)
    size = f"B={B}, n={n}, m={m}, p={p}"
    log(f"[{size}, {dtype_name}] reference")
    qp64 = qp.astype(jnp.float64)
    reference = jax.jit(jax.vmap(qp_reference))(qp64)

    sweep = jax.jit(value_and_grad_of(
        lambda qp, b, tol, kappa: qpax_layer(tol, kappa)(qp, b)
    ))
    errors = {}
    for tol, kappa in [QPAX_DEFAULT, *QPAX_SWEEP]:
        (_, _), g = sweep(qp, qp.b, jnp.asarray(tol, dtype), jnp.asarray(kappa, dtype))
        errors[(tol, kappa)] = relative(g, reference)
    log(f"  qpax sweep (solver_tol, target_kappa) -> error: {errors}")
    finite = {k: e for k, e in errors.items() if e == e}
    best = min(finite, key=finite.get) if finite else QPAX_DEFAULT

    methods = {
        "itergrad OneStep (default tol)": itergrad_layer(ig.OneStep()),
        "itergrad Implicit (default tol)": itergrad_layer(ig.Implicit()),
        f"qpax defaults ({QPAX_DEFAULT[0]:g}, {QPAX_DEFAULT[1]:g})": qpax_layer(*QPAX_DEFAULT),
        f"qpax most accurate ({best[0]:g}, {best[1]:g})": qpax_layer(*best),
    }
    functions, rows = {}, []
    for name, x_of in list(methods.items()):
        # A method that raises (e.g. an error from inside a batched
        # derivative) is reported as such, not timed.
        try:
            jax.block_until_ready(jax.jit(value_and_grad_of(x_of))(qp, qp.b))
        except Exception as error:  # noqa: BLE001 - reported in the table
            lines = [ln for ln in str(error).splitlines() if "Error: " in ln]
            message = (lines[-1] if lines else str(error).splitlines()[0])[:200]
            log(f"  {name}: raised {message}")
            rows.append(dict(
                batch=size, dtype=dtype_name, method=name, solve_ms=float("nan"),
                solve_iqr_ms="", grad_ms=float("nan"), grad_iqr_ms="", failed="raised",
                grad_error=float("nan"), worst_instance=float("nan"),
                max_steps=message, compile_s=float("nan"), rounds=0,
            ))
            del methods[name]
            continue
        functions[(name, "solve")] = (x_of, (qp, qp.b))
        functions[(name, "grad")] = (value_and_grad_of(x_of), (qp, qp.b))
    log(f"[{size}, {dtype_name}] timing")
    timings, outputs = measure(functions, repeats, budget_s)
    for name in methods:
        _, (steps, failed) = outputs[(name, "solve")]
        (_, _), g = outputs[(name, "grad")]
        solve, grad = timings[(name, "solve")], timings[(name, "grad")]
        rows.append(dict(
            batch=size, dtype=dtype_name, method=name,
            solve_ms=1e3 * solve.median,
            solve_iqr_ms=f"{1e3 * solve.iqr[0]:.3g}-{1e3 * solve.iqr[1]:.3g}",
            grad_ms=1e3 * grad.median,
            grad_iqr_ms=f"{1e3 * grad.iqr[0]:.3g}-{1e3 * grad.iqr[1]:.3g}",
            failed=int(jnp.sum(failed)),
            grad_error=relative(g, reference, ~failed),
            worst_instance=worst_instance(g, reference, ~failed),
            max_steps=int(jnp.max(steps)) if int(jnp.max(steps)) >= 0 else "",
            compile_s=timings[(name, "grad")].compile_s,
            rounds=len(grad.times_s),
        ))
        r = rows[-1]
        log(f"  {name:40s} solve {r['solve_ms']:.1f} ms, solve+grad {r['grad_ms']:.1f} ms,"
            f" error {r['grad_error']:.1e} (worst {r['worst_instance']:.1e}),"
            f" {r['failed']} failed")
    accurate = next(r for r in rows if r["method"].startswith("qpax most accurate"))
    for r in rows:
        r["qpax_most_accurate_over_this"] = accurate["grad_ms"] / r["grad_ms"]
    return rows


def report(rows, args, load_start, seconds) -> str:
    lines = [
        "# A batched QP layer: itergrad vs qpax under `jax.vmap`",
        "",
        f"Generated by `python benchmarks/batched_qp.py{' --quick' if args.quick else ''}` "
        f"({datetime.datetime.now().isoformat(timespec='minutes')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}; "
        f"load average {load_start} at the start, "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} at the end; "
        f"{seconds:.0f} s in all). What is measured: the script's docstring. "
        "Times in ms: median [interquartile range] over the rounds; "
        "*qpax most accurate / this*: qpax's solve + gradient time at its most "
        "accurate setting over this row's (above 1: this row is faster). "
        "*grad error*: relative to the float64 reference (all instances); "
        "*worst instance*: the largest per-instance relative error; both over "
        "the instances solved; *failed*: instances whose solve did not succeed "
        "(itergrad: `Solution.result`, e.g. `stalled` at float32's rounding "
        "floor; qpax reports none, so a non-finite solution counts); *steps*: "
        "the most interior-point steps of an instance (qpax does not report "
        "its own).",
        "",
        "| batch | dtype | method | solve ms | solve + grad ms | grad error | "
        "worst instance | failed | qpax most accurate / this | steps | compile s | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['dtype']} | {r['method']} | {r['solve_ms']:.1f} "
            f"[{r['solve_iqr_ms']}] | {r['grad_ms']:.1f} [{r['grad_iqr_ms']}] | "
            f"{r['grad_error']:.1e} | {r['worst_instance']:.1e} | {r['failed']} | "
            f"{r['qpax_most_accurate_over_this']:.2f} | {r['max_steps']} | "
            f"{r['compile_s']:.1f} | {r['rounds']} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per batch")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    load_start = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    start = time.perf_counter()
    rows = []
    for B, n, m, p in QUICK_BATCHES if args.quick else BATCHES:
        for dtype_name in DTYPES:
            rows += bench(B, n, m, p, dtype_name, args.repeats, args.budget)
    out = Path(args.out)
    name = "batched_qp_quick" if args.quick else "batched_qp"
    atomic_write(out / f"{name}.md", report(rows, args, load_start, time.perf_counter() - start))
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    log(f"wrote {out / name}.md")


if __name__ == "__main__":
    main()
