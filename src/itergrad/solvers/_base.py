"""The solver protocol: a step map plus an optimality condition."""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree, Scalar

from .._solution import RESULTS
from .._tree import tree_norm, tree_sub


class AbstractSolver(eqx.Module):
    """An iterative algorithm $s_{k+1} = F(s_k, \\theta)$ on a solver state $s$.

    Subclasses implement `init`, `step` and `value`, and may override
    `optimality`, `residual_norm` and `status`.

    Rules every solver follows, because the estimators rely on them:

    - `step` is a pure, differentiable function of `(state, theta)`: it *is*
      the map $F$ that the one-step and truncated estimators differentiate.
    - The pytree structure, shapes and dtypes of the state never change
      between steps.
    - The floating-point leaves of the state are the unknowns of the implicit
      function theorem: `optimality(state, theta)` returns a pytree with the
      same structure as those leaves (a square system). Keep bookkeeping
      (counters, flags, result codes) in integer or boolean leaves.

    `superlinear` declares that $J_x F$ vanishes at the solution (Newton,
    interior point), so that Corollary 3's bound applies (`diagnose` uses it).
    """

    superlinear: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, x0: PyTree[Array] | None, theta: PyTree[Any]) -> PyTree[Any]:
        """The initial state from the initial iterate `x0` (or `None` where the
        solver can initialise itself)."""

    @abc.abstractmethod
    def step(self, state: PyTree[Any], theta: PyTree[Any]) -> PyTree[Any]:
        """One iteration $s_{k+1} = F(s_k, \\theta)$: pure and differentiable."""

    @abc.abstractmethod
    def value(self, state: PyTree[Any]) -> PyTree[Array]:
        """The part of the state the user asked for, $x$."""

    def optimality(self, state: PyTree[Any], theta: PyTree[Any]) -> PyTree[Array]:
        """A residual that vanishes at the solution, used by
        `Implicit(condition="optimality")`. Default: the fixed-point residual
        $F(s, \\theta) - s$ over the floating-point leaves of the state."""
        new_state = self.step(state, theta)
        return tree_sub(
            eqx.filter(new_state, eqx.is_inexact_array),
            eqx.filter(state, eqx.is_inexact_array),
        )

    def residual_norm(
        self, state: PyTree[Any], new_state: PyTree[Any], theta: PyTree[Any]
    ) -> Scalar:
        """The residual that decides termination, evaluated after a step from
        `state` to `new_state`. Default: the step length
        $\\|x_{k+1} - x_k\\|$. The loop stops once it is at most
        `atol + rtol * ||x_{k+1}||`."""
        return tree_norm(tree_sub(self.value(new_state), self.value(state)))

    def status(self, state: PyTree[Any]) -> RESULTS:
        """A solver-specific failure detected during the last step (a failed
        line search, an infeasible QP), or `RESULTS.successful`."""
        return RESULTS.successful


class FixedPointIteration(AbstractSolver):
    """A user step map $x_{k+1} = F(x_k, \\theta)$, seen as a solver whose state
    is the iterate itself.

    **Arguments:**

    - `F`: a callable `F(x, theta) -> x` preserving the structure of `x`.
    """

    F: Callable[[PyTree[Array], PyTree[Any]], PyTree[Array]]

    def init(self, x0, theta):
        if x0 is None:
            raise ValueError(
                "`x0=None` needs a solver that initialises itself; a plain step "
                "map `F` needs an explicit initial iterate `x0`."
            )
        return x0

    def step(self, state, theta):
        return self.F(state, theta)

    def value(self, state):
        return state


def tree_isfinite(tree: PyTree[Any]) -> Bool[Array, ""]:
    """True when every floating-point leaf of `tree` is finite."""
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]).all()
