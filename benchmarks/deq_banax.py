"""DEQ on digits: itergrad's estimators next to banax's DEQs (PyPI `banax`:
Jacobian-free backprop and implicit differentiation in JAX/Equinox), on the
same cell, data, forward solver settings and training budget, in one run.

    python benchmarks/deq_banax.py            # 3 seeds, the example's full size
    python benchmarks/deq_banax.py --quick    # 2 seeds, smaller, ~2 minutes

Both sides use the classifier of `examples/deq_digits.py` (injection, tanh
cell with a contraction cap, linear head; Adam, batch 64); only the
equilibrium function differs:

- itergrad: `ig.nn.DEQ(cell, solver=Anderson(memory=5), estimator=...)`;
- itergrad also with `Implicit(linear_solver=ig.Neumann(20),
  condition="fixed_point")`, a backward solve of banax's kind (a fixed-point
  iteration rather than GMRES);
- banax: `banax.adjoint.JFB` / `banax.adjoint.Implicit` around
  `banax.solver.Anderson(depth=5)`, the backward fixed-point iteration of
  `Implicit` an Anderson solver too.

Both forward solvers stop at ||f(z) - z|| <= atol (rtol off) or after
`max_steps`. Writes `benchmarks/results/deq_digits.md` (medians with min–max
over seeds) and `deq_digits.csv`, `deq_digits.png`.

Needs `scikit-learn`, `matplotlib`, `optax` and `banax` (>= 0.1.5, which
declares Python >= 3.12; on Python 3.11 it is installed with
`pip install --no-deps --ignore-requires-python banax` and loaded by
`import_banax` below, which only rewrites its PEP 695 type-alias and
generic-class syntax, none of its code).
"""

import argparse
import importlib
import importlib.util
import os
import pathlib
import re
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location(
        "deq_digits", ROOT / "examples" / "deq_digits.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _py311(source: str) -> str:
    """Rewrite PEP 695 syntax (Python 3.12) so that Python 3.11 can run it:
    `type X[...] = ...` becomes `X = Any` and `class C[T](Base[...])`
    becomes `class C(Base)`; annotations are made lazy. Type aliases and
    generic parameters carry no runtime behaviour in banax."""
    out = ["from __future__ import annotations", "from typing import Any as _Any"]
    depth = 0
    for line in source.splitlines():
        if depth > 0:  # continuation of a multi-line type alias
            depth += (
                line.count("(") + line.count("[") - line.count(")") - line.count("]")
            )
            continue
        alias = re.match(r"^(\s*)type (\w+)(\[[^\]]*\])?\s*=(.*)$", line)
        if alias:
            rest = alias.group(4)
            depth = (
                rest.count("(") + rest.count("[") - rest.count(")") - rest.count("]")
            )
            out.append(f"{alias.group(1)}{alias.group(2)} = _Any")
            continue
        generic = re.match(r"^(\s*)class (\w+)\[[^\]]*\]\(([\w.]+)[^:]*:(.*)$", line)
        if generic:
            indent, name, base, rest = generic.groups()
            out.append(f"{indent}class {name}({base}):{rest}")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def import_banax():
    """`import banax`; on Python < 3.12, import a copy of the installed
    package with its 3.12-only syntax rewritten (see `_py311`)."""
    try:
        return importlib.import_module("banax")
    except SyntaxError:
        pass
    spec = importlib.util.find_spec("banax")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("banax is not installed: pip install banax")
    source_dir = pathlib.Path(list(spec.submodule_search_locations)[0])
    target = pathlib.Path(tempfile.mkdtemp(prefix="banax311_")) / "banax"
    target.mkdir()
    for path in source_dir.glob("*.py"):
        (target / path.name).write_text(_py311(path.read_text()))
    for name in [m for m in sys.modules if m == "banax" or m.startswith("banax.")]:
        del sys.modules[name]
    sys.path.insert(0, str(target.parent))
    try:
        return importlib.import_module("banax")
    finally:
        sys.path.remove(str(target.parent))


def banax_equilibrium(banax, kind: str, *, max_steps: int, atol: float):
    import banax.adjoint
    import banax.solver

    def anderson(tol):
        return banax.solver.Anderson(depth=5, max_steps=max_steps, atol=tol, rtol=0.0)

    if kind == "jfb":
        adjoint = banax.adjoint.JFB(anderson(atol))
    else:
        adjoint = banax.adjoint.Implicit(solver=anderson(atol), b_solver=anderson(1e-5))

    def equilibrium(cell, u):
        solution = adjoint((cell, u), jnp.zeros_like(u))
        return solution.value, solution.stats.steps

    return equilibrium


def forward_milliseconds(example, equilibrium, data, hidden, repeats=50):
    """Median time of the compiled forward pass (no gradient) on one batch of
    64: the fixed-point solve and its loop machinery alone."""
    import equinox as eqx
    import jax

    (X_train, _), _ = data
    model = example.make_classifier(jax.random.PRNGKey(0), hidden, equilibrium)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = jax.jit(lambda p, x: jax.vmap(eqx.combine(p, static))(x)[0])
    xb = jnp.asarray(X_train[:64])
    jax.block_until_ready(forward(params, xb))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, xb))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _summary(rows, key, scale=1.0, fmt="{:.3f}"):
    values = np.array([r[key] for r in rows]) * scale
    return f"{fmt.format(np.median(values))} [{fmt.format(values.min())}, {fmt.format(values.max())}]"


