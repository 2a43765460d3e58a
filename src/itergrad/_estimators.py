"""Derivative estimators built from `stop_gradient` alone: unrolling, one-step
and truncated differentiation. (Implicit differentiation lives in
`_implicit.py`.)"""

import abc
import dataclasses
from typing import Any, Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree, Real

from ._implicit_rule import implicit_unknowns, valid_point
from ._loop import (
    LoopOutput,
    LoopSettings,
    history_entry,
    run_loop,
    run_loop_without_gradient,
)
from ._neumann import NeumannTail
from ._solution import RESULTS
from ._spectral import (
    DEFAULT_MAX_K,
    DEFAULT_MAX_TAIL,
    DEFAULT_POWER_ITERATIONS,
    needed_truncation,
    solver_contraction,
)
from ._tree import tree_norm, tree_sub, tree_where
from ._validate import nonnegative_int, positive_int
from .solvers._base import AbstractSolver, State


def _stop(tree: PyTree[Any]) -> PyTree[Any]:
    return jax.lax.stop_gradient(tree)


def attach_derivative(primal: PyTree[Any], live: PyTree[Any]) -> PyTree[Any]:
    """Return `primal`'s values carrying `live`'s derivative.

    Computed as `stop_gradient(primal) + (live - stop_gradient(live))`: the
    bracket is exactly zero in floating point, so the value is bit-for-bit the
    forward loop's iterate while every derivative (of any order) is `live`'s.
    """
    p_dyn, p_static = eqx.partition(primal, eqx.is_inexact_array)
    l_dyn, _ = eqx.partition(live, eqx.is_inexact_array)
    out = jax.tree_util.tree_map(
        lambda p, lv: _stop(p) + (lv - _stop(lv)), p_dyn, l_dyn
    )
    return eqx.combine(out, p_static)


def replay_last_steps(
    out: LoopOutput,
    K: int,
    live_steps: Int[Array, ""],
    solver: AbstractSolver,
    state0: State,
    theta: PyTree[Any],
) -> tuple[PyTree[Any], Real[Array, " K"]]:
    """The final unknowns carrying the derivative of the last `live_steps`
    steps of a forward loop that kept `K` states (`live_steps <= K`, may be
    traced): the steps are replayed from the stored $(z_{k-K'}, a_{k-K'})$,
    $K' = \\min(\\text{live\\_steps}, k)$, with gradients live. When $k$ is
    smaller, the replay starts from `state0`, so `x0`'s dependence on `theta`
    is kept, as in `Unroll`. Also returns the distances of the replayed
    states to $z_k$ (see `_replay_gaps`).

    A failed solve (non-finite, infeasible, non-convex, stalled, a failed
    line search: not `valid_point`) gets a zero derivative, as with
    `Implicit`, and no step is differentiated at its last states: nothing is
    replayed (`live_steps = 0`) and the masked replay starts from `state0`,
    so that no derivative is evaluated where the failure happened (there a
    zero cotangent times an infinite partial is NaN: a stalled float32 QP in
    a `vmap` batch made Lineax's transposed solve raise for the whole
    batch)."""
    steps = out.steps
    valid = valid_point(out.result)
    live_steps = jnp.where(valid, jnp.minimum(steps, live_steps), 0)
    assert out.history is not None  # keep=K >= 1 states were stored
    start = tree_where(
        valid & (steps > live_steps),
        history_entry(out.history, steps, live_steps, K),
        state0,
    )

    def replay(i, state):
        # Masked so that exactly `live_steps` steps are differentiated; masked
        # iterations leave the state (and its derivative) untouched.
        stepped = State(*solver.step(state.z, state.aux, theta))
        return tree_where(i >= K - live_steps, stepped, state)

    live = jax.lax.fori_loop(0, K, replay, start)
    # Failed: `state0` may depend on theta (a solver's own starting point):
    # its derivative is dropped too.
    live_z = tree_where(valid, live.z, jax.lax.stop_gradient(live.z))
    # Only the unknowns carry a derivative; the auxiliary state is returned
    # as the forward loop left it.
    return attach_derivative(out.state.z, live_z), _replay_gaps(out, K, live_steps)


