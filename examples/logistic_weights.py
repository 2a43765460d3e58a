"""Learn per-sample weights of a logistic regression trained on corrupted labels.

Bilevel problem (Section 3 and eq. 11 of the paper): the training loss is
$f(x, \\theta) = \\sum_i w_i(\\theta)\\, \\ell(y_i\\langle a_i, x\\rangle) + \\lambda\\|x_{-1}\\|^2$
with weights $w_i = 2\\sigma(\\theta_i) \\in (0, 2)$, solved by Newton's method;
the outer loss is the mean logistic loss on clean held-out data. A fraction of
the training labels is flipped: good weights down-weight them. The one-step,
implicit and unrolled hypergradients are compared on the final validation
loss and accuracy, on how much the flipped samples were down-weighted, and on
time.

Run `python examples/logistic_weights.py` (add `--quick` for a tiny run).
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from rich.console import Console
from rich.table import Table

import itergrad as ig


def make_problem(key, n_train, n_val, n_features, fraction):
    k_data, k_flip = jr.split(key)
    data = ig.problems.logistic_data(
        k_data, n_train + n_val, n_features, separation=2.0, lam=1.0
    )
    train = ig.problems.LogisticRegression(data.A[:n_train], data.y[:n_train], data.lam)
    A_val, y_val = data.A[n_train:], data.y[n_train:]
    train, flipped = ig.problems.flip_labels(train, k_flip, fraction)

    def inner(x, theta):
        return train.objective(x, 2.0 * jax.nn.sigmoid(theta))

    def outer(x, theta):
        return jnp.mean(jnp.logaddexp(0.0, -y_val * (A_val @ x)))

    def accuracy(x):
        return float(jnp.mean(jnp.sign(A_val @ x) == y_val))

    return inner, outer, accuracy, flipped, train.n


def main(quick: bool = False) -> dict[str, dict[str, float]]:
    """Run the comparison; returns `{estimator: {"loss", "accuracy",
    "flipped_weight", "clean_weight", "time"}}`, time in seconds per outer step."""
    jax.config.update("jax_enable_x64", True)
    n_train, n_val, n_features = (20, 100, 3) if quick else (400, 2000, 10)
    steps = 20 if quick else 200
    inner, outer, accuracy, flipped, n = make_problem(
        jr.key(0), n_train, n_val, n_features, fraction=0.3
    )
    theta0 = jnp.zeros(n_train)
    x0 = jnp.zeros(n)

    @eqx.filter_jit
    def evaluate(x0, theta):
        x = ig.solve(ig.Newton(inner), x0, theta).value
        return x, outer(x, theta)

    start_loss = float(evaluate(x0, theta0)[1])

    results = {}
    for name, estimator in [
        ("OneStep", ig.OneStep()),
        ("Implicit", ig.Implicit()),
        ("Unroll", ig.Unroll()),
    ]:
        history = ig.hypergradient_descent(
            outer,
            ig.Newton(inner),
            theta0,
            x0,
            estimator=estimator,
            optimizer=optax.adam(0.1),
            steps=steps,
            progress=not quick,
        )
        # Per outer step, compilation (the first step) excluded.
        stats = history.stats
        elapsed = (stats["time"] - stats["first_step_time"]) / (steps - 1)
        theta = history.theta[-1]
        x, loss = evaluate(history.x, theta)
        weights = 2.0 * jax.nn.sigmoid(theta)
        results[name] = {
            "loss": float(loss),
            "accuracy": accuracy(x),
            "flipped_weight": float(jnp.mean(weights[flipped])),
            "clean_weight": float(jnp.mean(weights[~flipped])),
            "time": elapsed,
        }

    table = Table(
        title="Per-sample weights for logistic regression with flipped labels"
    )
    for column in (
        "estimator",
        "val. loss",
        "val. acc.",
        "w flipped",
        "w clean",
        "ms / step",
    ):
        table.add_column(column, justify="right")
    table.add_row("uniform weights", f"{start_loss:.5f}", "-", "1", "1", "-")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['loss']:.5f}",
            f"{r['accuracy']:.3f}",
            f"{r['flipped_weight']:.3f}",
            f"{r['clean_weight']:.3f}",
            f"{1e3 * r['time']:.2f}",
        )
    Console().print(table)
    return results | {"uniform": {"loss": start_loss}}


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
