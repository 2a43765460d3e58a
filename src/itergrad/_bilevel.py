"""Hypergradient descent for bilevel problems (Section 3 of the paper).

`HypergradientDescent` is the outer step, optax-style (`init` / `step`), for
use in a loop of your own (under `eqx.filter_jit` or in `jax.lax.scan`);
`hypergradient_descent` is the convenience loop built on it (step size rules,
warm starts, timing, a progress bar and a `History`).
"""

import math
import numbers
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Real, Scalar

from ._diagnose import diagnose
from ._estimators import AbstractEstimator, OneStep
from ._iterate import solve
from ._solution import RESULTS
from ._spectral import linear_operator_norm
from ._tree import tree_norm
from ._validate import nonnegative_float, positive_float, positive_int
from .solvers._base import AbstractSolver, FixedPointIteration

_CONSTANTS = ("rho", "L_F", "L_J", "l_g", "l_nabla")


def _constants(rho: float, **bounds: float) -> tuple[float, ...]:
    """Check Corollary 5's constants; return them as Python floats."""
    if not isinstance(rho, numbers.Real) or isinstance(rho, bool) or not 0 <= rho < 1:
        raise ValueError(
            f"Corollary 5 needs a contraction factor 0 <= rho < 1, got {rho!r}."
        )
    checked = (float(nonnegative_float(v, name)) for name, v in bounds.items())
    return (float(rho), *checked)


def hypergradient_stepsize(
    rho: float, L_F: float, L_J: float, l_g: float, l_nabla: float
) -> float:
    """The outer step size $\\alpha = 1/L$ of Corollary 5, with $L$ a Lipschitz
    constant of the hypergradient $\\nabla_\\theta (g \\circ \\bar x)$:

    $$L = \\frac{L_J}{1-\\rho}\\Big(a + 1\\Big) l_g \\sqrt{1 + a^2}
    + l_\\nabla\\, a^2, \\qquad a = \\frac{L_F}{1-\\rho}.$$

    Derivation (Appendix A, proof of Corollary 5): with $z(\\theta) =
    (\\bar x(\\theta), \\theta)$ and $\\Phi(x, \\theta) = (I - J_x F)^{-1}
    J_\\theta F$, the hypergradient is $h(\\theta) = \\Phi(z(\\theta))^T
    \\nabla g(\\bar x(\\theta))$. $\\Phi$ is bounded by $a$ and
    $c = \\frac{L_J}{1-\\rho}(a + 1)$ Lipschitz (Lemmas 4 and 5), $\\bar x$ is
    $a$ Lipschitz, so $z$ is $\\sqrt{1 + a^2}$ Lipschitz, and
    $\\|h(\\theta) - h(\\theta')\\| \\le \\|\\Phi(z) - \\Phi(z')\\|\\, l_g
    + a\\, \\|\\nabla g(\\bar x) - \\nabla g(\\bar x')\\|
    \\le (c\\, l_g \\sqrt{1 + a^2} + l_\\nabla a^2) \\|\\theta - \\theta'\\|$.

    !!! warning "Differs from the paper's printed constant"

        The paper multiplies the first term by $a$ instead of
        $\\sqrt{1 + a^2}$: it takes $a$, the Lipschitz constant of $\\bar x$,
        for that of $z$, whose second component $\\theta \\mapsto \\theta$ is
        1 Lipschitz. Its $L$ is then too small when $a$ is small: for
        $F(x, \\theta) = \\rho x + \\frac{c}{\\omega} \\sin(\\omega\\theta)$ and
        $g(x) = x$ the hypergradient's true Lipschitz constant is
        $c\\omega/(1-\\rho) = L_J l_g/(1-\\rho)$ (with $L_F = c$), 8 times the
        paper's $L$ at $\\rho = c = 0.1$, and the step $1/L$ then overshoots
        (`tests/test_bilevel.py`). Both agree when $L_J = 0$, where this $L$ is
        attained (a linear $F$ with $J_x F = \\rho I$ and a quadratic $g$).

    **Arguments:** the contraction factor $0 \\le \\rho < 1$ of $F$ in $x$;
    $L_F \\ge 0$, a Lipschitz constant of $F$ in $\\theta$
    ($\\|J_\\theta F\\| \\le L_F$);
    $L_J \\ge 0$, the Lipschitz constant of the joint Jacobian
    $J_{(x,\\theta)} F$; $l_g \\ge 0$, the Lipschitz constant of the outer
    loss $g$; $l_\\nabla \\ge 0$, that of $\\nabla g$. All global bounds.

    **Returns:** $\\alpha$ (a Python float; `inf` if $L = 0$).
    """
    rho, L_F, L_J, l_g, l_nabla = _constants(
        rho, L_F=L_F, L_J=L_J, l_g=l_g, l_nabla=l_nabla
    )
    a = L_F / (1 - rho)
    lipschitz = L_J / (1 - rho) * (a + 1) * l_g * math.sqrt(1 + a**2) + l_nabla * a**2
    return math.inf if lipschitz == 0 else 1.0 / lipschitz


