"""Quickstart: differentiate gradient descent on a weighted ridge problem with
every itergrad estimator and compare each Jacobian with the exact one.

    python examples/quickstart.py

The step map is F(x, theta) = x - alpha * grad f_theta(x) with
f_theta(x) = 1/2 sum_i theta_i (y_i - <a_i, x>)^2 + lambda/2 ||x||^2, whose
solution and Jacobian have closed forms. One-step is biased by about
rho / (1 - rho) here (gradient descent is slow); Truncated(K) and Implicit are
not.
"""

import time

import jax
import jax.numpy as jnp
import jax.random as jr
from rich.console import Console
from rich.table import Table

import itergrad as ig


def main() -> None:
    jax.config.update("jax_enable_x64", True)
    n_samples, n_features, lam = 50, 5, 1.0
    ka, ky = jr.split(jr.key(0))
    A = jr.normal(ka, (n_samples, n_features))
    y = jr.normal(ky, (n_samples,))
    theta = jnp.ones(n_samples)
    L = float(jnp.linalg.eigvalsh(A.T @ A + lam * jnp.eye(n_features))[-1])
    mu = float(jnp.linalg.eigvalsh(A.T @ A + lam * jnp.eye(n_features))[0])
    alpha = 2.0 / (L + mu)

    def F(x, theta):
        return x - alpha * (A.T @ (theta * (A @ x - y)) + lam * x)

    def exact_jacobian(theta):
        H = A.T @ (theta[:, None] * A) + lam * jnp.eye(n_features)
        x_bar = jnp.linalg.solve(H, A.T @ (theta * y))
        # d x_bar / d theta_i = H^{-1} a_i (y_i - <a_i, x_bar>)
        return jnp.linalg.solve(H, A.T * (y - A @ x_bar))

    exact = exact_jacobian(theta)
    rho = 1 - 2 * mu / (L + mu)
    estimators = {
        "Unroll (reverse)": (ig.Unroll(), jax.jacrev),
        "Unroll (forward)": (ig.Unroll("forward"), jax.jacfwd),
        "Implicit": (ig.Implicit(), jax.jacrev),
        "Implicit + Neumann(10) (IAD)": (
            ig.Implicit(linear_solver=ig.Neumann(10), condition="fixed_point"),
            jax.jacrev,
        ),
        "OneStep": (ig.OneStep(), jax.jacrev),
        "Truncated(5)": (ig.Truncated(5), jax.jacrev),
        "Truncated(20)": (ig.Truncated(20), jax.jacrev),
    }
    table = Table(title=f"Jacobian of x(theta), gradient descent, rho = {rho:.3f}")
    table.add_column("estimator")
    table.add_column("steps", justify="right")
    table.add_column("relative Jacobian error", justify="right")
    table.add_column("time (ms, compiled)", justify="right")
    for name, (estimator, transform) in estimators.items():

        def value(t, estimator=estimator):
            return ig.iterate(
                F, jnp.zeros(n_features), t, estimator=estimator,
                max_steps=1000, rtol=1e-12, atol=1e-12,
            ).value

        jacobian = jax.jit(transform(value))
        jac = jax.block_until_ready(jacobian(theta))
        start = time.perf_counter()
        jac = jax.block_until_ready(jacobian(theta))
        elapsed = 1e3 * (time.perf_counter() - start)
        steps = ig.iterate(F, jnp.zeros(n_features), theta, max_steps=1000, rtol=1e-12, atol=1e-12).steps
        error = float(jnp.linalg.norm(jac - exact) / jnp.linalg.norm(exact))
        table.add_row(name, str(int(steps)), f"{error:.2e}", f"{elapsed:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
