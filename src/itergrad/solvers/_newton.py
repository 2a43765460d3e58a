"""Newton's method with a line search (Example 3), the Newton system solved
through Lineax (dense factorisation or matrix-free Krylov)."""

import abc
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._linear_solve import linear_solve
from .._solution import RESULTS
from .._tree import tree_freeze
from .._validate import in_open_interval, one_of, positive_int
from ._base import AbstractSolver
from ._forcing import EisenstatWalker, forced_solver, is_forceable
from ._gradient import check_iterate

# The Hessian of a convex objective, as Lineax needs to know it.
HESSIAN_TAGS = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})


def _roundoff(f0: Scalar) -> Scalar:
    # A change of the objective this small is invisible in floating point. Near
    # the solution the predicted decrease falls below it, and without this
    # slack Armijo would reject the exact Newton step on rounding noise alone.
    return 64 * jnp.finfo(jnp.result_type(f0)).eps * jnp.abs(f0)


def _indefinite(hessian: Float[Array, "n n"]) -> Bool[Array, ""]:
    """Whether the symmetric `hessian` has a negative eigenvalue beyond
    rounding: its Cholesky factorisation fails after a shift of
    $100\\, n\\, \\epsilon \\max_{ij} |H_{ij}|$ (a positive semidefinite, even
    singular, Hessian passes). A NaN Hessian is not reported here."""
    n = hessian.shape[0]
    shift = 100 * n * jnp.finfo(hessian.dtype).eps * jnp.max(jnp.abs(hessian))
    factor = jnp.linalg.cholesky(hessian + shift * jnp.eye(n, dtype=hessian.dtype))
    return ~jnp.all(jnp.isfinite(factor)) & jnp.all(jnp.isfinite(hessian))


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

    def search(
        self, fn, x, f0, g0, direction
    ) -> tuple[Scalar, Bool[Array, ""], Scalar, Float[Array, " n"]]:
        """Like `__call__` (same arguments), and also returns the value and gradient of `fn` at
        $x + t d$, so that a solver that needs them next (L-BFGS) does not
        evaluate them twice. This default evaluates them after the search;
        a search that computes them anyway (`Wolfe`) returns its own."""
        t, found = self(fn, x, f0, g0, direction)
        f, g = jax.value_and_grad(fn)(x + t * direction)
        return t, found, f, g


def _check_line_search(name: str, c1: float, max_steps: int) -> None:
    if not 0 < c1 < 0.5:
        raise ValueError(
            f"{name}(c1=...) must lie in (0, 1/2) so that Newton's unit step is "
            f"accepted near the solution, got {c1}."
        )
    positive_int(max_steps, f"{name}(max_steps=...)")


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
        in_open_interval(self.decrease, "Backtracking(decrease=...)", 0, 1)

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
        t, found, _, _ = self.search(fn, x, f0, g0, direction)
        return t, found

    def search(self, fn, x, f0, g0, direction):
        value_and_grad = jax.value_and_grad(fn)
        slope = jnp.vdot(g0, direction)
        slack = _roundoff(f0)
        negligible = jnp.abs(slope) <= slack
        dtype = jnp.result_type(x)

        def evaluate(t):
            f, g = value_and_grad(x + t * direction)
            return f, g, jnp.vdot(g, direction)

        def decrease(t, f):
            return jnp.isfinite(f) & (f <= f0 + self.c1 * t * slope + slack)

        def curvature(s):
            if self.strong:
                return jnp.abs(s) <= self.c2 * jnp.abs(slope)
            return s >= self.c2 * slope

        def accepted(t, f, s):
            return negligible | (decrease(t, f) & curvature(s))

        def cond_fun(carry):
            t, _, _, f, _, s, i = carry
            return (~accepted(t, f, s)) & (i < self.max_steps)

        def body_fun(carry):
            t, lo, hi, f, _, s, i = carry
            # Too long: no sufficient decrease, or (strong) past the minimiser.
            too_long = ~decrease(t, f) | (self.strong & (s > 0))
            hi = jnp.where(too_long, t, hi)
            lo = jnp.where(too_long, lo, t)
            t = jnp.where(jnp.isfinite(hi), (lo + hi) / 2, 2 * t)
            f, g, s = evaluate(t)
            return t, lo, hi, f, g, s, i + 1

        one = jnp.ones((), dtype)
        f1, g1, s1 = evaluate(one)
        init = (
            one,
            jnp.zeros((), dtype),
            jnp.full((), jnp.inf, dtype),
            f1,
            g1,
            s1,
            jnp.array(0),
        )
        t, _, _, f, g, s, _ = jax.lax.while_loop(cond_fun, body_fun, init)
        descent = jnp.isfinite(slope) & (slope <= slack)
        return t, descent & accepted(t, f, s), f, g