def hypergradient_epsilon(
    rho: float, L_F: float, L_J: float, l_g: float, l_nabla: float, M: float, k: int
) -> float:
    """Corollary 4/5's bound on the one-step hypergradient error:
    $\\|\\nabla_\\theta(g \\circ \\bar x) - J^{OS} x_k^T \\nabla g(x_k)\\| \\le
    \\epsilon = \\frac{\\rho}{1-\\rho}\\big(L_F l_g + (L_J l_g + L_F l_\\nabla)
    M \\rho^{k-2}\\big)$,
    where $M \\ge \\|x_0 - F(x_0, \\theta)\\|$ and $k \\ge 2$ inner steps (Lemma 1
    turns Corollary 4's distances into powers of $\\rho$:
    $\\|x_{k-1} - \\bar x\\| \\le \\rho^{k-1} M / (1 - \\rho)$).

    **Arguments:** as `hypergradient_stepsize`, plus $M \\ge 0$ and the number
    of inner steps $k \\ge 2$.

    **Returns:** $\\epsilon$ (a Python float).

    !!! warning

        For $\\rho = 0$ (an exact single-step algorithm) the formula gives 0
        while Corollary 4 still has the $L_J l_g \\|x_{k-1} - \\bar x\\|$ term
        when $k$ is small; use it for $k \\ge 2$ and $\\rho > 0$.
    """
    rho, L_F, L_J, l_g, l_nabla, M = _constants(
        rho, L_F=L_F, L_J=L_J, l_g=l_g, l_nabla=l_nabla, M=M
    )
    if positive_int(k, "k") < 2:
        raise ValueError(f"Corollary 5 needs k >= 2 inner steps, got {k}.")
    return (
        rho / (1 - rho) * (L_F * l_g + (L_J * l_g + L_F * l_nabla) * M * rho ** (k - 2))
    )


def _as_solver(solver: Any) -> AbstractSolver:
    if isinstance(solver, AbstractSolver):
        return solver
    if not callable(solver):
        raise TypeError(
            "`solver` must be an itergrad solver or a step map F(x, theta), got "
            f"{type(solver).__name__}."
        )
    return FixedPointIteration(solver)


def _committed(tree: PyTree[Any]) -> PyTree[Any]:
    # Committed (non-weak) dtypes: the iterates produced by a step have them,
    # so a weakly typed start would trace the step a second time.
    return jtu.tree_map(lambda a: jnp.asarray(a, jnp.result_type(a)), tree)


class HypergradientState(eqx.Module):
    """The state of `HypergradientDescent` between outer steps.

    **Fields:**

    - `opt_state`: the optax optimizer's state.
    - `x`: the start of the next inner solve: `x0`, or with `warm_start` the
      previous inner solution; `None` for self-initialising solvers.
    """

    opt_state: optax.OptState
    x: PyTree[Array] | None


class HypergradientInfo(eqx.Module):
    """What one outer step of `HypergradientDescent` measured, at $\\theta_l$
    (before the update).

    **Fields:**

    - `loss`: $g(x_k(\\theta_l), \\theta_l)$.
    - `hypergradient`: the estimated hypergradient
      $J x_k(\\theta_l)^T \\nabla_x g + \\nabla_\\theta g$ (the structure of
      `theta`), with $J$ the estimator's Jacobian.
    - `hypergradient_norm`: its Euclidean norm over all leaves.
    - `x`: the inner solution $x_k(\\theta_l)$ (no derivative attached).
    - `steps`: the inner solver's number of steps $k$.
    - `result`: the inner solve's `RESULTS` code (only informative with
      `throw=False`: otherwise a failure raises).
    - `derivative_error_bound`: with `error_estimate=True`, the estimated
      relative error of the estimator's Jacobian $J$ of the inner solve
      (`itergrad.solve(..., error_estimate=True)`); NaN otherwise.
    """

    loss: Scalar
    hypergradient: PyTree[Array]
    hypergradient_norm: Scalar
    x: PyTree[Array]
    steps: Int[Array, ""]
    result: RESULTS
    derivative_error_bound: Scalar


