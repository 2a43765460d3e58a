"""Select the Lasso's regularisation on held-out data by hypergradient descent,
and compare with a grid search.

Bilevel problem with $\\theta = \\log\\lambda$:
$\\min_\\theta \\tfrac{1}{2N_v}\\|A_v \\bar x(\\theta) - b_v\\|^2$ where
$\\bar x(\\theta) = \\arg\\min_x \\tfrac{1}{2N}\\|A x - b\\|^2 + e^\\theta\\|x\\|_1$,
solved by FISTA (`ig.ProximalGradient`) and differentiated by `ig.Implicit()`:
the proximal-gradient fixed point, whose linear system reduces to the support
(matrix-free GMRES, about $|S|$ iterations). The outer loop is
`ig.hypergradient_descent` with gradient steps on $\\theta$, warm-starting each inner
solve. The grid search solves the Lasso on a log-spaced grid of $\\lambda$.

Run `python examples/lasso_selection.py` (synthetic $N = 200$ training and
200 validation samples, $p = 2000$ features, 10 informative) or with
`--quick` for a tiny run.
"""

import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optax

import itergrad as ig

SOLVE = dict(max_steps=20000, rtol=1e-10, atol=1e-10)


def main(quick: bool = False, verbose: bool = True) -> dict:
    jax.config.update("jax_enable_x64", True)
    n_train, n_val, n_features, n_grid = (
        (100, 200, 200, 25) if quick else (200, 200, 2000, 30)
    )
    full, x_star = ig.problems.lasso_data(
        jr.key(0), n_train + n_val, n_features, n_informative=10, noise=1.0
    )
    train, val = full.split(n_train)
    solver = ig.ProximalGradient(train.smooth, train.prox, 1 / train.lipschitz())
    x0 = jnp.zeros(n_features)

    def validation_loss(x, theta):
        residual = val.A @ x - val.b
        return 0.5 * jnp.dot(residual, residual) / n_val

    # Grid search: log-spaced from lambda_max down to lambda_max / 1000.
    lam_max = float(train.lambda_max())
    grid = jnp.linspace(np.log(lam_max), np.log(lam_max * 1e-3), n_grid)
    spacing = float(grid[0] - grid[1])

    @jax.jit
    def grid_losses(grid):
        def one(theta):
            return validation_loss(ig.solve(solver, x0, theta, **SOLVE).value, theta)

        return jax.lax.map(one, grid)

    start = time.perf_counter()
    losses = np.asarray(grid_losses(grid))
    grid_time = time.perf_counter() - start
    best = int(np.argmin(losses))

    # Hypergradient descent from lambda_max / 2, where the validation loss
    # decreases towards the first minimum (it is not convex in theta: local
    # minima appear as the support changes at smaller lambda).
    estimator = ig.Implicit(linear_solver=lx.GMRES(rtol=1e-10, atol=1e-10))
    start = time.perf_counter()
    history = ig.hypergradient_descent(
        validation_loss,
        solver,
        jnp.asarray(np.log(lam_max * 0.5)),
        x0,
        estimator=estimator,
        # Plain gradient steps: Adam's momentum overshoots the minimum here
        # and its normalised steps then oscillate around it.
        optimizer=optax.sgd(0.05),
        steps=100,
        progress=False,
        **SOLVE,
    )
    descent_time = time.perf_counter() - start
    theta = float(history.theta[-1])
    selected_loss = float(
        jax.jit(lambda t: validation_loss(ig.solve(solver, x0, t, **SOLVE).value, t))(
            theta
        )
    )
    support = int(jnp.sum(ig.solve(solver, x0, theta, **SOLVE).value != 0))
    results = {
        "grid_theta": float(grid[best]),
        "grid_loss": float(losses[best]),
        "grid_spacing": spacing,
        "grid_time": grid_time,
        "theta": theta,
        "loss": selected_loss,
        "descent_time": descent_time,
        "support": support,
        "true_support": int(jnp.sum(x_star != 0)),
        "lambda_max": lam_max,
    }
    if verbose:
        print(
            f"lambda_max = {lam_max:.4g}; grid of {n_grid} points, step {spacing:.3f} in log(lambda)"
        )
        print(
            f"grid search:           lambda = {np.exp(results['grid_theta']):.4g}, "
            f"validation loss {results['grid_loss']:.6g} ({grid_time:.2f} s, compile included)"
        )
        print(
            f"hypergradient descent: lambda = {np.exp(theta):.4g}, validation loss "
            f"{selected_loss:.6g} ({descent_time:.2f} s, compile included); "
            f"support {support} (true {results['true_support']})"
        )
        print(
            f"|log lambda - grid best| = {abs(theta - results['grid_theta']):.3f} "
            f"(<= one grid step: {abs(theta - results['grid_theta']) <= spacing}); "
            f"relative loss gap {(selected_loss - results['grid_loss']) / results['grid_loss']:+.2e}"
        )
    return results


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
