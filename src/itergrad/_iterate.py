"""Entry points: `iterate` for a plain step map, `solve` for a solver."""

import numbers
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from ._auto import Auto
from ._batch_errors import error_if_failed
from ._error_bound import derivative_error_bound
from ._estimators import AbstractEstimator, OneStep
from ._guard import guard
from ._implicit import Implicit
from ._loop import LoopOutput, LoopSettings
from ._solution import RESULTS, Solution
from ._validate import nonnegative_float, step_bound
from .solvers._base import AbstractSolver, FixedPointIteration, State


def _check_settings(estimator, max_steps, rtol, atol) -> int:
    """Check the settings; return `max_steps` as a Python `int` (a NumPy
    integer would otherwise reach `LoopSettings`' static field as is)."""
    if not isinstance(estimator, AbstractEstimator):
        raise TypeError(
            "`estimator` must be an itergrad estimator (ig.OneStep(), "
            "ig.Truncated(K), ig.Implicit(), ig.Unroll()), got "
            f"{type(estimator).__name__}."
        )
    max_steps = step_bound(max_steps, "max_steps")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is None:
            continue
        if not isinstance(tol, int | float):
            raise ValueError(f"`{name}` must be a non-negative number, got {tol!r}.")
        nonnegative_float(tol, name)
    return max_steps


def _check_x0(x0: Any) -> None:
    """Refuse initial iterates that can only fail later, inside the user's `F`
    or a reduction over no elements, with an error naming no argument. Checked
    on shapes and pytree structure only: nothing runs."""
    leaves = jtu.tree_leaves(x0)
    if type(x0) in (list, tuple) and leaves and all(
        isinstance(leaf, numbers.Number) for leaf in leaves
    ):
        # A list is a pytree: each number would be a separate scalar unknown,
        # and F would receive a list, not an array.
        raise TypeError(
            f"`x0` is a {type(x0).__name__} of Python numbers, which would be a pytree "
            f"of {len(leaves)} separate scalar unknowns (F would receive a "
            f"{type(x0).__name__}): pass an array, e.g. `jnp.asarray(x0)`, or a "
            f"{type(x0).__name__} of arrays for a pytree of unknowns."
        )
    if not leaves:
        raise ValueError(
            f"`x0` is an empty pytree ({x0!r}): there are no unknowns to iterate on; "
            "pass the initial iterate, e.g. `jnp.zeros(n)`."
        )
    if all(np.size(leaf) == 0 for leaf in leaves):
        raise ValueError(
            "`x0` has no entries (every leaf has size 0, shapes "
            f"{[jnp.shape(leaf) for leaf in leaves]}): there are no unknowns to "
            "iterate on; pass at least one non-empty array."
        )


def _trace_step(solver: AbstractSolver, state0: State, theta: Any, what: str) -> State:
    """The shapes of one step from `state0`, traced only. A step that cannot
    even be traced (usually broadcasting `x0` against `theta`) is reported
    with the shapes of both arguments, the original error chained."""
    try:
        return State(*eqx.filter_eval_shape(solver.step, state0.z, state0.aux, theta))
    except (TypeError, ValueError) as e:
        # Only plain TypeError/ValueError (JAX's shape errors): subclasses such
        # as JAX's tracer errors have other constructors and other causes.
        if type(e) not in (TypeError, ValueError):
            raise
        raise type(e)(
            f"{what} failed on the unknowns from `x0` ({_shapes(state0.z)}) and "
            f"`theta` ({_shapes(theta)}): check that `x0` and `theta` have the "
            f"shapes and structure it expects. The error was: {e}"
        ) from e


def _shapes(tree: Any) -> str:
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_array_like))
    text = ", ".join(
        f"{jnp.result_type(leaf)}{list(jnp.shape(leaf))}" for leaf in leaves[:6]
    )
    return text + (", ..." if len(leaves) > 6 else "") if leaves else "no arrays"


def _check_optimality(solver: AbstractSolver, state0: State, theta: Any) -> None:
    """`Implicit(condition="optimality")` solves a square linear system in the
    unknowns z: an `optimality` residual of another structure or shape would be
    handed to Lineax, which either fails with a message about its own
    operators or solves it as least squares, silently wrong. Checked at trace
    time (shapes only, nothing runs). Dtypes are not compared: a residual
    promoted by a float64 `theta` is still square."""
    name = type(solver).__name__
    z = jax.eval_shape(lambda: state0.z)
    residual = eqx.filter_eval_shape(solver.optimality, state0.z, state0.aux, theta)
    if jtu.tree_structure(z) != jtu.tree_structure(residual) or any(
        a.shape != getattr(b, "shape", None)
        for a, b in zip(jtu.tree_leaves(z), jtu.tree_leaves(residual), strict=True)
    ):
        raise ValueError(
            f"{name}.optimality must return a residual with the structure and shapes "
            "of the unknowns z: Implicit(condition='optimality') solves the square "
            "system J_z G dz = -J_theta G dtheta in z. Fix `optimality`, or use "
            "`Implicit(condition='fixed_point')`.\n"
            f"  unknowns z:  {z}\n  optimality:  {residual}"
        )


