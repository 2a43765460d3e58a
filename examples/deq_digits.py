"""A small deep equilibrium (DEQ) classifier on scikit-learn's digits, trained
with five derivative estimators of the same fixed point, with the cell's
contraction factor rho and the K of `Truncated("auto")` logged every epoch.

    x (64 pixels) -> u = A x           (injection)
    z* = tanh(s W z* + u + b)          (the equilibrium, ig.nn.DEQ + ig.Anderson)
    logits = C z* + c                  (head)

with $s = \\min(1, \\gamma / \\|W\\|_F)$ so that the cell stays a contraction
($\\|s W\\|_2 \\le \\gamma$) however training moves $W$. The cell's gradient is
taken by:

- `onestep`:   ig.OneStep()           Jacobian-free backprop, one cell VJP;
- `truncated`: ig.Truncated(5)        five differentiated cell steps;
- `auto`:      ig.Truncated("auto", target=1e-2)
                                      K chosen per example from the measured rho;
- `implicit`:  ig.Implicit(GMRES)     the implicit function theorem, matrix-free;
- `unroll`:    ig.Unroll()            backprop through every forward step.

Every estimator runs the same forward pass (Anderson acceleration, memory 5,
stopping at ||f(z) - z|| <= atol), so only the backward pass differs. Reported
per estimator: test accuracy, seconds per epoch (median compiled train-step
time times steps per epoch, robust to other load on the machine), the compiled
train step's temporary memory (XLA's own count, a proxy for peak memory), and
mean forward steps, and the trained cell's contraction factor
rho = ||J_z f(z*)||_2 at test fixed points (OneStep's relative bias is at most
rho at the fixed point, Truncated(K)'s rho^K).

**rho during training.** Before training (epoch 0) and after every epoch,
`probe` solves the cell's fixed point for the same `PROBES` test inputs (the
forward pass above, with `Truncated("auto", target=AUTO_TARGET)` as its
estimator) and records, per input:

- `rho`: $\\|J_z f(z^\\star)\\|_2$ from `ig.diagnose` (matrix-free power
  iteration, `PROBE_POWER_ITERATIONS` steps, no dense Jacobian; it agrees
  with the dense `jnp.linalg.norm(jax.jacfwd(cell)(z, u), 2)` to float32
  rounding, `tests/test_deq.py`);
- `onestep_disagreement`: diagnose's measured relative difference between
  the one-step and the implicit derivative on random directions (at the
  fixed point it is at most rho);
- `auto_K` and `auto_rho`: the number of differentiated steps
  `Truncated("auto")` chose (`sol.stats["differentiated_steps"]`) and the
  rho it measured itself (`sol.stats["contraction"]`, 30 power-iteration
  steps corrected upwards), so that
  $K = \\min(\\lceil \\log(t/(1+t)) / \\log \\rho \\rceil, k)$, $t$ =
  `AUTO_TARGET`, $k$ the forward steps, while $K \\le$ `AUTO_MAX_K`
  (`auto_K` below; $K \\approx \\log t / \\log \\rho$).

The probe is the same for every estimator's model (only the trained
parameters differ), so each row shows how its own training moved rho, and
with it the K that `Truncated("auto")` needs; the `auto` row is the model
trained with that rule (per example, on the training batches). Its train
step costs more than `Truncated(5)`'s: it estimates rho (30 power-iteration
steps) and replays `AUTO_MAX_K` masked steps whatever K is.

Writes `deq_digits.png` (bars, training loss, and rho / K /
disagreement vs epoch), `deq_digits.csv` (one row per run),
`deq_digits_epochs.csv` (one row per run and epoch: medians and ranges over
the probe inputs) and `deq_digits.json` (everything, per input).

    python examples/deq_digits.py --quick     # under a minute on a laptop CPU
    python examples/deq_digits.py             # the full run, a few minutes

`benchmarks/deq_banax.py` reuses this file to put banax's DEQs on the same
cell, data and budget (rho is then measured at itergrad's fixed point of the
banax-trained cell).
"""

import argparse
import csv
import json
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
# Forward budget and tolerance of every itergrad equilibrium (and the probe).
MAX_STEPS, ATOL = 30, 1e-4
# rho during training: measured at the fixed points of the first PROBES test
# inputs, by power iteration: 300 steps reach float32 rounding (~1e-7
# relative to the dense norm) even where the top singular values of J_z f
# are close (at hidden 64 100 steps leave ~2e-5).
PROBES = 8
PROBE_POWER_ITERATIONS = 300
# The relative bias that Truncated("auto") aims for: K ~ log(t) / log(rho).
# Its ring buffer keeps max_K states (the backward pass replays max_K masked
# steps, so it costs like Truncated(max_K)): 12 covers rho <= 0.68 at this
# target (K <= 12); a larger K is still met, by a K-term Neumann tail with
# the Jacobians frozen at z_k.
AUTO_TARGET = 1e-2
AUTO_MAX_K = 12


