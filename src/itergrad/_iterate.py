"""Entry points: `iterate` for a plain step map, `solve` for a solver."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._error_bound import derivative_error_bound
from ._estimators import AbstractEstimator, OneStep
from ._guard import guard
from ._loop import LoopOutput, LoopSettings
from ._solution import RESULTS, Solution
from ._validate import nonnegative_float, positive_int
from .solvers._base import AbstractSolver, FixedPointIteration, State


def _check_settings(estimator, max_steps, rtol, atol):
    if not isinstance(estimator, AbstractEstimator):
        raise TypeError(
            "`estimator` must be an itergrad estimator (ig.OneStep(), "
            "ig.Truncated(K), ig.Implicit(), ig.Unroll()), got "
            f"{type(estimator).__name__}."
        )
    positive_int(max_steps, "max_steps")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is None:
            continue
        if not isinstance(tol, int | float):
            raise ValueError(f"`{name}` must be a non-negative number, got {tol!r}.")
        nonnegative_float(tol, name)


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
      $+\\infty$ where the step map is not a contraction.

    **Returns:** a `Solution`.
    """
    _check_settings(estimator, max_steps, rtol, atol)
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"`solver` must be an itergrad solver, got {type(solver).__name__}; "
            "for a plain step map use `itergrad.iterate(F, x0, theta)`."
        )
    state0 = State(*_check_init(solver, solver.init(x0, theta)))
    new_state = State(
        *eqx.filter_eval_shape(solver.step, state0.z, state0.aux, theta)
    )
    _check_structure(state0, new_state, f"{type(solver).__name__}.step")
    default = default_tolerance(state0.z)
    settings = LoopSettings(
        max_steps=max_steps,
        rtol=default if rtol is None else float(rtol),
        atol=default if atol is None else float(atol),
    )
    state, out = estimator.run(solver, state0, theta, settings)
    result = out.result
    if throw:
        # On the unknowns' derivative path too: under jit(grad(...)) the
        # primal output may never be used (see `itergrad._guard`).
        failed = result != RESULTS.successful
        aux = state.aux
        if jtu.tree_leaves(eqx.filter(aux, eqx.is_array)):
            aux = result.error_if(aux, failed)
        state = State(guard(state.z, result, failed), aux)
    solution = Solution(
        value=solver.value(state.z),
        steps=out.steps,
        residual=out.residual,
        result=result,
        state=state,
        stats=_stats(max_steps, out),
    )
    if error_estimate:
        solution.stats["derivative_error_bound"] = derivative_error_bound(
            estimator, solver, out, theta
        )
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
