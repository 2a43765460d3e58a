"""Time itergrad's batched workloads on whatever accelerator JAX finds (a GPU
when there is one, the CPU otherwise), for the day a GPU is available.

    python benchmarks/device.py            # full sizes (a few minutes on one GPU)
    python benchmarks/device.py --quick    # tiny sizes, runs on a laptop CPU in ~1 min

Three workloads, each compiled once, warmed up, then timed (median and
min-max of `--repeats` calls, `block_until_ready`):

- `qp layer`: `jax.vmap` of `InteriorPointQP` over B random QPs with the
  same shapes (B = 128, n = 50, m = 10, p = 50; quick: B = 16, n = 20),
  solve and solve + gradient (`OneStep` and `Implicit`) of
  $\\sum_i \\|x_i(b_i)\\|^2/2$, in float32 and float64;
- `logistic`: `jax.vmap` of `Newton` + `Implicit` over 64 weighted logistic
  regressions of 2000 x 101 (quick: 8 of 200 x 21), per-sample weights as
  theta;
- `deq`: the DEQ classifier of `examples/deq_digits.py` (hidden width 256,
  batch 1024; quick: 64 and 64) on random inputs: forward, and forward +
  gradient of the cross-entropy with `OneStep`, `Implicit(GMRES)`, `Unroll`.

Every result is checked for finiteness and each solve's `RESULTS` (a
timing of a failed solve is reported as failed, not as a time). Writes
`results/device_<platform>.md` (quick runs: `device_<platform>_quick.md`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
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
import numpy as np  # noqa: E402
import optax  # noqa: E402

import itergrad as ig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def timed(fn, args, repeats):
    """(compile s, median s, min s, max s, output) of a jitted `fn(*args)`."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), min(times), max(times), out


def check(out, results=None) -> str:
    leaves = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
        return "non-finite output"
    if results is not None:
        bad = int(jnp.sum(results != ig.RESULTS.successful._value))
        if bad:
            return f"{bad} instances failed"
    return "ok"


def qp_layer(quick, repeats):
    B, n, m, p = (16, 20, 5, 10) if quick else (128, 50, 10, 50)
    qps = [ig.problems.random_qp(jr.key(i), n, m, p) for i in range(B)]
    batch64 = jax.tree.map(lambda *xs: jnp.stack(xs), *qps)
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        batch = batch64.astype(dtype)
        for name, estimator in (("OneStep", ig.OneStep()), ("Implicit", ig.Implicit())):

            def solve(qp, b, estimator=estimator):
                sol = ig.solve(
                    ig.InteriorPointQP(), None, eqx.tree_at(lambda q: q.b, qp, b),
                    estimator=estimator, max_steps=100, throw=False,
                )
                return sol.value, sol.result._value

            def loss(b, qp):
                x, results = jax.vmap(solve)(qp, b)
                return 0.5 * jnp.sum(x**2), results

            grad = jax.value_and_grad(loss, has_aux=True)
            c, med, lo, hi, ((_, results), g) = timed(grad, (batch.b, batch), repeats)
            rows.append((
                f"QP layer B={B}, n={n}, m={m}, p={p}", jnp.dtype(dtype).name,
                f"solve + grad, {name}", c, med, lo, hi, check(g, results),
            ))
        c, med, lo, hi, (x, results) = timed(jax.vmap(solve), (batch, batch.b), repeats)
        rows.append((
            f"QP layer B={B}, n={n}, m={m}, p={p}", jnp.dtype(dtype).name,
            "solve", c, med, lo, hi, check(x, results),
        ))
    return rows


def logistic(quick, repeats):
    B, N, features = (8, 200, 20) if quick else (64, 2000, 100)
    problem = ig.problems.logistic_data(jr.key(0), N, features)
    thetas = jr.uniform(jr.key(1), (B, N), minval=0.5, maxval=1.5)
    solver = ig.Newton(problem.objective)

    def loss(theta):
        sol = ig.solve(
            solver, jnp.zeros(problem.n), theta, estimator=ig.Implicit(), throw=False
        )
        return 0.5 * jnp.sum(sol.value**2), sol.result._value

    grad = jax.vmap(jax.value_and_grad(loss, has_aux=True))
    c, med, lo, hi, ((_, results), g) = timed(grad, (thetas,), repeats)
    return [(
        f"logistic B={B}, {N}x{features + 1}", "float64", "Newton, solve + grad, Implicit",
        c, med, lo, hi, check(g, results),
    )]


def deq(quick, repeats):
    sys.path.insert(0, str(ROOT / "examples"))
    import deq_digits  # the example's cell, classifier and estimators

    hidden, batch = (64, 64) if quick else (256, 1024)
    x = jr.uniform(jr.key(0), (batch, 64))
    labels = jr.randint(jr.key(1), (batch,), 0, 10)
    rows = []
    for name in ("onestep", "implicit", "unroll"):
        model = deq_digits.make_classifier(
            jr.key(2), hidden,
            deq_digits.itergrad_equilibrium(deq_digits.ESTIMATORS[name]()),
        )
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss(params, x, labels, static=static):
            logits, _ = jax.vmap(eqx.combine(params, static))(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        c, med, lo, hi, g = timed(jax.grad(loss), (params, x, labels), repeats)
        rows.append((
            f"DEQ hidden={hidden}, batch={batch}", "float32",
            f"forward + grad, {name}", c, med, lo, hi, check(g),
        ))
    forward = lambda params, x: jax.vmap(eqx.combine(params, static))(x)[0]  # noqa: E731
    c, med, lo, hi, out = timed(forward, (params, x), repeats)
    rows.append((f"DEQ hidden={hidden}, batch={batch}", "float32", "forward", c, med,
                 lo, hi, check(out)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 10)
    device = jax.devices()[0]
    start = time.perf_counter()
    rows = []
    for workload in (qp_layer, logistic, deq):
        print(f"[{workload.__name__}]", flush=True)
        for row in workload(args.quick, repeats):
            rows.append(row)
            print("  " + " | ".join(map(str, row[:3])), f"{1e3 * row[4]:.2f} ms", row[7], flush=True)
    total = time.perf_counter() - start
    lines = [
        f"# itergrad on {device.platform} ({device.device_kind})",
        "",
        f"Generated by `python benchmarks/device.py{' --quick' if args.quick else ''}` "
        f"in {total:.0f} s; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, {len(jax.devices())} device(s). What is timed: "
        "the script's docstring. Times in ms: median [min, max] of "
        f"{repeats} calls after compilation.",
        "",
        "| workload | dtype | what | compile s | median ms | [min, max] ms | check |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, dtype, what, c, med, lo, hi, status in rows:
        lines.append(
            f"| {name} | {dtype} | {what} | {c:.1f} | {1e3 * med:.2f} | "
            f"[{1e3 * lo:.2f}, {1e3 * hi:.2f}] | {status} |"
        )
    suffix = "_quick" if args.quick else ""
    path = Path(args.out) / f"device_{device.platform}{suffix}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({total:.0f} s)")
    failed = [r for r in rows if r[7] != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} workloads failed: {failed}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
