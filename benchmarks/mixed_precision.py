"""float32, float64 and mixed precision: the gradient accuracy (and time) of
each estimator when the forward solve runs in float32.

    python benchmarks/mixed_precision.py         # writes results/mixed_precision.md

Configurations, per problem:

- `float64`: everything in float64 (itergrad's default tolerances);
- `float32`: the data, the solve and the derivative in float32 (default
  tolerances follow the dtype);
- `float32 + float64 solve`: the float32 solve, then
  `Implicit(solve_dtype=jnp.float64)`: the implicit system formed and
  solved in float64, the derivative rounded back to float32.

Problems: weighted logistic regression (60 x 8 features scaled over 0, 2 and
4 decades: cond(H) = 6.3, 1.4e4, 5.5e4), Newton; the paper's random QPs
(n = 20, 50, 100), interior point, gradient with respect to b. Every run sees
the same float32-rounded data; the reference is the float64 `Implicit`
derivative at a solve converged to 1e-13/1e-14 of that data. Errors are
relative Frobenius errors of the Jacobian; times are medians of 7 calls of
the jitted Jacobian after compilation (solve + derivative).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import itergrad as ig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {
    "float64 Implicit": (jnp.float64, ig.Implicit()),
    "float32 Implicit": (jnp.float32, ig.Implicit()),
    "float32 + float64 solve (Implicit(solve_dtype=float64))": (
        jnp.float32, ig.Implicit(solve_dtype=jnp.float64)
    ),
    "float32 OneStep": (jnp.float32, ig.OneStep()),
    "float64 OneStep": (jnp.float64, ig.OneStep()),
}


def timed(fn, arg, repeats=7):
    out = jax.block_until_ready(fn(arg))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t0)
    return np.asarray(out, np.float64), 1e3 * statistics.median(times)


def logistic_cases():
    n_samples, n_features, lam = 60, 8, 1e-4
    data = ig.problems.logistic_data(jr.key(3), n_samples, n_features, lam=lam)
    theta = np.asarray(
        jr.uniform(jr.key(4), (n_samples,), minval=0.5, maxval=1.5), np.float32
    )
    for decades in (0, 2, 4):
        scales = np.concatenate([[1.0], np.logspace(0, -decades, n_features)])
        A = (np.asarray(data.A) * scales).astype(np.float32)
        y = np.asarray(data.y, np.float32)

        def jacobian_fn(dtype, estimator, tol=None, A=A, y=y):
            problem = ig.problems.LogisticRegression(
                jnp.asarray(A, dtype), jnp.asarray(y, dtype), lam
            )
            tols = {} if tol is None else {"rtol": tol, "atol": tol}

            def x_of(t):
                return ig.solve(
                    ig.Newton(problem.objective), jnp.zeros(problem.n, dtype), t,
                    estimator=estimator, max_steps=100, throw=False, **tols,
                ).value

            return jax.jit(jax.jacrev(x_of))

        p64 = ig.problems.LogisticRegression(jnp.asarray(A, jnp.float64), jnp.asarray(y, jnp.float64), lam)
        x = ig.solve(ig.Newton(p64.objective), jnp.zeros(p64.n), jnp.asarray(theta, jnp.float64),
                     rtol=1e-14, atol=1e-14, max_steps=100, throw=False).value
        cond = float(np.linalg.cond(np.asarray(jax.hessian(p64.objective)(x, jnp.asarray(theta, jnp.float64)))))
        yield f"logistic 60x9, cond(H) = {cond:.1e}", jacobian_fn, theta, 1e-14


def qp_cases():
    for n in (20, 50, 100):
        qp64 = ig.problems.random_qp(jr.key(1), n, n // 4, n // 2).astype(jnp.float32).astype(jnp.float64)

        def jacobian_fn(dtype, estimator, tol=None, qp64=qp64):
            qp = qp64.astype(dtype)
            tols = {} if tol is None else {"rtol": tol, "atol": tol}

            def x_of(b):
                return ig.solve(
                    ig.InteriorPointQP(), None, eqx.tree_at(lambda q: q.b, qp, b),
                    estimator=estimator, max_steps=100, throw=False, **tols,
                ).value

            return jax.jit(jax.jacrev(x_of))

        yield f"QP n={n}, m={n // 4}, p={n // 2} (d/db)", jacobian_fn, np.asarray(qp64.b, np.float32), 1e-13


def main():
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for problem, jacobian_fn, theta, ref_tol in [*logistic_cases(), *qp_cases()]:
        reference, _ = timed(jacobian_fn(jnp.float64, ig.Implicit(), ref_tol), jnp.asarray(theta, jnp.float64), 1)
        for name, (dtype, estimator) in CONFIGS.items():
            J, ms = timed(jacobian_fn(dtype, estimator), jnp.asarray(theta, dtype))
            error = float(np.linalg.norm(J - reference) / np.linalg.norm(reference))
            rows.append((problem, name, error, ms))
            print(f"{problem:45s} {name:58s} {error:.1e} {ms:.2f} ms", flush=True)
    lines = [
        "# float32, float64 and mixed precision",
        "",
        f"Generated by `python benchmarks/mixed_precision.py` (load average {load} at "
        "the start; what is measured: the script's docstring). Error: relative to the "
        "float64 reference of the same float32-rounded data; ms: median jitted "
        "solve + Jacobian (`jacrev`).",
        "",
        "| problem | configuration | Jacobian error | ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {p} | {n} | {e:.1e} | {ms:.2f} |" for p, n, e, ms in rows]
    (RESULTS / "mixed_precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
