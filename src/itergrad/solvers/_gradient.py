"""First-order solvers: gradient descent (Example 1) and the heavy-ball method
(Remark 1), each a step map on a smooth objective $f(x, \\theta)$."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, PyTree, Scalar

from ._base import AbstractSolver

_STEPSIZE_RULES = ("1/L", "2/(L+mu)")


def _concrete(value: Any) -> float | None:
    """`value` as a Python float when it is known at trace time, else `None`."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError):
        return None


def check_stepsize(solver: str, stepsize: Any, L: Any, mu: Any) -> None:
    """Raise a `ValueError` naming the fix when a step-size rule is unusable."""
    if isinstance(stepsize, str):
        if stepsize not in _STEPSIZE_RULES:
            raise ValueError(
                f"{solver}(stepsize=...) must be a positive number or one of "
                f"{_STEPSIZE_RULES}, got {stepsize!r}."
            )
        needed = ("L",) if stepsize == "1/L" else ("L", "mu")
        for name, value in zip(("L", "mu"), (L, mu), strict=True):
            if name not in needed:
                continue
            if value is None:
                raise ValueError(
                    f"{solver}(stepsize={stepsize!r}) needs the smoothness constants "
                    f"{' and '.join(needed)}: pass e.g. "
                    f"{solver}(objective, {stepsize!r}, L=..., mu=...) "
                    "(`WeightedRidge.smoothness(theta)` computes them for ridge)."
                )
            concrete = _concrete(value)
            if concrete is not None and not (np.isfinite(concrete) and concrete > 0):
                raise ValueError(
                    f"{solver}(stepsize={stepsize!r}) needs `{name}` > 0 and "
                    f"finite, got {name}={concrete!r}."
                )
        if stepsize == "2/(L+mu)":
            L_value, mu_value = _concrete(L), _concrete(mu)
            if L_value is not None and mu_value is not None and mu_value > L_value:
                raise ValueError(
                    f"{solver} needs mu <= L (mu is the strong convexity constant, "
                    f"L the gradient's Lipschitz constant), got L={L_value}, "
                    f"mu={mu_value}."
                )
    else:
        concrete = _concrete(stepsize)
        if concrete is None and not eqx.is_array(stepsize):
            raise ValueError(
                f"{solver}(stepsize=...) must be a positive number or one of "
                f"{_STEPSIZE_RULES}, got {stepsize!r}."
            )
        if concrete is not None and not (np.isfinite(concrete) and concrete > 0):
            raise ValueError(
                f"{solver}(stepsize=...) must be positive and finite, got {concrete}."
            )


def resolve_stepsize(stepsize: Any, L: Any, mu: Any) -> Any:
    if isinstance(stepsize, str):
        return 1.0 / L if stepsize == "1/L" else 2.0 / (L + mu)
    return stepsize


def check_iterate(solver: str, x0: Any) -> PyTree[Array]:
    if x0 is None:
        raise ValueError(
            f"{solver} needs an initial iterate: pass `x0` (e.g. jnp.zeros(n))."
        )
    x0 = jtu.tree_map(jnp.asarray, x0)
    if not all(jnp.issubdtype(x.dtype, jnp.inexact) for x in jtu.tree_leaves(x0)):
        raise TypeError(
            f"{solver}: `x0` must have floating-point leaves (got "
            f"{[str(x.dtype) for x in jtu.tree_leaves(x0)]}); pass e.g. "
            "jnp.zeros(n) rather than integers."
        )
    return x0


def _axpy(alpha: Any, u: PyTree[Array], v: PyTree[Array]) -> PyTree[Array]:
    # Cast back so that a float64 step size (computed from data) never changes
    # the dtype of a float32 state: the loop requires a fixed state structure.
    return jtu.tree_map(lambda a, b: (alpha * a + b).astype(b.dtype), u, v)


