"""Raise on a failed solve whichever part of the output is used.

`result.error_if(x, failed)` alone guards the *primal* output. Under
`jax.jit(jax.grad(loss))` the primal output of the solve is often not needed
by the backward pass, XLA removes the check, and a failed solve returns a
gradient without an error. `guard` ties the same check to the derivative
path: its tangent (and therefore its cotangent, by transposition) is the
input's tangent times a flag that only the check can produce, so any
derivative computed from the output keeps the check alive. Under `vmap` the
message starts with how many instances failed (`itergrad._batch_errors`).
"""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree

from ._batch_errors import error_if_failed
from ._solution import RESULTS


def guard(tree: PyTree[Array], result: RESULTS, failed: Bool[Array, ""]) -> PyTree[Array]:
    """`tree`, raising `result`'s message when `failed`, in the forward pass
    and in every derivative of `tree` (forward and reverse mode)."""
    return _guarded(error_if_failed(tree, result, failed), result, failed)


@eqx.filter_custom_jvp
def _guarded(tree, result, failed):
    del result, failed
    return tree


@_guarded.def_jvp
def _guarded_jvp(primals, tangents):
    tree, result, failed = primals
    t_tree, _, _ = tangents
    # A factor that is exactly one but can only be produced by the check: any
    # derivative of the output depends on it, so the check cannot be removed.
    one = error_if_failed(jnp.ones(()), result, failed)

    def scale(t, x):
        return None if t is None else t * one.astype(jnp.result_type(x))

    t_out = jtu.tree_map(scale, t_tree, tree, is_leaf=lambda t: t is None)
    return tree, t_out
