"""itergrad side by side with the libraries users would pick instead.

    python benchmarks/run.py                       # full run (~6 min on 2 idle cores)
    python benchmarks/run.py --quick               # smallest sizes (~2 min)
    python benchmarks/run.py --only logistic,qp --repeats 9

Three benchmarks (see `benchmarks/README.md` for every column):

- `logistic`: Newton on the weighted logistic regression of the paper's §4
  (eq. 11), gradient of $\\|x(\\theta)\\|^2/2$ with respect to the per-sample
  weights $\\theta$. itergrad `Newton` with `OneStep`, `Implicit`, `Unroll`;
  optimistix (`root_find` of $\\nabla f$ with `Newton`, `minimise` with `BFGS`,
  both `ImplicitAdjoint`); jaxopt `LBFGS` with implicit differentiation (its
  default linear solve, and a tight conjugate gradient).
- `qp`: the random QPs of Appendix B.1 ($m = n/4$, $p = n/2$), gradient of
  $\\|x(b)\\|^2/2$ with respect to $b$. itergrad `InteriorPointQP` with
  `OneStep`, `Implicit`; qpax `solve_qp_primal` at its defaults and at the
  (tolerance, relaxation) pair, out of a small sweep, whose gradient is closest
  to the reference.
- `memory`: the compiled peak memory (`memory_analysis()`: arguments + outputs
  + temporaries) of each itergrad estimator's gradient against `max_steps`.

Every function is `jax.jit`-compiled once (compile time reported on its own),
called once to warm up, then timed with `block_until_ready` over repeats;
medians and interquartile ranges are reported, and speed only as ratios
measured in the same run. Every gradient is compared with a dense reference
(implicit function theorem on a tightly converged solution), so that speed is
compared at equal accuracy. No assertion is made on any time.

Results go to `benchmarks/results/<name>.csv` and `benchmarks/results/README.md`
(written atomically).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax

# The accuracy comparisons (1e-8 relative) are float64 comparisons.
jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import lineax as lx  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import itergrad as ig  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

LOGISTIC_SIZES = [(200, 100), (600, 300), (2000, 1000)]
LOGISTIC_QUICK = [(200, 100)]
QP_SIZES = [100, 300, 1000]
QP_QUICK = [100]
MEMORY_STEPS = [10, 100, 1000]
MEMORY_QUICK = [10, 100]
MEMORY_SIZE = (200, 100)

# Tolerances. itergrad and optimistix Newton stop on 1e-10; the quasi-Newton
# competitors need a tighter gradient tolerance to reach a 1e-8 gradient.
NEWTON_TOL = 1e-10
QUASI_NEWTON_TOL = 1e-10
QP_TOL = 1e-12
QP_REFERENCE_TOL = 1e-14
# qpax (solver_tol, target_kappa) pairs tried for its most accurate gradient.
QPAX_DEFAULT = (1e-5, 1e-3)
QPAX_SWEEP = [(1e-7, 1e-6), (1e-9, 1e-7), (1e-10, 1e-8), (1e-11, 1e-9)]
QPAX_MAX_ITER = 50
NEWTON_CG = lx.CG(rtol=1e-10, atol=1e-10, max_steps=500)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
    compile_s: float
    times_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_s)

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.times_s) < 2:
            return self.times_s[0], self.times_s[0]
        q = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q[0], q[2]


def measure(
    functions: dict[str, tuple[Callable, tuple]], repeats: int, budget_s: float
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Compile every function once (timed), warm each up once, then time them
    round-robin: each round calls every function once, so that all of them see
    the same machine load. Stops after `repeats` rounds, or earlier (after at
    least 3 rounds) once `budget_s` seconds of rounds are spent; tiny functions
    get more rounds while the others' time is below 0.5 s."""
    compiled, compile_s, outputs = {}, {}, {}
    for key, (fn, args) in functions.items():
        log(f"    compile {key}")
        t0 = time.perf_counter()
        compiled[key] = jax.jit(fn).lower(*args).compile()
        compile_s[key] = time.perf_counter() - t0
        outputs[key] = jax.block_until_ready(compiled[key](*args))
    times: dict[str, list[float]] = {key: [] for key in functions}
    start = time.perf_counter()
    rounds = 0
    while True:
        for key, (_, args) in functions.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[key](*args))
            times[key].append(time.perf_counter() - t0)
        rounds += 1
        spent = time.perf_counter() - start
        if rounds >= repeats and (spent >= 0.5 or rounds >= 100):
            break
        if rounds >= 3 and spent >= budget_s:
            break
    return {k: Timing(compile_s[k], times[k]) for k in functions}, outputs


