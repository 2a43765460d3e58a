"""L-BFGS on weighted logistic regression (eq. 11): every estimator under
jit / vmap / jacfwd / jacrev against a dense implicit-function reference and
finite differences, float32 and float64; the memory is auxiliary state; the
one-step estimator is a quasi-Newton step; planted failures."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import itergrad as ig
from itergrad.problems import logistic_data

from .helpers import central_difference_jacobian, relative_error

N_SAMPLES, N_FEATURES = 30, 5
SOLVE_TOL = 1e-12
MAX_STEPS = 300
RTOL_EXACT = 1e-9  # Implicit: the exact solution's derivative
RTOL_UNROLL = 1e-7  # Unroll: the piggyback recursion converges with the iterates
RTOL_FD = 1e-6  # central differences with step 1e-6
RTOL_F32 = 2e-3  # float32 solve and derivative vs the float64 reference
CG = lx.CG(rtol=1e-12, atol=1e-12, max_steps=100)

# (name, estimator, AD modes it supports, expected relative error bound or
# None for "biased": OneStep / Truncated are checked separately).
ESTIMATORS = [
    ("implicit", ig.Implicit(), ("fwd", "rev"), RTOL_EXACT),
    ("implicit_cg", ig.Implicit(linear_solver=CG), ("fwd", "rev"), RTOL_EXACT),
    (
        "implicit_fixed_point",
        ig.Implicit(condition="fixed_point"),
        ("fwd", "rev"),
        RTOL_EXACT,
    ),
    ("unroll", ig.Unroll(), ("rev",), RTOL_UNROLL),
    ("unroll_forward", ig.Unroll(mode="forward"), ("fwd",), RTOL_UNROLL),
    ("onestep", ig.OneStep(), ("fwd", "rev"), None),
    ("truncated", ig.Truncated(5), ("fwd", "rev"), None),
]
IDS = [case[0] for case in ESTIMATORS]


@pytest.fixture(scope="module")
def logistic():
    problem = logistic_data(jr.key(0), N_SAMPLES, N_FEATURES, lam=0.5)
    theta = jr.uniform(jr.key(1), (N_SAMPLES,), minval=0.5, maxval=1.5)
    return problem, theta


def _x_of(problem, estimator, linesearch=None, dtype=jnp.float64):
    solver = ig.LBFGS(
        problem.objective,
        memory=5,
        **({} if linesearch is None else {"linesearch": linesearch}),
    )

    def x_of(theta):
        return ig.solve(
            solver,
            jnp.zeros(problem.n, dtype),
            theta,
            estimator=estimator,
            max_steps=MAX_STEPS,
            rtol=SOLVE_TOL,
            atol=SOLVE_TOL,
        ).value

    return x_of


BATCH = 2  # theta and 1.5 * theta, under vmap


@pytest.fixture(scope="module")
def thetas(logistic):
    _, theta = logistic
    return jnp.stack([theta, 1.5 * theta])


@pytest.fixture(scope="module")
def reference(logistic, thetas):
    """Dense implicit function theorem at a Newton solution, per batch
    element: (x_bar, J, the jitted solution map)."""
    problem, _ = logistic
    f = problem.objective

    @jax.jit
    def newton(theta):
        return ig.solve(
            ig.Newton(f), jnp.zeros(problem.n), theta, rtol=1e-14, atol=1e-14
        ).value

    def dense(theta):
        x_bar = newton(theta)
        H = jax.hessian(f)(x_bar, theta)
        cross = jax.jacobian(jax.grad(f), argnums=1)(x_bar, theta)
        return x_bar, -jnp.linalg.solve(H, cross)

    x_bar, J = zip(*[dense(t) for t in thetas])
    return jnp.stack(x_bar), jnp.stack(J), newton


@pytest.fixture(scope="module")
def fd_jacobian(logistic, reference):
    """Central differences of the Newton solution (independent of L-BFGS and
    of the dense formula), at the first theta."""
    _, theta = logistic
    return central_difference_jacobian(reference[2], theta)


_CACHE: dict = {}


def _transformed(problem, thetas, name):
    """One compilation per estimator: jit of (x, vmap(jacfwd), vmap(jacrev))
    over a batch of thetas, traced once and called twice."""
    if name in _CACHE:
        return _CACHE[name]
    estimator, modes = {c[0]: (c[1], c[2]) for c in ESTIMATORS}[name]
    x_of = _x_of(problem, estimator)

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(thetas):
        x = jax.vmap(x_of)(thetas)
        out = {"x": x}
        for mode in modes:
            jac = {"fwd": jax.jacfwd, "rev": jax.jacrev}[mode]
            out[mode] = jax.vmap(jac(x_of))(thetas)
        return out

    run(thetas * 1.01)
    _CACHE[name] = run(thetas)  # a new value: no retrace
    return _CACHE[name]


def test_references_agree(reference, fd_jacobian):
    assert relative_error(fd_jacobian, reference[1][0]) < RTOL_FD


def test_backtracking_solution_matches_newton(logistic, reference):
    problem, theta = logistic
    sol = jax.jit(
        lambda t: ig.solve(
            ig.LBFGS(problem.objective, linesearch=ig.Backtracking()),
            jnp.zeros(problem.n),
            t,
            max_steps=MAX_STEPS,
            rtol=SOLVE_TOL,
            atol=SOLVE_TOL,
        )
    )(theta)
    assert sol.result == ig.RESULTS.successful
    assert relative_error(sol.value, reference[0][0]) < 1e-10
    # Quasi-Newton: far fewer steps than gradient descent, more than Newton.
    assert 5 < int(sol.steps) < 100
    # The memory is auxiliary state: `memory` pairs of size n.
    assert sol.state.aux.s.shape == (10, problem.n)
    assert int(sol.state.aux.count) > 0


# Implicit (dense), OneStep, Unroll in both modes run by default; the other
# variants of the same checks are in the slow tier (`pytest -m slow`).
_SLOW = {"implicit_cg", "implicit_fixed_point", "truncated"}


@pytest.mark.parametrize(
    "name, estimator, modes, tol",
    [
        pytest.param(*case, id=case[0], marks=[pytest.mark.slow] if case[0] in _SLOW else [])
        for case in ESTIMATORS
    ],
)
def test_estimator_matrix(
    logistic, thetas, reference, fd_jacobian, name, estimator, modes, tol
):
    """Every estimator under jit (no retrace), vmap and its AD modes: the
    primal (Wolfe line search) is Newton's solution; the exact estimators
    match the dense reference and finite differences."""
    problem, _ = logistic
    out = _transformed(problem, thetas, name)
    assert relative_error(out["x"], reference[0]) < 1e-10
    jacobians = [out[mode] for mode in modes]
    for J in jacobians:
        assert jnp.all(jnp.isfinite(J))
    if len(jacobians) == 2:
        # Forward and reverse mode compute the same estimator.
        np.testing.assert_allclose(jacobians[0], jacobians[1], rtol=1e-8, atol=1e-12)
    J = jacobians[0]
    exact = reference[1]
    if tol is not None:
        for b in range(BATCH):
            assert relative_error(J[b], exact[b]) < tol
        assert relative_error(J[0], fd_jacobian) < RTOL_FD
    else:
        # The quasi-Newton estimators are biased at any accuracy (the
        # docstring's claim): off by more than the exact ones, yet of the
        # right size and direction.
        for b in range(BATCH):
            error = relative_error(J[b], exact[b])
            assert 1e-6 < error < 1.0, error
            cosine = jnp.vdot(J[b], exact[b]) / (
                jnp.linalg.norm(J[b]) * jnp.linalg.norm(exact[b])
            )
            assert cosine > 0.5


def test_onestep_is_a_quasi_newton_step(logistic, thetas, reference):
    """J^OS = -t H B with H symmetric positive definite (the L-BFGS inverse
    Hessian) and B = d grad f / d theta at x_{k-1} (~ at x_bar): recover
    M = -J^OS B^+ from the estimate and check it is an SPD matrix whose
    product with the true Hessian has its spectrum around 1, yet which is
    not the inverse Hessian."""
    problem, theta = logistic
    J = _transformed(problem, thetas, "onestep")["rev"][0]
    x_bar = reference[0][0]
    B = jax.jacobian(jax.grad(problem.objective), argnums=1)(x_bar, theta)
    M = -J @ jnp.linalg.pinv(B)
    # x_{k-1} is within ~1e-9 of x_bar: B there differs at that level.
    np.testing.assert_allclose(M, M.T, rtol=1e-6, atol=1e-6 * jnp.abs(M).max())
    assert jnp.linalg.eigvalsh(0.5 * (M + M.T))[0] > 0
    H = jax.hessian(problem.objective)(x_bar, theta)
    eig = jnp.linalg.eigvals(M @ H).real
    assert 0.1 < float(jnp.min(eig)) and float(jnp.max(eig)) < 10
    assert relative_error(M, jnp.linalg.inv(H)) > 1e-4


def test_truncated_is_less_biased_than_onestep(logistic, thetas, reference):
    problem, _ = logistic
    errors = [
        relative_error(_transformed(problem, thetas, name)["rev"][0], reference[1][0])
        for name in ("onestep", "truncated")
    ]
    assert errors[1] < 0.5 * errors[0], errors


def test_float32(logistic, reference):
    """A float32 problem stays float32 (unknowns, memory, derivatives) and
    reaches float32 accuracy; Implicit's derivative too."""
    problem, theta = logistic
    problem32 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, problem
    )
    solver = ig.LBFGS(problem32.objective)

    def x_of(t, estimator):
        return ig.solve(
            solver,
            jnp.zeros(problem.n, jnp.float32),
            t,
            estimator=estimator,
            max_steps=MAX_STEPS,
            rtol=1e-6,
            atol=1e-6,
        ).value

    @jax.jit
    def run(t):
        return (
            x_of(t, ig.Implicit()),
            jax.jacrev(lambda u: x_of(u, ig.Implicit()))(t),
            jax.jacfwd(lambda u: x_of(u, ig.OneStep()))(t),
        )

    x, J_implicit, J_onestep = run(theta.astype(jnp.float32))
    assert x.dtype == J_implicit.dtype == J_onestep.dtype == jnp.float32
    assert relative_error(x, reference[0][0]) < RTOL_F32
    assert relative_error(J_implicit, reference[1][0]) < RTOL_F32
    assert relative_error(J_onestep, reference[1][0]) < 1.0