class GradientDescent(AbstractSolver):
    """Gradient descent $x_{k+1} = x_k - \\alpha \\nabla_x f(x_k, \\theta)$
    (Example 1 of the paper).

    The unknowns are the iterate $x$ itself (any pytree of floating-point
    arrays); there is no auxiliary state. `optimality` is $\\nabla_x f(x, \\theta)$, so
    `Implicit(condition="optimality")` solves with the Hessian
    $\\nabla^2_{xx} f$, and `Implicit(condition="fixed_point")` with
    $\\alpha \\nabla^2_{xx} f$ (the same solution).

    For a $\\mu$-strongly convex $f$ with $L$-Lipschitz gradient the step map is
    a contraction with factor $\\rho = \\max\\{1 - \\alpha\\mu, \\alpha L - 1\\}$:
    $\\rho = 1 - \\mu/L$ for $\\alpha = 1/L$ and
    $\\rho = (L - \\mu)/(L + \\mu)$ for $\\alpha = 2/(L + \\mu)$.

    **Arguments:**

    - `objective`: `objective(x, theta) -> scalar`, differentiable in `x`
      (twice for `Implicit`) and in `theta`.
    - `stepsize`: a positive number $\\alpha$, or the rule `"1/L"` or
      `"2/(L+mu)"` evaluated from `L` and `mu`.
    - `L`: the Lipschitz constant of $\\nabla_x f(\\cdot, \\theta)$, needed by
      both rules (a number or a scalar array).
    - `mu`: the strong convexity constant, needed by `"2/(L+mu)"`; $0 < \\mu \\le L$.

    !!! warning

        The one-step estimator is biased by up to $\\rho L_F / (1 - \\rho)$
        (Corollary 1), which is large for ill-conditioned problems
        ($\\rho \\to 1$ as $L/\\mu \\to \\infty$). Prefer `Truncated(K)` with
        $K \\approx \\log(\\mathrm{tol}) / \\log\\rho$, or `Implicit`. A step size
        $\\alpha \\ge 2/L$ diverges.
    """

    objective: Callable[[PyTree[Array], PyTree[Any]], Scalar]
    stepsize: float | str | Array
    L: float | Array | None = None
    mu: float | Array | None = None

    def __check_init__(self):
        if not callable(self.objective):
            raise TypeError(
                "GradientDescent(objective, ...) needs a callable "
                f"objective(x, theta) -> scalar, got {type(self.objective).__name__}."
            )
        check_stepsize("GradientDescent", self.stepsize, self.L, self.mu)

    optimality_tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})

    def init(self, x0, theta):
        return check_iterate("GradientDescent", x0), None

    def step(self, z, aux, theta):
        alpha = resolve_stepsize(self.stepsize, self.L, self.mu)
        grad = jax.grad(self.objective)(z, theta)
        return _axpy(-alpha, grad, z), aux

    def value(self, z):
        return z

    def optimality(self, z, aux, theta):
        return jax.grad(self.objective)(z, theta)


class _HeavyBallState(eqx.Module):
    x: PyTree[Array]
    x_prev: PyTree[Array]


class HeavyBall(AbstractSolver):
    """Polyak's heavy-ball method in phase space (Remark 1):
    $x_{k+1} = x_k - \\alpha \\nabla_x f(x_k, \\theta) + \\beta (x_k - x_{k-1})$.

    The unknowns are the pair $(x_k, x_{k-1})$ (the step map is a fixed-point
    map of both, not of $x$ alone) and the step map is
    $F(x, x_{\\mathrm{prev}}) = (x - \\alpha \\nabla_x f(x) + \\beta(x - x_{\\mathrm{prev}}), x)$,
    started at $(x_0, x_0)$; there is no auxiliary state. `optimality`
    returns $(\\nabla_x f(x, \\theta), x - x_{\\mathrm{prev}})$: both equations hold
    at the fixed point, and the system is square and invertible when
    $\\nabla^2_{xx} f$ is. `value` is $x$.

    With Polyak's parameters $\\alpha = 4/(\\sqrt L + \\sqrt\\mu)^2$,
    $\\beta = \\big((\\sqrt\\kappa - 1)/(\\sqrt\\kappa + 1)\\big)^2$, $\\kappa = L/\\mu$,
    the iteration converges like $\\rho^k$ with
    $\\rho = (\\sqrt\\kappa - 1)/(\\sqrt\\kappa + 1)$ on quadratics.

    **Arguments:**

    - `objective`: `objective(x, theta) -> scalar`.
    - `stepsize`: a positive number $\\alpha$, or `"1/L"` / `"2/(L+mu)"` with
      `L` (and `mu`) given.
    - `momentum`: $\\beta \\in [0, 1)$.
    - `L`, `mu`: smoothness and strong convexity constants for the rules.

    !!! warning

        One step of the map is not a contraction in general (only many steps
        are), so Corollary 1 does not apply to `OneStep()` here: its estimate
        can be far off. Use `Implicit()` or a large `Truncated(K)`.
    """

    objective: Callable[[PyTree[Array], PyTree[Any]], Scalar]
    stepsize: float | str | Array
    momentum: float | Array
    L: float | Array | None = None
    mu: float | Array | None = None

    def __check_init__(self):
        if not callable(self.objective):
            raise TypeError(
                "HeavyBall(objective, ...) needs a callable objective(x, theta) -> "
                f"scalar, got {type(self.objective).__name__}."
            )
        check_stepsize("HeavyBall", self.stepsize, self.L, self.mu)
        beta = _concrete(self.momentum)
        if beta is not None and not 0 <= beta < 1:
            raise ValueError(f"HeavyBall(momentum=...) must lie in [0, 1), got {beta}.")

    def init(self, x0, theta):
        x0 = check_iterate("HeavyBall", x0)
        return _HeavyBallState(x=x0, x_prev=x0), None

    def step(self, z, aux, theta):
        alpha = resolve_stepsize(self.stepsize, self.L, self.mu)
        grad = jax.grad(self.objective)(z.x, theta)
        x_new = jtu.tree_map(
            lambda x, xp, g: (x - alpha * g + self.momentum * (x - xp)).astype(x.dtype),
            z.x,
            z.x_prev,
            grad,
        )
        return _HeavyBallState(x=x_new, x_prev=z.x), aux

    def value(self, z):
        return z.x

    def optimality(self, z, aux, theta):
        grad = jax.grad(self.objective)(z.x, theta)
        velocity = jtu.tree_map(lambda x, xp: x - xp, z.x, z.x_prev)
        return _HeavyBallState(x=grad, x_prev=velocity)
