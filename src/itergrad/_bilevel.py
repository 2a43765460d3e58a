"""Hypergradient descent for bilevel problems (Section 3 of the paper)."""

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree, Real, Scalar

from ._diagnose import diagnose
from ._estimators import AbstractEstimator, OneStep
from ._iterate import solve
from ._spectral import linear_operator_norm
from ._tree import tree_norm
from .solvers._base import AbstractSolver, FixedPointIteration


class History(eqx.Module):
    """The trajectory of `hypergradient_descent`.

    **Fields:**

    - `theta`: the outer iterates $\\theta_0, \\dots, \\theta_L$ stacked along a
      leading axis of length `steps + 1` (each leaf of `theta0` gets it).
    - `losses`: $g(x_k(\\theta_l), \\theta_l)$ for $l = 0, \\dots, L-1$ (the loss
      at which the hypergradient of step $l$ was taken).
    - `steps`: the inner solver's number of steps $k$ at each outer step.
    - `hypergradient_norms`: $\\|J^T \\nabla g\\|$ at each outer step, the norm
      of the estimated hypergradient.
    - `x`: the last inner solution $x_k(\\theta_{L-1})$.
    - `stats`: `"traces"` (how many times the outer step was traced: 1 unless
      shapes changed), `"time"` (wall-clock seconds, all steps),
      `"first_step_time"` (the first step alone, compilation included) and
      `"stepsize"` (the step size used, when one was given or derived).
    """

    theta: PyTree[Array]
    losses: Real[Array, " steps"]
    steps: Array
    hypergradient_norms: Real[Array, " steps"]
    x: PyTree[Array]
    stats: dict[str, Any]


def hypergradient_stepsize(
    rho: float, L_F: float, L_J: float, l_g: float, l_nabla: float
) -> float:
    """Corollary 5's outer step size: $\\alpha = 1/L$ with
    $L = \\Big(\\frac{L_J}{1-\\rho}\\big(\\frac{L_F}{1-\\rho} + 1\\big) l_g
    + l_\\nabla \\frac{L_F}{1-\\rho}\\Big) \\frac{L_F}{1-\\rho}$, a Lipschitz
    constant of $\\nabla_\\theta (g \\circ \\bar x)$ (Appendix A).

    **Arguments:** the contraction factor $\\rho < 1$; $L_F$, a bound on
    $\\|J_\\theta F\\|$ (and on $F$'s Lipschitz constant in $\\theta$); $L_J$, the
    Lipschitz constant of $J_{(x,\\theta)} F$; $l_g$, the Lipschitz constant of
    the outer loss $g$; $l_\\nabla$, that of $\\nabla g$.

    **Returns:** $\\alpha$ (a Python float; `inf` if $L = 0$).
    """
    if not 0 <= rho < 1:
        raise ValueError(
            f"Corollary 5 needs a contraction factor 0 <= rho < 1, got {rho}."
        )
    a = L_F / (1 - rho)
    lipschitz = (L_J / (1 - rho) * (a + 1) * l_g + l_nabla * a) * a
    return math.inf if lipschitz == 0 else 1.0 / lipschitz


def hypergradient_epsilon(
    rho: float, L_F: float, L_J: float, l_g: float, l_nabla: float, M: float, k: int
) -> float:
    """Corollary 4/5's bound on the one-step hypergradient error:
    $\\|\\nabla_\\theta(g \\circ \\bar x) - J^{OS} x_k^T \\nabla g(x_k)\\| \\le
    \\epsilon = \\frac{\\rho}{1-\\rho}\\big(L_F l_g + (L_J l_g + L_F l_\\nabla)
    M \\rho^{k-2}\\big)$,
    where $M \\ge \\|x_0 - F(x_0, \\theta)\\|$ and $k \\ge 2$ inner steps (Lemma 1
    turns Corollary 4's distances into powers of $\\rho$).

    **Returns:** $\\epsilon$ (a Python float).

    !!! warning

        For $\\rho = 0$ (an exact single-step algorithm) the formula gives 0
        while Corollary 4 still has the $L_J l_g \\|x_{k-1} - \\bar x\\|$ term
        when $k$ is small; use it for $k \\ge 2$ and $\\rho > 0$.
    """
    if not 0 <= rho < 1:
        raise ValueError(
            f"Corollary 5 needs a contraction factor 0 <= rho < 1, got {rho}."
        )
    if k < 2:
        raise ValueError(f"Corollary 5 needs k >= 2 inner steps, got {k}.")
    return (
        rho / (1 - rho) * (L_F * l_g + (L_J * l_g + L_F * l_nabla) * M * rho ** (k - 2))
    )


