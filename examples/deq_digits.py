"""A small deep equilibrium (DEQ) classifier on scikit-learn's digits, trained
with four derivative estimators of the same fixed point.

    x (64 pixels) -> u = A x           (injection)
    z* = tanh(s W z* + u + b)          (the equilibrium, ig.nn.DEQ + ig.Anderson)
    logits = C z* + c                  (head)

with $s = \\min(1, \\gamma / \\|W\\|_F)$ so that the cell stays a contraction
($\\|s W\\|_2 \\le \\gamma$) however training moves $W$. The cell's gradient is
taken by:

- `onestep`:   ig.OneStep()           Jacobian-free backprop, one cell VJP;
- `truncated`: ig.Truncated(5)        five differentiated cell steps;
- `implicit`:  ig.Implicit(GMRES)     the implicit function theorem, matrix-free;
- `unroll`:    ig.Unroll()            backprop through every forward step.

Every estimator runs the same forward pass (Anderson acceleration, memory 5,
stopping at ||f(z) - z|| <= atol), so only the backward pass differs. Reported
per estimator: test accuracy, seconds per epoch (median compiled train-step
time times steps per epoch, robust to other load on the machine), the compiled
train step's temporary memory (XLA's own count, a proxy for peak memory), and
mean forward steps, and the trained cell's contraction factor
rho = ||J_z f(z*)||_2 at test fixed points (OneStep's relative bias is at most
rho at the fixed point, Truncated(K)'s rho^K). Writes a figure and a CSV.

    python examples/deq_digits.py --quick     # under a minute on a laptop CPU
    python examples/deq_digits.py             # the full run, a few minutes

`benchmarks/deq_banax.py` reuses this file to put banax's DEQs on the same
cell, data and budget.
"""

import argparse
import csv
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optax

import itergrad as ig

# The contraction cap gamma of the cell (see the module docstring).
CONTRACTION = 0.9
MEMORY = 5


