"""`ig.iterate`: pytrees, dtypes, JAX transforms, retracing, failures."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import pytest

import itergrad as ig

from .helpers import linear_contraction, tree_allclose

ESTIMATORS = {
    "onestep": (ig.OneStep(), ("fwd", "rev")),
    "truncated": (ig.Truncated(4), ("fwd", "rev")),
    "implicit": (ig.Implicit(), ("fwd", "rev")),
    "implicit_fixed_point": (ig.Implicit(condition="fixed_point"), ("fwd", "rev")),
    "neumann": (ig.Implicit(linear_solver=ig.Neumann(200), condition="fixed_point"), ("fwd", "rev")),
    "unroll_reverse": (ig.Unroll(), ("rev",)),
    "unroll_forward": (ig.Unroll("forward"), ("fwd",)),
}
TOL = {jnp.float32: 2e-4, jnp.float64: 1e-10}


def _pytree_problem(dtype):
    """A contraction on x = {"a": (2,), "b": ((3,), scalar)} with theta a tuple.

    Equivalent to the flat linear map F(v) = A v + B t, so the exact Jacobian is
    (I - A)^{-1} B on the flattened variables.
    """
    F_flat, A, B, c = linear_contraction(jr.key(3), 6, 3, 0.4)
    A, B, c = A.astype(dtype), B.astype(dtype), c.astype(dtype)

    def flatten_x(x):
        return jnp.concatenate([x["a"], x["b"][0], x["b"][1][None]])

    def unflatten_x(v):
        return {"a": v[:2], "b": (v[2:5], v[5])}

    def F(x, theta):
        t = jnp.concatenate([theta[0], theta[1][None]])
        return unflatten_x(A @ flatten_x(x) + B @ t + c)

    x0 = {"a": jnp.zeros(2, dtype), "b": (jnp.zeros(3, dtype), jnp.zeros((), dtype))}
    theta = (jnp.array([0.5, -1.0], dtype), jnp.array(2.0, dtype))
    exact = jnp.linalg.solve(jnp.eye(6, dtype=dtype) - A, B)
    return F, x0, theta, flatten_x, exact


def _flat_jacobian(jac, flatten_x):
    # jac is a pytree (x structure) of pytrees (theta structure); assemble 6 x 3.
    def columns(leaf_tree):
        return jnp.concatenate(
            [leaf_tree[0].reshape(-1, 2), leaf_tree[1].reshape(-1, 1)], axis=1
        )

    blocks = [columns(jac["a"]), columns(jac["b"][0]), columns(jac["b"][1])]
    return jnp.concatenate([b.reshape(-1, 3) for b in blocks], axis=0)


# float32 runs by default for OneStep and Implicit; its other estimators are
# in the slow tier (`pytest -m slow`).
@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param(
            name,
            dtype,
            id=f"{name}-{dtype.__name__}",
            marks=[pytest.mark.slow]
            if dtype is jnp.float32 and name not in ("onestep", "implicit")
            else [],
        )
        for dtype in (jnp.float32, jnp.float64)
        for name in ESTIMATORS
    ],
)
def test_pytrees_dtypes_and_transforms(name, dtype):
    estimator, modes = ESTIMATORS[name]
    F, x0, theta, flatten_x, exact = _pytree_problem(dtype)
    exact_or_estimate = exact
    if name == "onestep":
        exact_or_estimate = None  # biased by design; checked in test_estimators
    tol = TOL[dtype]
    rtol = 1e-6 if dtype == jnp.float32 else 1e-13

    def value(th):
        sol = ig.iterate(F, x0, th, estimator=estimator, max_steps=400, rtol=rtol, atol=rtol)
        return sol.value

    out = value(theta)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(x0)
    assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(out))
    jacobians = []
    for mode in modes:
        transform = jax.jacfwd if mode == "fwd" else jax.jacrev
        jac = _flat_jacobian(jax.jit(transform(value))(theta), flatten_x)
        assert jac.dtype == dtype
        jacobians.append(jac)
        if exact_or_estimate is not None and name != "truncated":
            assert jnp.max(jnp.abs(jac - exact)) < tol * 10
    if len(jacobians) == 2:
        assert jnp.max(jnp.abs(jacobians[0] - jacobians[1])) < tol
    # vmap over a batch of theta agrees with the unbatched call.
    batch = jax.tree_util.tree_map(lambda t: jnp.stack([t, 2 * t, -t]), theta)
    batched = jax.jit(jax.vmap(value))(batch)
    second = value(jax.tree_util.tree_map(lambda t: t[1], batch))
    assert tree_allclose(jax.tree_util.tree_map(lambda t: t[1], batched), second, rtol=tol, atol=tol)


@pytest.mark.parametrize("estimator", [ig.OneStep(), ig.Implicit()])
def test_jit_vmap_grad_over_a_batch_of_theta(estimator):
    F, A, B, c = linear_contraction(jr.key(0), 5, 3, 0.5)
    thetas = jr.normal(jr.key(1), (8, 3))

    def loss(theta):
        x = ig.iterate(F, jnp.zeros(5), theta, estimator=estimator, rtol=1e-13, atol=1e-13).value
        return 0.5 * jnp.sum(x**2)

    grads = jax.jit(jax.vmap(jax.grad(loss)))(thetas)
    J = B if isinstance(estimator, ig.OneStep) else jnp.linalg.solve(jnp.eye(5) - A, B)
    x_bar = jax.vmap(lambda t: jnp.linalg.solve(jnp.eye(5) - A, B @ t + c))(thetas)
    expected = x_bar @ J
    assert jnp.max(jnp.abs(grads - expected)) < 1e-10


@pytest.mark.parametrize("estimator", [ig.OneStep(), ig.Implicit(), ig.Unroll(), ig.Truncated(3)])
def test_second_call_does_not_retrace(estimator):
    F, *_ = linear_contraction(jr.key(0), 4, 2, 0.5)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def grad(theta):
        return jax.grad(
            lambda t: jnp.sum(ig.iterate(F, jnp.zeros(4), t, estimator=estimator).value)
        )(theta)

    grad(jnp.ones(2))
    grad(jnp.array([0.3, -2.0]))


def test_every_estimator_differentiates_arrays_that_F_closes_over():
    # Derivatives w.r.t. closed-over arrays are neither silently zero (Implicit
    # closure-converts F) nor a crash in the no-gradient loop (the loop is
    # closure-converted and stopped). Closed forms in c: one-step I,
    # truncated sum_{i<K} A^i, implicit and unrolled-to-convergence (I - A)^{-1}.
    from .helpers import truncated_jacobian

    _, A, B, c = linear_contraction(jr.key(0), 4, 2, 0.5)

    def value(c_vec, estimator):
        F = lambda x, theta: A @ x + B @ theta + c_vec  # noqa: E731
        return ig.iterate(F, jnp.zeros(4), jnp.ones(2), estimator=estimator, rtol=1e-13, atol=1e-13).value

    implicit = jnp.linalg.inv(jnp.eye(4) - A)
    cases = [
        (ig.Implicit(), implicit),
        (ig.Unroll(), implicit),
        (ig.OneStep(), jnp.eye(4)),
        (ig.Truncated(3), truncated_jacobian(A, jnp.eye(4), 3)),
    ]
    for estimator, expected in cases:
        jac = jax.jacrev(lambda cv: value(cv, estimator))(c)
        assert jnp.max(jnp.abs(jac - expected)) < 1e-10, estimator


def test_neumann_is_inexact_ad():
    # Implicit + Neumann(k) on the linear oracle is sum_{i<k} A^i B, the IAD estimate.
    F, A, B, _ = linear_contraction(jr.key(2), 5, 3, 0.7)
    from .helpers import truncated_jacobian

    for k in (1, 3, 10):
        est = ig.Implicit(linear_solver=ig.Neumann(k), condition="fixed_point")
        value = lambda t: ig.iterate(F, jnp.zeros(5), t, estimator=est).value  # noqa: E731
        for transform in (jax.jacfwd, jax.jacrev):
            jac = transform(value)(jnp.ones(3))
            assert jnp.max(jnp.abs(jac - truncated_jacobian(A, B, k))) < 1e-12


def test_nonconvergence_is_reported_and_raises():
    F, *_ = linear_contraction(jr.key(0), 4, 2, 0.99)
    sol = ig.iterate(F, jnp.zeros(4), jnp.ones(2), max_steps=5, throw=False)
    assert sol.result == ig.RESULTS.max_steps_reached
    assert int(sol.steps) == 5
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps"):
        ig.iterate(F, jnp.zeros(4), jnp.ones(2), max_steps=5)


@pytest.mark.parametrize("where", ["theta", "x0"])
def test_nan_input_is_never_successful(where):
    F, *_ = linear_contraction(jr.key(0), 4, 2, 0.5)
    theta = jnp.array([1.0, jnp.nan]) if where == "theta" else jnp.ones(2)
    x0 = jnp.array([0.0, jnp.inf, 0.0, 0.0]) if where == "x0" else jnp.zeros(4)
    sol = ig.iterate(F, x0, theta, throw=False)
    assert sol.result == ig.RESULTS.nonfinite
    assert int(sol.steps) == 0
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        ig.iterate(F, x0, theta)


def test_divergence_is_reported_as_nonfinite():
    F = lambda x, theta: 3.0 * x + theta  # noqa: E731  (an expansion: blows up)
    sol = ig.iterate(F, jnp.ones(2), jnp.ones(2), max_steps=2000, throw=False)
    assert sol.result == ig.RESULTS.nonfinite
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        eqx.filter_jit(lambda t: ig.iterate(F, jnp.ones(2), t, max_steps=2000).value)(jnp.ones(2))


def test_failed_backward_linear_solve_raises_instead_of_returning_zeros():
    # F(x) = x + (theta - x) * 0 has J_x F = I: I - J_x F is singular.
    F = lambda x, theta: x + 0.0 * theta  # noqa: E731
    est = ig.Implicit(linear_solver=lx.LU(), condition="fixed_point")
    grad = jax.grad(lambda t: jnp.sum(ig.iterate(F, jnp.ones(2), t, estimator=est).value))
    # Lineax's own check raises (wrapped by JAX's runtime error outside
    # filter_jit), naming the singular operator.
    with pytest.raises(Exception, match="singular"):
        jax.block_until_ready(grad(jnp.ones(2)))


def test_bad_arguments_raise_clear_errors():
    F = lambda x, theta: 0.5 * x + theta  # noqa: E731
    x0, theta = jnp.zeros(2), jnp.ones(2)
    with pytest.raises(ValueError, match="max_steps"):
        ig.iterate(F, x0, theta, max_steps=0)
    with pytest.raises(ValueError, match="rtol"):
        ig.iterate(F, x0, theta, rtol=-1.0)
    with pytest.raises(TypeError, match="estimator"):
        ig.iterate(F, x0, theta, estimator="onestep")
    with pytest.raises(ValueError, match="positive integer K"):
        ig.Truncated(0)
    with pytest.raises(ValueError, match="mode"):
        ig.Unroll("sideways")
    with pytest.raises(ValueError, match="condition"):
        ig.Implicit(condition="stationary")
    with pytest.raises(TypeError, match="floating-point"):
        ig.iterate(F, jnp.zeros(2, int), theta)
    with pytest.raises(ValueError, match="same structure"):
        ig.iterate(lambda x, t: jnp.concatenate([x, t]), x0, theta)
    with pytest.raises(ValueError, match="x0"):
        ig.iterate(F, None, theta)


def _compiled_temp_bytes(estimator, max_steps, n=100):
    F, *_ = linear_contraction(jr.key(0), n, n, 0.99)

    def loss(theta):
        sol = ig.iterate(F, jnp.zeros(n), theta, estimator=estimator,
                         max_steps=max_steps, rtol=0.0, atol=0.0, throw=False)
        return jnp.sum(sol.value)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(n)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # compiles several loop lengths to read their memory
def test_memory_of_onestep_and_implicit_does_not_grow_with_max_steps():
    for estimator in (ig.OneStep(), ig.Implicit(), ig.Truncated(5)):
        assert _compiled_temp_bytes(estimator, 10) == _compiled_temp_bytes(estimator, 1000)
    assert _compiled_temp_bytes(ig.Unroll(), 1000) > 2 * _compiled_temp_bytes(ig.Unroll(), 10)
