"""The implicit function theorem as a custom JVP: the only place the
derivative of a fixed point (rather than of a program that ran) is defined.

Used by `Implicit` and by the Neumann tail of `Truncated("auto")`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import PyTree

from ._neumann import _AbstractNeumann
from ._solution import RESULTS
from ._tree import tree_freeze, tree_norm, tree_sub
from .solvers._base import AbstractSolver, State


def implicit_unknowns(
    solver: AbstractSolver,
    state: State,
    theta: PyTree[Any],
    condition: str,
    linear_solver: lx.AbstractLinearSolver,
    tags: frozenset[object],
    throw: bool,
    active: Any = True,
    solve_dtype: Any = None,
) -> PyTree[Any]:
    """The final unknowns $z$ (stopped) carrying the implicit derivative
    $\\dot z = -(J_z G)^{-1} J_\\theta G\\, \\dot\\theta$ of the condition
    $G(z, \\theta) = 0$ (`"optimality"`: `solver.optimality`; `"fixed_point"`:
    $F_z(z, a, \\theta) - z$), with the auxiliary state $a$ frozen.

    `active` (a boolean, per instance under `vmap`; see `valid_point`) is
    whether the forward solve ended at a point the derivative means
    something at: where it did not (non-finite, infeasible, ... flagged in
    its `Solution.result`) the derivative is zero and the linear solve is
    neither checked nor able to raise, so one failed instance of a batch
    changes nothing in the others.

    `solve_dtype` (mixed precision): when given (e.g. `jnp.float64` for a
    float32 solve), $G$ is evaluated, linearised and solved with $z$ and
    $\\theta$ promoted to it, and the derivative is rounded back to the
    unknowns' dtype at the end; `None` keeps the unknowns' dtype."""
    root = jax.lax.stop_gradient(state.z)
    aux = jax.lax.stop_gradient(state.aux)
    condition_fn = _condition_function(solver, condition, aux)
    # Closure conversion turns arrays that the solver or the user's F close
    # over into explicit inputs, so they are differentiated through the
    # custom rule too instead of being silently treated as constants. It
    # traces G at the dtype it will be evaluated in (see `promote`).
    _check_not_narrower(solve_dtype, root)
    promote = _promoter(solve_dtype)
    condition_fn = eqx.filter_closure_convert(condition_fn, promote(root), promote(theta))
    active = jax.lax.stop_gradient(jnp.asarray(active, bool))
    return _implicit_root(
        root, condition_fn, theta, active, linear_solver=linear_solver, tags=tags,
        throw=throw, condition=condition, solve_dtype=solve_dtype,
    )


def _check_not_narrower(solve_dtype: Any, root: PyTree[Any]) -> None:
    """A `solve_dtype` narrower than the unknowns would be a silent no-op
    (nothing is cast down): refused."""
    if solve_dtype is None:
        return
    target = jnp.dtype(solve_dtype)
    for leaf in jtu.tree_leaves(root):
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating) and (
            jnp.finfo(leaf.dtype).bits > jnp.finfo(target).bits
        ):
            raise ValueError(
                f"Implicit(solve_dtype={target.name}) is narrower than the unknowns' "
                f"dtype {leaf.dtype.name}: the system is never solved in a lower "
                "precision than the forward solve. Use solve_dtype=None, or a wider "
                "dtype (jnp.float64 after a float32 solve)."
            )


def _promoter(solve_dtype: Any) -> Callable[[PyTree[Any]], PyTree[Any]]:
    """Casts the real floating-point leaves of a pytree narrower than
    `solve_dtype` up to it (identity for `None`)."""
    if solve_dtype is None:
        return lambda tree: tree
    target = jnp.dtype(solve_dtype)
    if target == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "Implicit(solve_dtype=jnp.float64) needs 64-bit JAX: call "
            "`jax.config.update('jax_enable_x64', True)` at start-up (without "
            "it every float64 array is silently float32, and the mixed-precision "
            "solve would be a float32 one)."
        )

    def cast(leaf):
        if (
            eqx.is_array(leaf)
            and jnp.issubdtype(leaf.dtype, jnp.floating)
            and jnp.finfo(leaf.dtype).bits < jnp.finfo(target).bits
        ):
            return leaf.astype(target)
        return leaf

    return lambda tree: jtu.tree_map(cast, tree)


def valid_point(result: RESULTS) -> Any:
    """Whether a forward solve with this result ended at a point where the
    implicit derivative is defined: a converged one, or the last iterate of a
    deliberate step budget (`max_steps_reached` with `throw=False`: the
    derivative at $x_k$, eq. 6). Non-finite, infeasible, non-convex or
    line-search failures are not."""
    return (result == RESULTS.successful) | (result == RESULTS.max_steps_reached)


def _condition_function(
    solver: AbstractSolver, condition: str, aux: PyTree[Any]
) -> Callable[[PyTree[Any], PyTree[Any]], PyTree[Any]]:
    def condition_fn(z, theta):
        if condition == "optimality":
            return solver.optimality(z, aux, theta)
        new_z, _ = solver.step(z, aux, theta)
        return tree_sub(new_z, z)

    return condition_fn


@eqx.filter_custom_jvp
def _implicit_root(root, condition_fn, theta, active, *, linear_solver, tags, throw,
                   condition, solve_dtype):
    del condition_fn, theta, active, linear_solver, tags, throw, condition, solve_dtype
    return root


@_implicit_root.def_jvp
def _implicit_root_jvp(
    primals, tangents, *, linear_solver, tags, throw, condition, solve_dtype
):
    root, condition_fn, theta, active = primals
    promote = _promoter(solve_dtype)
    root_dtypes = jtu.tree_map(lambda v: v.dtype, root)
    _, t_condition_fn, t_theta, _ = tangents
    # Tangent of G(root, .) in the direction of (condition_fn's closed-over
    # arrays, theta); the root itself is held fixed.
    diff_inputs, static_inputs = eqx.partition(
        (condition_fn, theta), eqx.is_inexact_array
    )
    t_inputs = jtu.tree_map(
        lambda t, x: None if x is None else (jnp.zeros_like(x) if t is None else t),
        (t_condition_fn, t_theta),
        diff_inputs,
        is_leaf=lambda t: t is None,
    )

    def g_of_inputs(dyn):
        fn, th = eqx.combine(dyn, static_inputs)
        return fn(promote(root), promote(th))

    _, t_residual = jax.jvp(g_of_inputs, (diff_inputs,), (t_inputs,))
    # Linearised once: a Krylov solver's products then cost one linear
    # application each, not a fresh JVP through the condition.
    operator = lx.linearise(
        lx.JacobianLinearOperator(
            lambda z, args: condition_fn(z, args), promote(root), promote(theta),
            tags=tags,
        )
    )
    # A failed forward solve: a zero right-hand side (a zero derivative that
    # no solver can fail on), and no check (see `implicit_unknowns`). Masked
    # on both sides of the solve, so that the transposed solve of reverse
    # mode gets a zero right-hand side too.
    def masked(tree):
        return jtu.tree_map(lambda v: v * active.astype(v.dtype), tree)

    t_root = _solve_condition(
        operator, masked(t_residual), linear_solver, throw, condition, active
    )
    return root, jtu.tree_map(
        lambda t, dtype: (-t).astype(dtype), masked(t_root), root_dtypes
    )


def _solve_condition(operator, vector, linear_solver, throw, condition, active):
    """$(J_z G)^{-1}$ `vector`, refusing a singular $J_z G$ with itergrad's
    message (`throw`) or returning NaN for it (`throw=False`), in every AD
    mode.

    Lineax alone cannot do this: the transposed solve of reverse mode always
    raises its own message (`throw=True` unconditionally) and the solve's
    result code is not returned there, so a failure seen only in a tangent
    (or cotangent) solve cannot be reported as ours nor turned into NaN.
    Hence two ways, chosen by the solver:

    - direct solvers (a factorisation): a probe solve with a fixed generic
      right-hand side, on the primal side, decides; it reuses the
      factorisation (one back-substitution and two products), and the
      tangent solves never fail inside Lineax (`_Quiet`). A probe is needed
      anyway: a consistent right-hand side solves with a small residual even
      when $J_z G$ is singular up to rounding (catalogue S6), only a generic
      one shows the blown-up inverse.
    - iterative solvers (`throw=True`): each tangent solve checks its own
      result (`_Raising`), raising inside Lineax's primitive, so also in the
      transposed solve; a probe would double their cost. With `throw=False`
      they are probed too (a second solve: the price of a NaN flag instead
      of an error under `vmap(grad)`).

    Least-squares solvers (`assume_full_rank()` false, e.g. `lx.SVD()`,
    `lx.AutoLinearSolver(well_posed=False)`) were chosen for singular
    systems on purpose: their pseudo-inverse answer is returned unchecked.
    Neumann series are approximations by design (never fail).
    """
    if isinstance(linear_solver, _AbstractNeumann) or not linear_solver.assume_full_rank():
        return lx.linear_solve(operator, vector, linear_solver, throw=throw).value
    if throw and not isinstance(linear_solver, _DIRECT_SOLVERS):
        checked = _Raising(linear_solver, _solver_name(linear_solver), condition)
        return lx.linear_solve(operator, vector, checked, throw=False).value
    stopped = tree_freeze(operator)
    state = linear_solver.init(stopped, {})
    ok = _probe(stopped, linear_solver, state) | ~active
    quiet = _Quiet(linear_solver)
    if throw:
        # A factor of exactly one that only the check produces: any use of
        # the derivative keeps the check (as in `itergrad._guard`).
        flag = eqx.error_if(
            jnp.ones(()), ~ok, _singular_message(linear_solver, condition)
        )
    else:
        # Multiplying (not `where`) keeps the tangent linear, so reverse mode
        # transposes it: the gradient of a failed solve is NaN, flagged.
        flag = jnp.where(ok, 1.0, jnp.nan)

    def flagged(tree):
        return jtu.tree_map(lambda v: v * flag.astype(v.dtype), tree)

    # On both sides of the solve: reverse mode runs these in the opposite
    # order, and `_Quiet` zeroes a non-finite answer, so a NaN must also be
    # applied after the (transposed) solve to reach the gradient.
    value = lx.linear_solve(operator, flagged(vector), quiet, state=state, throw=False).value
    return flagged(value)


# Solvers whose `init` factorises the operator: a probe solve reuses it.
_DIRECT_SOLVERS = (
    lx.AutoLinearSolver, lx.LU, lx.QR, lx.Cholesky, lx.Diagonal, lx.Triangular,
    lx.Tridiagonal,
)

# Refuse when the estimated condition number exceeds this fraction of
# 1 / machine epsilon: the solve's relative error bound, about cond * eps,
# is then above 10 % (no reliable digit left).
_CONDITION_LIMIT = 0.1


def _probe(operator, linear_solver, state):
    """Whether `linear_solver` solves $M u = r$ for a fixed generic $r$:
    finite $u$, a small backward error, and the condition estimate
    $\\kappa \\ge (\\|M r\\| / \\|r\\|)(\\|u\\| / \\|r\\|)$ (both factors are
    lower bounds of $\\|M\\|$ and $\\|M^{-1}\\|$) below
    `_CONDITION_LIMIT / eps`."""
    r = _generic_vector(operator.out_structure())
    solution = lx.linear_solve(operator, r, linear_solver, state=state, throw=False)
    u = solution.value
    norm_r = tree_norm(r)
    norm_u = tree_norm(u)
    norm_m = tree_norm(operator.mv(r)) / norm_r
    backward_error = tree_norm(tree_sub(operator.mv(u), r)) / (norm_m * norm_u + norm_r)
    eps = max(float(jnp.finfo(leaf.dtype).eps) for leaf in jtu.tree_leaves(r))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(u)]))
    # Written so that NaN anywhere makes `ok` false.
    return (
        finite
        & (solution.result == lx.RESULTS.successful)
        & (backward_error <= jnp.sqrt(eps))
        & (norm_m * norm_u / norm_r * eps <= _CONDITION_LIMIT)
    )


def _generic_vector(structure):
    """A fixed pseudo-random vector with `structure` (deterministic: no key
    from the user, the same probe every call)."""
    leaves, treedef = jtu.tree_flatten(structure)
    key = jax.random.key(0)
    return jtu.tree_unflatten(
        treedef,
        [
            jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
            for i, leaf in enumerate(leaves)
        ],
    )


def _solver_name(linear_solver) -> str:
    return type(linear_solver).__name__


def _condition_text(condition: str) -> str:
    if condition == "fixed_point":
        return "I - J_z F (condition='fixed_point')"
    return "the Jacobian of the solver's optimality condition (condition='optimality')"


def _singular_message(linear_solver, condition: str) -> str:
    return (
        "linear_solve_failed: A linear solve failed in `Implicit`'s derivative: "
        f"J_z G, {_condition_text(condition)}, is singular or numerically singular "
        f"at the solution (`Implicit(linear_solver={_solver_name(linear_solver)}(...))` "
        "gives a non-finite or unreliable answer; estimated condition number above "
        f"{_CONDITION_LIMIT}/machine epsilon). The implicit function theorem does not "
        "apply there: the solution is not locally unique or not differentiable, e.g. "
        "an eigenvalue 1 of J_z F, a rank-deficient Hessian, dependent equality "
        "constraints, active constraints that are not linearly independent or only "
        "weakly active in a QP. Change the problem (regularise it, remove dependent "
        "constraints), differentiate the iterations instead (`OneStep()`, "
        "`Truncated(K)`, `Unroll()`), or, to accept the minimum-norm least-squares "
        "derivative (one of many when the solution is not unique), pass "
        "`Implicit(linear_solver=lx.AutoLinearSolver(well_posed=False))`."
    )


def _iterative_message(name: str, condition: str, what: str) -> str:
    return (
        f"linear_solve_failed: A linear solve failed in `Implicit`'s derivative: "
        f"`Implicit(linear_solver={name}(...))` {what} on J_z G, "
        f"{_condition_text(condition)}. Raise the linear solver's `max_steps` or "
        "loosen its `rtol`/`atol`, use a direct solver (the default "
        "`lx.AutoLinearSolver(well_posed=None)`), or check that J_z G is "
        "nonsingular at the solution (the implicit function theorem needs it)."
    )


class _Wrapped(lx.AbstractLinearSolver):
    """A Lineax solver that delegates everything but `compute` to `inner`."""

    inner: eqx.AbstractVar[lx.AbstractLinearSolver]

    def init(self, operator, options):
        return self.inner.init(operator, options)

    def transpose(self, state, options):
        return self.inner.transpose(state, options)

    def conj(self, state, options):
        return self.inner.conj(state, options)

    def assume_full_rank(self):
        return self.inner.assume_full_rank()


class _Quiet(_Wrapped):
    """`inner`, reporting success with finite output whatever happens: the
    caller has already decided (by `_probe`) whether the solve can be
    trusted, and Lineax must not raise its own message meanwhile (it would
    in the transposed solve of reverse mode)."""

    inner: lx.AbstractLinearSolver

    def compute(self, state, vector, options):
        value, _, stats = self.inner.compute(state, vector, options)
        value = jtu.tree_map(lambda v: jnp.where(jnp.isfinite(v), v, 0), value)
        return value, lx.RESULTS.successful, stats


class _Raising(_Wrapped):
    """`inner`, raising itergrad's message (naming `Implicit`'s linear solver)
    when a solve fails: inside Lineax's primitive, so also in the transposed
    solves of reverse mode, where the result code is not returned."""

    inner: lx.AbstractLinearSolver
    name: str = eqx.field(static=True)
    condition: str = eqx.field(static=True)

    def compute(self, state, vector, options):
        value, result, stats = self.inner.compute(state, vector, options)
        finite = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(value)])
        )
        max_steps = result == lx.RESULTS.max_steps_reached
        value = eqx.error_if(
            value, max_steps,
            _iterative_message(self.name, self.condition, "reached its `max_steps`"),
        )
        value = eqx.error_if(
            value, ~max_steps & ((result != lx.RESULTS.successful) | ~finite),
            _iterative_message(
                self.name, self.condition,
                "broke down or returned a non-finite answer (a singular or "
                "indefinite system, or tags it does not satisfy)",
            ),
        )
        return value, result, stats
