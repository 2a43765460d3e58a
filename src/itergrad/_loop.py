"""The forward loop shared by every estimator.

One `while_loop` over solver states: every estimator sees the same iterates and
the same number of steps; they differ only in how (and whether) gradients flow
through it.
"""

from typing import Any, Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Int, PyTree, Real

from ._solution import RESULTS
from ._tree import tree_norm
from .solvers._base import AbstractSolver, State, tree_isfinite


class LoopOutput(eqx.Module):
    """The forward loop's result.

    `state` is the final `State(z, aux)`. `history` holds the last `keep`
    states *before* the final one (unknowns and auxiliary state: a step cannot
    be replayed without both), in a ring buffer indexed by step number modulo
    `keep` (the state entering step `i` is stored at `i % keep`); `None` when
    `keep == 0`.
    """

    state: State
    history: State | None
    steps: Int[Array, ""]
    residual: Real[Array, ""]
    result: RESULTS
    # Set by estimators that differentiate only the last steps (OneStep,
    # Truncated): how many were differentiated.
    differentiated_steps: Int[Array, ""] | None = None
    # Set by `Truncated("auto")`: the estimated contraction factor.
    contraction: Real[Array, ""] | None = None
    # Set by OneStep/Truncated: ||z_{k-1-i} - z_k|| for the replayed states
    # i < K (0 beyond), for the error estimate.
    replay_gaps: Real[Array, " K"] | None = None
    # Set by `Auto`: which estimator it used (`_auto.ONE_STEP`, `TRUNCATED`,
    # `IMPLICIT`).
    estimator: Int[Array, ""] | None = None


class LoopSettings(eqx.Module):
    """The loop's stopping rule: at most `max_steps` steps; stop once
    `solver.residual_norm <= atol + rtol * ||x_{k+1}||`."""

    max_steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)


def history_entry(
    history: State, steps: Int[Array, ""], back: Int[Array, ""], keep: int
) -> State:
    """The state $s_{k-b}$, `b = back`, from a ring buffer of size `keep`
    (valid when `1 <= back <= min(steps, keep)`)."""
    index = (steps - back) % keep
    return jtu.tree_map(lambda buf: buf[index], history)


def run_loop(
    solver: AbstractSolver,
    state0: State,
    theta: PyTree[Any],
    settings: LoopSettings,
    *,
    keep: int = 0,
    kind: Literal["lax", "checkpointed"] = "lax",
    checkpoints: int | None = None,
) -> LoopOutput:
    """Iterate `solver.step` from `state0` until convergence, failure or
    `settings.max_steps`.

    `kind="lax"` is a plain `lax.while_loop` (forward-mode differentiable);
    `kind="checkpointed"` is reverse-mode differentiable with `checkpoints`
    stored states (`None`: chosen from `max_steps`).
    """
    inputs_finite = tree_isfinite(state0.z) & tree_isfinite(theta)
    if keep > 0:
        history = jtu.tree_map(
            lambda leaf: jnp.zeros((keep,) + jnp.shape(leaf), jnp.result_type(leaf)),
            state0,
        )
    else:
        history = None
    dtype = jnp.result_type(*[x for x in jtu.tree_leaves(solver.value(state0.z))])
    init = (
        state0,
        history,
        jnp.array(0),
        jnp.array(jnp.inf, dtype=dtype),
        # The loop starts "failed" on non-finite inputs so that it never runs.
        RESULTS.where(inputs_finite, RESULTS.max_steps_reached, RESULTS.nonfinite),
        ~inputs_finite,
    )

    def cond_fun(carry):
        *_, steps, _, _, done = carry
        return (~done) & (steps < settings.max_steps)

    def body_fun(carry):
        state, history, steps, _, _, _ = carry
        if keep > 0:
            slot = steps % keep
            history = jtu.tree_map(
                lambda buf, leaf: buf.at[slot].set(leaf), history, state
            )
        new_z, new_aux = solver.step(state.z, state.aux, theta)
        new_state = State(new_z, new_aux)
        residual = jnp.asarray(
            solver.residual_norm(state.z, new_z, new_aux, theta), dtype=dtype
        )
        scale = tree_norm(solver.value(new_z))
        # An overflowing iterate (its norm is inf) must not make the
        # tolerance infinite and "converge".
        converged = (residual <= settings.atol + settings.rtol * scale) & jnp.isfinite(scale)
        finite = tree_isfinite(new_z) & jnp.isfinite(residual)
        status = solver.status(new_aux)
        result = RESULTS.where(
            finite,
            RESULTS.where(
                status == RESULTS.successful,
                RESULTS.where(
                    converged, RESULTS.successful, RESULTS.max_steps_reached
                ),
                status,
            ),
            RESULTS.nonfinite,
        )
        done = converged | (~finite) | (status != RESULTS.successful)
        return new_state, history, steps + 1, residual, result, done

    if kind == "lax":
        final = jax.lax.while_loop(cond_fun, body_fun, init)
    else:
        final = eqxi.while_loop(
            cond_fun,
            body_fun,
            init,
            max_steps=settings.max_steps,
            kind="checkpointed",
            checkpoints=checkpoints,
        )
    state, history, steps, residual, result, _ = final
    return LoopOutput(state, history, steps, residual, result)


def run_loop_without_gradient(
    solver: AbstractSolver,
    state0: State,
    theta: PyTree[Any],
    settings: LoopSettings,
    *,
    keep: int = 0,
) -> LoopOutput:
    """`run_loop` with no derivative flowing into it from anywhere.

    Stopping gradients on `state0` and `theta` is not enough: the solver's
    objective or the user's `F` may close over arrays that are being
    differentiated (e.g. the design matrix of a problem), and reverse-mode AD
    would then try to go through the `while_loop` and fail. Closure conversion
    turns everything the loop closes over into explicit leaves, which are then
    stopped too.
    """

    def forward(state0, theta):
        return run_loop(solver, state0, theta, settings, keep=keep)

    state0, theta = jax.lax.stop_gradient((state0, theta))
    forward = eqx.filter_closure_convert(forward, state0, theta)
    forward = jtu.tree_map(
        lambda leaf: jax.lax.stop_gradient(leaf) if eqx.is_array(leaf) else leaf,
        forward,
    )
    return forward(state0, theta)
