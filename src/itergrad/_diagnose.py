"""The paper's bounds, computed: contraction factor, Lipschitz constants,
Corollary 1 / 3 bounds, measured estimator disagreement and a recommended
estimator."""

import io
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree, Real

from ._estimators import AbstractEstimator, OneStep, Truncated
from ._implicit import Implicit
from ._solution import RESULTS, Solution, result_name
from ._spectral import (
    DEFAULT_MAX_K,
    DEFAULT_POWER_ITERATIONS,
    FlatStep,
    flat_step,
    local_constants,
)
from ._validate import positive_int
from .solvers._base import AbstractSolver, FixedPointIteration


def _concrete(x: Array, name: str) -> float:
    try:
        return float(x)
    except jax.errors.ConcretizationTypeError:
        raise ValueError(
            f"DiagnoseReport.{name} needs concrete numbers: call it outside "
            "`jax.jit` (jit `ig.diagnose` itself, then read the recommendation "
            "from the returned report)."
        ) from None


class DiagnoseReport(eqx.Module):
    """What `itergrad.diagnose` measured at the last iterate $x_k$, and the
    paper's bounds evaluated on it. All numbers are arrays (so the report can
    be returned from `jax.jit`); `recommended` and `reason` are built from them
    in Python.

    **Fields:**

    - `rho`: $\\rho \\approx \\|J_x F(x_k, \\theta)\\|_{op}$ (power iteration).
    - `L_F`: $L_F \\approx \\|J_\\theta F(x_k, \\theta)\\|_{op}$ (power iteration).
    - `L_J`: $L_J$, the Lipschitz constant of $x \\mapsto J_\\theta F(x, \\theta)$
      (given, or estimated along the last step: see `diagnose`).
    - `step`: the step length $\\|x_k - x_{k-1}\\|$ (plain step map) or
      $\\|x_{k+1} - x_k\\|$ (solver; one extra step from the final state).
    - `distance`: `step / (1 - rho)`, the Lemma 1 estimate of the distance to
      the fixed point (infinite when $\\rho \\ge 1$).
    - `corollary1_bound`: $\\rho L_F / (1 - \\rho) + L_J \\cdot$ `distance`
      (eq. 5), a bound on $\\|J^{OS} x_k - J_\\theta \\bar x\\|_{op}$.
    - `corollary3_bound`: $L_J \\cdot$ `distance` (eq. 7) for solvers that
      declare `superlinear = True`; `nan` otherwise.
    - `onestep_bound`: the smaller of the applicable bounds.
    - `jacobian_norm`: a lower estimate of $\\|J_\\theta \\bar x\\|_{op}$: the
      largest of $\\|J^{ID} t\\| / \\|t\\|$ over the probes and
      $L_F / (1 + \\rho)$ (since $J_\\theta F = (I - J_x F) J_\\theta \\bar x$).
    - `disagreement`: $\\max_t \\|J^{OS} t - J^{ID} t\\| / \\|J^{ID} t\\|$ over the
      random probe directions $t$ (both at $x_k$).
    - `superlinear`, `target`, `max_K`: the settings the recommendation uses.
    """

    rho: Real[Array, ""]
    L_F: Real[Array, ""]
    L_J: Real[Array, ""]
    step: Real[Array, ""]
    distance: Real[Array, ""]
    corollary1_bound: Real[Array, ""]
    corollary3_bound: Real[Array, ""]
    onestep_bound: Real[Array, ""]
    jacobian_norm: Real[Array, ""]
    disagreement: Real[Array, ""]
    superlinear: bool = eqx.field(static=True)
    target: float = eqx.field(static=True)
    max_K: int = eqx.field(static=True)

    def truncation_bound(self, K: int) -> float:
        """Relative bias bound of `Truncated(K)`:
        $\\rho^K L_F / ((1 - \\rho^K)\\, \\|J_\\theta \\bar x\\|)$ (Corollary 1
        applied to $F^K$, first term), with `jacobian_norm` for the
        denominator."""
        rho = _concrete(self.rho, "truncation_bound")
        if rho >= 1:
            return math.inf
        return rho**K * self._L_F / ((1 - rho**K) * self._scale)

    @property
    def _L_F(self) -> float:
        return _concrete(self.L_F, "recommended")

    @property
    def _scale(self) -> float:
        scale = _concrete(self.jacobian_norm, "recommended")
        return scale if scale > 0 else 1.0

    def _recommendation(self) -> tuple[AbstractEstimator, str]:
        rho = _concrete(self.rho, "recommended")
        target = self.target
        if not math.isfinite(rho) or rho >= 1:
            return Implicit(), (
                f"rho = {rho:.3g} >= 1: the step map is not a contraction at x_k, "
                "so no one-step/truncated bound applies; use Implicit (and check "
                "that the solve converged)."
            )
        if self._L_F == 0:
            return OneStep(), "F does not depend on theta: every estimator gives 0."
        scale = self._scale
        convergence = _concrete(self.L_J * self.distance, "recommended") / scale
        note = ""
        if convergence > target:
            note = (
                f" Note: the convergence term L_J * distance / ||J|| = "
                f"{convergence:.2g} exceeds the target; tighten rtol/atol (this "
                "error affects every estimator)."
            )
        onestep_rel = _concrete(self.onestep_bound, "recommended") / scale
        if onestep_rel <= target:
            which = "Corollary 3" if self.superlinear else "Corollary 1"
            return OneStep(), (
                f"{which}: one-step relative error bound {onestep_rel:.2g} <= "
                f"target {target:.2g}." + note
            )
        for K in range(1, self.max_K + 1):
            bias = self.truncation_bound(K)
            if bias <= target:
                if K == 1:
                    return OneStep(), (
                        f"rho = {rho:.3g}: truncation bias bound rho L_F / "
                        f"((1 - rho) ||J||) = {bias:.2g} <= target {target:.2g}." + note
                    )
                return Truncated(K), (
                    f"rho = {rho:.3g}: K = {K} is the smallest K with "
                    f"rho^K L_F / ((1 - rho^K) ||J||) = {bias:.2g} <= target "
                    f"{target:.2g} (one-step: {self.truncation_bound(1):.2g})." + note
                )
        return Implicit(), (
            f"rho = {rho:.3g} is too close to 1: even K = {self.max_K} leaves a "
            f"relative truncation bias bound of "
            f"{self.truncation_bound(self.max_K):.2g} > target {target:.2g}." + note
        )

    @property
    def recommended(self) -> AbstractEstimator:
        """`OneStep()`, `Truncated(K)` with the smallest `K <= max_K` whose
        relative bias bound meets `target`, or `Implicit()`."""
        return self._recommendation()[0]

    @property
    def reason(self) -> str:
        """Why `recommended` was chosen, with the numbers."""
        return self._recommendation()[1]

    def __rich__(self):
        from rich.table import Table

        table = Table(title="itergrad.diagnose", show_lines=False)
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_column("meaning")

        def fmt(x):
            try:
                return f"{float(x):.4g}"
            except (TypeError, jax.errors.ConcretizationTypeError):
                return "<traced>"

        rows = [
            ("rho", self.rho, "||J_x F(x_k)||_op, contraction factor"),
            ("L_F", self.L_F, "||J_theta F(x_k)||_op"),
            ("L_J", self.L_J, "Lipschitz const. of x -> J_theta F"),
            ("step", self.step, "||x_k - x_{k-1}|| (solver: ||x_{k+1} - x_k||)"),
            ("distance", self.distance, "step / (1 - rho) ~ ||x - x_bar||"),
            ("corollary1_bound", self.corollary1_bound, "rho L_F/(1-rho) + L_J dist"),
            ("corollary3_bound", self.corollary3_bound, "L_J dist (superlinear)"),
            ("onestep_bound", self.onestep_bound, "bound on ||J_OS - J||_op"),
            (
                "jacobian_norm",
                self.jacobian_norm,
                "lower estimate of ||J_theta x_bar||",
            ),
            ("disagreement", self.disagreement, "measured rel. |OS - ID| on probes"),
        ]
        for name, value, meaning in rows:
            table.add_row(name, fmt(value), meaning)
        try:
            estimator, reason = self._recommendation()
            table.caption = f"recommended: {estimator!r}\n{reason}"
        except ValueError:
            table.caption = "recommended: (not available under jit)"
        return table

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=110, color_system=None)
        console.print(self)
        return buffer.getvalue()