def default_tolerance(z: PyTree[Array]) -> float:
    """The default `rtol` and `atol`: $\\max(10^{-10}, 100\\,\\epsilon)$, with
    $\\epsilon$ the machine epsilon of the lowest-precision leaf of the
    unknowns `z` (1e-10 in float64, 1.2e-5 in float32)."""
    eps = max(float(jnp.finfo(leaf.dtype).eps) for leaf in jtu.tree_leaves(z))
    return max(1e-10, 100 * eps)


def _check_structure(old, new, what):
    old_struct = jax.eval_shape(lambda: old)
    if jtu.tree_structure(old_struct) != jtu.tree_structure(new) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jtu.tree_leaves(old_struct), jtu.tree_leaves(new))
    ):
        raise ValueError(
            f"{what} must return a pytree of the same structure, shapes and "
            f"dtypes as its input.\n  input:  {old_struct}\n  output: {new}"
        )


def solve(
    solver: AbstractSolver,
    x0: PyTree[Array] | None,
    theta: PyTree[Any],
    *,
    estimator: AbstractEstimator = OneStep(),
    max_steps: int = 100,
    rtol: float | None = None,
    atol: float | None = None,
    throw: bool = True,
    error_estimate: bool = False,
) -> Solution:
    """Run `solver` from `x0` and return its last iterate, differentiable in
    `theta` according to `estimator`.

    The forward pass is the same for every estimator: states
    $s_{i+1} = F(s_i, \\theta)$ (`solver.step`) until
    `solver.residual_norm <= atol + rtol * ||x_{i+1}||`, a failure, or
    `max_steps`.

    **Arguments:**

    - `solver`: an `AbstractSolver` (e.g. `ig.Newton(objective)`).
    - `x0`: the initial iterate (a pytree), or `None` for solvers that
      initialise themselves (`ig.InteriorPointQP`).
    - `theta`: the parameters, any pytree; derivatives are taken with respect
      to its floating-point leaves.
    - `estimator`: `OneStep()` (default), `Truncated(K)`, `Implicit(...)` or
      `Unroll(...)`.
    - `max_steps`: a positive integer bound on the number of steps.
    - `rtol`, `atol`: the stopping tolerances; by default
      `default_tolerance(dtype)` $= \\max(10^{-10}, 100\\,\\epsilon)$ for the
      unknowns' lowest-precision dtype: `1e-10` in float64, `1.2e-5` in
      float32 (a float32 iteration cannot reach 1e-10 and would end in
      `max_steps_reached`).
    - `throw`: raise an `equinox.EquinoxRuntimeError` with an explanation when
      the result is not `RESULTS.successful` (default). With `False`, check
      `Solution.result` yourself.
    - `error_estimate`: also estimate the relative error of the derivative
      the estimator returns, `sol.stats["derivative_error_bound"]` (about
      $4 \\times 30$ Jacobian-vector products at the final unknowns; works
      under `jit` and `vmap`). An estimate from the paper's bounds with
      sampled constants, not a certificate: see `itergrad._error_bound`;
      $+\\infty$ where the step map is not a contraction. There, for an
      estimator that sums powers of $J_z F$ (`OneStep`, `Truncated(K)`,
      `Neumann`), the result is `RESULTS.not_contracting` (a repelling
      fixed point, e.g. an iteration started at it).

    **Returns:** a `Solution`.
    """
    max_steps = _check_settings(estimator, max_steps, rtol, atol)
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"`solver` must be an itergrad solver, got {type(solver).__name__}; "
            "for a plain step map use `itergrad.iterate(F, x0, theta)`."
        )
    if x0 is not None:
        _check_x0(x0)
    state0 = State(*_check_init(solver, solver.init(x0, theta)))
    step_name = (
        "`F(x, theta)`" if isinstance(solver, FixedPointIteration)
        else f"{type(solver).__name__}.step"
    )
    new_state = _trace_step(solver, state0, theta, step_name)
    _check_structure(state0, new_state, f"{type(solver).__name__}.step")
    if isinstance(estimator, Implicit | Auto) and estimator.condition == "optimality":
        _check_optimality(solver, state0, theta)
    default = default_tolerance(state0.z)
    settings = LoopSettings(
        max_steps=max_steps,
        rtol=default if rtol is None else float(rtol),
        atol=default if atol is None else float(atol),
    )
    state, out = estimator.run(solver, state0, theta, settings)
    result = out.result
    estimate = None
    if error_estimate:
        estimate = derivative_error_bound(estimator, solver, out, theta)
        result = RESULTS.where(
            (result == RESULTS.successful) & estimate.theory_fails,
            RESULTS.not_contracting, result)
    if throw and not result.is_traced():
        # An eager call (no jit, vmap or grad around it): raise here, from this
        # call's own frame. Equinox's `error_if` would go through its cached
        # `filter_jit`, whose "stack inside of JIT" is the one recorded when it
        # was first traced, i.e. possibly a different, earlier `ig.solve` call.
        if np.any(np.asarray(result != RESULTS.successful)):
            raise eqx.EquinoxRuntimeError(RESULTS[result])
    elif throw:
        # On the unknowns' derivative path too: under jit(grad(...)) the
        # primal output may never be used (see `itergrad._guard`).
        failed = result != RESULTS.successful
        aux = state.aux
        if jtu.tree_leaves(eqx.filter(aux, eqx.is_array)):
            aux = error_if_failed(aux, result, failed)
        state = State(guard(state.z, result, failed), aux)
    solution = Solution(
        value=solver.value(state.z),
        steps=out.steps,
        residual=out.residual,
        result=result,
        state=state,
        stats=_stats(max_steps, out),
    )
    if estimate is not None:
        solution.stats["derivative_error_bound"] = estimate.bound
    return solution