def _replay_gaps(out: LoopOutput, K: int, live_steps: Int[Array, ""]) -> Real[Array, " K"]:
    """$\\|z_{k-1-i} - z_k\\|$ for the differentiated states $i <$
    `live_steps` (0 beyond): how far from $z_k$ each replayed Jacobian was
    evaluated (used by the error estimate)."""
    history = out.history
    assert history is not None
    z_k = _stop(out.state.z)

    def gap(i):
        state = history_entry(history, out.steps, i + 1, K)
        return jnp.where(i < live_steps, tree_norm(tree_sub(_stop(state.z), z_k)), 0.0)

    return jax.vmap(gap)(jnp.arange(K))


def truncate(
    K: int, solver: AbstractSolver, state0: State, theta: PyTree[Any], settings: LoopSettings
) -> tuple[State, LoopOutput]:
    """Run the loop without gradients keeping `K` states; differentiate its
    last `K` steps."""
    out = run_loop_without_gradient(solver, state0, theta, settings, keep=K)
    z, gap = replay_last_steps(out, K, jnp.array(K), solver, state0, theta)
    out = dataclasses.replace(
        out, differentiated_steps=jnp.minimum(out.steps, K), replay_gaps=gap
    )
    return State(z, out.state.aux), out


def measure_truncation(
    solver: AbstractSolver,
    state0: State,
    theta: PyTree[Any],
    settings: LoopSettings,
    max_K: int,
    target: float,
    power_iterations: int,
    cap: int,
) -> tuple[LoopOutput, Real[Array, ""], Int[Array, ""]]:
    """The forward loop without gradients keeping `max_K` states, the
    contraction factor $\rho$ at its final unknowns and the truncation $K$
    that meets `target` (`cap + 1` when none up to `cap` does); shared by
    `Truncated("auto")` and `Auto`."""
    out = run_loop_without_gradient(solver, state0, theta, settings, keep=max_K)
    # Power iteration starts from the last step z_k - z_{k-1}: for a
    # linearly converging iteration it is dominated by the slowest mode,
    # i.e. it is already close to the vector sought (and it needs no
    # random key).
    assert out.history is not None
    previous = history_entry(out.history, out.steps, jnp.array(1), max_K).z
    rho = solver_contraction(
        solver, _stop(out.state), _stop(theta), power_iterations,
        start=_stop(tree_sub(out.state.z, previous)),
    )
    return out, rho, needed_truncation(rho, target, cap)


class AbstractEstimator(eqx.Module):
    """A way to differentiate the output of an iterative solver.

    An estimator turns "run the loop" into a state whose derivative with respect
    to `theta` is the estimator's; the primal value is always the forward
    loop's last iterate.
    """

    @abc.abstractmethod
    def run(
        self,
        solver: AbstractSolver,
        state0: State,
        theta: PyTree[Any],
        settings: LoopSettings,
    ) -> tuple[State, LoopOutput]:
        """Return `(final state with differentiable unknowns, forward loop
        output)`."""


