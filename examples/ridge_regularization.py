"""Tune a ridge regularization on held-out data by hypergradient descent.

Bilevel problem (Section 3 of the paper), with $\\theta = \\log\\lambda$:
$\\min_\\theta \\tfrac{1}{2N_v}\\|A_v \\bar x(\\theta) - y_v\\|^2$ where
$\\bar x(\\theta) = \\arg\\min_x \\tfrac12\\|A x - y\\|^2 + \\tfrac{e^\\theta}{2}\\|x\\|^2$,
solved by Newton's method. The one-step, implicit and unrolled hypergradients
are compared with the closed-form optimum found by a fine grid search.

Run `python examples/ridge_regularization.py` (add `--quick` for a tiny run).
"""

import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from rich.console import Console
from rich.table import Table

import itergrad as ig


def make_problem(key, n_features, n_train, n_val, noise=1.5):
    k1, k2, k3, k4, k5 = jr.split(key, 5)
    x_star = 0.5 * jr.normal(k1, (n_features,))
    A = jr.normal(k2, (n_train, n_features))
    y = A @ x_star + noise * jr.normal(k3, (n_train,))
    A_val = jr.normal(k4, (n_val, n_features))
    y_val = A_val @ x_star + noise * jr.normal(k5, (n_val,))

    def inner(x, theta):
        return 0.5 * jnp.sum((A @ x - y) ** 2) + 0.5 * jnp.exp(theta) * jnp.dot(x, x)

    def outer(x, theta):
        return 0.5 * jnp.mean((A_val @ x - y_val) ** 2)

    def x_bar(theta):
        H = A.T @ A + jnp.exp(theta) * jnp.eye(n_features)
        return jnp.linalg.solve(H, A.T @ y)

    return inner, outer, x_bar


def main(quick: bool = False) -> dict[str, dict[str, float]]:
    """Run the comparison; returns `{estimator: {"gap", "theta", "time"}}`, time in seconds per outer step."""
    jax.config.update("jax_enable_x64", True)  # the 1e-4 gap is a float64 claim
    n_features, n_train, n_val = (8, 12, 40) if quick else (50, 60, 400)
    steps = 150 if quick else 300
    inner, outer, x_bar = make_problem(jr.key(0), n_features, n_train, n_val)
    grid = jnp.linspace(-6.0, 8.0, 4001)
    grid_losses = jax.vmap(lambda t: outer(x_bar(t), t))(grid)
    best = float(jnp.min(grid_losses))

    results = {}
    for name, estimator in [
        ("OneStep", ig.OneStep()),
        ("Implicit", ig.Implicit()),
        ("Unroll", ig.Unroll()),
    ]:
        history = ig.hypergradient_descent(
            outer,
            ig.Newton(inner),
            jnp.array(0.0),
            jnp.zeros(n_features),
            estimator=estimator,
            optimizer=optax.adam(0.1),
            steps=steps,
            progress=not quick,
        )
        # Per outer step, compilation (the first step) excluded.
        stats = history.stats
        elapsed = (stats["time"] - stats["first_step_time"]) / (steps - 1)
        theta = history.theta[-1]
        gap = (float(outer(x_bar(theta), theta)) - best) / best
        results[name] = {"gap": gap, "theta": float(theta), "time": elapsed}

    table = Table(title="Ridge regularization by hypergradient descent (Newton inner)")
    for column in ("estimator", "log lambda", "rel. val-loss gap", "ms / step"):
        table.add_column(column, justify="right")
    table.add_row(
        "grid search", f"{float(grid[jnp.argmin(grid_losses)]):.4f}", "0", "-"
    )
    for name, r in results.items():
        table.add_row(
            name, f"{r['theta']:.4f}", f"{r['gap']:.2e}", f"{1e3 * r['time']:.2f}"
        )
    Console().print(table)
    return results


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
