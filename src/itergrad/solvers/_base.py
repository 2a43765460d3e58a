"""The solver contract: unknowns, auxiliary state, a step map and an optimality
condition.

A solver's state has two parts, in the spirit of optimistix's `y` and `state`:

- the **unknowns** $z$: what the iteration converges to and what the implicit
  function theorem, `diagnose` and `Truncated("auto")` see (the iterate $x$;
  $(x, x_{prev})$ for heavy ball; $(x, s, z, y)$ for the QP). A pytree of
  floating-point arrays.
- the **auxiliary state** `aux`: everything else the step needs (line-search
  and forcing history, quasi-Newton or Anderson memory, counters, result
  codes), of any dtype. It never enters a linear system: adding a float
  statistic to it does not change the size of anything `Implicit` solves.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree, Scalar

from .._solution import RESULTS
from .._tree import tree_norm, tree_sub

Z = TypeVar("Z")
Aux = TypeVar("Aux")


class State(eqx.Module, Generic[Z, Aux]):
    """A solver state: the unknowns `z` and the auxiliary state `aux`."""

    z: Z
    aux: Aux


class AbstractSolver(eqx.Module, Generic[Z, Aux]):
    """An iterative algorithm $(z_{k+1}, a_{k+1}) = F(z_k, a_k, \\theta)$ on
    unknowns $z$ and auxiliary state $a$.

    Subclasses implement `init`, `step` and `value`, and may override
    `optimality`, `residual_norm` and `status`. The estimators rely on these
    rules:

    - `step(z, aux, theta) -> (z, aux)` is a pure, differentiable function:
      it *is* the map $F$ that `OneStep`/`Truncated` differentiate and
      `Unroll` differentiates through.
    - The pytree structure, shapes and dtypes of `z` and of `aux` never change
      between steps; every leaf of `z` is a floating-point array.
    - `optimality(z, aux, theta)` returns a residual with the structure of `z`
      that vanishes at the solution: `Implicit(condition="optimality")` solves
      the square system $J_z G\\, \\dot z = -J_\\theta G\\, \\dot\\theta$ in $z$
      only, with `aux` held at its final value. The default is the fixed-point
      residual $F_z(z, a, \\theta) - z$.
    - Quantities that carry no derivative of their own (a line-search step, a
      forcing term) are computed under `jax.lax.stop_gradient`.

    **Class variable** `superlinear`: set `superlinear = True` (a plain class
    attribute, e.g. `class MySolver(ig.AbstractSolver): superlinear = True`)
    when $J_z F \\to 0$ at the solution (Newton, interior point), so that
    Corollary 3's bound applies: `diagnose` uses it. **Class variable**
    `optimality_tags`: the Lineax tags of $J_z$ `optimality` (e.g.
    `frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})` when it is
    the Hessian of a convex objective), passed on by `Implicit`. **Class
    variable** `error_estimate_needs_float64`: set it when the step's derivatives
    overflow in lower precision (the interior point's $1/s$ terms near the
    boundary); `error_estimate=True` then reports $+\\infty$ (no
    estimate) for float32 unknowns instead of computing one.
    """

    superlinear: ClassVar[bool] = False
    error_estimate_needs_float64: ClassVar[bool] = False
    # Lineax tags of the Jacobian of `optimality` in z at the solution, used
    # by `Implicit(condition="optimality")` (e.g. symmetric positive
    # semidefinite for a Hessian system, so that `lx.CG` applies).
    optimality_tags: ClassVar[frozenset[object]] = frozenset()

    @abc.abstractmethod
    def init(self, x0: PyTree[Array] | None, theta: PyTree[Any]) -> tuple[Z, Aux]:
        """The initial `(z, aux)` from the initial iterate `x0` (or `None` where
        the solver can initialise itself)."""

    @abc.abstractmethod
    def step(self, z: Z, aux: Aux, theta: PyTree[Any]) -> tuple[Z, Aux]:
        """One iteration $(z, a) \\mapsto F(z, a, \\theta)$: pure and
        differentiable."""

    @abc.abstractmethod
    def value(self, z: Z) -> PyTree[Array]:
        """The part of the unknowns the user asked for, $x$."""

    def optimality(self, z: Z, aux: Aux, theta: PyTree[Any]) -> Z:
        """A residual shaped like `z` that vanishes at the solution, used by
        `Implicit(condition="optimality")`. Default: the fixed-point residual
        $F_z(z, a, \\theta) - z$."""
        new_z, _ = self.step(z, aux, theta)
        return tree_sub(new_z, z)

    def residual_norm(self, z: Z, new_z: Z, new_aux: Aux, theta: PyTree[Any]) -> Scalar:
        """The residual that decides termination, evaluated after a step from
        `z` to `(new_z, new_aux)`. Default: the step length
        $\\|x_{k+1} - x_k\\|$. The loop stops once it is at most
        `atol + rtol * ||x_{k+1}||`."""
        return tree_norm(tree_sub(self.value(new_z), self.value(z)))

    def status(self, aux: Aux) -> RESULTS:
        """A solver-specific failure detected during the last step (a failed
        line search, an infeasible QP), or `RESULTS.successful`."""
        return RESULTS.successful


class FixedPointIteration(AbstractSolver[PyTree[Array], None]):
    """A user step map $x_{k+1} = F(x_k, \\theta)$, seen as a solver whose
    unknowns are the iterate and which has no auxiliary state.

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
        return x0, None

    def step(self, z, aux, theta):
        return self.F(z, theta), aux

    def value(self, z):
        return z


def tree_isfinite(tree: PyTree[Any]) -> Bool[Array, ""]:
    """True when every floating-point leaf of `tree` is finite."""
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]).all()