def value_and_grad_of(x_of: Callable) -> Callable:
    """`(data, theta) -> (||x||^2/2, gradient in theta)` for `x_of(data, theta)
    -> (x, steps)`."""

    def loss(data, theta, *extra):
        x, steps = x_of(data, theta, *extra)
        return 0.5 * jnp.sum(x**2), steps

    return jax.value_and_grad(loss, argnums=1, has_aux=True)


def time_methods(
    methods: dict[str, Callable], args: tuple, size: str, reference: jax.Array,
    repeats: int, budget_s: float,
) -> list[dict]:
    """Time every method's solve and solve + gradient on `args` in one
    round-robin (`measure`) and return one table row per method, with its
    gradient's error against `reference`. Each method maps `args` to
    `(x, iterations)`."""
    functions = {}
    for name, x_of in methods.items():
        functions[(name, "solve")] = (x_of, args)
        functions[(name, "grad")] = (value_and_grad_of(x_of), args)
    timings, outputs = measure(functions, repeats, budget_s)
    rows = []
    for name in methods:
        _, steps = outputs[(name, "solve")]
        (_, _), g = outputs[(name, "grad")]
        rows.append(
            _row(
                size, name, int(steps), timings[(name, "solve")],
                timings[(name, "grad")], relative_error(g, reference),
            )
        )
    return rows


def relative_error(g: jax.Array, ref: jax.Array) -> float:
    return float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))


# --------------------------------------------------------------------------
# Logistic regression (paper §4, eq. 11)


