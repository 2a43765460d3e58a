"""Batches of problems under `jax.vmap`: every instance gets its own steps,
result and derivative; an instance that fails or converges early changes
nothing in the others (issue 15).

Why it holds: the forward loop is a `lax.while_loop` whose predicate is
batched, and JAX's batching rule runs the body for the whole batch but
*selects*, per instance, the old carry for the instances that are done. A
finished instance's iterate, history ring buffer and step count are frozen,
so the step that `OneStep` / `Truncated` replay is that instance's own last
step.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import itergrad as ig


def _relative(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# -- a plain step map: every estimator ----------------------------------------

# Contraction factors from 0.05 to 0.9: the instances need from a handful to
# about 250 steps, so most of them finish while others still run.
RATES = jnp.linspace(0.05, 0.9, 7)
ESTIMATORS = {
    "onestep": ig.OneStep(),
    "truncated": ig.Truncated(5),
    "truncated_auto": ig.Truncated("auto", target=1e-8),
    "auto": ig.Auto(target=1e-8),
    "implicit": ig.Implicit(),
    "implicit_fixed_point": ig.Implicit(condition="fixed_point"),
    "unroll": ig.Unroll(),
}


def _step(x, theta):
    rate, shift = theta
    return rate * jnp.tanh(x) + shift


def _per_instance(estimator):
    def run(rate, shift):
        def loss(theta):
            sol = ig.iterate(_step, jnp.zeros(3), theta, estimator=estimator,
                             max_steps=400, throw=False)
            return jnp.sum(sol.value**2), sol

        (_, sol), grad = jax.value_and_grad(loss, has_aux=True)((rate, shift))
        return sol.value, grad, sol.steps, sol.result

    return run


@pytest.mark.parametrize("transform", ["value", "grad"])
def test_throw_under_vmap_says_how_many_instances_failed(transform):
    # Rates 0.99 and 0.995 need more than 60 steps; 0.1 and 0.5 do not.
    rates = jnp.array([0.1, 0.99, 0.5, 0.995])

    def loss(rate):
        sol = ig.iterate(lambda x, r: r * x + 1.0, jnp.zeros(2), rate, max_steps=60)
        return jnp.sum(sol.value)

    f = jax.vmap(loss) if transform == "value" else jax.vmap(jax.grad(loss))
    with pytest.raises(Exception, match=r"2 of 4 instances of the batch failed .*"
                                        r"max_steps_reached"):
        jax.block_until_ready(jax.jit(f)(rates))
    # Nested batches count every instance; a single failing instance keeps
    # the plain message.
    with pytest.raises(Exception, match=r"2 of 4 instances"):
        jax.block_until_ready(jax.jit(jax.vmap(jax.vmap(loss)))(rates.reshape(2, 2)))
    with pytest.raises(Exception, match="max_steps_reached") as single:
        jax.block_until_ready(jax.jit(loss)(jnp.array(0.99)))
    assert "instances of the batch" not in str(single.value)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_step_map_batch_with_a_nonfinite_instance_matches_solo_runs(name):
    run = _per_instance(ESTIMATORS[name])
    shifts = jnp.stack([jnp.array([0.3, -0.2, 0.1]) * (i + 1) for i in range(len(RATES))])
    bad = 3
    shifts = shifts.at[bad, 1].set(jnp.nan)  # planted failure
    values, grads, steps, results = jax.jit(jax.vmap(run))(RATES, shifts)
    results = np.asarray(results._value)
    assert results[bad] == ig.RESULTS.nonfinite._value
    solo = jax.jit(run)
    seen_steps = set()
    for i in range(len(RATES)):
        if i == bad:
            continue
        v, g, k, r = solo(RATES[i], shifts[i])
        assert r == ig.RESULTS.successful and results[i] == r._value
        assert int(steps[i]) == int(k)
        seen_steps.add(int(k))
        assert _relative(values[i], v) <= 1e-12
        for leaf_batched, leaf_solo in zip(jax.tree.leaves(grads), jax.tree.leaves(g), strict=True):
            assert _relative(leaf_batched[i], leaf_solo) <= 1e-12, (name, i)
    # The instances really finished at different steps (freezing was tested).
    assert len(seen_steps) >= 4, seen_steps


# -- QPs with infeasible instances planted ------------------------------------


def _planted_qps(B, n, m, p, bad, seed=0):
    """`B` random feasible QPs; in the instances `bad`, inequality row 1 is
    made to contradict row 0 (g x <= h and -g x <= -h - 1)."""
    qps = [ig.problems.random_qp(k, n, m, p) for k in jr.split(jr.key(seed), B)]
    for i in bad:
        q = qps[i]
        qps[i] = ig.QP(Q=q.Q, q=q.q, A=q.A, b=q.b,
                       G=q.G.at[1].set(-q.G[0]), h=q.h.at[1].set(-q.h[0] - 1.0))
    return qps


def _qp_run(estimator, w):
    def run(qp):
        def loss(qp):
            sol = ig.solve(ig.InteriorPointQP(), None, qp, estimator=estimator,
                           max_steps=60, throw=False)
            return jnp.dot(w, sol.value), sol

        (_, sol), grad = eqx.filter_value_and_grad(loss, has_aux=True)(qp)
        return sol.value, (grad.Q, grad.q, grad.A, grad.b, grad.G, grad.h), sol.steps, sol.result

    return run


def _check_qp_batch(B, n, m, p, bad, estimator):
    """Returns the largest relative batched-vs-solo gradient difference over
    the feasible instances, after checking values, steps and results."""
    qps = _planted_qps(B, n, m, p, bad)
    w = jr.normal(jr.key(1), (n,))
    run = _qp_run(estimator, w)
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), *qps)
    values, grads, steps, results = eqx.filter_jit(jax.vmap(run))(batch)
    results = np.asarray(results._value)
    assert all(results[i] != ig.RESULTS.successful._value for i in bad)
    # A failed instance gets a zero derivative, with every estimator (none
    # is evaluated where it failed), never NaN.
    for i in bad:
        for g in grads:
            assert bool(jnp.all(g[i] == 0)), i
    solo = eqx.filter_jit(run)
    worst = 0.0
    for i, qp in enumerate(qps):
        if i in bad:
            continue
        v, g, k, r = solo(qp)
        assert r == ig.RESULTS.successful and results[i] == r._value, i
        assert int(steps[i]) == int(k), i
        assert _relative(values[i], v) <= 1e-12, i
        for gb, gs in zip(grads, g, strict=True):
            if gs.size:
                worst = max(worst, _relative(gb[i], gs))
    return worst


@pytest.mark.slow  # QP compiles; the step-map batches stay in the default run (CI time budget)
def test_qp_batch_with_infeasible_instances_implicit_matches_solo_runs():
    assert _check_qp_batch(8, 20, 5, 20, bad=(2, 5), estimator=ig.Implicit()) <= 1e-12


@pytest.mark.slow  # two more QP compiles (CI time budget)
def test_qp_batch_with_infeasible_instances_onestep_matches_solo_runs():
    # OneStep differentiates the full Newton step of the last interior-point
    # step (exact at the solution, as Implicit): the batched and solo
    # derivatives agree to rounding. (When the derivative carried the step
    # length, they differed by 1e-11..1e-10: the ill-conditioned step
    # amplified the batched kernels' rounding.)
    assert _check_qp_batch(8, 20, 5, 20, bad=(2, 5), estimator=ig.OneStep()) <= 1e-12


@pytest.mark.slow  # the size: 64 QPs with n = 50 (two large compiles)
def test_qp_batch_of_64_with_3_infeasible_implicit_matches_solo_runs():
    worst = _check_qp_batch(64, 50, 10, 50, bad=(5, 17, 40), estimator=ig.Implicit())
    assert worst <= 1e-12, worst
