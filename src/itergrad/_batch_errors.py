"""Runtime errors that say how many instances of a `vmap` batch failed.

`equinox`'s `error_if` under `jax.vmap` raises if any instance failed, with
the message of one of them, and no word of how many. Here the count is taken
across every `vmap` level by a small primitive, `unvmap_sum` (the summing
sibling of `equinox.internal.unvmap_any`/`unvmap_max`), and encoded into the
index of the message, which a lazily formatted message table turns back into
text when (and only when) the error is raised.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.extend.core
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.interpreters import batching, mlir
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree

from ._solution import RESULTS

# Counts above this are printed as "at least COUNT_CAP": the message index
# (result + R * (failed + (COUNT_CAP + 1) * total)) must fit in an int32.
COUNT_CAP = 9_999

unvmap_sum_p = jax.extend.core.Primitive("itergrad_unvmap_sum")


def unvmap_sum(x: Int[ArrayLike, "..."]) -> Int[Array, ""]:
    """As `jnp.sum`, but also over every `vmap` batch dimension: the same
    scalar for every instance."""
    return unvmap_sum_p.bind(x)  # type: ignore[return-value]


def _unvmap_sum_impl(x):
    return jnp.sum(x, dtype=x.dtype)


def _unvmap_sum_abstract_eval(x):
    return ShapedArray(shape=(), dtype=x.dtype)


def _unvmap_sum_batch(x, batch_axes):
    del batch_axes
    (x,) = x
    # Bound again: an enclosing vmap sums its own axis in turn.
    return unvmap_sum(x), None


unvmap_sum_p.def_impl(_unvmap_sum_impl)
unvmap_sum_p.def_abstract_eval(_unvmap_sum_abstract_eval)
batching.primitive_batchers[unvmap_sum_p] = _unvmap_sum_batch
mlir.register_lowering(
    unvmap_sum_p, mlir.lower_fun(_unvmap_sum_impl, multiple_results=False)
)


@dataclasses.dataclass(frozen=True)
class _BatchMessages(Sequence):
    """`RESULTS`' messages, each prefixed by how many instances failed: index
    `result + R * (failed + (COUNT_CAP + 1) * total)`, formatted on demand (the
    table is never built)."""

    def _messages(self) -> list[str]:
        return RESULTS._index_to_message  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self._messages()) * (COUNT_CAP + 1) ** 2

    def __getitem__(self, index: Any) -> str:  # type: ignore[override]
        messages = self._messages()
        rest, result = divmod(int(index), len(messages))
        total, failed = divmod(rest, COUNT_CAP + 1)
        message = messages[result]
        if total <= 1:
            return message
        def count(n):
            return f"at least {COUNT_CAP}" if n >= COUNT_CAP else str(n)
        return (
            f"{count(failed)} of {count(total)} instances of the batch failed "
            f"(`vmap`); with `throw=False` each instance's `Solution.result` says "
            f"which. One of them: {message}"
        )


_MESSAGES = _BatchMessages()


def error_if_failed(
    token: PyTree[Array], result: RESULTS, failed: Bool[Array, ""]
) -> PyTree[Array]:
    """`result.error_if(token, failed)`, whose message, under `vmap`, starts
    with how many of the batch's instances failed."""
    n_results = len(RESULTS._index_to_message)  # type: ignore[attr-defined]
    failed_i = failed.astype(jnp.int32)
    n_failed = jnp.minimum(unvmap_sum(failed_i), COUNT_CAP)
    # `failed_i * 0 + 1`, not `ones_like`: a constant would not be batched,
    # and would count one instance.
    n_total = jnp.minimum(unvmap_sum(failed_i * 0 + 1), COUNT_CAP)
    value = result._value  # type: ignore[attr-defined]
    index = value + n_results * (n_failed + (COUNT_CAP + 1) * n_total)
    return eqx.branched_error_if(token, failed, index, _MESSAGES)