def auto_estimator() -> ig.Truncated:
    return ig.Truncated("auto", target=AUTO_TARGET, max_K=AUTO_MAX_K)


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


def itergrad_equilibrium(
    estimator, *, max_steps: int = MAX_STEPS, atol: float = ATOL
) -> Equilibrium:
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
    "auto": auto_estimator,
    "implicit": lambda: ig.Implicit(linear_solver=lx.GMRES(rtol=1e-5, atol=1e-5)),
    "unroll": lambda: ig.Unroll(),
}


def auto_K(
    rho, forward_steps, target: float = AUTO_TARGET, max_K: int = AUTO_MAX_K
) -> np.ndarray:
    """The K that `Truncated("auto", target, max_K)` documents for a measured
    rho < 1: the smallest K with $\\rho^K / (1 - \\rho^K) \\le t$, i.e.
    $\\lceil \\log(t/(1+t)) / \\log \\rho \\rceil$ (about
    $\\log t / \\log \\rho$), no more than the forward steps taken when it
    fits the `max_K` stored states (beyond, the Neumann tail takes all K)."""
    rho = np.asarray(rho, np.float64)
    needed = np.maximum(np.ceil(np.log(target / (1 + target)) / np.log(rho)), 1)
    capped = np.minimum(needed, np.asarray(forward_steps))
    return np.where(needed > max_K, needed, capped).astype(int)


def _probe_one(cell: Cell, u: jax.Array):
    deq = ig.nn.DEQ(
        cell,
        solver=lambda F: ig.Anderson(F, memory=MEMORY),
        estimator=auto_estimator(),
        max_steps=MAX_STEPS,
        rtol=0.0,
        atol=ATOL,
    )
    z, sol = deq(u, return_solution=True)
    # The DEQ iterates F(z, theta) = f(z, u), theta = (the cell's arrays, u):
    # diagnose that solve (a fixed budget that runs out is diagnosed as is).
    theta = (eqx.filter(cell, eqx.is_array), u)
    report = ig.diagnose(
        deq.solver(deq.step_map()),
        sol,
        theta,
        key=jr.PRNGKey(0),
        target=AUTO_TARGET,
        power_iterations=PROBE_POWER_ITERATIONS,
        allow_unconverged=True,
    )
    return z, {
        "rho": report.rho,
        "onestep_disagreement": report.disagreement,
        "auto_K": sol.stats["differentiated_steps"],
        "auto_rho": sol.stats["contraction"],
        "forward_steps": sol.steps,
    }


# One compiled probe for every estimator's model (it depends on the cell and
# the injected inputs only).
_probe = jax.jit(jax.vmap(_probe_one, in_axes=(None, 0)))