class Unroll(AbstractEstimator):
    """Automatic differentiation through every step (Algorithm 1).

    The derivative is the piggyback recursion (eq. 2),
    $J_\\theta x_{i+1} = J_x F(x_i, \\theta) J_\\theta x_i + J_\\theta F(x_i, \\theta)$,
    accumulated over all $k$ steps, including the dependence of $x_0$ on
    $\\theta$.

    **Arguments:**

    - `mode`: `"reverse"` (default) differentiates with reverse mode (`grad`,
      `jacrev`, `vjp`) through a checkpointed loop: time $k\\omega C_F$, memory
      growing with the number of stored states. `"forward"` supports forward
      mode only (`jvp`, `jacfwd`): time $k \\omega C_F m$, memory $n + m$.
    - `checkpoints`: with `mode="reverse"`, how many states to store (fewer:
      less memory, more recomputation). `None` (default) stores enough to
      never recompute more than about twice, chosen from `max_steps`.

    !!! warning

        Each mode supports only its own direction of AD: reverse mode through
        `mode="forward"` (or forward mode through `mode="reverse"`) raises. The
        estimate converges linearly to $J_\\theta \\bar x$ but lags behind the
        iterates (the burn-in effect).
    """

    mode: Literal["reverse", "forward"] = eqx.field(static=True, default="reverse")
    checkpoints: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.mode not in ("reverse", "forward"):
            raise ValueError(
                f"Unroll(mode=...) must be 'reverse' or 'forward', got {self.mode!r}."
            )
        if self.checkpoints is not None:
            positive_int(self.checkpoints, "Unroll(checkpoints=...)")

    def run(self, solver, state0, theta, settings):
        if self.mode == "forward":
            out = run_loop(solver, state0, theta, settings, kind="lax")
            # JAX only fails when it transposes the while_loop, with a message
            # that names neither the estimator nor the fix; a cotangent
            # reaching the loop's output raises this one first (transposition
            # runs from the outputs back).
            dynamic, static = eqx.partition(out.state, eqx.is_inexact_array)
            dynamic = eqxi.nondifferentiable_backward(dynamic, msg=_FORWARD_UNDER_REVERSE)
            return eqx.combine(dynamic, static), out
        try:
            out = run_loop(
                solver,
                state0,
                theta,
                settings,
                kind="checkpointed",
                checkpoints=self.checkpoints,
            )
        except TypeError as e:
            # Raised while tracing the checkpointed loop (a custom_vjp) under
            # jvp: say which estimator and what to use instead.
            if "forward-mode autodiff" not in str(e):
                raise
            raise TypeError(_REVERSE_UNDER_FORWARD) from e
        return out.state, out


_FORWARD_UNDER_REVERSE = (
    "Unroll('forward') supports forward-mode differentiation only (jax.jvp, "
    "jax.jacfwd): its loop is a lax.while_loop, which JAX cannot differentiate in "
    "reverse mode. For jax.grad, jax.jacrev or jax.vjp use Unroll() "
    "(mode='reverse'), or another estimator (OneStep(), Truncated(K), Implicit())."
)
_REVERSE_UNDER_FORWARD = (
    "Unroll() (mode='reverse') supports reverse-mode differentiation only (jax.grad, "
    "jax.jacrev, jax.vjp): its checkpointed loop is a custom_vjp, which JAX cannot "
    "differentiate in forward mode. For jax.jvp or jax.jacfwd use Unroll('forward'), "
    "or another estimator (OneStep(), Truncated(K), Implicit())."
)


