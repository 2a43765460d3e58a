"""The solver contract: unknowns apart from auxiliary state, and the one rule
for derivatives of linear solves (`itergrad._linear_solve`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest
from helpers import central_difference_jacobian, relative_error

import itergrad as ig
from itergrad._linear_solve import linear_solve

N, M_DATA, MEMORY = 4, 12, 500


def _ridge():
    key_a, key_y = jr.split(jr.key(0))
    A = jr.normal(key_a, (M_DATA, N))
    y = jr.normal(key_y, (M_DATA,))

    def objective(x, theta):
        return 0.5 * jnp.sum((A @ x - y) ** 2) + 0.5 * jnp.sum(theta * x**2)

    def solution(theta):
        return jnp.linalg.solve(A.T @ A + jnp.diag(theta), A.T @ y)

    L = float(jnp.linalg.eigvalsh(A.T @ A)[-1]) + 2.0
    return objective, solution, L


class _Bookkeeping(eqx.Module):
    # Float statistics and a large float memory: none of them is an unknown.
    steps_taken: jax.Array
    gradient_norm: jax.Array
    memory: jax.Array
    counter: jax.Array


class BookkeepingDescent(ig.AbstractSolver):
    """Gradient descent whose auxiliary state carries float bookkeeping (a
    running gradient norm, a step counter as a float, and a 500-float memory
    of past gradient norms, like a quasi-Newton history)."""

    objective: object
    stepsize: float

    def init(self, x0, theta):
        aux = _Bookkeeping(
            steps_taken=jnp.zeros(()),
            gradient_norm=jnp.zeros(()),
            memory=jnp.zeros(MEMORY),
            counter=jnp.zeros((), jnp.int32),
        )
        return x0, aux

    def step(self, z, aux, theta):
        g = jax.grad(self.objective)(z, theta)
        norm = jnp.linalg.norm(g)
        aux = _Bookkeeping(
            steps_taken=aux.steps_taken + 1.0,
            gradient_norm=norm,
            memory=aux.memory.at[aux.counter % MEMORY].set(norm),
            counter=aux.counter + 1,
        )
        return z - self.stepsize * g, aux

    def value(self, z):
        return z

    def optimality(self, z, aux, theta):
        return jax.grad(self.objective)(z, theta)


class _RecordingLU(lx.AbstractLinearSolver):
    """`lx.LU`, recording the size of every operator it is initialised on."""

    sizes: list = eqx.field(static=True)

    def init(self, operator, options):
        self.sizes.append((operator.in_size(), operator.out_size()))
        return lx.LU().init(operator, options)

    def compute(self, state, vector, options):
        return lx.LU().compute(state, vector, options)

    def transpose(self, state, options):
        return lx.LU().transpose(state, options)

    def conj(self, state, options):
        return lx.LU().conj(state, options)

    def assume_full_rank(self):
        return True


@pytest.mark.parametrize("condition", ["optimality", "fixed_point"])
def test_float_bookkeeping_does_not_enter_the_implicit_system(condition):
    objective, solution, L = _ridge()
    solver = BookkeepingDescent(objective, 1.0 / L)
    theta = jnp.linspace(0.5, 2.0, N)
    sizes: list = []
    estimator = ig.Implicit(linear_solver=_RecordingLU(sizes), condition=condition)

    def x_of(t):
        return ig.solve(
            solver, jnp.zeros(N), t, estimator=estimator, max_steps=5000,
            rtol=1e-13, atol=1e-13,
        ).value

    # Jitted: one compilation instead of op-by-op dispatch (the recording
    # linear solver is initialised at trace time all the same).
    J = jax.jit(jax.jacfwd(x_of))(theta)
    # The operator is n x n: the 500 floats of memory and the two float
    # statistics are no unknowns.
    assert sizes and all(size == (N, N) for size in sizes)
    closed_form = jax.jacfwd(solution)(theta)
    assert relative_error(J, closed_form) < 1e-9
    fd = central_difference_jacobian(solution, theta)
    assert relative_error(J, fd) < 1e-7
    # The solve ran through the bookkeeping.
    sol = jax.jit(lambda t: ig.solve(solver, jnp.zeros(N), t, max_steps=5000,
                                     rtol=1e-13, atol=1e-13))(theta)
    assert float(sol.state.aux.steps_taken) == int(sol.steps)
    assert int(sol.state.aux.counter) == int(sol.steps)


def test_bookkeeping_is_invisible_to_diagnose_and_auto_truncation():
    objective, _, L = _ridge()
    theta = jnp.linspace(0.5, 2.0, N)
    plain = ig.GradientDescent(objective, 1.0 / L)
    with_aux = BookkeepingDescent(objective, 1.0 / L)
    reports = []

    # Jitted (solve and diagnose in one compilation per solver); the
    # recommendation is not read here, only rho and L_F.
    @eqx.filter_jit
    def solve_and_diagnose(solver, theta):
        sol = ig.solve(solver, jnp.zeros(N), theta, max_steps=5000, rtol=1e-12,
                       atol=1e-12)
        return ig.diagnose(solver, sol, theta, key=jr.key(1))

    for solver in (plain, with_aux):
        reports.append(solve_and_diagnose(solver, theta))
    np.testing.assert_allclose(float(reports[0].rho), float(reports[1].rho), rtol=1e-10)
    np.testing.assert_allclose(float(reports[0].L_F), float(reports[1].L_F), rtol=1e-10)
    auto = ig.Truncated("auto", target=1e-6, max_K=200)
    Ks = [
        int(eqx.filter_jit(lambda s, t: ig.solve(
            s, jnp.zeros(N), t, estimator=auto, max_steps=5000, rtol=1e-12,
            atol=1e-12).stats["differentiated_steps"])(s, theta))
        for s in (plain, with_aux)
    ]
    assert Ks[0] == Ks[1] > 1


class _IntegerUnknowns(ig.AbstractSolver):
    def init(self, x0, theta):
        return (x0, jnp.zeros((), jnp.int32)), None

    def step(self, z, aux, theta):
        return (0.5 * z[0] + theta, z[1] + 1), aux

    def value(self, z):
        return z[0]


class _NoPair(ig.AbstractSolver):
    def init(self, x0, theta):
        return x0

    def step(self, z, aux, theta):
        return z, aux

    def value(self, z):
        return z


def test_contract_violations_are_refused_with_a_message():
    with pytest.raises(TypeError, match="auxiliary state"):
        ig.solve(_IntegerUnknowns(), jnp.zeros(2), jnp.ones(2))
    with pytest.raises(TypeError, match=r"pair `\(z, aux\)`"):
        ig.solve(_NoPair(), jnp.zeros(2), jnp.ones(2))


def _spd(key, n):
    M = jr.normal(key, (n, n))
    return M @ M.T / n + jnp.eye(n)


@pytest.mark.parametrize("kind", ["factorised", "krylov_loose_forward"])
def test_linear_solve_derivative_is_that_of_the_exact_solve(kind):
    # u(t) = M(t)^{-1} r(t) with M(t) = M0 + t_0 M1, r(t) = r0 + t_1 r1.
    k0, k1, k2, k3 = jr.split(jr.key(2), 4)
    n = 6
    M0, M1 = _spd(k0, n), _spd(k1, n)
    r0, r1 = jr.normal(k2, (n,)), jr.normal(k3, (n,))
    tags = lx.positive_semidefinite_tag
    tight = lx.CG(rtol=1e-13, atol=1e-13, max_steps=100)

    def u_of(t):
        matrix = M0 + t[0] * M1
        operator = lx.MatrixLinearOperator(matrix, tags)
        vector = r0 + t[1] * r1
        if kind == "factorised":
            state = lx.Cholesky().init(
                lx.MatrixLinearOperator(jax.lax.stop_gradient(matrix), tags), {}
            )
            return linear_solve(operator, vector, lx.Cholesky(), state=state).value
        # A forward solve far looser than the derivative's: the derivative
        # must still be the exact solve's.
        loose = lx.CG(rtol=1e-3, atol=1e-3, max_steps=100)
        return linear_solve(operator, vector, loose, derivative_solver=tight).value

    def exact(t):
        return jnp.linalg.solve(M0 + t[0] * M1, r0 + t[1] * r1)

    t = jnp.array([0.3, -0.7])
    closed_form = jax.jacfwd(exact)(t)
    # The exact derivative at the computed u: M^{-1}(dr - dM u).
    u = u_of(t)
    matrix = M0 + t[0] * M1
    at_u = jnp.stack(
        [jnp.linalg.solve(matrix, -M1 @ u), jnp.linalg.solve(matrix, r1)], axis=1
    )
    # Each derivative jitted: one compilation instead of op-by-op dispatch.
    jacobians = {jac: jax.jit(jac(u_of))(t) for jac in (jax.jacfwd, jax.jacrev)}
    for J in jacobians.values():
        np.testing.assert_allclose(J, at_u, rtol=1e-10, atol=1e-10)
    if kind == "factorised":
        np.testing.assert_allclose(jacobians[jax.jacrev], closed_form, rtol=1e-10)
        fd = central_difference_jacobian(jax.jit(u_of), t)
        np.testing.assert_allclose(fd, closed_form, rtol=1e-6, atol=1e-8)
        # Higher derivatives apply the same rule again: exact too.
        H = jax.jit(jax.jacfwd(jax.jacrev(lambda s: u_of(s)[0])))(t)
        H_exact = jax.hessian(lambda s: exact(s)[0])(t)
        np.testing.assert_allclose(H, H_exact, rtol=1e-9, atol=1e-10)


def test_implicit_tags_let_cg_solve_the_hessian_system():
    # Newton's optimality condition is a Hessian system: Implicit tags it
    # symmetric positive semidefinite by default, so lx.CG applies (Lineax
    # refuses CG on an untagged operator).
    objective, solution, _ = _ridge()
    theta = jnp.linspace(0.5, 2.0, N)
    cg = lx.CG(rtol=1e-12, atol=1e-12, max_steps=100)

    def x_of(t, estimator):
        return ig.solve(ig.Newton(objective), jnp.zeros(N), t, estimator=estimator).value

    J = jax.jit(jax.jacrev(lambda t: x_of(t, ig.Implicit(linear_solver=cg))))(theta)
    assert relative_error(J, jax.jacfwd(solution)(theta)) < 1e-10
    assert relative_error(J, central_difference_jacobian(solution, theta)) < 1e-7
    # Without the tags (an explicit empty set) CG is refused with Lineax's message.
    with pytest.raises(ValueError, match="positive"):
        jax.jit(jax.jacrev(
            lambda t: x_of(t, ig.Implicit(linear_solver=cg, tags=frozenset()))))(theta)