def _estimate_corollary5(outer_loss, solver, theta, x0, settings, key):
    """Local estimates of (rho, L_F, L_J, l_g, l_nabla) at the first solve."""
    sol = solve(solver, x0, theta, **settings, throw=False)
    report = diagnose(solver, sol, theta, key=key)
    x = jax.lax.stop_gradient(sol.value)
    grad_g = jax.grad(lambda z: outer_loss(z, theta))
    flat_x, unravel = ravel_pytree(x)

    def hvp(v):
        return ravel_pytree(jax.jvp(grad_g, (x,), (unravel(v),))[1])[0]

    l_nabla = linear_operator_norm(hvp, jr.normal(key, flat_x.shape, flat_x.dtype), 50)
    l_g = tree_norm(grad_g(x))
    return tuple(float(v) for v in (report.rho, report.L_F, report.L_J, l_g, l_nabla))


def hypergradient_descent(
    outer_loss: Callable[[PyTree[Array], PyTree[Any]], Scalar],
    solver: AbstractSolver | Callable[[PyTree[Array], PyTree[Any]], PyTree[Array]],
    theta0: PyTree[Array],
    x0: PyTree[Array] | None,
    *,
    estimator: AbstractEstimator = OneStep(),  # noqa: B008 (immutable module)
    optimizer: optax.GradientTransformation | None = None,
    stepsize: float | Literal["corollary5"] | None = None,
    constants: dict[str, float] | None = None,
    steps: int = 100,
    warm_start: bool = True,
    max_steps: int = 100,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    throw: bool = True,
    progress: bool = True,
    key: Array | None = None,
) -> History:
    """Minimise $\\theta \\mapsto g(x_k(\\theta), \\theta)$ by gradient descent on
    the hypergradient given by `estimator` (eq. 10):
    $\\theta_{l+1} = \\theta_l - \\alpha\\, J x_k(\\theta_l)^T \\nabla g(x_k(\\theta_l))$,
    with $J = J^{OS}$ for `OneStep()` (the paper's recursion) or the estimator's
    Jacobian otherwise. With a general `optimizer` the hypergradient is handed
    to optax instead of the plain step.

    Each outer step is one `eqx.filter_jit`-compiled call (inner solve,
    backward pass, optimizer update) traced once. With `warm_start=True` the
    inner solve at $\\theta_{l+1}$ starts from $x_k(\\theta_l)$ (the value of
    the previous solution, passed as `x0`; solvers that need `x0=None` are
    always started cold).

    **Arguments:**

    - `outer_loss`: $g$, called as `outer_loss(x, theta) -> scalar`.
    - `solver`: an `AbstractSolver` or a plain step map `F(x, theta)`.
    - `theta0`: the initial outer parameters (a pytree of float arrays).
    - `x0`: the initial inner iterate (or `None` for self-initialising solvers).
    - `estimator`: how to differentiate the inner solve (default `OneStep()`).
    - `optimizer`: an optax `GradientTransformation`; default
      `optax.sgd(1e-2)` when neither `optimizer` nor `stepsize` is given.
    - `stepsize`: instead of `optimizer`, plain gradient descent with this
      step $\\alpha$; `"corollary5"` takes Corollary 5's
      $\\alpha$ (`hypergradient_stepsize`) from `constants`.
    - `constants`: with `stepsize="corollary5"`, a dict with keys `rho`,
      `L_F`, `L_J`, `l_g`, `l_nabla`; missing keys are estimated at $\\theta_0$
      (`diagnose` for the first three, $\\|\\nabla g(x_k)\\|$ and the power
      iteration norm of $\\nabla^2 g$ for the last two).
    - `steps`: the number of outer steps $L$.
    - `warm_start`: start each inner solve from the previous solution.
    - `max_steps`, `rtol`, `atol`, `throw`: for each inner solve (see
      `itergrad.solve`).
    - `progress`: show a rich progress bar with the current loss.
    - `key`: a `jax.random` key for the Corollary 5 estimates (default key 0).

    **Returns:** a `History`.

    !!! warning

        With `OneStep()` and a slowly contracting inner solver, the
        hypergradient is biased by up to
        $\\rho L_F l_g / (1 - \\rho)$ (Corollary 4): the iterates then reach
        only an $\\epsilon$-critical point (Corollary 5,
        `hypergradient_epsilon`). Estimated constants are local to $\\theta_0$,
        so the derived Corollary 5 step size is not a certified one.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive integer, got {steps!r}.")
    if not callable(outer_loss):
        raise TypeError("`outer_loss` must be callable as outer_loss(x, theta).")
    if not isinstance(solver, AbstractSolver):
        if not callable(solver):
            raise TypeError(
                "`solver` must be an itergrad solver or a step map F(x, theta), got "
                f"{type(solver).__name__}."
            )
        solver = FixedPointIteration(solver)
    # Committed (non-weak) dtypes, so that the warm start x_k(theta_l), which
    # has them, does not retrace the outer step.
    theta0 = jtu.tree_map(lambda a: jnp.asarray(a, jnp.result_type(a)), theta0)
    if x0 is not None:
        x0 = jtu.tree_map(lambda a: jnp.asarray(a, jnp.result_type(a)), x0)
    settings = dict(estimator=estimator, max_steps=max_steps, rtol=rtol, atol=atol)
    if optimizer is not None and stepsize is not None:
        raise ValueError(
            "Pass either `optimizer` (an optax transformation) or `stepsize` "
            "(plain gradient descent), not both."
        )
    used_stepsize = None
    if stepsize == "corollary5":
        names = ("rho", "L_F", "L_J", "l_g", "l_nabla")
        constants = dict(constants or {})
        unknown = set(constants) - set(names)
        if unknown:
            raise ValueError(
                f"Unknown `constants` keys {sorted(unknown)}; use {names}."
            )
        if any(name not in constants for name in names):
            estimates = _estimate_corollary5(
                outer_loss,
                solver,
                theta0,
                x0,
                dict(max_steps=max_steps, rtol=rtol, atol=atol),
                jr.key(0) if key is None else key,
            )
            for name, value in zip(names, estimates, strict=True):
                constants.setdefault(name, value)
        used_stepsize = hypergradient_stepsize(*(constants[n] for n in names))
        optimizer = optax.sgd(used_stepsize)
    elif stepsize is not None:
        if isinstance(stepsize, str) or not stepsize > 0:
            raise ValueError(
                f"`stepsize` must be a positive number or 'corollary5', got {stepsize!r}."
            )
        used_stepsize = float(stepsize)
        optimizer = optax.sgd(used_stepsize)
    elif optimizer is None:
        used_stepsize = 1e-2
        optimizer = optax.sgd(used_stepsize)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "`optimizer` must be an optax GradientTransformation, e.g. optax.sgd(1e-2)."
        )

    traces = [0]

    @eqx.filter_jit
    def outer_step(theta, opt_state, x_init):
        traces[0] += 1  # Python side effect: runs only while tracing.

        def loss_fn(th):
            sol = solve(solver, x_init, th, throw=throw, **settings)
            return outer_loss(sol.value, th), sol

        (loss, sol), grad = eqx.filter_value_and_grad(loss_fn, has_aux=True)(theta)
        updates, opt_state = optimizer.update(grad, opt_state, theta)
        theta = eqx.apply_updates(theta, updates)
        x_next = jax.lax.stop_gradient(sol.value)
        return theta, opt_state, x_next, loss, sol.steps, tree_norm(grad)

    theta = theta0
    opt_state = optimizer.init(eqx.filter(theta0, eqx.is_inexact_array))
    x_init = x0
    thetas, losses, inner_steps, grad_norms = [theta0], [], [], []
    start = time.perf_counter()
    first_step_time = math.nan
    with _progress_bar(progress, steps) as advance:
        for step in range(steps):
            theta, opt_state, x_next, loss, k, gnorm = outer_step(
                theta, opt_state, x_init
            )
            if step == 0:
                jax.block_until_ready(theta)
                first_step_time = time.perf_counter() - start
            if warm_start and x0 is not None:
                x_init = x_next
            thetas.append(theta)
            losses.append(loss)
            inner_steps.append(k)
            grad_norms.append(gnorm)
            advance(loss)
    jax.block_until_ready(theta)
    elapsed = time.perf_counter() - start
    return History(
        theta=jtu.tree_map(lambda *xs: jnp.stack(xs), *thetas),
        losses=jnp.stack(losses),
        steps=jnp.stack(inner_steps),
        hypergradient_norms=jnp.stack(grad_norms),
        x=x_next,
        stats={
            "traces": traces[0],
            "time": elapsed,
            "first_step_time": first_step_time,
            "stepsize": used_stepsize,
        },
    )


class _progress_bar:
    """A rich progress bar showing the outer loss; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = total

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("hypergradient descent"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.start()
        task = self.progress.add_task("outer", total=self.total, loss="-")

        def advance(loss):
            # Reading the loss synchronises with the device once per outer
            # step; the bar is for interactive use, disable it in benchmarks.
            self.progress.update(task, advance=1, loss=f"{float(loss):.6g}")

        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
        return False