class Truncated(AbstractEstimator):
    """Differentiate only the last `K` steps (truncated backpropagation).

    The loop runs under `stop_gradient`; then the last $K$ steps are replayed
    from $x_{k-K}$ with gradients live. The derivative is
    $\\sum_{i=0}^{K-1} \\big(\\prod_{j<i} J_x F(x_{k-1-j})\\big) J_\\theta F(x_{k-1-i})$,
    i.e. the one-step estimator of $F_\\theta^K$, whose contraction factor is
    $\\rho^K$ (Corollary 1 with $\\rho^K$). When $k < K$ every step is
    differentiated, including $x_0$'s dependence on $\\theta$, as `Unroll`.

    Cost: $K \\omega C_F$ time and $K n$ memory for the stored states; every AD
    mode works (plain `stop_gradient` program, no custom rule).

    **Automatic K.** `Truncated("auto", target=1e-4)` estimates
    $\\rho = \\|J_z F(z_k, \\theta)\\|_{op}$ at the final unknowns by
    `power_iterations` steps of matrix-free power iteration (one JVP and one
    VJP of $F$ each, inside the same jitted computation; reported as
    `sol.stats["contraction"]`) and differentiates the smallest number of
    steps $K = \\lceil \\log(t / (1 + t)) / \\log \\rho \\rceil$, $t$ = `target`,
    for which the relative truncation bias bound $\\rho^K / (1 - \\rho^K) \\le t$
    (at the fixed point the truncation error is exactly
    $J_z F^K \\, J_\\theta \\bar z$, so the relative error is at most $\\rho^K$;
    the criterion keeps a $1/(1-\\rho^K)$ margin, as Corollary 1 does).
    `sol.stats["differentiated_steps"]` is the $K$ used.

    - $K \\le$ `max_K`: the last $K$ steps are replayed from the stored states
      (a static ring buffer of `max_K` states; `max_K` masked steps).
    - `max_K` $< K \\le$ `max_K + max_tail`: the truncated sum
      $\\sum_{i<K} J_z F^i J_\\theta F$ is continued with the Jacobians frozen at
      $z_k$, a $K$-term Neumann series (memory $n$, $K$ Jacobian-vector
      products per derivative direction), so targets are met at
      $\\rho = 0.999$ without storing $K$ states. Its difference from the
      replayed sum is $O(\\|z_k - \\bar z\\|)$ (the Jacobians barely change
      once the iteration has converged).
    - Otherwise the target cannot be met: the result is
      `RESULTS.not_contracting` when $\\rho \\ge 1$ (the estimators' theory
      does not hold) and `RESULTS.truncation_target_unreachable` otherwise,
      raising with `throw=True`; never a silently larger error.

    **Arguments:**

    - `K`: the number of differentiated steps, a positive integer, or
      `"auto"`.
    - `target`: (`"auto"` only) the relative bias to reach; default `1e-4`.
    - `max_K`: (`"auto"` only) the number of stored states, a static positive
      integer; default `100` (the same default as `diagnose`).
    - `max_tail`: (`"auto"` only) the most Neumann terms beyond `max_K`;
      default `20_000`.
    - `power_iterations`: (`"auto"` only) power-iteration steps for $\\rho$;
      default `30` (as `diagnose`), started from the last step
      $z_k - z_{k-1}$ mixed with a fixed generic vector, so that no random
      key is needed and the estimate is deterministic.

    !!! warning

        Biased when the iteration contracts slowly: by about
        $\\rho^K L_F / (1 - \\rho^K)$ (Corollary 1). With `"auto"`, $\\rho$ is
        estimated by power iteration from the last step (whose slowest mode
        dominates) and corrected upwards by the eigenpair's residual, which
        over-estimates it once the iteration has found the top singular
        vector's neighbourhood (slower when the top singular values of
        $J_z F$ are clustered); $\\rho$ is local to $z_k$, so where $J_z F$
        varies strongly along the path $K$ may still come out a little small.
    """

    K: int | Literal["auto"] = eqx.field(static=True)
    target: float | None = eqx.field(static=True, default=None)
    max_K: int | None = eqx.field(static=True, default=None)
    max_tail: int | None = eqx.field(static=True, default=None)
    power_iterations: int = eqx.field(static=True, default=DEFAULT_POWER_ITERATIONS)

    def __check_init__(self):
        if self.K == "auto":
            target = 1e-4 if self.target is None else self.target
            max_K = DEFAULT_MAX_K if self.max_K is None else self.max_K
            if isinstance(target, bool) or not isinstance(target, int | float) or not (
                0 < target
            ):
                raise ValueError(
                    "Truncated('auto', target=...) needs a positive relative bias "
                    f"target such as 1e-4, got {self.target!r}."
                )
            positive_int(max_K, "Truncated('auto', max_K=...)")
            if self.max_tail is not None:
                nonnegative_int(self.max_tail, "Truncated('auto', max_tail=...)")
            positive_int(self.power_iterations, "Truncated('auto', power_iterations=...)")
            return
        if not isinstance(self.K, int) or isinstance(self.K, bool) or self.K < 1:
            raise ValueError(
                f"Truncated(K) needs a positive integer K or 'auto', got {self.K!r}."
            )
        if self.target is not None or self.max_K is not None or self.max_tail is not None:
            raise ValueError(
                "Truncated(K, target=..., max_K=...): `target` and `max_K` only "
                f"apply to Truncated('auto'); with a fixed K={self.K} drop them."
            )

    def run(self, solver, state0, theta, settings):
        if self.K != "auto":
            return truncate(self.K, solver, state0, theta, settings)
        target = 1e-4 if self.target is None else float(self.target)
        max_K = DEFAULT_MAX_K if self.max_K is None else self.max_K
        max_tail = DEFAULT_MAX_TAIL if self.max_tail is None else self.max_tail
        cap = max_K + max_tail
        out, rho, needed = measure_truncation(
            solver, state0, theta, settings, max_K, target, self.power_iterations, cap
        )
        replayed, gap = replay_last_steps(
            out, max_K, jnp.minimum(needed, max_K), solver, state0, theta
        )
        # Beyond the stored states the truncated sum sum_{i<K} J^i J_theta F
        # is continued with the Jacobians frozen at z_k: a K-term Neumann
        # series (memory n, K products), used only when K > max_K (with 0
        # terms otherwise). Both are computed: a `lax.cond` here made
        # Lineax's non-finite check fire under `vmap` of Newton and QP cells
        # (tests/test_matrix.py), not investigated further.
        use_tail = (needed > max_K) & (needed <= cap)
        tail = implicit_unknowns(
            solver, out.state, theta, "fixed_point",
            NeumannTail(jnp.where(use_tail, needed, 0)), frozenset(), False,
        )
        z = tree_where(use_tail, tail, replayed)
        failure = RESULTS.where(
            rho >= 1, RESULTS.not_contracting, RESULTS.truncation_target_unreachable
        )
        result = RESULTS.where(
            (out.result == RESULTS.successful) & (needed > cap), failure, out.result
        )
        out = dataclasses.replace(
            out,
            result=result,
            differentiated_steps=jnp.where(use_tail, needed, jnp.minimum(needed, out.steps)),
            contraction=rho,
            replay_gaps=jnp.where(use_tail, 0.0, gap),
        )
        return State(z, out.state.aux), out