def load_data(seed: int = 0, limit: int | None = None):
    """Digits (1797 images of 8x8, 10 classes), scaled to [0, 1], split 80/20
    with a fixed permutation. `limit` keeps the first examples (for tests)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    if limit is not None:
        order = order[:limit]
    X, y = X[order], y[order]
    split = int(0.8 * len(y))
    return (X[:split], y[:split]), (X[split:], y[split:])


class Cell(eqx.Module):
    """$f(z, u) = \\tanh(W z + u + b)$."""

    W: jax.Array
    b: jax.Array

    def __call__(self, z, u):
        return jnp.tanh(self.W @ z + u + self.b)

    def contractive(self) -> "Cell":
        """The cell with $W$ scaled by $s = \\min(1, \\gamma/\\|W\\|_F)$, so that
        $\\|s W\\|_2 \\le \\gamma$ (computed once per forward pass, not per step;
        gradients flow through the scaling)."""
        scale = jnp.minimum(1.0, CONTRACTION / (jnp.linalg.norm(self.W) + 1e-12))
        return Cell(scale * self.W, self.b)


# An equilibrium function maps (cell, u) to (z*, forward steps): itergrad's
# and banax's DEQs plug in here, the rest of the model is shared.
Equilibrium = Callable[[Cell, jax.Array], tuple[jax.Array, jax.Array]]


class Classifier(eqx.Module):
    inject: eqx.nn.Linear
    cell: Cell
    head: eqx.nn.Linear
    equilibrium: Equilibrium = eqx.field(static=True)

    def __call__(self, x):
        u = self.inject(x)
        z, steps = self.equilibrium(self.cell.contractive(), u)
        return self.head(z), steps


def make_classifier(key, hidden: int, equilibrium: Equilibrium) -> Classifier:
    ki, kw, kh = jr.split(key, 3)
    W = 0.5 * jr.normal(kw, (hidden, hidden)) / np.sqrt(hidden)
    return Classifier(
        inject=eqx.nn.Linear(64, hidden, key=ki),
        cell=Cell(W, jnp.zeros(hidden)),
        head=eqx.nn.Linear(hidden, 10, key=kh),
        equilibrium=equilibrium,
    )


def itergrad_equilibrium(estimator, *, max_steps=30, atol=1e-4) -> Equilibrium:
    def equilibrium(cell, u):
        deq = ig.nn.DEQ(
            cell,
            solver=lambda F: ig.Anderson(F, memory=MEMORY),
            estimator=estimator,
            max_steps=max_steps,
            rtol=0.0,
            atol=atol,
        )
        z, solution = deq(u, return_solution=True)
        return z, solution.steps

    return equilibrium


ESTIMATORS = {
    "onestep": lambda: ig.OneStep(),
    "truncated": lambda: ig.Truncated(5),
    "implicit": lambda: ig.Implicit(linear_solver=lx.GMRES(rtol=1e-5, atol=1e-5)),
    "unroll": lambda: ig.Unroll(),
}


def train(
    name: str,
    equilibrium: Equilibrium,
    data,
    *,
    hidden: int,
    epochs: int,
    batch: int = 64,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> dict[str, Any]:
    """Train one classifier with Adam; return its metrics.

    The train step is compiled ahead of time (`jax.jit(...).lower().compile()`),
    so that epoch times exclude compilation and XLA reports the step's memory.
    `epoch_seconds` is the median train-step time times the steps per epoch.
    """
    (X_train, y_train), (X_test, y_test) = data
    model = make_classifier(jr.PRNGKey(seed), hidden, equilibrium)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    def loss_fn(params, xb, yb):
        logits, steps = jax.vmap(eqx.combine(params, static))(xb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, steps

    def train_step(params, opt_state, xb, yb):
        (loss, steps), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, xb, yb)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jnp.mean(steps)

    @jax.jit
    def evaluate(params, X, y):
        model = eqx.combine(params, static)
        logits, steps = jax.vmap(model)(X)

        # rho = ||J_z f(z*, u)||_2 at the fixed points of (up to) 32 test
        # inputs: the contraction that bounds OneStep's relative bias
        # (Corollary 1 at the fixed point) and sets Truncated(K)'s rho^K.
        def contraction(x):
            cell, u = model.cell.contractive(), model.inject(x)
            z, _ = model.equilibrium(cell, u)
            z = jax.lax.stop_gradient(z)
            return jnp.linalg.norm(jax.jacfwd(cell)(z, u), ord=2)

        rho = jnp.median(jax.vmap(contraction)(X[:32]))
        return jnp.mean(jnp.argmax(logits, -1) == y), jnp.mean(steps), rho

    n_batches = max(1, len(y_train) // batch)
    xb0, yb0 = jnp.asarray(X_train[:batch]), jnp.asarray(y_train[:batch])
    start = time.perf_counter()
    step = jax.jit(train_step).lower(params, opt_state, xb0, yb0).compile()
    compile_seconds = time.perf_counter() - start
    memory = step.memory_analysis()
    temp_bytes = (
        getattr(memory, "temp_size_in_bytes", float("nan")) if memory else float("nan")
    )

    rng = np.random.default_rng(seed)
    epoch_seconds, step_seconds, losses, train_steps = [], [], [], []
    for _ in range(epochs):
        order = rng.permutation(len(y_train))
        epoch_start = time.perf_counter()
        for i in range(n_batches):
            idx = order[i * batch : (i + 1) * batch]
            xb, yb = jnp.asarray(X_train[idx]), jnp.asarray(y_train[idx])
            start = time.perf_counter()
            params, opt_state, loss, steps = jax.block_until_ready(
                step(params, opt_state, xb, yb)
            )
            step_seconds.append(time.perf_counter() - start)
            losses.append(float(loss))
            train_steps.append(float(steps))
        epoch_seconds.append(time.perf_counter() - epoch_start)
    accuracy, test_steps, rho = evaluate(
        params, jnp.asarray(X_test), jnp.asarray(y_test)
    )
    return {
        "estimator": name,
        "seed": seed,
        "test_accuracy": float(accuracy),
        # Median train-step time times steps per epoch: robust to other
        # processes' load on a shared machine (the wall time is kept too).
        "epoch_seconds": float(np.median(step_seconds)) * n_batches,
        "epoch_wall_seconds": float(np.median(epoch_seconds)),
        "compile_seconds": compile_seconds,
        "temp_memory_mb": temp_bytes / 2**20,
        "forward_steps": float(test_steps),
        "contraction": float(rho),
        "train_forward_steps": float(np.mean(train_steps)),
        "final_loss": float(np.mean(losses[-n_batches:])),
        "losses": losses,
    }


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row["estimator"] for row in rows))

    def values(key):
        return [np.median([r[key] for r in rows if r["estimator"] == n]) for n in names]

    panels = [
        ("test_accuracy", "test accuracy"),
        ("epoch_seconds", "seconds per epoch"),
        ("temp_memory_mb", "train-step temp memory (MiB)"),
        ("forward_steps", "forward steps (test)"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.4))
    for ax, (key, label) in zip(axes, panels):
        ax.bar(names, values(key), color="C0")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    ax = axes[-1]
    for n in names:
        first = next(r for r in rows if r["estimator"] == n)
        ax.plot(first["losses"], label=n, lw=1)
    ax.set_yscale("log")
    ax.set_title("training loss (first seed)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    keys = [k for k in rows[0] if k != "losses"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in keys})


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a run under a minute")
    size.add_argument("--tiny", action="store_true", help="a smoke test (seconds)")
    parser.add_argument(
        "--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS)
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default="examples/results")
    args = parser.parse_args(argv)

    if args.tiny:
        hidden, epochs, limit = 8, 1, 300
    elif args.quick:
        hidden, epochs, limit = 32, 6, None
    else:
        hidden, epochs, limit = 64, 20, None
    hidden = args.hidden or hidden
    epochs = args.epochs or epochs
    data = load_data(limit=limit)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for seed in range(args.seeds):
        for name in args.estimators:
            row = train(
                name,
                itergrad_equilibrium(ESTIMATORS[name]()),
                data,
                hidden=hidden,
                epochs=epochs,
                seed=seed,
            )
            rows.append(row)
            print(
                f"{name:>10s} seed {seed}: accuracy {row['test_accuracy']:.4f}, "
                f"{row['epoch_seconds']:.3f} s/epoch, {row['temp_memory_mb']:.2f} MiB, "
                f"{row['forward_steps']:.1f} forward steps, rho {row['contraction']:.2f}"
            )
    plot(rows, out / "deq_digits.png")
    write_csv(rows, out / "deq_digits.csv")
    print(f"wrote {out / 'deq_digits.png'} and {out / 'deq_digits.csv'}")
    return rows


if __name__ == "__main__":
    main()