def logistic_methods() -> dict[str, Callable]:
    """Each method maps `(problem, theta)` to `(x, iterations)`."""
    import jaxopt
    import optimistix as optx

    def itergrad_newton(estimator, linear_solver=None, **kwargs):
        if linear_solver is not None:
            kwargs["linear_solver"] = linear_solver

        def x_of(problem, theta):
            sol = ig.solve(
                ig.Newton(problem.objective, **kwargs),
                jnp.zeros(problem.n),
                theta,
                estimator=estimator,
                max_steps=50,
                rtol=NEWTON_TOL,
                atol=NEWTON_TOL,
            )
            return sol.value, sol.steps

        return x_of

    def optx_newton(problem, theta):
        sol = optx.root_find(
            lambda y, args: jax.grad(args[0].objective)(y, args[1]),
            optx.Newton(rtol=NEWTON_TOL, atol=NEWTON_TOL),
            jnp.zeros(problem.n),
            args=(problem, theta),
            adjoint=optx.ImplicitAdjoint(),
            max_steps=50,
        )
        return sol.value, sol.stats["num_steps"]

    def optx_bfgs(problem, theta):
        sol = optx.minimise(
            lambda y, args: args[0].objective(y, args[1]),
            optx.BFGS(rtol=QUASI_NEWTON_TOL, atol=QUASI_NEWTON_TOL),
            jnp.zeros(problem.n),
            args=(problem, theta),
            adjoint=optx.ImplicitAdjoint(),
            max_steps=5000,
        )
        return sol.value, sol.stats["num_steps"]

    def jaxopt_lbfgs(**kwargs):
        def x_of(problem, theta):
            solver = jaxopt.LBFGS(
                fun=lambda x, th, pr: pr.objective(x, th),
                tol=QUASI_NEWTON_TOL,
                maxiter=5000,
                implicit_diff=True,
                **kwargs,
            )
            params, state = solver.run(jnp.zeros(problem.n), theta, problem)
            return params, state.iter_num

        return x_of

    return {
        "itergrad Newton + OneStep": itergrad_newton(ig.OneStep()),
        "itergrad Newton + Implicit": itergrad_newton(ig.Implicit()),
        "itergrad Newton + Unroll": itergrad_newton(ig.Unroll()),
        # Matrix-free inexact Newton: Hessian-vector products only, O(Nn) per
        # CG iteration instead of O(Nn^2) for the Hessian. By default each
        # Newton system is solved to an Eisenstat-Walker forcing tolerance;
        # the derivative solves use the CG tolerance (1e-10).
        "itergrad Newton-CG + OneStep": itergrad_newton(
            ig.OneStep(), NEWTON_CG, hessian="hvp"
        ),
        "itergrad Newton-CG (forcing=None) + OneStep": itergrad_newton(
            ig.OneStep(), NEWTON_CG, hessian="hvp", forcing=None
        ),
        "itergrad Newton-CG + Implicit(GMRES)": itergrad_newton(
            ig.Implicit(linear_solver=lx.GMRES(rtol=1e-10, atol=1e-10)), NEWTON_CG,
            hessian="hvp",
        ),
        "optimistix Newton root_find + ImplicitAdjoint": optx_newton,
        "optimistix BFGS minimise + ImplicitAdjoint": optx_bfgs,
        "jaxopt LBFGS implicit_diff (default solve)": jaxopt_lbfgs(),
        "jaxopt LBFGS implicit_diff (CG tol 1e-10)": jaxopt_lbfgs(
            implicit_diff_solve=partial(jaxopt.linear_solve.solve_cg, tol=1e-10)
        ),
    }


def logistic_reference(problem, theta) -> jax.Array:
    """Dense implicit function theorem at a tightly converged Newton solution:
    $\\nabla_\\theta = -B^\\top H^{-1} x$, $H = \\nabla^2_{xx} f$,
    $B = \\partial_\\theta \\nabla_x f$."""
    x = ig.solve(
        ig.Newton(problem.objective), jnp.zeros(problem.n), theta,
        estimator=ig.Implicit(), max_steps=100, rtol=1e-15, atol=1e-15, throw=False,
    ).value
    H = jax.hessian(problem.objective)(x, theta)
    B = jax.jacfwd(jax.grad(problem.objective), argnums=1)(x, theta)
    return -B.T @ jnp.linalg.solve(H, x)


def bench_logistic(sizes, repeats, budget_s) -> list[dict]:
    rows = []
    methods = logistic_methods()
    for N, n_features in sizes:
        problem = ig.problems.logistic_data(jr.PRNGKey(0), N, n_features)
        theta = jnp.ones(N)
        reference = jax.jit(logistic_reference)(problem, theta)
        size = f"{N}x{n_features + 1}"
        log(f"[logistic {size}]")
        rows += time_methods(methods, (problem, theta), size, reference, repeats, budget_s)
        _add_ratios(rows, size, "itergrad Newton + OneStep")
    return rows


# --------------------------------------------------------------------------
# Quadratic programs (paper App. B.1)