def report(rows, path: pathlib.Path, settings: dict) -> str:
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    lines = [
        "# DEQ on digits: itergrad estimators and banax, side by side",
        "",
        "Produced by `python benchmarks/deq_banax.py"
        + (" --quick" if settings["quick"] else "")
        + "` in one process (same cell, data, forward solver settings and budget for "
        "every row; see the script's docstring). Medians over "
        f"{settings['seeds']} seeds, [min, max] in brackets. Hidden width "
        f"{settings['hidden']}, {settings['epochs']} epochs, batch 64, Adam lr 1e-2, "
        f"Anderson memory 5, forward stop ||f(z) - z|| <= {settings['atol']} or "
        f"{settings['max_steps']} steps, float32, CPU "
        f"({settings['devices']}, {settings['cores']} cores, load average "
        f"{settings['load_start']:.1f} at the start and {settings['load_end']:.1f} "
        "at the end: a shared machine, so times carry noise that the min-max "
        "brackets show). Seconds per epoch are the median compiled train-step "
        "time times the steps per epoch (compilation excluded: the train step "
        "is compiled ahead of time); memory is XLA's temporary allocation of "
        "the compiled train step (batch 64), a proxy for peak memory.",
        "",
        "| library / estimator | test accuracy (%) | s / epoch | forward ms / batch | compile s | temp memory (MiB) | forward steps (test) | rho (trained cell) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        sub = [r for r in rows if r["estimator"] == name]
        lines.append(
            f"| {name} | {_summary(sub, 'test_accuracy', 100, '{:.2f}')} | "
            f"{_summary(sub, 'epoch_seconds')} | {_summary(sub, 'forward_ms', fmt='{:.2f}')} | "
            f"{_summary(sub, 'compile_seconds', fmt='{:.1f}')} | "
            f"{_summary(sub, 'temp_memory_mb', fmt='{:.2f}')} | "
            f"{_summary(sub, 'forward_steps', fmt='{:.1f}')} | "
            f"{_summary(sub, 'contraction', fmt='{:.2f}')} |"
        )

    def median(name, key):
        return float(np.median([r[key] for r in rows if r["estimator"] == name]))

    lines += ["", "## Claims", ""]
    if {"itergrad onestep", "itergrad implicit"} <= set(names):
        acc_gap = 100 * (
            median("itergrad onestep", "test_accuracy")
            - median("itergrad implicit", "test_accuracy")
        )
        os_t, im_t = (
            median("itergrad onestep", "epoch_seconds"),
            median("itergrad implicit", "epoch_seconds"),
        )
        holds = abs(acc_gap) <= 1.0 and os_t < im_t
        lines.append(
            f"- OneStep (JFB) test accuracy within 1 point of Implicit's at lower time "
            f"per epoch: accuracy difference {acc_gap:+.2f} points, {os_t:.3f} s vs "
            f"{im_t:.3f} s per epoch ({im_t / os_t:.1f}x) — "
            f"**{'holds' if holds else 'did not hold'}**."
        )
    for ours, theirs in (
        ("itergrad onestep", "banax jfb"),
        ("itergrad implicit", "banax implicit"),
    ):
        if {ours, theirs} <= set(names):
            lines.append(
                f"- {ours} vs {theirs}: accuracy "
                f"{100 * median(ours, 'test_accuracy'):.2f} vs {100 * median(theirs, 'test_accuracy'):.2f}, "
                f"{median(ours, 'epoch_seconds'):.3f} vs {median(theirs, 'epoch_seconds'):.3f} s/epoch, "
                f"{median(ours, 'temp_memory_mb'):.2f} vs {median(theirs, 'temp_memory_mb'):.2f} MiB."
            )
    lines += [
        "",
        "Forward ms / batch: the compiled forward pass alone (no gradient) on "
        "64 examples, median of 50 runs. itergrad's forward pass is the same "
        "loop for every estimator except that OneStep/Truncated keep the last "
        "K states (iterate and Anderson history) in a ring buffer and Unroll "
        "runs a checkpointed loop, which shows in this column.",
        "",
        "rho: ||J_z f(z*)||_2 of the trained cell at the fixed points of 32 "
        "test inputs (median): OneStep's relative bias at the fixed point is at "
        "most rho, Truncated(5)'s at most rho^5 (Corollary 1).",
        "",
        "Forward steps: itergrad counts steps, each one evaluation of f; banax "
        "counts loop iterations after an initial f(x0) in its `init`, so the "
        "same number of f evaluations reads one less.",
        "",
        "Notes: itergrad's OneStep differentiates the cell at the last iterate "
        "z_{k-1}, banax's JFB at the returned z_k; itergrad's Implicit solves "
        "(I - J_z f)^T w = g by GMRES (rtol = atol = 1e-5), banax's by an Anderson "
        "fixed-point iteration on w -> g + J_z f^T w (atol 1e-5). banax 0.1.5 "
        "declares Python >= 3.12 and was loaded on Python 3.11 by rewriting its "
        "type-alias syntax only (`import_banax`).",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    import jax

    import itergrad as ig

    load_start = os.getloadavg()[0]
    example = _example()
    banax = import_banax()
    hidden, epochs, seeds = (32, 6, 2) if args.quick else (64, 20, 3)
    epochs = args.epochs or epochs
    seeds = args.seeds or seeds
    max_steps, atol = 30, 1e-4
    data = example.load_data()
    variants = {
        f"itergrad {name}": (
            lambda name=name: example.itergrad_equilibrium(
                example.ESTIMATORS[name](), max_steps=max_steps, atol=atol
            )
        )
        for name in ("onestep", "truncated", "implicit", "unroll")
    }
    # Implicit with banax's kind of backward solve: a fixed-point (Neumann)
    # iteration instead of GMRES, 20 terms.
    variants["itergrad implicit-neumann"] = lambda: example.itergrad_equilibrium(
        ig.Implicit(linear_solver=ig.Neumann(20), condition="fixed_point"),
        max_steps=max_steps,
        atol=atol,
    )
    for kind in ("jfb", "implicit"):
        variants[f"banax {kind}"] = lambda kind=kind: banax_equilibrium(
            banax, kind, max_steps=max_steps, atol=atol
        )

    rows = []
    # Seed-major order, so that machine-load drift spreads over all variants.
    for seed in range(seeds):
        for name, make in variants.items():
            row = example.train(
                name, make(), data, hidden=hidden, epochs=epochs, seed=seed
            )
            row["forward_ms"] = forward_milliseconds(example, make(), data, hidden)
            rows.append(row)
            print(
                f"{name:>18s} seed {seed}: acc {row['test_accuracy']:.4f}, "
                f"{row['epoch_seconds']:.3f} s/epoch, {row['temp_memory_mb']:.2f} MiB, "
                f"{row['forward_steps']:.1f} steps",
                flush=True,
            )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    example.write_csv(rows, out / "deq_digits.csv")
    example.plot(rows, out / "deq_digits.png")
    settings = {
        "cores": os.cpu_count(),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "quick": args.quick,
        "seeds": seeds,
        "hidden": hidden,
        "epochs": epochs,
        "atol": atol,
        "max_steps": max_steps,
        "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
    }
    print(report(rows, out / "deq_digits.md", settings))
    return rows


if __name__ == "__main__":
    main()
