"""Mixed precision: a float32 forward solve whose `Implicit` linear system is
formed and solved in float64 (`Implicit(solve_dtype=jnp.float64)`).

References (float64, independent of itergrad's estimators): the dense
implicit function theorem, J = -H^{-1} ∇²_{xθ} f, at a Newton solution of
the float32-rounded data, and central finite differences of that float64
solution. What the float64 solve can and cannot remove (the `Implicit`
docstring): the float32 rounding of the linear solve, about
cond(H) * 6e-8, but not eq. (6)'s distance of the float32 x_k to x̄.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import itergrad as ig

from .helpers import central_difference_jacobian, relative_error

N_SAMPLES, N_FEATURES = 60, 8
# A small ridge term and badly scaled features (below): cond(H) ~ 1e4, so
# that the float32 linear solve's rounding (~cond * 6e-8) shows.
LAM = 1e-4


@pytest.fixture(scope="module")
def problem():
    data = ig.problems.logistic_data(jr.key(3), N_SAMPLES, N_FEATURES, lam=LAM)
    theta = jr.uniform(jr.key(4), (N_SAMPLES,), minval=0.5, maxval=1.5)
    # The data every run sees: float32-rounded, held in float64 for the references.
    # Feature scales spanning two decades: cond(H) ~ 1e4.
    scales = np.concatenate([[1.0], np.logspace(0, -2, N_FEATURES)])
    A = (np.asarray(data.A) * scales).astype(np.float32).astype(np.float64)
    y = np.asarray(data.y, np.float32).astype(np.float64)
    theta = np.asarray(theta, np.float32).astype(np.float64)
    return A, y, theta


def _problem(A, y, dtype):
    return ig.problems.LogisticRegression(jnp.asarray(A, dtype), jnp.asarray(y, dtype), LAM)


@pytest.fixture(scope="module")
def reference(problem):
    A, y, theta = problem
    p = _problem(A, y, jnp.float64)

    @jax.jit
    def x_of(t):
        return ig.solve(
            ig.Newton(p.objective), jnp.zeros(p.n), t, rtol=1e-14, atol=1e-14,
            max_steps=60, throw=False,
        ).value

    x = x_of(jnp.asarray(theta))
    H = jax.hessian(p.objective)(x, jnp.asarray(theta))
    cross = jax.jacobian(jax.grad(p.objective), argnums=1)(x, jnp.asarray(theta))
    J = -np.linalg.solve(np.asarray(H), np.asarray(cross))
    fd = central_difference_jacobian(x_of, jnp.asarray(theta))
    return J, np.asarray(fd), float(np.linalg.cond(np.asarray(H)))


def _jacobian(problem, estimator, mode):
    A, y, theta = problem
    p = _problem(A, y, jnp.float32)

    def x_of(t):
        return ig.solve(
            ig.Newton(p.objective), jnp.zeros(p.n, jnp.float32), t,
            estimator=estimator, max_steps=60,
        ).value

    jac = {"fwd": jax.jacfwd, "rev": jax.jacrev}[mode]
    return jax.jit(jac(x_of))(jnp.asarray(theta, jnp.float32))


def test_references_agree(reference):
    J, fd, cond = reference
    assert relative_error(fd, J) < 1e-6
    assert 1e3 < cond < 1e6, cond  # the regime the test is about


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_float64_solve_after_a_float32_forward_solve(problem, reference, mode):
    J, fd, cond = reference
    plain = _jacobian(problem, ig.Implicit(), mode)
    mixed = _jacobian(problem, ig.Implicit(solve_dtype=jnp.float64), mode)
    # The derivative keeps the unknowns' dtype.
    assert plain.dtype == mixed.dtype == jnp.float32
    error_plain = relative_error(np.asarray(plain, np.float64), J)
    error_mixed = relative_error(np.asarray(mixed, np.float64), J)
    # Measured: plain 1.4e-7 / 1.9e-7 (rev / fwd), mixed 5.8e-8 (cond 1.4e4):
    # float32 LU is backward stable and Newton's float32 x_k is close, so the
    # gain is small here (the QP below shows a large one); never a loss.
    assert error_mixed <= error_plain, (error_mixed, error_plain)
    assert error_mixed < 2e-7, error_mixed
    assert relative_error(np.asarray(mixed, np.float64), fd) < 1e-6


# Slow tier (CI time budget: four QP compiles, 17 s alone, 34 s in a loaded
# CI run). The default tier checks the float64 solve on the float32 logistic
# problems above, and docs/batches-and-devices.md runs it on a float32 QP.
@pytest.mark.slow
def test_float64_solve_of_a_float32_qp():
    """The interior-point QP's KKT system at a float32 solution: the float64
    solve removes most of the float32 derivative's error (measured: 6.7e-7
    -> 2.7e-8). References: `Implicit` on the float64 solve of the same
    (float32-rounded) data at 1e-13, and central differences of it."""
    qp64 = ig.problems.random_qp(jr.key(1), 20, 5, 10).astype(jnp.float32).astype(jnp.float64)

    def x_of(b, dtype, estimator, tol=None):
        qp = eqx.tree_at(lambda q: q.b, qp64.astype(dtype), b)
        tols = {} if tol is None else {"rtol": tol, "atol": tol}
        return ig.solve(
            ig.InteriorPointQP(), None, qp, estimator=estimator, max_steps=100, **tols
        ).value

    b64 = qp64.b
    # One compiled function gives the float64 solution and its Implicit
    # Jacobian; the central differences evaluate it at shifted b (each QP
    # compile costs seconds).
    solution_and_jacobian = jax.jit(jax.jacrev(
        lambda b: (x_of(b, jnp.float64, ig.Implicit(), 1e-13),) * 2, has_aux=True
    ))
    J = np.asarray(solution_and_jacobian(b64)[0])
    fd = central_difference_jacobian(lambda b: solution_and_jacobian(b)[1], b64)
    assert relative_error(fd, J) < 1e-6
    b32 = b64.astype(jnp.float32)
    errors = {}
    for name, estimator in [
        ("plain", ig.Implicit()), ("mixed", ig.Implicit(solve_dtype=jnp.float64))
    ]:
        J32 = jax.jit(jax.jacrev(lambda b, e=estimator: x_of(b, jnp.float32, e)))(b32)
        assert J32.dtype == jnp.float32
        errors[name] = relative_error(np.asarray(J32, np.float64), J)
    assert errors["mixed"] < 0.2 * errors["plain"], errors
    assert errors["mixed"] < 1e-6, errors


def test_mixed_precision_under_vmap_matches_single_runs(problem):
    A, y, theta = problem
    p = _problem(A, y, jnp.float32)
    estimator = ig.Implicit(solve_dtype=jnp.float64)

    def loss(t):
        sol = ig.solve(
            ig.Newton(p.objective), jnp.zeros(p.n, jnp.float32), t,
            estimator=estimator, max_steps=60,
        )
        return 0.5 * jnp.sum(sol.value**2)

    thetas = jnp.stack([jnp.asarray(theta, jnp.float32) * s for s in (1.0, 0.8, 1.3)])
    batched = jax.jit(jax.vmap(jax.grad(loss)))(thetas)
    single = jax.jit(jax.grad(loss))
    for i in range(len(thetas)):
        np.testing.assert_allclose(batched[i], single(thetas[i]), rtol=1e-5, atol=1e-9)


def test_solve_dtype_narrower_than_the_unknowns_is_refused():
    """float16 after a float32 solve would be ignored (nothing is cast
    down): refused with a message instead (found by a new-user trial)."""
    def x_of(t):
        return ig.iterate(
            lambda x, t: 0.5 * x + t, jnp.zeros(2, jnp.float32), t,
            estimator=ig.Implicit(solve_dtype=jnp.float16),
        ).value

    with pytest.raises(ValueError, match="narrower than the unknowns"):
        jax.jacrev(x_of)(jnp.ones(2, jnp.float32))


def test_solve_dtype_must_be_floating():
    with pytest.raises(ValueError, match="real floating-point dtype"):
        ig.Implicit(solve_dtype=jnp.int32)
    with pytest.raises(ValueError, match="real floating-point dtype"):
        ig.Implicit(solve_dtype="not a dtype")


def test_float64_solve_without_x64_is_refused():
    """Without `jax_enable_x64` a float64 array is silently float32: the
    mixed-precision solve refuses with a message instead of solving in
    float32 (a subprocess: the tests run with x64 enabled)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        import itergrad as ig
        def x_of(t):
            F = lambda x, t: 0.5 * x + t
            return ig.iterate(F, jnp.zeros(2), t,
                              estimator=ig.Implicit(solve_dtype=jnp.float64)).value
        try:
            jax.grad(lambda t: x_of(t).sum())(jnp.ones(2))
        except ValueError as error:
            print("REFUSED", error)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert "REFUSED" in out.stdout and "jax_enable_x64" in out.stdout, (
        out.stdout + out.stderr
    )