def qp_reference(qp) -> jax.Array:
    """Dense implicit function theorem on the KKT residual $\\Phi(w, b)$ at a
    tightly converged interior-point solution: $\\nabla_b = -J_b\\Phi^\\top
    J_w\\Phi^{-\\top} (x, 0, 0, 0)$."""
    solver = ig.InteriorPointQP()
    sol = ig.solve(
        solver, None, qp, estimator=ig.Implicit(), max_steps=100,
        rtol=QP_REFERENCE_TOL, atol=QP_REFERENCE_TOL, throw=False,
    )
    state = jax.lax.stop_gradient(sol.state)
    w0, unravel = ravel_pytree(state.z)

    def phi(w, b):
        res = solver.optimality(unravel(w), state.aux, eqx.tree_at(lambda q: q.b, qp, b))
        return ravel_pytree(res)[0]

    Jw = jax.jacfwd(phi, argnums=0)(w0, qp.b)
    Jb = jax.jacfwd(phi, argnums=1)(w0, qp.b)
    # x comes first in the unknowns' flattening.
    x = state.z.x
    cotangent = jnp.zeros_like(w0).at[: x.size].set(x)
    return -Jb.T @ jnp.linalg.solve(Jw.T, cotangent)


def qp_itergrad(estimator):
    def x_of(qp, b):
        sol = ig.solve(
            ig.InteriorPointQP(), None, eqx.tree_at(lambda q: q.b, qp, b),
            estimator=estimator, max_steps=100, rtol=QP_TOL, atol=QP_TOL,
        )
        return sol.value, sol.steps

    return x_of


def qp_qpax(qp, b, solver_tol, target_kappa):
    import qpax

    x = qpax.solve_qp_primal(
        qp.Q, qp.q, qp.A, b, qp.G, qp.h,
        solver_tol=solver_tol, target_kappa=target_kappa, max_iter=QPAX_MAX_ITER,
    )
    # qpax does not return its iteration count from solve_qp_primal.
    return x, jnp.array(-1)