def probe(cell: Cell, u: jax.Array) -> tuple[jax.Array, dict[str, np.ndarray]]:
    """rho and `Truncated("auto")`'s K at the fixed points of a batch of
    injected inputs `u` (shape `(probes, hidden)`) of the contractive `cell`:
    `(z*, {"rho", "onestep_disagreement", "auto_K", "auto_rho",
    "forward_steps"})`, one value per input (see the module docstring)."""
    z, measured = _probe(cell, u)
    return z, {k: np.asarray(v) for k, v in measured.items()}


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
    X_probe = jnp.asarray(X_test[:PROBES])
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

        # Per test input: the logits (as `model(x)`), the forward steps and
        # rho = ||J_z f(z*, u)||_2 at its fixed point (dense), the contraction
        # that bounds OneStep's relative bias (Corollary 1 at the fixed point)
        # and sets Truncated(K)'s rho^K; one equilibrium solve per input.
        def one(x):
            cell, u = model.cell.contractive(), model.inject(x)
            z, steps = model.equilibrium(cell, u)
            z = jax.lax.stop_gradient(z)
            rho = jnp.linalg.norm(jax.jacfwd(cell)(z, u), ord=2)
            return model.head(z), steps, rho

        logits, steps, rho = jax.vmap(one)(X)
        # The median rho over (up to) the first 32 test inputs.
        rho = jnp.median(rho[:32])
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

    def measure(params, epoch: int, loss: float | None) -> dict[str, Any]:
        model = eqx.combine(params, static)
        _, values = probe(model.cell.contractive(), jax.vmap(model.inject)(X_probe))
        record: dict[str, Any] = {"epoch": epoch, "loss": loss}
        for key in (
            "rho",
            "onestep_disagreement",
            "auto_K",
            "auto_rho",
            "forward_steps",
        ):
            value = values[key]
            record[key] = value.tolist()
            record[key + "_median"] = float(np.median(value))
            record[key + "_min"] = float(np.min(value))
            record[key + "_max"] = float(np.max(value))
        return record

    rng = np.random.default_rng(seed)
    epoch_seconds, step_seconds, losses, train_steps = [], [], [], []
    # Epoch 0 is the initialisation; then one record after every epoch.
    history = [measure(params, 0, None)]
    for epoch in range(1, epochs + 1):
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
        history.append(measure(params, epoch, float(np.mean(losses[-n_batches:]))))
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
        "rho_initial": history[0]["rho_median"],
        "rho_final": history[-1]["rho_median"],
        "auto_K_final": history[-1]["auto_K_median"],
        "losses": losses,
        # Per epoch (0 = initialisation): rho, diagnose's disagreement and
        # Truncated("auto")'s K at the PROBES test inputs.
        "epochs": history,
        # Not written out: the trained model and the probe inputs, for checks.
        "model": eqx.combine(params, static),
        "probe_inputs": np.asarray(X_probe),
    }


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row["estimator"] for row in rows))

    def values(key):
        return [np.median([r[key] for r in rows if r["estimator"] == n]) for n in names]

    def first(n):
        return next(r for r in rows if r["estimator"] == n)

    panels = [
        ("test_accuracy", "test accuracy"),
        ("epoch_seconds", "seconds per epoch"),
        ("temp_memory_mb", "train-step temp memory (MiB)"),
        ("forward_steps", "forward steps (test)"),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, label) in zip(axes[0], panels):
        ax.bar(names, values(key), color="C0")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    ax = axes[1, 0]
    for n in names:
        ax.plot(first(n)["losses"], label=n, lw=1)
    ax.set_yscale("log")
    ax.set_title("training loss (first seed)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)

    # Per epoch (0 = initialisation), first seed: medians over the probe
    # inputs, the band their range.
    def per_epoch(ax, key, title, formula=False, band=True):
        for i, n in enumerate(names):
            history = first(n).get("epochs", [])
            if not history:
                continue
            epochs = [h["epoch"] for h in history]
            med = [h[key + "_median"] for h in history]
            ax.plot(epochs, med, "o-", color=f"C{i}", label=n, lw=1, ms=3)
            if band:
                ax.fill_between(
                    epochs,
                    [h[key + "_min"] for h in history],
                    [h[key + "_max"] for h in history],
                    color=f"C{i}",
                    alpha=0.1,
                )
            if formula:
                rho = np.array([h["rho_median"] for h in history])
                steps = np.array([h["forward_steps_median"] for h in history])
                ax.plot(epochs, auto_K(rho, steps), ":", color=f"C{i}", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch (0: initialisation)")
        ax.legend(fontsize=7)

    per_epoch(axes[1, 1], "rho", "rho = ||J_z f(z*)||_2 (ig.diagnose)")
    per_epoch(
        axes[1, 2],
        "auto_K",
        f'Truncated("auto", target={AUTO_TARGET:g}): K\n'
        "(dotted: ceil(log(t/(1+t)) / log rho))",
        formula=True,
        band=False,
    )
    per_epoch(
        axes[1, 3], "onestep_disagreement", "OneStep vs Implicit, relative (<= rho)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scalar_keys(row: dict[str, Any]) -> list[str]:
    return [k for k, v in row.items() if isinstance(v, str | int | float)]


def write_csv(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """One line per run: the scalar metrics (not the per-epoch records)."""
    _write_table(rows, _scalar_keys(rows[0]), path)


def _write_table(
    records: Sequence[dict[str, Any]], keys: list[str], path: pathlib.Path
) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for record in records:
            writer.writerow({k: record[k] for k in keys})


def write_epochs_csv(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """One line per run and epoch (0 = initialisation): the training loss of
    the epoch, and the medians and ranges over the probe inputs of rho,
    diagnose's OneStep disagreement, Truncated("auto")'s K and own rho, and
    the forward steps."""
    records = [
        {"estimator": row["estimator"], "seed": row["seed"], **h}
        for row in rows
        for h in row.get("epochs", [])
    ]
    if not records:
        return
    _write_table(
        records, [k for k, v in records[0].items() if not isinstance(v, list)], path
    )


def write_json(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Every run's scalars, training losses and per-epoch records (with the
    per-input values), as JSON."""
    keys = ("model", "probe_inputs")
    data = {
        "auto_target": AUTO_TARGET,
        "probes": PROBES,
        "runs": [{k: v for k, v in row.items() if k not in keys} for row in rows],
    }
    path.write_text(json.dumps(data, indent=1))


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
            history = row["epochs"]
            print(
                f"{'':>10s} per epoch 0..{epochs} (median over {PROBES} test inputs): "
                "rho "
                + " ".join(f"{h['rho_median']:.3f}" for h in history)
                + f"; Truncated('auto', target={AUTO_TARGET:g}) K "
                + " ".join(f"{h['auto_K_median']:g}" for h in history)
            )
    plot(rows, out / "deq_digits.png")
    write_csv(rows, out / "deq_digits.csv")
    write_epochs_csv(rows, out / "deq_digits_epochs.csv")
    write_json(rows, out / "deq_digits.json")
    print(
        f"wrote {out / 'deq_digits.png'}, {out / 'deq_digits.csv'}, "
        f"{out / 'deq_digits_epochs.csv'} and {out / 'deq_digits.json'}"
    )
    return rows


if __name__ == "__main__":
    main()