def _failed_solve_message(name: str) -> str:
    return (
        f"`sol` is a failed solve (sol.result is {name}): diagnose estimates the "
        "bounds at a solution, and the last iterate of a solve that did not "
        "converge or became non-finite is none. Make the solve succeed first "
        "(see the message of `sol.result`, e.g. more `max_steps` or finite "
        "inputs), then diagnose it; for a deliberate fixed budget of steps "
        "(max_steps_reached), pass `allow_unconverged=True`."
    )


def _check_successful(sol: Solution, allow_unconverged: bool) -> PyTree[Any]:
    """`sol.state`, after refusing a failed solve: at once when `sol.result`
    is concrete, else (under `jit`/`vmap`) by a runtime check threaded onto
    the state every estimate is computed from. With `allow_unconverged`, a
    solve stopped by `max_steps` passes."""
    result = sol.result
    failed = result != RESULTS.successful
    if allow_unconverged:
        failed = failed & (result != RESULTS.max_steps_reached)
    if not result.is_traced():
        if np.any(np.asarray(failed)):
            raise ValueError(_failed_solve_message(f"RESULTS.{result_name(result)}"))
        return sol.state
    if not jax.tree_util.tree_leaves(eqx.filter(sol.state, eqx.is_array)):
        return sol.state
    return eqx.error_if(sol.state, failed, _failed_solve_message("not successful"))


