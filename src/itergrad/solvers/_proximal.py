"""Proximal gradient (ISTA) and its accelerated version (FISTA, with adaptive
restart) for $\\min_x f(x, \\theta) + g(x, \\theta)$; the momentum is
auxiliary state."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from .._tree import tree_norm, tree_sub
from ._base import AbstractSolver
from ._gradient import check_iterate, check_stepsize, resolve_stepsize


class _ProximalAux(eqx.Module):
    """FISTA's auxiliary state; the unknowns are $z = x$ only."""

    # v_k = x_k - x_{k-1}: the momentum direction (zero for ISTA and after a
    # restart). Kept as a displacement, not as x_{k-1}, so that with the
    # auxiliary state held the step map is x -> T(x + beta v): the
    # proximal-gradient map T itself at convergence (v -> 0).
    velocity: PyTree[Array]
    # The momentum sequence t_k (t_0 = 1).
    t: Scalar
    # ||x_{k+1} - y_k||: the proximal-gradient step at the extrapolated point.
    residual: Scalar


class ProximalGradient(AbstractSolver):
    """Proximal gradient descent for $\\min_x f(x, \\theta) + g(x, \\theta)$,
    $f$ smooth, $g$ with a cheap proximal operator: with
    $T_\\theta(x) = \\mathrm{prox}_{\\alpha g(\\cdot, \\theta)}\\big(x - \\alpha
    \\nabla_x f(x, \\theta)\\big)$,

    - ISTA (`accelerate=False`): $x_{k+1} = T_\\theta(x_k)$;
    - FISTA (`accelerate=True`, default): $y_k = x_k + \\beta_k (x_k - x_{k-1})$,
      $x_{k+1} = T_\\theta(y_k)$, $\\beta_k = (t_k - 1)/t_{k+1}$,
      $t_{k+1} = (1 + \\sqrt{1 + 4 t_k^2})/2$, $t_0 = 1$; with `restart=True`
      (default) the momentum is reset ($t_{k+1} = 1$) whenever
      $\\langle y_k - x_{k+1}, x_{k+1} - x_k\\rangle > 0$ (O'Donoghue &
      Candès' gradient restart), which makes FISTA converge linearly on
      problems that are strongly convex on the solution's support.

    **Unknowns, auxiliary state, optimality.** The unknowns are $z = x$
    (any pytree of floating-point arrays). The momentum
    $v_k = x_k - x_{k-1}$, $t_k$ and the last residual are auxiliary state.
    `optimality` is the proximal-gradient fixed-point residual
    $G(x, \\theta) = x - T_\\theta(x)$, independent of the momentum: it
    vanishes exactly at the minimisers. `Implicit()` (condition
    `"optimality"`) therefore solves
    $(I - J_x T_\\theta)\\, \\dot x = J_\\theta T_\\theta\\, \\dot\\theta$ at
    $x_k$, with $J$ the generalised Jacobian of the prox (JAX's derivative of
    it). For the Lasso, $J_x T = D (I - \\alpha \\nabla^2 f)$ with $D$ the 0/1
    diagonal of the support $S$: the rows off $S$ are those of the identity
    and the system reduces to the support,
    $(\\nabla^2 f)_{SS}\\, \\dot x_S = -\\partial_\\theta (\\nabla f + \\partial g)_S$
    (as in sparse-ho); a matrix-free `lx.GMRES` converges in about $|S|$
    iterations. No Lineax tags are set ($J_x T$ is not symmetric).
    `Implicit(condition="fixed_point")` uses the step map with the auxiliary
    state held at its final value, $x \\mapsto T_\\theta(x + \\beta v)$: for
    ISTA and at convergence of FISTA ($v \\to 0$) this is the same
    condition; away from it the two differ by $O(\\|v_k\\|)$.

    **OneStep / Truncated.** `OneStep()` differentiates the last step with
    the momentum held: $J^{OS} = J_\\theta T_\\theta(y_{k-1})$. Near the
    solution $T_\\theta$ contracts with
    $\\rho = \\|D (I - \\alpha\\nabla^2 f) D\\|_{op} = \\max(1 - \\alpha\\mu_S,
    \\alpha L_S - 1)$ ($\\mu_S, L_S$: extreme eigenvalues of
    $(\\nabla^2 f)_{SS}$), so Corollary 1 bounds the bias by
    $\\rho L_F / (1 - \\rho) + L_J \\|x_{k-1} - \\bar x\\|$, with
    $L_F = \\|J_\\theta T\\|$ (for the Lasso in $\\theta = \\log\\lambda$:
    $\\alpha\\lambda\\sqrt{|S|}$). `Truncated(K)` replays the last $K$ steps,
    momentum included (its derivative flows through the replayed steps), and
    for ISTA its bias is bounded with $\\rho^K$ in place of $\\rho$.
    `Unroll()` differentiates every FISTA step exactly.

    **Arguments:**

    - `smooth`: `smooth(x, theta) -> scalar`, the smooth part $f$,
      differentiable in `x` (twice for the derivatives).
    - `prox`: `prox(x, step, theta) -> x`,
      $\\mathrm{prox}_{\\mathrm{step}\\cdot g(\\cdot, \\theta)}(x)$; see
      `itergrad.prox` (e.g.
      `lambda x, s, th: ig.prox.l1(x, s, jnp.exp(th))`).
    - `stepsize`: $\\alpha \\in (0, 1/L]$ for an $L$-Lipschitz $\\nabla f$,
      a positive number or array, or the rule `"1/L"` with `L` given.
    - `accelerate`: FISTA (default `True`) or ISTA.
    - `restart`: adaptive restart of FISTA's momentum (default `True`).
    - `L`: the Lipschitz constant of $\\nabla_x f$ for `stepsize="1/L"`.

    The stopping residual is $\\|x_{k+1} - y_k\\|$ (the proximal-gradient
    step at the point the step was taken from; $\\alpha$ times the gradient
    mapping).

    !!! warning

        `OneStep()` is biased by up to $\\rho L_F/(1-\\rho)$ (Corollary 1), and
        $\\rho = 1 - \\alpha\\mu_S$ is close to 1 when the design restricted to
        the support is ill-conditioned. Prefer `Implicit()` (exact at the
        solution, cheap on a small support) or a large `Truncated(K)`.
        Derivatives are those of the support found: they jump where the
        support changes (a measure-zero set of $\\theta$).
    """

    smooth: Callable[[PyTree[Array], PyTree[Any]], Scalar]
    prox: Callable[[PyTree[Array], Any, PyTree[Any]], PyTree[Array]]
    stepsize: float | str | Array
    accelerate: bool = eqx.field(static=True, default=True)
    restart: bool = eqx.field(static=True, default=True)
    L: float | Array | None = None

    def __check_init__(self):
        for name in ("smooth", "prox"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"ProximalGradient({name}=...) must be callable, got "
                    f"{type(getattr(self, name)).__name__}."
                )
        if isinstance(self.stepsize, str) and self.stepsize == "2/(L+mu)":
            raise ValueError(
                "ProximalGradient(stepsize=...) must be a positive number or '1/L'; "
                "'2/(L+mu)' does not keep the proximal-gradient map non-expansive."
            )
        check_stepsize("ProximalGradient", self.stepsize, self.L, None)

    def init(self, x0, theta):
        x0 = check_iterate("ProximalGradient", x0)
        dtype = jnp.result_type(*jtu.tree_leaves(x0))
        aux = _ProximalAux(
            velocity=jtu.tree_map(jnp.zeros_like, x0),
            t=jnp.ones((), dtype),
            residual=jnp.array(jnp.inf, dtype),
        )
        return x0, aux

    def _map(self, y, theta):
        """$T_\\theta(y) = \\mathrm{prox}_{\\alpha g}(y - \\alpha\\nabla f(y))$."""
        alpha = resolve_stepsize(self.stepsize, self.L, None)
        grad = jax.grad(self.smooth)(y, theta)
        forward = jtu.tree_map(lambda u, g: (u - alpha * g).astype(u.dtype), y, grad)
        out = self.prox(forward, alpha, theta)
        return jtu.tree_map(lambda o, u: o.astype(u.dtype), out, y)

    def step(self, z, aux, theta):
        if self.accelerate:
            t_next = (1 + jnp.sqrt(1 + 4 * aux.t**2)) / 2
            beta = (aux.t - 1) / t_next
            y = jtu.tree_map(
                lambda x, v: (x + beta * v).astype(x.dtype), z, aux.velocity
            )
        else:
            t_next = aux.t
            y = z
        x_new = self._map(y, theta)
        residual = jax.lax.stop_gradient(tree_norm(tree_sub(x_new, y)))
        if self.accelerate and self.restart:
            # The restart test is a discrete decision: no derivative.
            inner = sum(
                jnp.vdot(a - b, b - c)
                for a, b, c in zip(
                    jtu.tree_leaves(y), jtu.tree_leaves(x_new), jtu.tree_leaves(z)
                )
            )
            t_next = jnp.where(jax.lax.stop_gradient(inner) > 0, 1, t_next)
        velocity = tree_sub(x_new, z)
        new_aux = _ProximalAux(
            velocity=velocity,
            t=jnp.asarray(t_next, aux.t.dtype),
            residual=residual.astype(aux.residual.dtype),
        )
        return x_new, new_aux

    def value(self, z):
        return z

    def optimality(self, z, aux, theta):
        """$x - T_\\theta(x)$: the proximal-gradient fixed-point residual
        (independent of the momentum)."""
        return tree_sub(z, self._map(z, theta))

    def residual_norm(self, z, new_z, new_aux, theta):
        return new_aux.residual