def _check_init(solver: AbstractSolver, init: Any) -> tuple[Any, Any]:
    name = type(solver).__name__
    if not (isinstance(init, tuple) and len(init) == 2):
        raise TypeError(
            f"{name}.init must return a pair `(z, aux)`: the unknowns and the "
            f"auxiliary state (`None` if there is none), got {type(init).__name__}."
        )
    z, _ = init
    leaves = jtu.tree_leaves(z)
    if not leaves or not all(eqx.is_inexact_array(leaf) for leaf in leaves):
        raise TypeError(
            f"{name}: the unknowns `z` must be a non-empty pytree of floating-point "
            "arrays (the implicit function theorem solves for them); keep integer "
            "or boolean bookkeeping (counters, flags, result codes) in the "
            f"auxiliary state. Got leaves {[type(leaf).__name__ for leaf in leaves]}."
        )
    return init


def _stats(max_steps: int, out: LoopOutput) -> dict[str, Any]:
    stats: dict[str, Any] = {"max_steps": max_steps}
    if out.differentiated_steps is not None:
        stats["differentiated_steps"] = out.differentiated_steps
    if out.contraction is not None:
        stats["contraction"] = out.contraction
    if out.estimator is not None:
        stats["estimator"] = out.estimator
    return stats


def iterate(
    F: Callable[[PyTree[Array], PyTree[Any]], PyTree[Array]],
    x0: PyTree[Array],
    theta: PyTree[Any],
    *,
    estimator: AbstractEstimator = OneStep(),
    max_steps: int = 100,
    rtol: float | None = None,
    atol: float | None = None,
    throw: bool = True,
    error_estimate: bool = False,
) -> Solution:
    """Iterate a step map $x_{i+1} = F(x_i, \\theta)$ from `x0` and return
    $x_k(\\theta)$ with the derivative of `estimator`.

    Stops when $\\|x_{k} - x_{k-1}\\| \\le$ `atol + rtol` $\\|x_k\\|$, on a
    non-finite iterate, or after `max_steps` steps. `F(x, theta)` must return
    a pytree with the structure, shapes and dtypes of `x`. Other arguments as
    in `itergrad.solve`.

    **Example:**

    ```python
    F = lambda x, theta: 0.5 * x + theta
    sol = ig.iterate(F, jnp.zeros(3), jnp.ones(3), estimator=ig.Implicit())
    jax.jacobian(lambda t: ig.iterate(F, jnp.zeros(3), t).value)(jnp.ones(3))
    ```
    """
    if not callable(F):
        raise TypeError(f"`F` must be callable as F(x, theta), got {type(F).__name__}.")
    # Before converting: a list of numbers is refused, not made into a list of
    # 0-d arrays (see `_check_x0`).
    if x0 is not None:
        _check_x0(x0)
    x0 = jtu.tree_map(jnp.asarray, x0)
    if not all(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jtu.tree_leaves(x0)):
        raise TypeError(
            "`x0` must have floating-point leaves (got "
            f"{[str(jnp.result_type(x)) for x in jtu.tree_leaves(x0)]}); "
            "pass e.g. jnp.zeros(n) rather than integers."
        )
    return solve(
        FixedPointIteration(F),
        x0,
        theta,
        estimator=estimator,
        max_steps=max_steps,
        rtol=rtol,
        atol=atol,
        throw=throw,
        error_estimate=error_estimate,
    )