class HypergradientDescent(eqx.Module):
    """One outer step of hypergradient descent (eq. 10), optax-style.

    For the bilevel problem $\\min_\\theta h(\\theta) = g(x_k(\\theta), \\theta)$,
    where $x_k(\\theta)$ is the inner solve, `step` computes
    $$\\theta_{l+1} = \\theta_l + \\mathrm{update}\\big(J x_k(\\theta_l)^T
    \\nabla_x g(x_k(\\theta_l), \\theta_l) + \\nabla_\\theta g\\big),$$
    with $J$ the `estimator`'s Jacobian ($J^{OS}$ for `OneStep()`, the paper's
    recursion) and `update` the optax `optimizer` (`optax.sgd(alpha)` is the
    paper's $\\theta_{l+1} = \\theta_l - \\alpha \\nabla h$).

    Use it in your own loop:

    ```python
    method = ig.HypergradientDescent(outer_loss, solver, optax.adam(0.1))
    state = method.init(theta, x0)
    step = eqx.filter_jit(method.step)
    for _ in range(100):
        theta, state, info = step(theta, state)
    ```

    or inside `jax.lax.scan`. `hypergradient_descent` runs this loop for you.

    **Arguments:**

    - `outer_loss`: $g$, called as `outer_loss(x, theta) -> scalar`.
    - `solver`: an `AbstractSolver` or a plain step map `F(x, theta)`.
    - `optimizer`: an optax `GradientTransformation`.
    - `estimator`: how to differentiate the inner solve (default `OneStep()`).
    - `warm_start`: start each inner solve from the previous solution
      (default `True`; solvers that need `x0=None` are always started cold).
    - `max_steps`, `rtol`, `atol`, `throw`, `error_estimate`: for each inner
      solve (see `itergrad.solve`); `error_estimate=True` fills
      `HypergradientInfo.derivative_error_bound`.

    !!! warning

        Give `theta` and `x0` committed dtypes (`jnp.asarray(0.0, jnp.float64)`,
        not a Python float): `step` returns committed ones, and a weakly typed
        first input traces `step` a second time.
    """

    outer_loss: Callable[[PyTree[Array], PyTree[Any]], Scalar]
    solver: AbstractSolver = eqx.field(converter=_as_solver)
    optimizer: optax.GradientTransformation
    estimator: AbstractEstimator = OneStep()
    warm_start: bool = eqx.field(default=True, static=True)
    max_steps: int = eqx.field(default=100, static=True)
    rtol: float = eqx.field(default=1e-10, static=True)
    atol: float = eqx.field(default=1e-10, static=True)
    throw: bool = eqx.field(default=True, static=True)
    error_estimate: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        if not callable(self.outer_loss):
            raise TypeError("`outer_loss` must be callable as outer_loss(x, theta).")
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(
                "`optimizer` must be an optax GradientTransformation, e.g. "
                f"optax.sgd(1e-2), got {type(self.optimizer).__name__}."
            )
        if not isinstance(self.estimator, AbstractEstimator):
            raise TypeError(
                "`estimator` must be an itergrad estimator (ig.OneStep(), "
                f"ig.Implicit(), ...), got {type(self.estimator).__name__}."
            )
        positive_int(self.max_steps, "max_steps")
        nonnegative_float(self.rtol, "rtol")
        nonnegative_float(self.atol, "atol")

    def init(
        self, theta: PyTree[Array], x0: PyTree[Array] | None
    ) -> HypergradientState:
        """The state before the first step: the optimizer's state for `theta`
        and `x0` (with committed dtypes) as the first inner start."""
        opt_state = self.optimizer.init(eqx.filter(theta, eqx.is_inexact_array))
        return HypergradientState(opt_state, None if x0 is None else _committed(x0))

    def step(
        self, theta: PyTree[Array], state: HypergradientState
    ) -> tuple[PyTree[Array], HypergradientState, HypergradientInfo]:
        """One outer step from $\\theta_l$: solve the inner problem from
        `state.x`, take the hypergradient, update.

        **Returns:** `(theta_next, state_next, info)`, with `info` measured at
        $\\theta_l$ (a `HypergradientInfo`).
        """

        def loss_fn(th):
            sol = solve(
                self.solver,
                state.x,
                th,
                estimator=self.estimator,
                max_steps=self.max_steps,
                rtol=self.rtol,
                atol=self.atol,
                throw=self.throw,
                error_estimate=self.error_estimate,
            )
            return self.outer_loss(sol.value, th), sol

        (loss, sol), grad = eqx.filter_value_and_grad(loss_fn, has_aux=True)(theta)
        if self.throw:
            loss, grad = _check_outer(loss, grad, sol.result)
        updates, opt_state = self.optimizer.update(grad, state.opt_state, theta)
        theta_next = eqx.apply_updates(theta, updates)
        x = jax.lax.stop_gradient(sol.value)
        start = x if self.warm_start and state.x is not None else state.x
        info = HypergradientInfo(
            loss=loss,
            hypergradient=grad,
            hypergradient_norm=tree_norm(grad),
            x=x,
            steps=sol.steps,
            result=sol.result,
            derivative_error_bound=sol.stats.get(
                "derivative_error_bound", jnp.full((), jnp.nan, loss.dtype)
            ),
        )
        return theta_next, HypergradientState(opt_state, start), info


