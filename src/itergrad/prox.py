"""Proximal operators for `itergrad.ProximalGradient`.

Each function returns $\\mathrm{prox}_{s g}(x) = \\arg\\min_u \\tfrac12\\|u - x\\|^2
+ s\\, g(u)$ for one non-smooth $g$ and step $s > 0$, in closed form, written
with `jnp.where` / `jnp.maximum` so that JAX differentiates it almost
everywhere: its derivative is the generalised (Clarke) Jacobian used by
implicit differentiation of the proximal-gradient fixed point (for the
$\\ell_1$ norm a diagonal 0/1 matrix selecting the support). Every argument
may be a traced array, so regularisation strengths can be differentiated.

`ProximalGradient` calls `prox(x, step, theta)`; adapt these with a lambda,
e.g. `prox=lambda x, s, theta: ig.prox.l1(x, s, jnp.exp(theta))` for a
Lasso with $\\theta = \\log\\lambda$.
"""

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

__all__ = ["box", "elastic_net", "group_lasso", "l1", "nonnegative"]


def l1(
    x: Float[Array, "..."], step: ArrayLike, strength: ArrayLike
) -> Float[Array, "..."]:
    """Soft thresholding, the prox of $g(u) = \\lambda \\|u\\|_1$:
    $\\mathrm{prox}_{s g}(x)_i = \\mathrm{sign}(x_i) \\max(|x_i| - s\\lambda, 0)$.

    Its derivative in $x$ is $\\mathrm{diag}(1_{|x_i| > s\\lambda})$ and in
    $\\lambda$ is $-s\\, \\mathrm{sign}(x_i) 1_{|x_i| > s\\lambda}$.

    **Arguments:**

    - `x`: the point, any shape.
    - `step`: $s > 0$.
    - `strength`: $\\lambda \\ge 0$, a scalar or an array broadcasting
      against `x` (a weighted $\\ell_1$ norm).
    """
    threshold = step * strength
    return (jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)).astype(x.dtype)


def elastic_net(
    x: Float[Array, "..."],
    step: ArrayLike,
    l1_strength: ArrayLike,
    l2_strength: ArrayLike,
) -> Float[Array, "..."]:
    """The prox of $g(u) = a \\|u\\|_1 + \\tfrac b2 \\|u\\|_2^2$:
    $\\mathrm{prox}_{s g}(x) = \\mathrm{prox}_{s a \\|\\cdot\\|_1}(x) / (1 + s b)$.

    **Arguments:**

    - `x`: the point, any shape.
    - `step`: $s > 0$.
    - `l1_strength`: $a \\ge 0$.
    - `l2_strength`: $b \\ge 0$.
    """
    return (l1(x, step, l1_strength) / (1 + step * l2_strength)).astype(x.dtype)


def nonnegative(
    x: Float[Array, "..."], step: Any = None, theta: Any = None
) -> Float[Array, "..."]:
    """Projection onto the non-negative orthant, the prox of its indicator:
    $\\max(x, 0)$ (independent of the step). The signature
    `(x, step, theta)` lets it be passed to `ProximalGradient` as it is
    (non-negative least squares)."""
    del step, theta
    return jnp.maximum(x, 0).astype(x.dtype)


def box(
    x: Float[Array, "..."], step: Any, lower: ArrayLike, upper: ArrayLike
) -> Float[Array, "..."]:
    """Projection onto the box $\\{u : l \\le u \\le u_{\\max}\\}$, the prox of
    its indicator: $\\min(\\max(x, l), u_{\\max})$ (independent of the step).
    Its derivative is 1 strictly inside the box and 0 at an active bound; in
    the bounds, 1 on the coordinates clipped to them.

    **Arguments:**

    - `x`: the point.
    - `step`: ignored (present for a uniform signature).
    - `lower`, `upper`: the bounds, scalars or arrays broadcasting against
      `x`, with `lower <= upper` (may be `-jnp.inf` / `jnp.inf`).
    """
    del step
    return jnp.clip(x, lower, upper).astype(x.dtype)


def group_lasso(
    x: Float[Array, "... d"], step: ArrayLike, strength: ArrayLike
) -> Float[Array, "... d"]:
    """Block soft thresholding, the prox of the group-lasso penalty
    $g(u) = \\lambda \\sum_g \\|u_g\\|_2$ where each group is a slice along
    the **last** axis of `x` (reshape a flat vector of equal groups to
    `(n_groups, group_size)`):
    $\\mathrm{prox}_{s g}(x)_g = \\max\\big(1 - s\\lambda / \\|x_g\\|_2, 0\\big)\\, x_g$.

    A group whose norm is at most $s\\lambda$ is set to zero, with zero
    derivative (the norm is evaluated safely at 0, so no NaN appears).

    **Arguments:**

    - `x`: the point, shape `(..., group_size)`.
    - `step`: $s > 0$.
    - `strength`: $\\lambda \\ge 0$, a scalar or an array of shape `x.shape[:-1]`
      (one strength per group).
    """
    squared = jnp.sum(x**2, axis=-1, keepdims=True)
    positive = squared > 0
    norm = jnp.sqrt(jnp.where(positive, squared, 1))
    threshold = step * jnp.expand_dims(jnp.asarray(strength), -1)
    scale = jnp.where(positive, jnp.maximum(1 - threshold / norm, 0), 0)
    return (scale * x).astype(x.dtype)