class _NewtonAux(eqx.Module):
    """Newton's auxiliary state (no unknowns here: $z = x$)."""

    result: RESULTS
    # Forcing-term history for inexact (Krylov) Newton: the gradient norm and
    # the forcing term of the previous step, computed without derivatives.
    previous_gradient_norm: Scalar
    previous_forcing: Scalar
    # Krylov steps so far (Lineax's `num_steps`, summed); 0 when direct.
    krylov_steps: Int[Array, ""]


class Newton(AbstractSolver):
    """Newton's method with a line search (Example 3):
    $x_{k+1} = x_k - t_k \\nabla^2_{xx} f(x_k, \\theta)^{-1} \\nabla_x f(x_k, \\theta)$.

    The unknowns are $z = x$ (any pytree of floating-point arrays);
    `optimality` is $\\nabla_x f$, so `Implicit()` solves with the Hessian
    (tagged symmetric positive semidefinite, so `lx.CG` works there too).
    The auxiliary state holds a `RESULTS` code, `krylov_steps` (the Krylov
    solver's step counts summed over the Newton steps: for CG one
    Hessian-vector product each, for GMRES one restart cycle; 0 with a direct
    solver) and the forcing term's history. `status` reports
    `RESULTS.linesearch_failed` when no acceptable step was found (or the
    direction was not a descent direction, e.g. an indefinite Hessian),
    `RESULTS.linear_solve_failed` when the Newton system could not be solved,
    `RESULTS.nonconvex` when a dense Hessian solved by a solver other than
    Cholesky is indefinite, and `RESULTS.nonfinite` when the objective or its
    gradient is NaN/Inf at the iterate; after a failure the iterate is left
    unchanged.

    The Newton system $\\nabla^2 f\\, d = -g$ is solved by Lineax, with the
    Hessian either materialised (`hessian="dense"`: one linearisation of the
    gradient and $n$ Hessian-vector products, then e.g. a Cholesky
    factorisation) or applied matrix-free (`hessian="hvp"`: each product
    costs about one gradient; use a Krylov `linear_solver` such as
    `lx.CG(rtol, atol)`: inexact Newton). The step $t_k$ comes from
    `linesearch` and carries no derivative; near the solution $t_k = 1$, so
    the one-step estimator differentiates the exact Newton map and is
    quadratically accurate (Corollary 3).

    **Derivatives of the direction.** Whatever the solver and however loosely
    the forward system was solved, the direction is differentiated as the
    exact Newton direction, $\\dot d = H^{-1}(-\\dot g - \\dot H d)$: one
    third-order directional derivative for $\\dot H d$ (never the derivative
    of a materialised Hessian or of its factorisation) and one more solve with
    the same factorisation, or with `linear_solver` at its own `rtol`/`atol`
    when matrix-free (these tolerances therefore set the derivatives'
    accuracy). The rule (`itergrad._linear_solve`) applies again at every
    order, so Hessians of the one-step estimator are exact too.

    **Arguments:**

    - `objective`: `objective(x, theta) -> scalar`, twice differentiable in
      `x` (three times for derivatives of the one-step estimator).
    - `linesearch`: `Backtracking()` (default, Armijo) or `Wolfe()`.
    - `linear_solver`: any Lineax solver for the Newton system. Default
      `lx.Cholesky()`; `lx.LU()` assumes no definiteness in the solve, but
      Newton still needs a convex objective: an ascent direction is reported
      as a line-search failure, and an indefinite Hessian (where LU would
      step towards a saddle point) as `RESULTS.nonconvex`, checked by one
      extra Cholesky factorisation of the dense Hessian per step; `lx.CG(rtol=..., atol=...,
      max_steps=...)` with `hessian="hvp"` for matrix-free inexact Newton. A
      Krylov solver that stops at its `max_steps` still yields a usable
      (descent) direction.
    - `hessian`: `"dense"` (default) materialises the Hessian once per step,
      so that a factorisation serves the forward solve and every derivative;
      `"hvp"` never forms it (memory $O(n)$), each operator product being a
      Hessian-vector product.
    - `forcing`: (solvers with a `rtol`/`atol` stopping test: CG, GMRES,
      BiCGStab) how accurately each Newton system is solved in the forward
      pass. Default `EisenstatWalker()`: loosely far from the solution, ever
      more tightly near it, never tighter than the solver's `rtol`/`atol`
      (see `EisenstatWalker`); this cuts the number of Hessian-vector
      products several-fold and leaves derivatives unchanged. `None` solves
      every system to the solver's tolerance.

    !!! warning

        The objective must be strictly convex near the solution: at a point
        with an indefinite Hessian Cholesky fails and the line search reports
        `RESULTS.linesearch_failed`.
    """

    superlinear = True
    optimality_tags = HESSIAN_TAGS

    objective: Callable[[PyTree[Array], PyTree[Any]], Scalar]
    linesearch: AbstractLineSearch = Backtracking()
    linear_solver: lx.AbstractLinearSolver = lx.Cholesky()
    hessian: Literal["dense", "hvp"] = eqx.field(static=True, default="dense")
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
        one_of(self.hessian, "Newton(hessian=...)", ("dense", "hvp"))

    def init(self, x0, theta):
        x0 = check_iterate("Newton", x0)
        dtype = ravel_pytree(x0)[0].dtype
        aux = _NewtonAux(
            result=RESULTS.successful,
            previous_gradient_norm=jnp.zeros((), dtype),
            previous_forcing=jnp.zeros((), dtype),
            krylov_steps=jnp.zeros((), jnp.int32),
        )
        return x0, aux

    def step(self, z, aux, theta):
        flat, unravel = ravel_pytree(z)
        # Arrays the objective closes over become explicit inputs, so that
        # derivatives reach them through the Hessian operator below.
        objective = eqx.filter_closure_convert(
            lambda u, th: self.objective(unravel(u), th), flat, theta
        )
        # One linearisation gives f, g and the Hessian-vector product
        # v -> H v at about the cost of one gradient per product.
        (f, g), linear = jax.linearize(
            lambda u: jax.value_and_grad(objective)(u, theta), flat
        )
        structure = jax.ShapeDtypeStruct(flat.shape, flat.dtype)
        operator = lx.FunctionLinearOperator(lambda v: linear(v)[1], structure, HESSIAN_TAGS)
        gradient_norm = jnp.linalg.norm(jax.lax.stop_gradient(g))

        solver, derivative_solver = self.linear_solver, None
        forcing = aux.previous_forcing
        if self.forcing is not None and is_forceable(solver):
            forcing = self.forcing(
                gradient_norm, aux.previous_gradient_norm, aux.previous_forcing
            )
            solver = forced_solver(solver, forcing, gradient_norm)
            derivative_solver = self.linear_solver
        solver_state = None
        indefinite = jnp.array(False)
        if self.hessian == "dense":
            # Materialised and factorised on stopped values: the derivative
            # of the direction never goes through the matrix (see
            # `itergrad._linear_solve`).
            hessian = jax.lax.stop_gradient(
                jax.vmap(operator.mv, out_axes=1)(jnp.eye(flat.size, dtype=flat.dtype))
            )
            solver_state = solver.init(lx.MatrixLinearOperator(hessian, HESSIAN_TAGS), {})
            if not isinstance(self.linear_solver, lx.Cholesky):
                # A solver that assumes no definiteness (LU) happily steps to
                # a saddle point; Newton minimises, so the Hessian must be
                # positive semidefinite (up to rounding) wherever a step is
                # taken. Cholesky does this check for free.
                indefinite = _indefinite(hessian)
        newton = linear_solve(
            operator, -g, solver, state=solver_state, derivative_solver=derivative_solver
        )
        direction = newton.value
        # A non-finite direction (Cholesky on an indefinite Hessian) or an ascent
        # one (LU there) is a line-search failure: there is no descent direction.
        # Only a solver failing with a finite output is a linear-solve failure.
        solve_failed = ~newton.usable & jnp.all(jnp.isfinite(direction))

        # The line search sees no derivatives: its step is piecewise constant,
        # and reverse mode could not go through its while_loop anyway. The
        # objective's closed-over arrays are frozen too.
        frozen_objective, frozen_theta = tree_freeze((objective, theta))
        t, found = self.linesearch(
            lambda u: frozen_objective(u, frozen_theta),
            *tree_freeze((flat, f, g, direction)),
        )
        # NaN or Inf in the objective or its gradient (e.g. in the data it
        # closes over) is reported as such, not as the line-search failure
        # it causes.
        nonfinite = ~(jnp.isfinite(f) & jnp.all(jnp.isfinite(g)))
        accepted = found & ~solve_failed & ~indefinite & ~nonfinite
        new_flat = jnp.where(accepted, flat + t * direction, flat)
        result = RESULTS.where(
            nonfinite,
            RESULTS.nonfinite,
            RESULTS.where(
                solve_failed,
                RESULTS.linear_solve_failed,
                RESULTS.where(
                    found,
                    RESULTS.where(indefinite, RESULTS.nonconvex, RESULTS.successful),
                    RESULTS.linesearch_failed,
                ),
            ),
        )
        new_aux = _NewtonAux(
            result=result,
            previous_gradient_norm=gradient_norm,
            previous_forcing=jax.lax.stop_gradient(forcing),
            krylov_steps=aux.krylov_steps + newton.steps,
        )
        return unravel(new_flat), new_aux

    def value(self, z):
        return z

    def optimality(self, z, aux, theta):
        return jax.grad(self.objective)(z, theta)

    def status(self, aux):
        return aux.result