def _implicit_jvps(
    f: FlatStep, probes: Array, linear_solver: lx.AbstractLinearSolver | None
) -> tuple[Array, Array]:
    """One-step and implicit JVPs at $x_k$ for each probe direction $t$:
    $J_\\theta F t$ and $(I - J_x F)^{-1} J_\\theta F t$, matrix-free."""
    _, jvp_x = jax.linearize(lambda x: f(x, f.theta), f.x)
    _, jvp_theta = jax.linearize(lambda t: f(f.x, t), f.theta)
    structure = jax.ShapeDtypeStruct(f.x.shape, f.x.dtype)
    operator = lx.FunctionLinearOperator(lambda v: v - jvp_x(v), structure)
    if linear_solver is None:
        # GMRES needs only matvecs; its tolerance follows the dtype so that
        # float32 inputs do not stall.
        tol = float(jnp.finfo(f.x.dtype).eps) ** 0.75
        linear_solver = lx.GMRES(rtol=tol, atol=tol, restart=min(20, f.x.size))

    def one(t):
        onestep = jvp_theta(t)
        sol = lx.linear_solve(operator, onestep, linear_solver, throw=False)
        return onestep, sol.value

    return jax.vmap(one)(probes)


def diagnose(
    F_or_solver: AbstractSolver | Callable[[PyTree[Array], PyTree[Any]], PyTree[Array]],
    sol: Solution,
    theta: PyTree[Any],
    *,
    key: PRNGKeyArray,
    probes: int = 4,
    target: float = 1e-4,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    L_J: float | Real[Array, ""] | None = None,
    max_K: int = DEFAULT_MAX_K,
    linear_solver: lx.AbstractLinearSolver | None = None,
    allow_unconverged: bool = False,
) -> DiagnoseReport:
    """Estimate the quantities of the paper's bounds at the last iterate of
    `sol` and recommend an estimator.

    With $x_k$ the final unknowns (`sol.state.z`; the solver's auxiliary
    state is held fixed, it is no dimension of any estimate):

    - $\\rho = \\|J_x F(x_k, \\theta)\\|_{op}$ and
      $L_F = \\|J_\\theta F(x_k, \\theta)\\|_{op}$ by `power_iterations` steps of
      power iteration on $J^T J$ (one `jax.linearize` JVP and its
      `jax.linear_transpose` per step; no dense Jacobian is formed). $\\rho$'s
      iteration starts from the direction of one more step, which a slowly
      converging iteration aligns with its slowest mode, and is corrected
      upwards by the eigenpair's residual: the bounds below grow like
      $1/(1 - \\rho)$ and must not inherit an under-estimate (the same
      estimates as `solve(..., error_estimate=True)`, `_spectral.local_constants`);
    - distance $\\approx \\|x_k - x_{k-1}\\| / (1 - \\rho)$ (Lemma 1), which bounds
      $\\|x_{k-1} - \\bar x\\|$ (and hence $\\|x_k - \\bar x\\|$) when $F$ is a
      $\\rho$-contraction;
    - Corollary 1: $\\|J^{OS} x_k - J_\\theta \\bar x\\|_{op} \\le
      \\rho L_F / (1 - \\rho) + L_J \\|x_{k-1} - \\bar x\\|$ (eq. 5), and for
      solvers with `superlinear = True`, Corollary 3:
      $\\le L_J \\|x_{k-1} - \\bar x\\|$ (eq. 7);
    - the relative disagreement between the one-step JVP $J_\\theta F(x_k) t$
      and the implicit JVP $(I - J_x F(x_k))^{-1} J_\\theta F(x_k) t$ (eq. 3,
      solved matrix-free with GMRES) on `probes` random directions $t$;
    - a recommendation: `OneStep()` if the one-step bound, relative to a lower
      estimate of $\\|J_\\theta \\bar x\\|$, meets `target`; else `Truncated(K)`
      with the smallest $K \\le$ `max_K` such that
      $\\rho^K L_F / ((1 - \\rho^K) \\|J_\\theta \\bar x\\|) \\le$ `target`; else
      `Implicit()`.

    $L_J$ (the Lipschitz constant of $x \\mapsto J_\\theta F(x, \\theta)$) is
    taken from the argument `L_J` if given; otherwise it is estimated as the
    operator norm of the directional derivative
    $\\partial_x (J_\\theta F)(x_k, \\theta)[u]$ along the unit direction $u$ of
    the last step (exact second-order AD, a limit of finite differences of
    $J_\\theta F$ along $x_k - x_{k-1}$).

    The numeric part works under `jax.jit` (e.g.
    `eqx.filter_jit(ig.diagnose)(F, sol, theta, key=key)`); read
    `report.recommended` / `report.reason` outside it. `print(report)` shows a
    table.

    **Arguments:**

    - `F_or_solver`: the plain step map `F(x, theta)` given to `ig.iterate`
      (then the unknowns are $x$), or the `AbstractSolver` given to `ig.solve`
      (then $F$ is `solver.step` on the unknowns $z$, auxiliary state fixed).
    - `sol`: the `Solution` of that solve.
    - `theta`: the parameters of that solve.
    - `key`: a `jax.random` key for the power-iteration starts and probes.
    - `probes`: number of random directions for `disagreement` (default 4).
    - `target`: the relative derivative error the recommendation aims for
      (default `1e-4`).
    - `power_iterations`: power-iteration steps per norm (default 30, as
      `Truncated("auto")`).
    - `L_J`: a known Lipschitz constant of $J_\\theta F$ in $x$; `None`
      (default) estimates it as above.
    - `max_K`: the largest `K` considered for `Truncated(K)` (default 100, as
      `Truncated("auto")`).
    - `linear_solver`: the Lineax solver for the implicit JVPs (default GMRES).
    - `allow_unconverged`: diagnose a solve that stopped at `max_steps`
      (a fixed budget of $k$ steps, as in Corollary 5) instead of refusing
      it; the bounds are then those of its last iterate. Non-finite solves
      are refused whatever this says. Default `False`.

    **Returns:** a `DiagnoseReport`.

    **Raises:** `ValueError` when `sol.result` is not `RESULTS.successful`
    (under `jit`: an `equinox` runtime error with the same message): the bounds
    are estimates at a solution, and the last iterate of a failed solve
    (non-finite, or not converged) is none; its numbers would recommend an
    estimator for a problem that was never solved.

    !!! warning

        These are local estimates at $x_k$, not certified constants: power
        iteration approaches $L_F$ and $L_J$ from below ($\\rho$ is corrected
        upwards, which holds once the iteration has found the top singular
        vector's neighbourhood), $\\rho$ is the norm at
        $x_k$ rather than a sup over the region (Assumption 1), and the
        estimated $L_J$ is a directional derivative along the last step only.
        For iterations that are not single-step contractions (e.g. heavy ball,
        whose phase-space step can have $\\|J_x F\\| > 1$) the bounds do not
        apply and `Implicit` is recommended. For solvers the step length is
        $\\|x_{k+1} - x_k\\|$ from one extra step, so `distance` then estimates
        $\\|x_k - \\bar x\\|$, smaller than the $\\|x_{k-1} - \\bar x\\|$ of eq.
        (5) and (7).
    """
    if not isinstance(sol, Solution):
        raise TypeError(
            f"`sol` must be the itergrad.Solution of a solve, got {type(sol).__name__}."
        )
    state = _check_successful(sol, allow_unconverged)
    for name, value in (
        ("probes", probes),
        ("power_iterations", power_iterations),
        ("max_K", max_K),
    ):
        positive_int(value, name)
    if not isinstance(target, int | float) or not target > 0:
        raise ValueError(f"`target` must be a positive number, got {target!r}.")
    if isinstance(F_or_solver, AbstractSolver):
        solver, plain = F_or_solver, False
    elif callable(F_or_solver):
        solver, plain = FixedPointIteration(F_or_solver), True
    else:
        raise TypeError(
            "`F_or_solver` must be a step map F(x, theta) or an itergrad solver, "
            f"got {type(F_or_solver).__name__}."
        )
    f = flat_step(
        solver, jax.lax.stop_gradient(state), jax.lax.stop_gradient(theta)
    )
    if f.theta.size == 0:
        raise ValueError(
            "`theta` has no floating-point leaves: nothing to differentiate."
        )
    k_theta, k_probe = jr.split(key)
    constants = local_constants(
        f,
        power_iterations,
        theta_start=jr.normal(k_theta, f.theta.shape, f.theta.dtype),
        L_B=None if L_J is None else jnp.asarray(L_J, f.x.dtype),
    )
    rho, L_F, L_J_value = constants.rho, constants.L_F, constants.L_B
    # A plain step map's solution knows its last step ||x_k - x_{k-1}||; for a
    # solver it is one more step from the final unknowns.
    step = jnp.asarray(sol.residual, f.x.dtype) if plain else constants.step
    one = jnp.ones((), f.x.dtype)
    distance = jnp.where(rho < 1, step / jnp.where(rho < 1, one - rho, one), jnp.inf)

    corollary1 = jnp.where(
        rho < 1,
        rho * L_F / jnp.where(rho < 1, one - rho, one) + L_J_value * distance,
        jnp.inf,
    )
    if solver.superlinear:
        corollary3 = L_J_value * distance
        onestep_bound = jnp.minimum(corollary1, corollary3)
    else:
        corollary3 = jnp.full((), jnp.nan, f.x.dtype)
        onestep_bound = corollary1

    directions = jr.normal(k_probe, (probes,) + f.theta.shape, f.theta.dtype)
    onestep, implicit = _implicit_jvps(f, directions, linear_solver)
    implicit_norms = jnp.linalg.norm(implicit, axis=1)
    direction_norms = jnp.linalg.norm(directions, axis=1)
    jacobian_norm = jnp.maximum(
        jnp.max(implicit_norms / direction_norms), L_F / (1 + rho)
    )
    safe_norms = jnp.where(implicit_norms > 0, implicit_norms, 1.0)
    disagreement = jnp.max(jnp.linalg.norm(onestep - implicit, axis=1) / safe_norms)

    return DiagnoseReport(
        rho=rho,
        L_F=L_F,
        L_J=L_J_value,
        step=step,
        distance=distance,
        corollary1_bound=corollary1,
        corollary3_bound=corollary3,
        onestep_bound=onestep_bound,
        jacobian_norm=jacobian_norm,
        disagreement=disagreement,
        superlinear=bool(solver.superlinear),
        target=float(target),
        max_K=max_K,
    )