_OUTER_LOSS_NONFINITE = (
    "hypergradient descent: the outer loss `outer_loss(x, theta)` returned a "
    "non-finite value (NaN or Inf) at a successful inner solve. Check "
    "`outer_loss` at the current `theta` and inner solution (log or division "
    "at 0, overflow), or lower the outer step size if `theta` diverged."
)
_OUTER_GRADIENT_NONFINITE = (
    "hypergradient descent: the hypergradient is non-finite (NaN or Inf) while "
    "the outer loss and the inner solve are fine. The usual cause is the "
    "gradient of `outer_loss(x, theta)` (e.g. sqrt or abs at 0, a NaN "
    "derivative of a non-differentiable operation); else the estimator's "
    "derivative of the inner solve."
)


def _check_outer(
    loss: Scalar, grad: PyTree[Array], result: RESULTS
) -> tuple[Scalar, PyTree[Array]]:
    """Raise a message that blames the outer loss when it, or the
    hypergradient, is non-finite after a successful inner solve (a failed
    inner solve raises its own message)."""
    ok = result == RESULTS.successful
    leaves = jtu.tree_leaves(eqx.filter(grad, eqx.is_inexact_array))
    finite_grad = jnp.array(True)
    for leaf in leaves:
        finite_grad = finite_grad & jnp.all(jnp.isfinite(leaf))
    # Both checks sit on the hypergradient, which the update always uses.
    finite_loss = jnp.isfinite(loss)
    grad = eqx.error_if(grad, ok & ~finite_loss, _OUTER_LOSS_NONFINITE)
    grad = eqx.error_if(grad, ok & finite_loss & ~finite_grad, _OUTER_GRADIENT_NONFINITE)
    return loss, grad


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
      `"first_step_time"` (the first step alone, compilation included),
      `"stepsize"` (the step size used, when one was given or derived) and,
      with `error_estimate=True`, `"derivative_error_bound"` (one estimate
      per outer step of the inner Jacobian's relative error).
    """

    theta: PyTree[Array]
    losses: Real[Array, " steps"]
    steps: Array
    hypergradient_norms: Real[Array, " steps"]
    x: PyTree[Array]
    stats: dict[str, Any]


def _estimate_corollary5(
    outer_loss, solver, theta, x0, settings, key
) -> dict[str, float]:
    """Local estimates of (rho, L_F, L_J, l_g, l_nabla) at the first solve."""
    key_diagnose, key_hessian = jr.split(key)
    # throw=True: the constants of a failed inner solve would be meaningless,
    # and the error names the inner solve (not `diagnose`'s `sol`).
    sol = solve(solver, x0, theta, **settings, throw=True)
    report = diagnose(solver, sol, theta, key=key_diagnose)
    x = jax.lax.stop_gradient(sol.value)
    grad_g = jax.grad(lambda z: outer_loss(z, theta))
    flat_x, unravel = ravel_pytree(x)

    def hvp(v):
        return ravel_pytree(jax.jvp(grad_g, (x,), (unravel(v),))[1])[0]

    v0 = jr.normal(key_hessian, flat_x.shape, flat_x.dtype)
    l_nabla = linear_operator_norm(hvp, v0, 50)
    l_g = tree_norm(grad_g(x))
    values = (report.rho, report.L_F, report.L_J, l_g, l_nabla)
    return {name: float(v) for name, v in zip(_CONSTANTS, values, strict=True)}


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
    key: PRNGKeyArray | None = None,
    steps: int = 100,
    warm_start: bool = True,
    max_steps: int = 100,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    throw: bool = True,
    error_estimate: bool = True,
    error_tolerance: float = 0.1,
    progress: bool = True,
) -> History:
    """Minimise $\\theta \\mapsto g(x_k(\\theta), \\theta)$ by `steps` outer steps
    of `HypergradientDescent` (eq. 10):
    $\\theta_{l+1} = \\theta_l - \\alpha\\, J x_k(\\theta_l)^T \\nabla g(x_k(\\theta_l))$,
    with $J = J^{OS}$ for `OneStep()` (the paper's recursion) or the estimator's
    Jacobian otherwise. With a general `optimizer` the hypergradient is handed
    to optax instead of the plain step.

    Each outer step is one `eqx.filter_jit`-compiled `HypergradientDescent.step`
    (inner solve, backward pass, optimizer update), traced once. With
    `warm_start=True` the inner solve at $\\theta_{l+1}$ starts from
    $x_k(\\theta_l)$.

    **Arguments:**

    - `outer_loss`: $g$, called as `outer_loss(x, theta) -> scalar`.
    - `solver`: an `AbstractSolver` or a plain step map `F(x, theta)`.
    - `theta0`: the initial outer parameters (a pytree of float arrays).
    - `x0`: the initial inner iterate (or `None` for self-initialising solvers).
    - `estimator`: how to differentiate the inner solve (default `OneStep()`).
    - `optimizer`: an optax `GradientTransformation`; default
      `optax.sgd(1e-2)` when neither `optimizer` nor `stepsize` is given.
    - `stepsize`: instead of `optimizer`, plain gradient descent with this
      step $\\alpha > 0$; `"corollary5"` takes Corollary 5's
      $\\alpha$ (`hypergradient_stepsize`) from `constants`.
    - `constants`: with `stepsize="corollary5"`, a dict with keys `rho`,
      `L_F`, `L_J`, `l_g`, `l_nabla`; missing keys are estimated at $\\theta_0$
      (`diagnose` for the first three, $\\|\\nabla g(x_k)\\|$ and the power
      iteration norm of $\\nabla^2 g$ for the last two) from random starts
      drawn with `key`.
    - `key`: a `jax.random` key, needed only when constants are estimated.
    - `steps`: the number of outer steps $L$, a positive integer.
    - `warm_start`: start each inner solve from the previous solution.
    - `max_steps`, `rtol`, `atol`, `throw`: for each inner solve (see
      `itergrad.solve`).
    - `error_estimate`: estimate, at every outer step, the relative error of
      the inner Jacobian the estimator returned
      (`History.stats["derivative_error_bound"]`, one value per step; about
      a hundred extra Jacobian-vector products of the step map per outer
      step). Default `True`.
    - `error_tolerance`: warn (`UserWarning`) when that estimate exceeds
      this relative error at any outer step (default `0.1`): the
      hypergradients may then be wrong by as much, which no loss curve
      shows. The message says what to use instead.
    - `progress`: show a rich progress bar with the current loss.

    **Returns:** a `History`.

    !!! warning

        With `OneStep()` and a slowly contracting inner solver, the
        hypergradient is biased by up to
        $\\rho L_F l_g / (1 - \\rho)$ (Corollary 4): the iterates then reach
        only an $\\epsilon$-critical point (Corollary 5,
        `hypergradient_epsilon`). Estimated constants are local to $\\theta_0$,
        so the derived Corollary 5 step size is not a certified one.
    """
    steps = positive_int(steps, "steps")
    if optimizer is not None and stepsize is not None:
        raise ValueError(
            "Pass either `optimizer` (an optax transformation) or `stepsize` "
            "(plain gradient descent), not both."
        )
    solver = _as_solver(solver)
    theta0 = _committed(theta0)
    used_stepsize = None
    if stepsize == "corollary5":
        constants = dict(constants or {})
        unknown = set(constants) - set(_CONSTANTS)
        if unknown:
            raise ValueError(
                f"Unknown `constants` keys {sorted(unknown)}; use {_CONSTANTS}."
            )
        missing = [name for name in _CONSTANTS if name not in constants]
        if missing:
            if key is None:
                raise ValueError(
                    f"`stepsize='corollary5'` estimates the missing constants "
                    f"{missing} from random starts: pass `key=jax.random.key(...)`, "
                    "or give all five in `constants`."
                )
            settings = dict(max_steps=max_steps, rtol=rtol, atol=atol)
            estimates = _estimate_corollary5(
                outer_loss, solver, theta0, x0, settings, key
            )
            constants = {**estimates, **constants}
        used_stepsize = hypergradient_stepsize(**constants)
    elif stepsize is not None:
        if isinstance(stepsize, str):
            raise ValueError(
                f"`stepsize` must be a positive number or 'corollary5', got {stepsize!r}."
            )
        used_stepsize = positive_float(stepsize, "stepsize")
    elif optimizer is None:
        used_stepsize = 1e-2
    if used_stepsize is not None:
        optimizer = optax.sgd(used_stepsize)
    assert optimizer is not None
    method = HypergradientDescent(
        outer_loss,
        solver,
        optimizer,
        estimator,
        warm_start=warm_start,
        max_steps=max_steps,
        rtol=rtol,
        atol=atol,
        throw=throw,
        error_estimate=error_estimate,
    )
    error_tolerance = positive_float(error_tolerance, "error_tolerance")

    traces = 0

    @eqx.filter_jit
    def outer_step(theta, state):
        nonlocal traces
        traces += 1  # Python side effect: runs only while tracing.
        return method.step(theta, state)

    theta, state = theta0, method.init(theta0, x0)
    thetas, infos = [theta0], []
    start = time.perf_counter()
    first_step_time = math.nan
    with _progress_bar(progress, steps) as advance:
        for step in range(steps):
            theta, state, info = outer_step(theta, state)
            if step == 0:
                jax.block_until_ready(theta)
                first_step_time = time.perf_counter() - start
            thetas.append(theta)
            infos.append(info)
            advance(info.loss)
    jax.block_until_ready(theta)
    elapsed = time.perf_counter() - start
    stats: dict[str, Any] = {
        "traces": traces,
        "time": elapsed,
        "first_step_time": first_step_time,
        "stepsize": used_stepsize,
    }
    if error_estimate:
        bounds = jnp.stack([info.derivative_error_bound for info in infos])
        stats["derivative_error_bound"] = bounds
        worst = float(jnp.max(bounds))
        if not worst <= error_tolerance:  # also NaN / inf
            warnings.warn(
                "hypergradient_descent: the estimated relative error of the "
                f"inner derivative reached {worst:.3g} (> error_tolerance="
                f"{error_tolerance:g}; History.stats['derivative_error_bound']): "
                f"{type(estimator).__name__} is biased on this inner solver "
                "(a slow contraction, Corollary 1), so the hypergradients may be "
                "wrong by as much. Use `estimator=ig.Implicit()`, "
                "`ig.Auto(target=...)` or `ig.Truncated('auto')`.",
                UserWarning,
                stacklevel=2,
            )
    return History(
        theta=jtu.tree_map(lambda *xs: jnp.stack(xs), *thetas),
        losses=jnp.stack([info.loss for info in infos]),
        steps=jnp.stack([info.steps for info in infos]),
        hypergradient_norms=jnp.stack([info.hypergradient_norm for info in infos]),
        x=infos[-1].x,
        stats=stats,
    )


class _progress_bar:
    """A rich progress bar showing the outer loss; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = total

    def __enter__(self) -> Callable[[Scalar], None]:
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