def test_pytree_unknowns_and_closed_over_data(logistic, reference):
    """x as a dict, and the derivative with respect to an array the objective
    closes over (the design matrix), checked by finite differences."""
    problem, theta = logistic

    def objective(x, th):
        return problem.objective(jnp.concatenate([x["b"], x["w"]]), th)

    x0 = {"b": jnp.zeros(1), "w": jnp.zeros(problem.n - 1)}
    sol = eqx.filter_jit(ig.solve)(
        ig.LBFGS(objective),
        x0,
        theta,
        rtol=SOLVE_TOL,
        atol=SOLVE_TOL,
        max_steps=MAX_STEPS,
    )
    flat = jnp.concatenate([sol.value["b"], sol.value["w"]])
    assert relative_error(flat, reference[0][0]) < 1e-10

    def x_of_scale(c):
        # Scale the (closed-over) labels' margins through the data.
        scaled = eqx.tree_at(lambda p: p.A, problem, problem.A * c[0])
        solver = ig.LBFGS(scaled.objective)
        return ig.solve(
            solver,
            jnp.zeros(problem.n),
            theta,
            estimator=ig.Implicit(),
            rtol=SOLVE_TOL,
            atol=SOLVE_TOL,
            max_steps=MAX_STEPS,
        ).value

    c = jnp.array([1.0])
    J = jax.jit(jax.jacrev(x_of_scale))(c)
    fd = central_difference_jacobian(jax.jit(x_of_scale), c)
    assert relative_error(J, fd) < RTOL_FD


