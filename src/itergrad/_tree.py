"""Small pytree arithmetic used across the package."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar


def tree_sub(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda u, v: u - v, a, b)


def tree_norm(tree: PyTree[Array]) -> Scalar:
    """The Euclidean norm of all leaves stacked into one vector.

    Written as max * ||x / max|| so that it neither overflows nor underflows,
    and with a safe zero so that its derivative at 0 is 0 instead of NaN.
    """
    leaves = [jnp.ravel(x) for x in jtu.tree_leaves(tree)]
    if not leaves:
        return jnp.array(0.0)
    flat = jnp.concatenate([jnp.abs(x) for x in leaves])
    scale = jnp.max(flat)
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.where(
        scale > 0, safe_scale * jnp.sqrt(jnp.sum((flat / safe_scale) ** 2)), 0.0
    )


def tree_where(pred: Any, a: PyTree[Any], b: PyTree[Any]) -> PyTree[Any]:
    return jtu.tree_map(lambda u, v: jnp.where(pred, u, v), a, b)


def inexact_part(tree: PyTree[Any]) -> tuple[PyTree[Any], PyTree[Any]]:
    """Split `tree` into (floating-point arrays, everything else)."""
    return eqx.partition(tree, eqx.is_inexact_array)


def tree_freeze(tree: PyTree[Any]) -> PyTree[Any]:
    """`jax.lax.stop_gradient` on every array leaf of `tree`, leaving other
    leaves (functions, Python numbers, static fields) as they are."""
    return jtu.tree_map(
        lambda leaf: jax.lax.stop_gradient(leaf) if eqx.is_array(leaf) else leaf, tree
    )