def bench_qp(sizes, repeats, budget_s) -> list[dict]:
    rows = []
    for n in sizes:
        qp = ig.problems.random_qp(jr.PRNGKey(0), n, n // 4, n // 2)
        size = f"n={n},m={n // 4},p={n // 2}"
        reference = jax.jit(qp_reference)(qp)
        # qpax: tolerances are traced arguments, so one compilation serves the
        # whole sweep; the timed configurations are compiled with constants.
        sweep = jax.jit(
            value_and_grad_of(lambda qp, b, tol, kappa: qp_qpax(qp, b, tol, kappa))
        )
        errors = {}
        for tol, kappa in [QPAX_DEFAULT, *QPAX_SWEEP]:
            (_, _), g = sweep(qp, qp.b, tol, kappa)
            errors[(tol, kappa)] = relative_error(g, reference)
        log(f"[qp {size}] qpax sweep (solver_tol, target_kappa) -> error: {errors}")
        finite = {k: e for k, e in errors.items() if e == e}
        best = min(finite, key=finite.get) if finite else QPAX_DEFAULT

        methods = {}
        for label, est in (("OneStep", ig.OneStep()), ("Implicit", ig.Implicit())):
            methods[f"itergrad InteriorPointQP + {label} (tol {QP_TOL:g})"] = (
                qp_itergrad(est)
            )
        for label, (tol, kappa) in (("defaults", QPAX_DEFAULT), ("most accurate", best)):
            name = f"qpax {label} (solver_tol {tol:g}, target_kappa {kappa:g})"
            methods[name] = partial(_qpax_fixed, tol=tol, kappa=kappa)
        log(f"[qp {size}]")
        rows += time_methods(methods, (qp, qp.b), size, reference, repeats, budget_s)
        _add_ratios(rows, size, f"itergrad InteriorPointQP + OneStep (tol {QP_TOL:g})")
    return rows


def _qpax_fixed(qp, b, *, tol, kappa):
    return qp_qpax(qp, b, tol, kappa)


# --------------------------------------------------------------------------
# Memory


def bench_memory(steps_list) -> list[dict]:
    N, n_features = MEMORY_SIZE
    problem = ig.problems.logistic_data(jr.PRNGKey(0), N, n_features)
    theta = jnp.ones(N)
    estimators = {
        "OneStep": ig.OneStep(),
        "Truncated(5)": ig.Truncated(5),
        "Implicit": ig.Implicit(),
        "Unroll": ig.Unroll(),
    }
    rows = []
    for name, est in estimators.items():
        for max_steps in steps_list:
            log(f"[memory] {name} max_steps={max_steps}")

            def x_of(problem, theta, est=est, max_steps=max_steps):
                sol = ig.solve(
                    ig.Newton(problem.objective), jnp.zeros(problem.n), theta,
                    estimator=est, max_steps=max_steps, throw=False,
                )
                return sol.value, sol.steps

            compiled = (
                jax.jit(value_and_grad_of(x_of)).lower(problem, theta).compile()
            )
            mem = compiled.memory_analysis()
            arg = mem.argument_size_in_bytes
            out = mem.output_size_in_bytes
            tmp = mem.temp_size_in_bytes
            rows.append(
                {
                    "problem": f"logistic {N}x{n_features + 1}",
                    "estimator": name,
                    "max_steps": max_steps,
                    "argument_MiB": arg / 2**20,
                    "output_MiB": out / 2**20,
                    "temp_MiB": tmp / 2**20,
                    "peak_MiB": (arg + out + tmp) / 2**20,
                }
            )
    return rows


# --------------------------------------------------------------------------
# Rows, ratios, output


def _row(size, method, steps, t_solve: Timing, t_grad: Timing, error) -> dict:
    return {
        "size": size,
        "method": method,
        "iterations": steps,
        "solve_ms": 1e3 * t_solve.median,
        "solve_q1_ms": 1e3 * t_solve.iqr[0],
        "solve_q3_ms": 1e3 * t_solve.iqr[1],
        "grad_ms": 1e3 * t_grad.median,
        "grad_q1_ms": 1e3 * t_grad.iqr[0],
        "grad_q3_ms": 1e3 * t_grad.iqr[1],
        "grad_over_solve": t_grad.median / t_solve.median,
        "grad_over_itergrad_loop": float("nan"),
        "vs_onestep": float("nan"),
        "rel_error": error,
        "compile_solve_s": t_solve.compile_s,
        "compile_grad_s": t_grad.compile_s,
        "solve_min_ms": 1e3 * min(t_solve.times_s),
        "grad_min_ms": 1e3 * min(t_grad.times_s),
        "repeats": len(t_grad.times_s),
    }


def _add_ratios(rows, size, onestep_name):
    """`vs_onestep`: time(solve + gradient) / that of itergrad OneStep.
    `grad_over_itergrad_loop`: time(solve + gradient) / time of the plain
    itergrad loop of the same solver (the forward pass of its `Implicit` row,
    which runs no extra step); blank for a solver without such a row."""
    here = [r for r in rows if r["size"] == size]
    onestep = next(r for r in here if r["method"] == onestep_name)

    def solver_of(method):
        return method.split(" + ")[0]

    loops = {
        solver_of(r["method"]): r["solve_ms"]
        for r in here
        if r["method"].startswith("itergrad") and " + Implicit" in r["method"]
    }
    for r in here:
        r["vs_onestep"] = r["grad_ms"] / onestep["grad_ms"]
        loop = loops.get(solver_of(r["method"]))
        if r["method"].startswith("itergrad") and loop is not None:
            r["grad_over_itergrad_loop"] = r["grad_ms"] / loop


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(name: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(RESULTS_DIR / f"{name}.csv", buf.getvalue())


def _fmt(x, spec=".3g"):
    if isinstance(x, float):
        return "" if x != x else format(x, spec)
    return str(x)


def timing_table(rows: list[dict]) -> str:
    head = (
        "| size | method | iters | solve ms (IQR) | solve+grad ms (IQR) | "
        "grad/solve | vs itergrad loop | vs OneStep | rel. error | compile s |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['method']} | "
            f"{'' if r['iterations'] < 0 else r['iterations']} | "
            f"{r['solve_ms']:.3g} ({r['solve_q1_ms']:.3g}–{r['solve_q3_ms']:.3g}) | "
            f"{r['grad_ms']:.3g} ({r['grad_q1_ms']:.3g}–{r['grad_q3_ms']:.3g}) | "
            f"{r['grad_over_solve']:.2f} | {_fmt(r['grad_over_itergrad_loop'], '.2f')} | "
            f"{r['vs_onestep']:.2f} | {r['rel_error']:.1e} | "
            f"{r['compile_solve_s']:.1f} + {r['compile_grad_s']:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def memory_table(rows: list[dict]) -> str:
    head = (
        "| problem | estimator | max_steps | arguments MiB | outputs MiB | "
        "temporaries MiB | peak MiB |\n|---|---|---:|---:|---:|---:|---:|\n"
    )
    return head + "\n".join(
        f"| {r['problem']} | {r['estimator']} | {r['max_steps']} | "
        f"{r['argument_MiB']:.3f} | {r['output_MiB']:.3f} | {r['temp_MiB']:.3f} | "
        f"{r['peak_MiB']:.3f} |"
        for r in rows
    ) + "\n"


def machine_info() -> str:
    import importlib.metadata as md

    versions = []
    for pkg in ("jax", "jaxlib", "equinox", "lineax", "optimistix", "jaxopt", "qpax"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    load = os.getloadavg()
    return (
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind})\n"
        f"- load average (1, 5, 15 min) at the end: "
        f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}\n"
        f"- python {platform.python_version()}; {', '.join(versions)}; float64\n"
    )


def write_report(results: dict[str, list[dict]], args, load_start) -> None:
    parts = [
        "# itergrad benchmark results\n",
        "Generated by `python benchmarks/run.py"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else "")
        + f" --repeats {args.repeats}`. Column meanings: `benchmarks/README.md`. "
        "Times are medians over repeats after one warm-up call, with the "
        "interquartile range in brackets; compile times are separate. The "
        "machine was shared: compare ratios within one table, not absolute "
        "times across runs.\n",
        machine_info()
        + f"- load average at the start: {load_start[0]:.2f}, {load_start[1]:.2f}, "
        f"{load_start[2]:.2f}\n",
    ]
    titles = {
        "logistic": "## Logistic regression, Newton (paper §4): gradient of "
        "‖x(θ)‖²/2 in the per-sample weights θ\n",
        "qp": "## Random QPs (App. B.1, m = n/4, p = n/2): gradient of ‖x(b)‖²/2 in b\n",
        "memory": "## Compiled peak memory of the gradient vs max_steps\n",
    }
    for name, rows in results.items():
        parts.append(titles[name])
        parts.append(memory_table(rows) if name == "memory" else timing_table(rows))
    atomic_write(RESULTS_DIR / "README.md", "\n".join(parts))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes only")
    parser.add_argument(
        "--only", default="", help="comma-separated subset of logistic,qp,memory"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per function")
    parser.add_argument(
        "--budget", type=float, default=None,
        help="seconds of timed rounds per problem size after which repeats stop (min 3)",
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5
    budget = args.budget if args.budget is not None else (5.0 if args.quick else 15.0)
    chosen = [s for s in args.only.split(",") if s] or ["logistic", "qp", "memory"]
    unknown = set(chosen) - {"logistic", "qp", "memory"}
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from logistic,qp,memory")
    load_start = os.getloadavg()
    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for name in chosen:
        if name == "logistic":
            rows = bench_logistic(
                LOGISTIC_QUICK if args.quick else LOGISTIC_SIZES, args.repeats, budget
            )
        elif name == "qp":
            rows = bench_qp(QP_QUICK if args.quick else QP_SIZES, args.repeats, budget)
        else:
            rows = bench_memory(MEMORY_QUICK if args.quick else MEMORY_STEPS)
        results[name] = rows
        write_csv(name, rows)
        write_report(results, args, load_start)
    log(f"done in {time.perf_counter() - start:.0f} s; see {RESULTS_DIR / 'README.md'}")


if __name__ == "__main__":
    main()
