"""Implicit differentiation: the only custom derivative rule in itergrad."""

from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
import lineax as lx

from ._estimators import AbstractEstimator
from ._implicit_rule import implicit_unknowns, valid_point
from ._loop import run_loop_without_gradient
from ._neumann import Neumann
from .solvers._base import AbstractSolver, State


class Implicit(AbstractEstimator):
    """Implicit differentiation at the last iterate (Algorithm 2).

    The loop runs without gradients to $x_k$; its derivative is then taken from
    the implicit function theorem applied at $x_k$ to a condition
    $G(z, \\theta) = 0$ satisfied by the solution:
    $J^{ID} x_k(\\theta) = -\\big(J_z G(x_k, \\theta)\\big)^{-1} J_\\theta G(x_k, \\theta)$.

    - `condition="fixed_point"`: $G = F(z, \\theta) - z$, giving eq. (3),
      $(I - J_x F(x_k, \\theta))^{-1} J_\\theta F(x_k, \\theta)$.
    - `condition="optimality"` (default): the solver's own optimality condition
      (`solver.optimality`): $\\nabla_x f = 0$ for gradient descent and
      Newton, the KKT conditions for the QP solver. Remark 3 of the paper: for
      Newton this costs $O(n^3)$ instead of $O(n^4)$. For a plain step map
      the two coincide.

    Forward mode is a custom JVP whose tangent is one linear solve; reverse
    mode comes by transposing that solve (Lineax), so `grad`, `jacrev`,
    `jacfwd`, `jvp`, `vmap` and `jit` all work. Cost: one linear solve with
    $J_z G$ per tangent/cotangent; memory $n$ (plus what the linear solver
    materialises). Derivatives with respect to arrays that `F` or the
    objective close over are computed too.

    **Arguments:**

    - `linear_solver`: a Lineax solver for the system in $J_z G$. Default
      `lx.AutoLinearSolver(well_posed=None)` (dense LU on the materialised
      Jacobian). `itergrad.Neumann(k)` gives the paper's inexact automatic
      differentiation (IAD). Matrix-free solvers (`lx.GMRES`, `lx.CG` with the
      right tags) avoid materialising the Jacobian.
    - `condition`: `"optimality"` (default) or `"fixed_point"`.
    - `throw`: raise when the linear solve fails (default `True`), with
      itergrad's `linear_solve_failed` message; with `False` a derivative
      through a failed solve is NaN instead, in every transform (`grad`,
      `jacfwd`, `vmap(grad)`: the other batch elements are unaffected).
      `Solution.result` cannot show it: the derivative is computed after the
      solve has returned. A Krylov solver is then probed too (see below; one
      extra solve), and a tangent solve of it that reaches its `max_steps`
      returns its last iterate, unflagged.
    - `solve_dtype`: mixed precision. `None` (default) forms and solves the
      system in the unknowns' dtype; e.g. `jnp.float64` after a float32
      forward solve evaluates $G$, its Jacobian and the solve with $x_k$ and
      $\\theta$ promoted to float64 (needs `jax_enable_x64`), and rounds the
      derivative back to float32. It removes the float32 rounding of the
      linear solve (about $\\mathrm{cond}(J_z G)\\cdot 6\\cdot 10^{-8}$), not
      the distance of the float32 $x_k$ to $\\bar x$ (eq. 6): measured in
      `docs/batches-and-devices.md`.
    - `tags`: Lineax tags of $J_z G$ (e.g.
      `frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})`), which
      decide what `lx.AutoLinearSolver` picks and are required by `lx.CG`.
      `None` (default) uses the solver's `optimality_tags` with
      `condition="optimality"` (symmetric positive semidefinite for the
      Hessian systems of `GradientDescent` and `Newton`, none otherwise) and
      no tags with `condition="fixed_point"`. Tags are promises: a wrong one
      gives a wrong derivative.

    Only the solver's unknowns $z$ enter the system; its auxiliary state
    (line-search history, quasi-Newton memory, counters) is held at its final
    value, so the system has the size of $z$ whatever the solver carries.

    !!! warning

        The estimate is that of the fixed point: away from convergence its error
        is $O(\\|x_k - \\bar x\\|)$ (eq. 6). Non-invertible $J_z G$ (a degenerate
        solution) makes the solve fail: an error is raised, never a zero
        gradient. (A constrained solution without strict complementarity is
        a kink, not a singular system: see `InteriorPointQP`'s warning.) With a direct `linear_solver` (the default) the system is
        probed once per derivative: one solve with a fixed generic
        right-hand side, reusing the factorisation, and two products; it
        refuses a non-finite answer, a large backward error or an estimated
        condition number above $0.1/\\epsilon$ (a system singular up to
        rounding solves a consistent right-hand side with a small residual,
        so only the generic one shows it). Krylov solvers (with `throw=True`)
        check each of their solves instead (their result code and a finite answer): they do not
        detect ill-conditioning. Least-squares solvers (`lx.SVD()`,
        `lx.AutoLinearSolver(well_posed=False)`) are not checked: their
        minimum-norm answer is what they were chosen for.
    """

    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=None)
    condition: Literal["optimality", "fixed_point"] = eqx.field(
        static=True, default="optimality"
    )
    throw: bool = eqx.field(static=True, default=True)
    tags: frozenset[object] | None = eqx.field(static=True, default=None)
    solve_dtype: Any = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.solve_dtype is not None:
            try:
                floating = jnp.issubdtype(jnp.dtype(self.solve_dtype), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(
                    "Implicit(solve_dtype=...) must be a real floating-point dtype "
                    f"(e.g. jnp.float64), got {self.solve_dtype!r}."
                )
        if self.condition not in ("optimality", "fixed_point"):
            raise ValueError(
                "Implicit(condition=...) must be 'optimality' or 'fixed_point', "
                f"got {self.condition!r}."
            )
        if isinstance(self.linear_solver, Neumann) and self.condition != "fixed_point":
            raise ValueError(
                "Implicit(linear_solver=Neumann(k)) needs condition='fixed_point': "
                "the Neumann series sums powers of I + J_z G, which is the step "
                "map's Jacobian only for the fixed-point condition (with the "
                "default 'optimality' condition it diverges in general)."
            )
        if not isinstance(self.linear_solver, lx.AbstractLinearSolver):
            raise TypeError(
                "Implicit(linear_solver=...) must be a Lineax linear solver "
                f"(e.g. lx.LU(), itergrad.Neumann(k)), got {self.linear_solver!r}."
            )

    def run(self, solver, state0, theta, settings):
        out = run_loop_without_gradient(solver, state0, theta, settings)
        # The system is square in the unknowns z only: the auxiliary state is
        # held at its final value, whatever its size or dtype.
        live = implicit_unknowns(
            solver, out.state, theta, self.condition, self.linear_solver,
            self._tags(solver), self.throw,
            active=valid_point(out.result), solve_dtype=self.solve_dtype,
        )
        return State(live, out.state.aux), out

    def _tags(self, solver: AbstractSolver) -> frozenset[object]:
        if self.tags is not None:
            return frozenset(self.tags)
        if self.condition == "optimality":
            return frozenset(solver.optimality_tags)
        return frozenset()
