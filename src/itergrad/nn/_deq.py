"""Deep equilibrium layers: the output is the fixed point of a cell."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._estimators import AbstractEstimator, OneStep
from .._iterate import solve
from .._solution import Solution
from .._validate import in_open_interval, nonnegative_float, positive_int
from ..solvers._anderson import Anderson
from ..solvers._base import AbstractSolver


def _default_solver(F: Callable[..., Any]) -> AbstractSolver:
    return Anderson(F, memory=5)


class DEQ(eqx.Module):
    """A deep equilibrium layer (Bai, Kolter & Koltun 2019): its output is
    the fixed point $z^\\star(x) = f_\\phi(z^\\star, x)$ of a cell $f_\\phi$.

    The forward pass iterates the damped cell
    $F(z, \\theta) = (1 - \\tau) z + \\tau f_\\phi(z, x)$, $\\theta = (\\phi, x)$
    (same fixed point for every $\\tau$), with `solver` (Anderson
    acceleration by default). Gradients reach the cell's parameters $\\phi$ and
    the input $x$ through `estimator`:

    - `OneStep()` (default): Jacobian-free backpropagation (Fung et al. 2022),
      $\\partial z^\\star/\\partial\\theta \\approx \\tau J_\\theta f(z_{k-1})$:
      one differentiated cell evaluation, memory of one state. Biased by the
      cell's contraction (Corollary 1; relative bias $\\le \\rho_\\tau$ at the
      fixed point, $\\rho_\\tau = \\|(1-\\tau)I + \\tau J_z f\\|$).
    - `Truncated(K)` with `damping=τ < 1`: phantom gradients (Geng et al.
      2021; torchdeq's `grad=K, tau=τ`): $K$ differentiated damped steps,
      $\\sum_{i<K} J_z F^i\\, \\tau J_\\theta f$, relative bias $\\le \\rho_\\tau^K$.
      `Truncated("auto")` picks $K$ from the measured $\\rho_\\tau$.
    - `Implicit(...)`: the implicit function theorem,
      $(I - J_z f)^{-1} J_\\theta f$ at $z_k$; pass
      `Implicit(linear_solver=lx.GMRES(rtol, atol))` for wide states (one
      Jacobian-vector product of the cell per Krylov iteration, no
      materialised Jacobian).
    - `Unroll()`: backpropagation through every forward step (memory grows
      with the steps; the reference, not a training method).

    With `Anderson`, every estimator differentiates the damped cell map, not
    the Anderson extrapolation (see `ig.Anderson`).

    **Arguments:**

    - `f`: the cell, a callable `f(z, x) -> z` (typically an `eqx.Module`
      whose array leaves are its parameters $\\phi$), preserving the structure,
      shapes and dtypes of `z`.
    - `solver`: a function from a step map `F(z, theta) -> z` to an itergrad
      solver; default `lambda F: ig.Anderson(F, memory=5)`. Pass
      `ig.FixedPointIteration` for plain iteration, or e.g.
      `functools.partial(ig.Anderson, memory=8, mixing=0.8)`.
    - `estimator`: the derivative; default `ig.OneStep()`.
    - `damping`: $\\tau \\in (0, 1]$ (default 1: the undamped cell).
    - `max_steps`, `rtol`, `atol`: the forward budget and tolerances (defaults
      50, 1e-4, 1e-4: a training budget, not a tight solve).
    - `throw`: raise when the forward pass does not converge within
      `max_steps` (default `False`: DEQs are usually trained with a fixed
      budget; check `Solution.result`, see `return_solution`).
    - `z_shape`: shape of the state $z$ when `z0` is not given to `__call__`
      (default `None`: $z$ has the shape of $x$).

    Calling `deq(x)` returns $z^\\star(x)$ for one input; use `jax.vmap` over a
    batch (each example then keeps its own number of steps and result).
    `deq(x, return_solution=True)` also returns the `ig.Solution`
    (`.steps`, `.residual` $= \\|f(z_{k-1}) - z_{k-1}\\|$, `.result`) for
    logging.

    !!! warning

        A cell that is not a contraction (e.g. a recurrent weight of spectral
        norm $> 1$ after training) can stop converging: the forward pass then
        ends at `max_steps`, `OneStep`'s bias grows like $\\rho/(1-\\rho)$ and
        `Implicit`'s linear system becomes ill-conditioned. Keep the cell
        contractive (spectral normalisation, weight decay) and log
        `Solution.result`.
    """

    f: Callable[..., PyTree[Array]]
    solver: Callable[..., AbstractSolver] = eqx.field(
        static=True, default=_default_solver
    )
    estimator: AbstractEstimator = OneStep()
    damping: float = eqx.field(static=True, default=1.0)
    max_steps: int = eqx.field(static=True, default=50)
    rtol: float = eqx.field(static=True, default=1e-4)
    atol: float = eqx.field(static=True, default=1e-4)
    throw: bool = eqx.field(static=True, default=False)
    z_shape: tuple[int, ...] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not callable(self.f):
            raise TypeError(
                f"DEQ(f, ...) needs a callable cell f(z, x) -> z, got {type(self.f).__name__}."
            )
        if not callable(self.solver):
            raise TypeError(
                "DEQ(solver=...) must be a function from a step map F(z, theta) to a "
                "solver, e.g. `lambda F: ig.Anderson(F, memory=5)` or "
                f"`ig.FixedPointIteration`, got {self.solver!r}."
            )
        if not isinstance(self.estimator, AbstractEstimator):
            raise TypeError(
                "DEQ(estimator=...) must be an itergrad estimator (ig.OneStep(), "
                f"ig.Truncated(K), ig.Implicit(), ig.Unroll()), got {self.estimator!r}."
            )
        if self.damping != 1.0:
            in_open_interval(self.damping, "DEQ(damping=...)", 0.0, 1.0)
        positive_int(self.max_steps, "DEQ(max_steps=...)")
        nonnegative_float(self.rtol, "DEQ(rtol=...)")
        nonnegative_float(self.atol, "DEQ(atol=...)")

    def step_map(self) -> Callable[[PyTree[Array], PyTree[Any]], PyTree[Array]]:
        """The map iterated by the solver,
        $F(z, (\\phi, x)) = (1 - \\tau) z + \\tau f_\\phi(z, x)$, where
        $\\phi$ are the cell's array leaves (so that they are `theta`)."""
        _, cell_static = eqx.partition(self.f, eqx.is_array)
        tau = self.damping

        def F(z, theta):
            cell_params, x = theta
            fz = eqx.combine(cell_params, cell_static)(z, x)
            if tau == 1.0:
                return fz
            return jtu.tree_map(
                lambda a, b: ((1 - tau) * a + tau * b).astype(a.dtype), z, fz
            )

        return F

    def __call__(
        self,
        x: PyTree[Array],
        z0: PyTree[Array] | None = None,
        *,
        return_solution: bool = False,
    ) -> PyTree[Array] | tuple[PyTree[Array], Solution]:
        """$z^\\star(x)$, from `z0` (default: zeros of shape `z_shape`, or
        shaped like `x`); with `return_solution=True`, `(z*, solution)`."""
        if z0 is None:
            if self.z_shape is not None:
                dtype = jnp.result_type(*jtu.tree_leaves(x))
                z0 = jnp.zeros(self.z_shape, dtype)
            else:
                z0 = jtu.tree_map(jnp.zeros_like, x)
        cell_params, _ = eqx.partition(self.f, eqx.is_array)
        theta = (cell_params, x)
        hint = (
            "Pass `z0` or DEQ(z_shape=...) when the state is not shaped like the input."
        )
        try:
            out = jax.eval_shape(self.f, z0, x)
        except (TypeError, ValueError) as error:
            raise ValueError(
                "DEQ: the cell f(z, x) failed on a state z of shapes "
                f"{jtu.tree_map(jnp.shape, z0)}: {error}\nThe cell must return a "
                f"state shaped like z. {hint}"
            ) from error
        if jtu.tree_structure(out) != jtu.tree_structure(z0) or any(
            a.shape != jnp.shape(b)
            for a, b in zip(jtu.tree_leaves(out), jtu.tree_leaves(z0))
        ):
            raise ValueError(
                "DEQ: the cell f(z, x) must return a state shaped like z; got "
                f"{out} for z of shapes {jtu.tree_map(jnp.shape, z0)}. {hint}"
            )
        solution = solve(
            self.solver(self.step_map()),
            z0,
            theta,
            estimator=self.estimator,
            max_steps=self.max_steps,
            rtol=self.rtol,
            atol=self.atol,
            throw=self.throw,
        )
        if return_solution:
            return solution.value, solution
        return solution.value