def test_planted_linesearch_failure_raises():
    @jax.custom_jvp
    def uphill(x):
        return jnp.sum(x**2)

    @uphill.defjvp
    def _(primals, tangents):
        (x,), (dx,) = primals, tangents
        # A gradient pointing the wrong way: no step along -H g decreases f.
        return jnp.sum(x**2), jnp.vdot(-2 * x, dx)

    solver = ig.LBFGS(
        lambda x, th: uphill(x - th), linesearch=ig.Backtracking(max_steps=10)
    )
    with pytest.raises(eqx.EquinoxRuntimeError, match="line search"):
        ig.solve(solver, jnp.zeros(3), jnp.ones(3))
    sol = ig.solve(solver, jnp.zeros(3), jnp.ones(3), throw=False)
    assert sol.result == ig.RESULTS.linesearch_failed
    np.testing.assert_array_equal(sol.value, jnp.zeros(3))


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="memory"):
        ig.LBFGS(lambda x, t: jnp.sum(x**2), memory=0)
    with pytest.raises(TypeError, match="callable"):
        ig.LBFGS("not a function")
    with pytest.raises(TypeError, match="line search"):
        ig.LBFGS(lambda x, t: jnp.sum(x**2), linesearch="wolfe")
    with pytest.raises(ValueError, match="initial iterate"):
        ig.solve(ig.LBFGS(lambda x, t: jnp.sum(x**2)), None, jnp.ones(2))
