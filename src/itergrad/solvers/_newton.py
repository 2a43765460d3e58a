"""Newton's method with a line search (Example 3), the Newton system solved
through Lineax (dense factorisation or matrix-free Krylov)."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._solution import RESULTS
from ._base import AbstractSolver
from ._gradient import check_iterate
from ._krylov import (
    HESSIAN_TAGS as _HESSIAN_TAGS,
    MATRIX_FREE as _MATRIX_FREE,
    EisenstatWalker,
    forced_solver,
    newton_direction,
)


def _roundoff(f0: Scalar) -> Scalar:
    # A change of the objective this small is invisible in floating point. Near
    # the solution the predicted decrease falls below it, and without this
    # slack Armijo would reject the exact Newton step on rounding noise alone.
    return 64 * jnp.finfo(jnp.result_type(f0)).eps * jnp.abs(f0)


class AbstractLineSearch(eqx.Module):
    """A line search along a descent direction $d$ from $x$: returns a step
    $t > 0$ and whether it is acceptable.

    Line searches run on values that carry no derivative (Newton stops
    gradients before calling them): the accepted step is piecewise constant in
    $(x, \\theta)$, so its derivative is zero almost everywhere.
    """

    @abc.abstractmethod
    def __call__(
        self,
        fn: Callable[[Float[Array, " n"]], Scalar],
        x: Float[Array, " n"],
        f0: Scalar,
        g0: Float[Array, " n"],
        direction: Float[Array, " n"],
    ) -> tuple[Scalar, Bool[Array, ""]]:
        """Search along `direction` from `x`, where `fn(x) = f0` and
        `grad fn(x) = g0`. Returns `(t, success)`."""


def _check_line_search(name: str, c1: float, max_steps: int) -> None:
    if not 0 < c1 < 0.5:
        raise ValueError(
            f"{name}(c1=...) must lie in (0, 1/2) so that Newton's unit step is "
            f"accepted near the solution, got {c1}."
        )
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(
            f"{name}(max_steps=...) must be a positive integer, got {max_steps!r}."
        )


class Backtracking(AbstractLineSearch):
    """Backtracking line search with the Armijo (sufficient decrease) condition.

    Tries $t = 1, \\tau, \\tau^2, \\dots$ and accepts the first $t$ with
    $f(x + t d) \\le f(x) + c_1 t \\langle \\nabla f(x), d \\rangle$ (up to a
    few ulps of $|f(x)|$, so that steps whose decrease is below rounding are
    accepted). Fails on a non-descent direction or after `max_steps` tries.

    **Arguments:**

    - `c1`: the sufficient-decrease constant, in $(0, 1/2)$ (default `1e-4`);
      below $1/2$ the unit Newton step is accepted near the solution.
    - `decrease`: the factor $\\tau \\in (0, 1)$ (default `0.5`).
    - `max_steps`: the number of reductions before failing (default `40`).
    """

    c1: float = 1e-4
    decrease: float = 0.5
    max_steps: int = eqx.field(static=True, default=40)

    def __check_init__(self):
        _check_line_search("Backtracking", self.c1, self.max_steps)
        if not 0 < self.decrease < 1:
            raise ValueError(
                f"Backtracking(decrease=...) must lie in (0, 1), got {self.decrease}."
            )

    def __call__(self, fn, x, f0, g0, direction):
        slope = jnp.vdot(g0, direction)
        slack = _roundoff(f0)
        one = jnp.ones((), jnp.result_type(x))

        def armijo(t, f):
            return jnp.isfinite(f) & (f <= f0 + self.c1 * t * slope + slack)

        def cond_fun(carry):
            t, f, i = carry
            return (~armijo(t, f)) & (i < self.max_steps)

        def body_fun(carry):
            t, _, i = carry
            t = t * self.decrease
            return t, fn(x + t * direction), i + 1

        t, f, _ = jax.lax.while_loop(
            cond_fun, body_fun, (one, fn(x + direction), jnp.array(0))
        )
        descent = jnp.isfinite(slope) & (slope <= slack)
        return t, descent & armijo(t, f)


class Wolfe(AbstractLineSearch):
    """A line search for the (strong or weak) Wolfe conditions, by bracketing
    and bisection.

    Accepts $t$ satisfying sufficient decrease,
    $f(x + t d) \\le f(x) + c_1 t \\langle \\nabla f(x), d\\rangle$, and the
    curvature condition: strong
    $|\\langle \\nabla f(x + t d), d\\rangle| \\le c_2 |\\langle \\nabla f(x), d\\rangle|$,
    or weak $\\langle \\nabla f(x + t d), d\\rangle \\ge c_2 \\langle \\nabla f(x), d\\rangle$.
    Starts at $t = 1$; doubles $t$ until the minimiser is bracketed, then
    bisects. When the predicted decrease $|\\langle \\nabla f(x), d\\rangle|$ is
    below rounding of $f$ the unit step is accepted at once.

    **Arguments:**

    - `c1`: sufficient-decrease constant in $(0, 1/2)$ (default `1e-4`).
    - `c2`: curvature constant in $(c_1, 1)$ (default `0.9`, the usual value
      for Newton).
    - `strong`: strong (default) or weak Wolfe curvature condition.
    - `max_steps`: the number of trial steps after the first (default `40`).

    Each trial costs one objective value and gradient, where `Backtracking`
    needs only the value.
    """

    c1: float = 1e-4
    c2: float = 0.9
    strong: bool = eqx.field(static=True, default=True)
    max_steps: int = eqx.field(static=True, default=40)

    def __check_init__(self):
        _check_line_search("Wolfe", self.c1, self.max_steps)
        if not self.c1 < self.c2 < 1:
            raise ValueError(f"Wolfe(c2=...) must lie in (c1, 1), got c2={self.c2}.")

    def __call__(self, fn, x, f0, g0, direction):
        value_and_grad = jax.value_and_grad(fn)
        slope = jnp.vdot(g0, direction)
        slack = _roundoff(f0)
        negligible = jnp.abs(slope) <= slack
        dtype = jnp.result_type(x)

        def evaluate(t):
            f, g = value_and_grad(x + t * direction)
            return f, jnp.vdot(g, direction)

        def decrease(t, f):
            return jnp.isfinite(f) & (f <= f0 + self.c1 * t * slope + slack)

        def curvature(s):
            if self.strong:
                return jnp.abs(s) <= self.c2 * jnp.abs(slope)
            return s >= self.c2 * slope

        def accepted(t, f, s):
            return negligible | (decrease(t, f) & curvature(s))

        def cond_fun(carry):
            t, _, _, f, s, i = carry
            return (~accepted(t, f, s)) & (i < self.max_steps)

        def body_fun(carry):
            t, lo, hi, f, s, i = carry
            # Too long: no sufficient decrease, or (strong) past the minimiser.
            too_long = ~decrease(t, f) | (self.strong & (s > 0))
            hi = jnp.where(too_long, t, hi)
            lo = jnp.where(too_long, lo, t)
            t = jnp.where(jnp.isfinite(hi), (lo + hi) / 2, 2 * t)
            f, s = evaluate(t)
            return t, lo, hi, f, s, i + 1

        one = jnp.ones((), dtype)
        f1, s1 = evaluate(one)
        init = (
            one,
            jnp.zeros((), dtype),
            jnp.full((), jnp.inf, dtype),
            f1,
            s1,
            jnp.array(0),
        )
        t, _, _, f, s, _ = jax.lax.while_loop(cond_fun, body_fun, init)
        descent = jnp.isfinite(slope) & (slope <= slack)
        return t, descent & accepted(t, f, s)


class _NewtonState(eqx.Module):
    x: PyTree[Array]
    result: RESULTS
    # Forcing-term history for inexact (Krylov) Newton: the gradient norm and
    # the forcing term of the previous step. Bookkeeping, not unknowns: they
    # are computed without derivatives (see `Newton.optimality`).
    previous_gradient_norm: Scalar
    previous_forcing: Scalar
    # Krylov steps so far (Lineax's `num_steps`, summed); 0 when dense.
    krylov_steps: Int[Array, ""]


def _freeze(tree: PyTree[Any]) -> PyTree[Any]:
    return jtu.tree_map(
        lambda leaf: jax.lax.stop_gradient(leaf) if eqx.is_array(leaf) else leaf, tree
    )


class Newton(AbstractSolver):
    """Newton's method with a line search (Example 3):
    $x_{k+1} = x_k - t_k \\nabla^2_{xx} f(x_k, \\theta)^{-1} \\nabla_x f(x_k, \\theta)$.

    The Newton system is solved by Lineax: by default a Cholesky factorisation
    of the dense Hessian (`jax.jacfwd` of the gradient); with a Krylov solver
    (`lx.CG(rtol, atol, max_steps)`, `lx.GMRES`, ...) the Hessian is never
    formed and each Krylov iteration costs one Hessian-vector product
    (inexact Newton). The step $t_k$ comes from `linesearch` and carries no
    derivative; near the solution $t_k = 1$, so the one-step estimator
    differentiates the exact Newton map and is quadratically accurate
    (Corollary 3). `optimality` is $\\nabla_x f$, in the state's structure.

    The state holds $x$, a `RESULTS` code, `krylov_steps` (the Krylov
    solver's step counts summed over the Newton steps: for CG one
    Hessian-vector product each, for GMRES one restart cycle; 0 with a dense
    solver) and the forcing term's history; `status` reports
    `RESULTS.linesearch_failed` when no acceptable step was found (or the
    direction was not a descent direction, e.g. an indefinite Hessian) and
    `RESULTS.linear_solve_failed` when the Newton system could not be solved.
    After a failure the iterate is left unchanged.

    **Arguments:**

    - `objective`: `objective(x, theta) -> scalar`, twice differentiable in
      `x` (three times for derivatives of the one-step estimator), $x$ any
      pytree of floating-point arrays.
    - `linesearch`: `Backtracking()` (default, Armijo) or `Wolfe()`.
    - `linear_solver`: a Lineax solver for the Newton system. Default
      `lx.Cholesky()` (the Hessian is tagged symmetric positive semidefinite);
      `lx.LU()` assumes no definiteness (an ascent direction is still reported
      as a line-search failure); `lx.CG(rtol=..., atol=...,
      max_steps=...)` for matrix-free inexact Newton. A Krylov solver that
      stops at its `max_steps` still yields a usable (descent) direction.
      With a Krylov solver, derivatives of the direction are those of the
      exact Newton direction, $\\dot d = H^{-1}(-\\dot g - \\dot H d)$, solved
      with this solver at its own `rtol`/`atol` (which therefore set the
      derivatives' accuracy).
    - `forcing`: (CG, GMRES, BiCGStab only) how accurately each Newton system
      is solved in the forward pass. Default `EisenstatWalker()`: loosely far
      from the solution, ever more tightly near it, never tighter than the
      solver's `rtol`/`atol` (see `EisenstatWalker`); this cuts the number of
      Hessian-vector products several-fold and leaves derivatives unchanged.
      `None` solves every system to the solver's tolerance.
    - `cheap_derivative`: (dense solvers only; default `True`) differentiate
      the Newton direction $d = -H^{-1}g$ without going through the Hessian's
      formation and factorisation: with $\\bar H$ the Hessian held constant,
      $d$ is computed as $\\hat d + \\big(\\ell - \\mathrm{sg}(\\ell)\\big)$,
      $\\ell = \\bar H^{-1}\\big(-g(x,\\theta) - \\nabla^2 f(x,\\theta)[\\mathrm{sg}(\\hat d)]\\big)$,
      whose first derivative is exactly that of $-H^{-1}g$,
      $dd = H^{-1}(-dg - dH\\,d)$, using one Hessian-vector product and the
      factorisation already computed. So every estimator's *first*
      derivative is unchanged (the paper's exact $J^{OS}$), at a fraction of
      the cost. Second and higher derivatives of the step are not exact; set
      `cheap_derivative=False` to differentiate the dense Hessian itself
      (e.g. for `jax.hessian` of the one-step estimator).

    !!! warning

        The objective must be strictly convex near the solution: at a point
        with an indefinite Hessian Cholesky fails and the line search reports
        `RESULTS.linesearch_failed`. With `cheap_derivative=False`,
        derivatives of the one-step estimator differentiate through the
        Hessian (third derivatives of `objective`): about the cost of forming
        the Hessian once more.
    """

    superlinear = True

    objective: Callable[[PyTree[Array], PyTree[Any]], Scalar]
    linesearch: AbstractLineSearch = Backtracking()
    linear_solver: lx.AbstractLinearSolver = lx.Cholesky()
    cheap_derivative: bool = eqx.field(static=True, default=True)
    forcing: EisenstatWalker | None = EisenstatWalker()

    def __check_init__(self):
        if not callable(self.objective):
            raise TypeError(
                "Newton(objective, ...) needs a callable objective(x, theta) -> "
                f"scalar, got {type(self.objective).__name__}."
            )
        if not isinstance(self.linesearch, AbstractLineSearch):
            raise TypeError(
                "Newton(linesearch=...) must be an itergrad line search "
                f"(ig.Backtracking(), ig.Wolfe()), got {self.linesearch!r}."
            )
        if self.forcing is not None and not isinstance(self.forcing, EisenstatWalker):
            raise TypeError(
                "Newton(forcing=...) must be ig.EisenstatWalker(...) or None, got "
                f"{self.forcing!r}."
            )
        if not isinstance(self.linear_solver, lx.AbstractLinearSolver):
            raise TypeError(
                "Newton(linear_solver=...) must be a Lineax solver (lx.Cholesky(), "
                f"lx.LU(), lx.CG(rtol, atol)), got {self.linear_solver!r}."
            )

    def init(self, x0, theta):
        x0 = check_iterate("Newton", x0)
        dtype = ravel_pytree(x0)[0].dtype
        return _NewtonState(
            x=x0,
            result=RESULTS.successful,
            previous_gradient_norm=jnp.zeros((), dtype),
            previous_forcing=jnp.zeros((), dtype),
            krylov_steps=jnp.zeros((), jnp.int32),
        )

    def step(self, state, theta):
        flat, unravel = ravel_pytree(state.x)

        def gradient(z):
            f, g = jax.value_and_grad(lambda u: self.objective(unravel(u), theta))(z)
            return g, f

        forcing = state.previous_forcing
        if isinstance(self.linear_solver, _MATRIX_FREE):
            g, f = gradient(flat)
            gradient_norm = jnp.linalg.norm(jax.lax.stop_gradient(g))
            primal_solver = self.linear_solver
            if self.forcing is not None:
                forcing = self.forcing(
                    gradient_norm, state.previous_gradient_norm, state.previous_forcing
                )
                primal_solver = forced_solver(primal_solver, forcing, gradient_norm)
            # Arrays the objective closes over become explicit inputs, so that
            # the custom derivative of the direction reaches them too.
            flat_objective = eqx.filter_closure_convert(
                lambda z, th: self.objective(unravel(z), th), flat, theta
            )
            direction, solver_ok, krylov_steps = newton_direction(
                flat, flat_objective, theta,
                primal_solver=primal_solver, tangent_solver=self.linear_solver,
            )
        else:
            if self.cheap_derivative:
                direction, solution, g, f = self._dense_direction(gradient, flat)
            else:
                hessian, g, f = _hessian_and_gradient(gradient, flat)
                operator = lx.MatrixLinearOperator(hessian, _HESSIAN_TAGS)
                solution = lx.linear_solve(
                    operator, -g, self.linear_solver, throw=False
                )
                direction = solution.value
            solver_ok = solution.result == lx.RESULTS.successful
            krylov_steps = 0
            gradient_norm = jnp.linalg.norm(jax.lax.stop_gradient(g))
        # A non-finite direction (Cholesky on an indefinite Hessian) or an ascent
        # one (LU there) is a line-search failure: there is no descent direction.
        # Only a solver failing with a finite output is a linear-solve failure.
        solve_failed = ~solver_ok & jnp.all(jnp.isfinite(direction))

        # The line search sees no derivatives: its step is piecewise constant,
        # and reverse mode could not go through its while_loop anyway. The
        # objective is closure-converted so that arrays it closes over are
        # frozen too.
        objective = eqx.filter_closure_convert(self.objective, state.x, theta)
        frozen_objective, frozen_theta = _freeze((objective, theta))
        t, found = self.linesearch(
            lambda z: frozen_objective(unravel(z), frozen_theta),
            *_freeze((flat, f, g, direction)),
        )
        accepted = found & ~solve_failed
        new_flat = jnp.where(accepted, flat + t * direction, flat)
        result = RESULTS.where(
            solve_failed,
            RESULTS.linear_solve_failed,
            RESULTS.where(found, RESULTS.successful, RESULTS.linesearch_failed),
        )
        return _NewtonState(
            x=unravel(new_flat),
            result=result,
            previous_gradient_norm=gradient_norm,
            previous_forcing=jax.lax.stop_gradient(forcing),
            krylov_steps=state.krylov_steps + krylov_steps,
        )

    def _dense_direction(self, gradient, flat):
        """$d = -H^{-1} g$ with the derivative described under
        `cheap_derivative`: the Hessian is formed and factorised on
        stopped inputs, and derivatives enter through $g$ and one
        Hessian-vector product only."""
        # jacfwd over a stopped point: its (expensive) derivative is never
        # taken. Closed-over theta may still carry tangents; stop them too.
        hessian, _, _ = _hessian_and_gradient(gradient, jax.lax.stop_gradient(flat))
        hessian = jax.lax.stop_gradient(hessian)
        operator = lx.MatrixLinearOperator(hessian, _HESSIAN_TAGS)
        state = self.linear_solver.init(operator, {})
        g, f = gradient(flat)
        solution = lx.linear_solve(
            operator, -jax.lax.stop_gradient(g), self.linear_solver, state=state,
            throw=False,
        )
        d_hat = jax.lax.stop_gradient(solution.value)
        # H(x, theta) d_hat with derivatives live in (x, theta), d_hat fixed.
        _, hvp = jax.jvp(lambda z: gradient(z)[0], (flat,), (d_hat,))
        correction = lx.linear_solve(
            operator, -g - hvp, self.linear_solver, state=state, throw=False
        ).value
        direction = d_hat + (correction - jax.lax.stop_gradient(correction))
        return direction, solution, g, f

    def value(self, state):
        return state.x

    def optimality(self, state, theta):
        grad = jax.grad(self.objective)(state.x, theta)

        def bookkeeping(value):
            # Not an unknown: a residual that is zero with identity Jacobian
            # keeps the implicit system square and decouples these leaves.
            return value - jax.lax.stop_gradient(value)

        residual = _NewtonState(
            x=grad,
            result=state.result,
            previous_gradient_norm=bookkeeping(state.previous_gradient_norm),
            previous_forcing=bookkeeping(state.previous_forcing),
            krylov_steps=state.krylov_steps,
        )
        return eqx.filter(residual, eqx.is_inexact_array)

    def status(self, state):
        return state.result


def _hessian_and_gradient(gradient, flat):
    """`(Hessian, gradient, value)` in one `jacfwd` pass: the primal of the
    gradient is computed once, not once per column."""

    def gradient_aux(z):
        g, f = gradient(z)
        return g, (g, f)

    hessian, (g, f) = jax.jacfwd(gradient_aux, has_aux=True)(flat)
    return hessian, g, f
