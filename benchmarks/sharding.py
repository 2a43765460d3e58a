"""A batch of problems sharded over 1, 2 and 4 host devices: `ig.sharded_vmap`
against a plain `jax.jit` over the sharded batch.

    python benchmarks/sharding.py             # 64 QPs (n = 50) and 64 logistic regressions
    python benchmarks/sharding.py --quick     # 16 of each, smaller, 3 repeats

Each device count runs in its own subprocess, since the number of host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count`) is fixed when jax starts.
In each, with a mesh of k devices (axis "batch"):

- **unsharded** (k = 1 only): `jax.jit(jax.vmap(f))` on one device, the
  reference the other rows are compared with;
- **sharded_vmap**: `jax.jit(ig.sharded_vmap(f, mesh))`: each device runs the
  batched solve of its own shard to that shard's convergence, no collective
  inside the loops;
- **plain jit**: `jax.jit(jax.vmap(f))` on the batch put on the mesh with
  `NamedSharding(mesh, P("batch"))`: XLA partitions the batched loops and
  all-reduces their "is any instance still running?" predicate every
  iteration, so every device iterates until the slowest instance of the whole
  batch has converged.

Workloads (float64): 64 random QPs (`ig.problems.random_qp`, n = 50, 12
equalities, 25 inequalities), `ig.InteriorPointQP` with `OneStep`, gradient of
`sum_i ||x_i||^2 / 2` with respect to every field of every QP; 64 weighted
logistic regressions, each with its own data (`ig.problems.logistic_data`,
200 samples, 20 features), Newton with backtracking and `Implicit`, gradient
with respect to the sample weights. "solve" is the batch of solutions,
"solve + grad" `jax.value_and_grad` of the summed loss.

Flags: `--xla_cpu_multi_thread_eigen=false`, so that a device's own
operations run on one thread; and 16 host devices in every run, the mesh
using the first k, so that XLA's CPU thread pool (max(cores, host devices)
threads) has threads to spare: with jaxlib 0.10.x, a batched LAPACK call
splits its batch into tasks on that pool and waits for them, and when every
thread of the pool waits so, nothing runs them (a deadlock: a first run with
2 host devices hung at k = 1; docs/batches-and-devices.md). The spare threads
also run those LAPACK tasks, so even k = 1 uses both cores in its
factorisations.

Times: first call (compile + one run), then `--repeats` timed rounds,
round-robin over the functions of a workload; median and min-max. Writes
`benchmarks/results/sharding.md` with the machine and its load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sharding.md"
DEVICE_COUNTS = (1, 2, 4)
# Host devices in every run, whatever the mesh: XLA's CPU thread pool has
# max(cores, host devices) threads, see the docstring.
HOST_DEVICES = 16


def worker(k: int, quick: bool, repeats: int) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import jax.tree_util as jtu
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import itergrad as ig

    jax.config.update("jax_enable_x64", True)
    mesh = Mesh(np.asarray(jax.devices()[:k]), ("batch",))
    on_mesh = NamedSharding(mesh, P("batch"))
    batch = 16 if quick else 64

    # --- the workloads: f(instance) -> (value, steps), loss(instance) -> scalar
    n = 20 if quick else 50
    qps = jax.vmap(lambda key: ig.problems.random_qp(key, n=n, m=n // 4, p=n // 2))(
        jr.split(jr.key(0), batch)
    )

    def qp_solve(qp, _):
        sol = ig.solve(ig.InteriorPointQP(), None, qp, estimator=ig.OneStep())
        return sol.value, sol.steps

    samples, features = (100, 10) if quick else (500, 40)

    def data(key):
        problem = ig.problems.logistic_data(key, samples, features)
        return problem.A, problem.y

    A, y = jax.vmap(data)(jr.split(jr.key(1), batch))
    weights = jr.uniform(jr.key(2), (batch, samples), minval=0.2, maxval=2.0)

    def logistic_solve(w, data):
        A, y = data
        problem = ig.problems.LogisticRegression(A=A, y=y, lam=1.0)
        newton = ig.Newton(problem.objective, linesearch=ig.Backtracking())
        sol = ig.solve(newton, jnp.zeros(A.shape[1]), w, estimator=ig.Implicit())
        return sol.value, sol.steps

    # (solve(diff, rest) of one instance, diff, rest): gradients with respect
    # to `diff` (every field of each QP; the logistic sample weights).
    workloads = {
        f"{batch} QPs, n = {n}, OneStep": (qp_solve, qps, None),
        f"{batch} logistic regressions, {samples}x{features + 1}, Newton + Implicit": (
            logistic_solve,
            weights,
            (A, y),
        ),
    }

    def variants(solve):
        def loss_of(batched):
            def loss(diff, rest):
                values, _ = batched(solve)(diff, rest)
                return 0.5 * jnp.sum(values**2)

            return loss

        sharded = lambda f: ig.sharded_vmap(f, mesh)  # noqa: E731
        out = {
            "sharded_vmap": (sharded, False),
            "plain jit": (jax.vmap, True),
        }
        if k == 1:
            out = {"unsharded": (jax.vmap, False), "sharded_vmap": (sharded, False)}
        return {
            name: (
                eqx.filter_jit(batched(solve)),
                eqx.filter_jit(eqx.filter_value_and_grad(loss_of(batched))),
                put,
            )
            for name, (batched, put) in out.items()
        }

    report = {"k": k, "devices": [str(d) for d in mesh.devices.flat], "rows": []}
    for label, (solve, diff, rest) in workloads.items():
        fns = variants(solve)
        args = {
            name: jax.device_put((diff, rest), on_mesh) if put else (diff, rest)
            for name, (_, _, put) in fns.items()
        }
        first, times, cpu, outs = {}, {}, {}, {}
        for name, (f_solve, f_grad, _) in fns.items():
            for what, f in (("solve", f_solve), ("solve + grad", f_grad)):
                t = time.perf_counter()
                outs[name, what] = jax.block_until_ready(f(*args[name]))
                first[name, what] = time.perf_counter() - t
                times[name, what], cpu[name, what] = [], []
        for _ in range(repeats):  # round-robin: every function once per round
            for name, (f_solve, f_grad, _) in fns.items():
                for what, f in (("solve", f_solve), ("solve + grad", f_grad)):
                    t, c = time.perf_counter(), time.process_time()
                    jax.block_until_ready(f(*args[name]))
                    times[name, what].append(time.perf_counter() - t)
                    cpu[name, what].append(time.process_time() - c)
        for name in fns:
            values, steps = outs[name, "solve"]
            (_, grads) = outs[name, "solve + grad"]
            report["rows"].append(
                {
                    "workload": label,
                    "method": name,
                    "steps": [int(s) for s in steps],
                    "values": np.asarray(values).tolist(),
                    "grads": [np.asarray(g).tolist() for g in jtu.tree_leaves(grads)],
                    "first": {w: first[name, w] for w in ("solve", "solve + grad")},
                    "times": {w: times[name, w] for w in ("solve", "solve + grad")},
                    # Cores busy: CPU time of the process over wall time.
                    "cores": {
                        w: sum(cpu[name, w]) / sum(times[name, w])
                        for w in ("solve", "solve + grad")
                    },
                }
            )
    return report


def _run_worker(k: int, quick: bool, repeats: int) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={HOST_DEVICES} "
            "--xla_cpu_multi_thread_eigen=false"
        ),
    )
    cmd = [sys.executable, __file__, "--worker", str(k), "--repeats", str(repeats)]
    if quick:
        cmd.append("--quick")
    load = os.getloadavg()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker k={k} failed:\n{proc.stderr[-4000:]}")
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    report = json.loads(line[len("REPORT ") :])
    report["load"] = (load, os.getloadavg())
    return report


def _max_rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _fmt(seconds: list[float]) -> str:
    ms = [1e3 * s for s in seconds]
    return f"{statistics.median(ms):.3g} ({min(ms):.3g}–{max(ms):.3g})"


def write(reports: list[dict], args, started: str, load_start, load_end) -> None:
    import jax
    import jaxlib

    reference = {
        row["workload"]: row
        for row in reports[0]["rows"]
        if row["method"] == "unsharded"
    }
    base = {
        (row["workload"], what): statistics.median(row["times"][what])
        for row in reports[0]["rows"]
        if row["method"] == "unsharded"
        for what in ("solve", "solve + grad")
    }
    lines = [
        "# A batch sharded over host devices: `ig.sharded_vmap` vs a plain `jit`",
        "",
        f"Generated by `python benchmarks/sharding.py{' --quick' if args.quick else ''}"
        f"{'' if args.repeats == 7 else f' --repeats {args.repeats}'}` "
        "(what is measured: its docstring; the recipe: "
        "`docs/batches-and-devices.md`). Times in ms: median over "
        f"{args.repeats} rounds after a first call, min–max in brackets; "
        "*speed-up* is the unsharded median over this one. *cores busy*: CPU "
        "time of the process over wall time, solve / solve + grad (at most 2 on "
        "this machine). *first s*: the first call of solve / solve + grad "
        "(compile + one run). *rel. diff x / grad*: the largest difference of "
        "the batch's solutions / gradients to the unsharded run, relative to "
        "the largest entry. *steps*: per-instance steps, min / median / max "
        "over the batch; *lock-step iterations*: the iterations each device's "
        "loop runs, for `sharded_vmap` the most steps of its own shard, for a "
        "plain `jit` the most of the whole batch. *load at start*: the 1-minute "
        "load average when that device count's process started (it includes "
        "the previous one's).",
        "",
        "On 2 cores, k devices can at best run 2 shards at once: 2x is the "
        "ceiling for k = 2 and k = 4. With jaxlib 0.10 even the unsharded run "
        "uses both cores part of the time (its batched factorisations are split "
        "over XLA's thread pool: *cores busy* > 1), so the room left for "
        "devices is smaller than 2x. Solutions agree to the last bits; a "
        "gradient can differ where the per-device batch size changes the "
        "rounding of the batched arithmetic and an instance's derivative "
        "amplifies it: plain `jax.vmap` over 32 of these QPs against the same "
        "32 inside the batch of 64, on one device, differs by as much "
        "(`docs/batches-and-devices.md`).",
        "",
        f"- date: {started}",
        f"- machine: {platform.platform()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, shared with other work",
        f"- python {platform.python_version()}; jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}; float64",
        "- XLA_FLAGS: `--xla_force_host_platform_device_count=16 "
        "--xla_cpu_multi_thread_eigen=false`, the mesh over the first k host "
        "devices (the spare devices keep XLA's thread pool from deadlocking in "
        "jaxlib 0.10's batched LAPACK kernels, whose batch tasks they also run; "
        "see the script's docstring)",
        "- load average (1, 5, 15 min) at the start: "
        + ", ".join(f"{x:.2f}" for x in load_start)
        + "; at the end: "
        + ", ".join(f"{x:.2f}" for x in load_end),
        "",
    ]
    workloads = list(reference)
    for workload in workloads:
        lines += [
            f"## {workload}",
            "",
            "| devices | method | solve ms | speed-up | solve + grad ms | speed-up "
            "| cores busy | first s | rel. diff x / grad | steps min / med / max "
            "| lock-step iterations | load at start |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        ref = reference[workload]
        for report in reports:
            k = report["k"]
            for row in report["rows"]:
                if row["workload"] != workload:
                    continue
                steps = row["steps"]
                shard = len(steps) // k
                if row["method"] == "plain jit":
                    lock = max(steps)
                else:
                    lock = "/".join(
                        str(max(steps[i * shard : (i + 1) * shard])) for i in range(k)
                    )
                diff_x = _max_rel(row["values"], ref["values"])
                diff_g = max(_max_rel(g, h) for g, h in zip(row["grads"], ref["grads"]))
                busy = " / ".join(
                    f"{row['cores'][w]:.2f}" for w in ("solve", "solve + grad")
                )
                cells = []
                for what in ("solve", "solve + grad"):
                    med = statistics.median(row["times"][what])
                    cells += [
                        _fmt(row["times"][what]),
                        f"{base[workload, what] / med:.2f}",
                    ]
                first = " / ".join(
                    f"{row['first'][w]:.1f}" for w in ("solve", "solve + grad")
                )
                lines.append(
                    f"| {k} | {row['method']} | {cells[0]} | {cells[1]} | {cells[2]} | "
                    f"{cells[3]} | {busy} | {first} | {diff_x:.0e} / {diff_g:.0e} | "
                    f"{min(steps)} / "
                    f"{statistics.median(steps):g} / {max(steps)} | {lock} | "
                    f"{report['load'][0][0]:.2f} |"
                )
        lines.append("")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(RESULTS)
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.worker is not None:
        report = worker(args.worker, args.quick, args.repeats)
        print("REPORT " + json.dumps(report))
        return
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load_start = os.getloadavg()
    reports = []
    for k in DEVICE_COUNTS:
        t = time.perf_counter()
        reports.append(_run_worker(k, args.quick, args.repeats))
        print(f"k = {k}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    write(reports, args, started, load_start, os.getloadavg())


if __name__ == "__main__":
    main()
