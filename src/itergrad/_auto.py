"""`Auto`: an estimator that picks OneStep, Truncated(K) or Implicit at run
time from the measured contraction factor."""

import dataclasses
from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Int

from ._estimators import (
    AbstractEstimator,
    _replay_gaps,
    attach_derivative,
    measure_truncation,
    replay_last_steps,
)
from ._implicit_rule import implicit_unknowns, valid_point
from ._loop import history_entry
from ._spectral import (
    DEFAULT_MAX_K,
    DEFAULT_POWER_ITERATIONS,
)
from ._tree import tree_where
from ._validate import positive_int
from .solvers._base import State

# Codes of `sol.stats["estimator"]` (an integer array, one per instance
# under vmap); `Auto.ESTIMATORS[code]` names them.
ONE_STEP, TRUNCATED, IMPLICIT = 0, 1, 2


class Auto(AbstractEstimator):
    """Pick the estimator at run time from the measured convergence.

    After the forward loop (without gradients, keeping the last `max_K`
    states) the contraction factor $\\rho = \\|J_z F(z_k, \\theta)\\|_{op}$ is
    estimated at the final unknowns by power iteration, as in
    `Truncated("auto")` (corrected upwards, started from the last step), and
    $K = \\lceil \\log(t / (1 + t)) / \\log \\rho \\rceil$ is the smallest
    number of differentiated steps whose truncation bias bound
    $\\rho^K / (1 - \\rho^K)$ is at most `target` $= t$ (Corollary 1 with
    $\\rho^K$). Then:

    - $K = 1$: `OneStep` (fast solvers: Newton, interior point, any solver
      whose step map contracts by $\\rho \\le t/(1+t)$ at the solution;
      Corollary 3). Cost: one differentiated step.
    - $1 < K \\le$ `max_K`: `Truncated(K)`, replaying the last $K$ steps from
      the stored states. Cost: $K$ differentiated steps.
    - $K >$ `max_K`, or $\\rho \\ge 1$ (the norm of $J_z F$ does not certify
      a contraction, e.g. heavy ball's phase-space map): `Implicit` with
      `linear_solver` and `condition`, exact at the fixed point up to
      $O(\\|z_k - \\bar z\\|)$ (eq. 6). Cost: one linear solve in $J_z G$
      per derivative direction.

    `max_K` is the cost threshold: beyond it a linear solve is assumed cheaper
    than replaying $K$ steps (set it lower when a step is expensive relative
    to a solve, higher when the unknowns are too large to materialise).
    The solver's `superlinear` declaration is not trusted: what decides is
    the measured $\\rho$, which is $\\approx 0$ at the solution of a
    superlinear method.

    The choice is reported per instance: `sol.stats["estimator"]` is
    `0` (OneStep), `1` (Truncated) or `2` (Implicit) (`Auto.ESTIMATORS[code]`
    names it), with `sol.stats["differentiated_steps"]` (the $K$; 0 for
    Implicit) and `sol.stats["contraction"]` ($\\rho$).
    `itergrad.solve(..., error_estimate=True)` estimates the error of the
    derivative actually returned.

    The branches are a `lax.switch`: one runs per call. Under `vmap` with
    instances choosing differently, JAX evaluates every branch for every
    instance and selects (each instance still gets its own choice).

    **Arguments:**

    - `target`: the relative truncation bias to reach; default `1e-4`.
    - `max_K`: the most steps replayed before `Implicit` is preferred, and
      the number of stored states; default `100` (as `Truncated("auto")`).
    - `linear_solver`, `condition`, `tags`: passed to the `Implicit` branch
      (see `itergrad.Implicit`); defaults as `Implicit`'s.
    - `power_iterations`: power-iteration steps for $\\rho$; default `30`.
    - `throw`: with `False`, a failed linear solve in the `Implicit` branch
      returns its output as it is (as `Implicit(throw=False)`).

    !!! warning

        $\\rho$ is measured at $z_k$ only; where $J_z F$ varies strongly along
        the last $K$ steps the truncated branch's error may exceed `target`
        by the distance term of Corollary 1 (`error_estimate=True` includes
        it).
    """

    ESTIMATORS: ClassVar[tuple[str, str, str]] = ("OneStep", "Truncated", "Implicit")

    target: float = eqx.field(static=True, default=1e-4)
    max_K: int = eqx.field(static=True, default=DEFAULT_MAX_K)
    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=None)
    condition: Literal["optimality", "fixed_point"] = eqx.field(
        static=True, default="optimality"
    )
    tags: frozenset[object] | None = eqx.field(static=True, default=None)
    power_iterations: int = eqx.field(static=True, default=DEFAULT_POWER_ITERATIONS)
    throw: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if (
            isinstance(self.target, bool)
            or not isinstance(self.target, int | float)
            or not 0 < self.target < 1
        ):
            raise ValueError(
                "Auto(target=...) needs a relative bias target in (0, 1) such as "
                f"1e-4, got {self.target!r}."
            )
        positive_int(self.max_K, "Auto(max_K=...)")
        positive_int(self.power_iterations, "Auto(power_iterations=...)")
        # The Implicit branch's own checks (condition, Neumann + optimality,
        # solver type) with the same messages.
        self._implicit()

    def _implicit(self):
        from ._implicit import Implicit

        return Implicit(
            linear_solver=self.linear_solver,
            condition=self.condition,
            throw=self.throw,
            tags=self.tags,
        )

    def run(self, solver, state0, theta, settings):
        out, rho, K = measure_truncation(
            solver, state0, theta, settings, self.max_K, float(self.target),
            self.power_iterations, self.max_K,
        )
        history = out.history
        assert history is not None
        choice = choose(K, self.max_K)
        implicit = self._implicit()

        def one_step(theta):
            start = tree_where(
                out.steps > 1,
                history_entry(history, out.steps, jnp.array(1), self.max_K),
                state0,
            )
            z, _ = solver.step(start.z, start.aux, theta)
            return attach_derivative(out.state.z, z)

        def truncated(theta):
            z, _ = replay_last_steps(out, self.max_K, K, solver, state0, theta)
            return z

        def implicit_branch(theta):
            return implicit_unknowns(
                solver, out.state, theta, implicit.condition, implicit.linear_solver,
                implicit._tags(solver), implicit.throw,
                active=valid_point(out.result),
            )

        z = jax.lax.switch(choice, (one_step, truncated, implicit_branch), theta)
        live = jnp.where(choice == IMPLICIT, 0, jnp.minimum(K, out.steps))
        out = dataclasses.replace(
            out,
            differentiated_steps=live,
            contraction=rho,
            replay_gaps=_replay_gaps(out, self.max_K, live),
            estimator=choice,
        )
        return State(z, out.state.aux), out


def choose(K: Int[Array, ""], max_K: int) -> Int[Array, ""]:
    """The branch for a needed truncation `K` (`max_K + 1` when no K up to
    `max_K` is enough, see `needed_truncation`)."""
    choice = jnp.where(K == 1, ONE_STEP, jnp.where(K <= max_K, TRUNCATED, IMPLICIT))
    return choice.astype(jnp.int32)

