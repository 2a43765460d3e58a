"""Log-domain Sinkhorn (`ig.Sinkhorn`, `ig.OTProblem`): marginals, the
regularised cost and its gradient with every estimator against two
references, OneStep's bias against Corollary 1, float32, jit and vmap."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest
from helpers import central_difference_jacobian, relative_error

import itergrad as ig

# Tight solves: the L1 marginal violation at which every solve here stops.
ATOL = 1e-13
MAX_STEPS = 2_000
# Cost-gradient tolerance vs the envelope closed form and finite differences
# (central differences with h = 1e-6 are good to about 1e-9).
GRAD_RTOL = 1e-7
# Jacobian of the potential g: Implicit / Unroll / Truncated("auto") vs
# finite differences.
JAC_RTOL = 1e-6
EPSILON = 0.5
N, M = 6, 5


def _points():
    kx, ky, ka = jr.split(jr.PRNGKey(0), 3)
    x = jr.normal(kx, (N, 2))
    y = jr.normal(ky, (M, 2)) + jnp.array([0.5, 0.0])
    a = jr.uniform(ka, (N,), minval=0.5, maxval=1.5)
    a = a / jnp.sum(a)
    return x, y, a


def _cost_matrix(x, y):
    return jnp.sum((x[:, None] - y[None]) ** 2, -1)


def _problem(x, y, a, **kwargs):
    return ig.OTProblem(x=x, y=y, a=a, **kwargs)


SOLVER = ig.Sinkhorn(epsilon=EPSILON)


def _solve(theta, estimator=ig.OneStep(), solver=SOLVER, **kwargs):
    settings = dict(rtol=0.0, atol=ATOL, max_steps=MAX_STEPS)
    settings.update(kwargs)
    return ig.solve(solver, None, theta, estimator=estimator, **settings)


# Compiled once per problem structure and shared by the tests (plain `ig.solve`
# outside `jit` would compile its loop at every call).
_solve_jit = eqx.filter_jit(_solve)


def test_plan_marginals_and_primal_value():
    x, y, a = _points()
    theta = _problem(x, y, a)
    sol = _solve_jit(theta)
    assert sol.result == ig.RESULTS.successful
    P = SOLVER.plan(sol, theta)
    b = theta.b
    np.testing.assert_allclose(P.sum(1), a, rtol=0, atol=1e-15)  # exact by f = T_a(g)
    np.testing.assert_allclose(P.sum(0), b, rtol=0, atol=1e-12)
    assert float(SOLVER.marginal_error(sol, theta)) <= 10 * ATOL
    # The semi-dual value equals the primal <P, C> + eps KL(P || a b^T).
    C = _cost_matrix(x, y)
    Q = a[:, None] * b[None, :]
    primal = jnp.sum(P * C) + EPSILON * jnp.sum(P * jnp.log(P / Q) - P + Q)
    np.testing.assert_allclose(SOLVER.cost(sol, theta), primal, rtol=1e-12)
    # The gauge: <b, g> = 0, and the potentials are a fixed point.
    f, g = SOLVER.potentials(sol, theta)
    assert abs(float(jnp.vdot(b, g))) < 1e-14
    assert f.shape == (N,) and g.shape == (M,)


def test_cost_matrix_input_matches_points():
    x, y, a = _points()
    from_points = _solve_jit(_problem(x, y, a))
    theta = ig.OTProblem(_cost_matrix(x, y), a=a)
    from_cost = _solve_jit(theta)
    np.testing.assert_allclose(from_cost.value, from_points.value, atol=1e-13)


def _envelope_gradient(x, y, a):
    """Independent closed form: grad_x OT = sum_ij P_ij grad_x C_ij with P held
    (envelope theorem), P from a tight solve."""
    theta = _problem(x, y, a)
    P = SOLVER.plan(_solve_jit(theta), theta)
    return jax.grad(lambda x: jnp.sum(P * _cost_matrix(x, y)))(x)


def _finite_difference_gradient(x, y, a):
    @jax.jit
    def cost(flat):
        theta = _problem(flat.reshape(x.shape), y, a)
        return SOLVER.cost(_solve(theta), theta)[None]

    return central_difference_jacobian(cost, x.ravel()).reshape(x.shape)


@pytest.fixture(scope="module")
def references():
    x, y, a = _points()
    return _envelope_gradient(x, y, a), _finite_difference_gradient(x, y, a)


ESTIMATORS = {
    "onestep": ig.OneStep(),
    "truncated3": ig.Truncated(3),
    "truncated_auto": ig.Truncated("auto"),
    "implicit": ig.Implicit(),
    "implicit_cg": ig.Implicit(linear_solver=lx.CG(rtol=1e-12, atol=1e-12)),
    "implicit_neumann": ig.Implicit(
        condition="fixed_point", linear_solver=ig.Neumann(60)
    ),
    "unroll": ig.Unroll(),
}


# Implicit, Implicit(CG), Unroll and Truncated("auto") are checked on the
# cost gradient by `test_potential_jacobian_and_cost_gradient`; the
# fixed-point condition by implicit_neumann (which needs it).
@pytest.mark.parametrize("name", ["onestep", "truncated3", "implicit_neumann"])
def test_cost_gradient_every_estimator(name, references):
    envelope, finite_differences = references
    # The two references agree with each other first.
    assert relative_error(envelope, finite_differences) < GRAD_RTOL
    x, y, a = _points()
    estimator = ESTIMATORS[name]

    def cost(x):
        theta = _problem(x, y, a)
        return SOLVER.cost(_solve(theta, estimator), theta)

    grad = jax.jit(jax.grad(cost))(x)
    assert relative_error(grad, envelope) < GRAD_RTOL
    assert relative_error(grad, finite_differences) < GRAD_RTOL


def test_cost_gradient_forward_mode_unroll(references):
    envelope, _ = references
    x, y, a = _points()

    def cost(x):
        theta = _problem(x, y, a)
        return SOLVER.cost(_solve(theta, ig.Unroll(mode="forward")), theta)

    grad = jax.jit(jax.jacfwd(cost))(x)
    assert relative_error(grad, envelope) < GRAD_RTOL


def _potential(x, y, a, estimator):
    return _solve(_problem(x, y, a), estimator).value


def _potential_and_cost(x, y, a, estimator):
    theta = _problem(x, y, a)
    sol = _solve(theta, estimator)
    return sol.value, SOLVER.cost(sol, theta)


@pytest.fixture(scope="module")
def potential_jacobian_fd():
    x, y, a = _points()
    return central_difference_jacobian(
        jax.jit(lambda flat: _potential(flat.reshape(x.shape), y, a, ig.OneStep())),
        x.ravel(),
    )


@pytest.mark.parametrize(
    "name, mode",
    [
        ("implicit", "fwd"),
        ("implicit_cg", "rev"),
        ("unroll", "rev"),
        ("truncated_auto", "fwd"),
    ],
)
def test_potential_jacobian_and_cost_gradient(
    name, mode, potential_jacobian_fd, references
):
    # g itself is not stationary (unlike the cost), so this is where the
    # estimators differ: those without bias match finite differences. The
    # cost gradient comes from the same compiled program (one compile per
    # estimator keeps the file fast).
    x, y, a = _points()
    jac = {"fwd": jax.jacfwd, "rev": jax.jacrev}[mode]
    J, grad = jax.jit(jac(lambda x: _potential_and_cost(x, y, a, ESTIMATORS[name])))(x)
    # Truncated("auto") stops at its relative bias target (default 1e-4).
    tolerance = 1e-4 if name == "truncated_auto" else JAC_RTOL
    assert relative_error(J.reshape(M, -1), potential_jacobian_fd) < tolerance
    envelope, finite_differences = references
    assert relative_error(grad, envelope) < GRAD_RTOL
    assert relative_error(grad, finite_differences) < GRAD_RTOL


@eqx.filter_jit
def _bias_quantities(x, y, a, b, epsilon):
    """rho and L_F by `ig.diagnose`; lambda_2 of J = D_b^{-1} P^T D_a^{-1} P in
    closed form (its top eigenvalue, 1, is the gauge direction that the step
    removes); the OneStep and Implicit Jacobians of g."""
    solver = ig.Sinkhorn()
    theta = _problem(x, y, a, b=b, epsilon=epsilon)
    sol = _solve(theta, solver=solver)
    report = ig.diagnose(solver, sol, theta, key=jr.PRNGKey(1))
    P = solver.plan(sol, theta)
    J_T = (P.T / b[:, None]) @ (P / a[:, None])

    def jac(estimator):
        def g(x):
            return _solve(
                _problem(x, y, a, b=b, epsilon=epsilon), estimator, solver
            ).value

        return jax.jacfwd(g)(x).reshape(M, -1)

    return report.rho, report.L_F, J_T, jac(ig.OneStep()), jac(ig.Implicit())


@pytest.mark.parametrize("epsilon", [0.5, 0.1])
def test_onestep_bias_within_corollary1(epsilon):
    # Uniform b: J_g F is symmetric, so the Euclidean norm that diagnose
    # measures is the contraction factor lambda_2.
    x, y, _ = _points()
    a = jnp.full((N,), 1.0 / N)
    b = jnp.full((M,), 1.0 / M)
    rho, L_F, J_T, J_os, J_id = _bias_quantities(x, y, a, b, jnp.array(epsilon))
    rho, L_F = float(rho), float(L_F)
    eigenvalues = np.sort(np.abs(np.linalg.eigvals(np.asarray(J_T))))[::-1]
    np.testing.assert_allclose(eigenvalues[0], 1.0, atol=1e-10)
    np.testing.assert_allclose(rho, eigenvalues[1], rtol=1e-3)
    bias = np.linalg.norm(np.asarray(J_os - J_id), 2)
    bound = rho * L_F / (1 - rho)  # Corollary 1 at the fixed point
    assert bias <= bound * (1 + 1e-6)
    # At the fixed point J_OS - J = -J_g F J: relative bias at most rho, and
    # a real bias (not a test that cannot fail).
    relative = bias / np.linalg.norm(np.asarray(J_id), 2)
    assert 0.05 * rho < relative <= rho * (1 + 1e-6)


def test_epsilon_in_theta_gradient():
    # dOT/deps = KL(P || a b^T) at the optimum (envelope theorem).
    x, y, a = _points()
    solver = ig.Sinkhorn()

    def cost(eps, estimator):
        theta = _problem(x, y, a, epsilon=eps)
        return solver.cost(_solve(theta, estimator, solver=solver), theta)

    eps = jnp.array(EPSILON)
    theta = _problem(x, y, a, epsilon=eps)
    P = solver.plan(_solve_jit(theta, solver=solver), theta)
    Q = a[:, None] * theta.b[None, :]
    kl = jnp.sum(P * jnp.log(P / Q) - P + Q)
    cost_onestep = jax.jit(lambda eps: cost(eps, ig.OneStep()))
    np.testing.assert_allclose(jax.grad(cost_onestep)(eps), kl, rtol=1e-9)
    h = 1e-6
    fd = (cost_onestep(eps + h) - cost_onestep(eps - h)) / (2 * h)
    np.testing.assert_allclose(fd, kl, rtol=1e-7)


def test_float32_smoke():
    x, y, a = _points()
    x32, y32, a32 = (v.astype(jnp.float32) for v in (x, y, a))
    solver = ig.Sinkhorn(epsilon=EPSILON)

    def cost(x):
        theta = _problem(x, y32, a32)
        sol = _solve(theta, ig.OneStep(), solver=solver, atol=1e-5, max_steps=500)
        return solver.cost(sol, theta)

    value, grad = jax.jit(jax.value_and_grad(cost))(x32)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.float32
    envelope = _envelope_gradient(x, y, a)
    assert relative_error(grad.astype(jnp.float64), envelope) < 1e-4


def test_jit_once_and_vmap():
    x, y, a = _points()
    batch = x[None] + 0.1 * jr.normal(jr.PRNGKey(3), (3, N, 2))

    def cost(x):
        theta = _problem(x, y, a)
        return SOLVER.cost(_solve(theta, ig.OneStep()), theta)

    cost_and_grad = jax.jit(
        eqx.debug.assert_max_traces(jax.value_and_grad(cost), max_traces=1)
    )
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(cost)))(batch)
    for i in range(batch.shape[0]):  # new values, no retracing
        value, grad = cost_and_grad(batch[i])
        np.testing.assert_allclose(values[i], value, rtol=1e-12)
        np.testing.assert_allclose(grads[i], grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError):  # the trace counter is live
        cost_and_grad(batch[:2])


def test_warm_start_and_max_steps():
    x, y, a = _points()
    theta = _problem(x, y, a)
    sol = _solve_jit(theta)
    warm = eqx.filter_jit(ig.solve)(
        SOLVER, sol.value, theta, rtol=0.0, atol=ATOL, max_steps=MAX_STEPS
    )
    assert int(warm.steps) <= 2
    with pytest.raises(eqx.EquinoxRuntimeError, match="did not converge"):
        _solve_jit(theta, max_steps=2)


def test_bad_input():
    x, y, a = _points()
    with pytest.raises(ValueError, match="cost matrix"):
        ig.OTProblem(a=a)
    with pytest.raises(ValueError, match="not both"):
        ig.OTProblem(_cost_matrix(x, y), x=x, y=y)
    with pytest.raises(ValueError, match="same total mass"):
        ig.OTProblem(x=x, y=y, a=2 * a)
    with pytest.raises(ValueError, match="positive weights"):
        ig.OTProblem(x=x, y=y, a=a.at[0].set(0.0))
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        ig.OTProblem(x=x, y=y, a=a[:3])
    with pytest.raises(ValueError, match="positive number"):
        ig.Sinkhorn(epsilon=-1.0)
    with pytest.raises(ValueError, match="exactly once"):
        ig.solve(ig.Sinkhorn(), None, _problem(x, y, a))
    with pytest.raises(ValueError, match="exactly once"):
        ig.solve(SOLVER, None, _problem(x, y, a, epsilon=0.1))
    with pytest.raises(TypeError, match="OTProblem"):
        ig.solve(SOLVER, None, {"cost": _cost_matrix(x, y)})
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        ig.solve(SOLVER, jnp.zeros(3), _problem(x, y, a))