class OneStep(AbstractEstimator):
    """One-step differentiation (Algorithm 3), a.k.a. Jacobian-free backprop.

    The loop runs under `stop_gradient` and only the last step is
    differentiated: $J^{OS} x_k(\\theta) = J_\\theta F(x_{k-1}, \\theta)$ (eq. 4).
    Cost: one extra differentiated step, $\\omega C_F$; memory $n$; every AD
    mode, `vmap` and `jit` work (no custom rule). Equal to `Truncated(1)`.

    !!! warning

        For a linearly convergent iteration with contraction factor $\\rho$ the
        estimate is biased: $\\|J^{OS} - J_\\theta \\bar x\\| \\le \\rho L_F/(1-\\rho)
        + L_J \\|x_{k-1} - \\bar x\\|$ (Corollary 1). It is accurate for fast
        algorithms (Newton, interior point: $\\le L_J \\|x_{k-1} - \\bar x\\|$,
        Corollary 3), not for slow ones such as gradient descent on an
        ill-conditioned problem: use `Truncated(K)` or `Implicit` there.
        Higher derivatives (e.g. a Hessian) are those of the estimator
        $\\theta \\mapsto F(x_{k-1}, \\theta)$, not of $\\bar x(\\theta)$.
    """

    def run(self, solver, state0, theta, settings):
        return truncate(1, solver, state0, theta, settings)
