"""Shared oracles and comparison helpers for the tests (DESIGN.md §7)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


def tree_allclose(a, b, *, rtol=1e-10, atol=1e-10) -> bool:
    """True when two pytrees have the same structure and close leaves."""
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
    )


def relative_error(estimate, reference) -> float:
    """||estimate - reference|| / ||reference|| (Frobenius, over all leaves)."""
    est = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(estimate)])
    ref = jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(reference)])
    return float(jnp.linalg.norm(est - ref) / jnp.linalg.norm(ref))


def central_difference_jacobian(f, theta, eps=1e-6):
    """Jacobian of a vector function of a flat vector by central differences
    (float64): column j is (f(theta + eps e_j) - f(theta - eps e_j)) / 2 eps."""
    theta = jnp.asarray(theta)
    columns = []
    for j in range(theta.size):
        e = jnp.zeros_like(theta).at[j].set(eps)
        columns.append((f(theta + e) - f(theta - e)) / (2 * eps))
    return jnp.stack(columns, axis=-1)


def linear_contraction(key, n, m, rho, dtype=jnp.float64):
    """The oracle F(x, theta) = A x + B theta + c with ||A||_op = rho.

    Returns (F, A, B, c). Closed forms: the fixed point is (I - A)^{-1}(B theta
    + c), its Jacobian (I - A)^{-1} B; one-step gives B, K-step truncation
    sum_{i<K} A^i B.
    """
    ka, kb, kc = jr.split(key, 3)
    A = jr.normal(ka, (n, n), dtype)
    A = rho * A / jnp.linalg.norm(A, ord=2)
    B = jr.normal(kb, (n, m), dtype)
    c = jr.normal(kc, (n,), dtype)

    def F(x, theta):
        return A @ x + B @ theta + c

    return F, A, B, c


def truncated_jacobian(A, B, K):
    """sum_{i<K} A^i B."""
    total = jnp.zeros_like(B)
    term = B
    for _ in range(K):
        total = total + term
        term = A @ term
    return total


def jacobian_fn(f, mode):
    return {"fwd": jax.jacfwd, "rev": jax.jacrev}[mode](f)
