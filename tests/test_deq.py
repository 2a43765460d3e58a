"""ig.nn.DEQ: gradients with respect to the cell's parameters against finite
differences and closed forms, on a tiny tanh cell; batching, logging, bad
inputs; the digits example at tiny size.

Closed forms at the fixed point z̄ of F = (1 - τ) z + τ f(z, x), for a loss
c·z*: Implicit c^T (I - J_z f)^{-1} J_φ f; OneStep τ c^T J_φ f;
Truncated(K) c^T sum_{i<K} (J_z F)^i τ J_φ f.
"""

import functools
import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import itergrad as ig

N, D = 4, 3
TIGHT = {"max_steps": 300, "rtol": 1e-12, "atol": 1e-12}
FD_EPS = 1e-6


class Cell(eqx.Module):
    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.W @ z + self.U @ x + self.b)


def _cell():
    kw, ku, kb = jr.split(jr.PRNGKey(0), 3)
    W = jr.normal(kw, (N, N))
    return Cell(
        0.8 * W / jnp.linalg.norm(W, ord=2), jr.normal(ku, (N, D)), jr.normal(kb, (N,))
    )


CELL = _cell()
X = jnp.array([0.3, -0.5, 0.8])
C = jnp.array([1.0, -2.0, 0.5, 1.5])
PARAMS, UNRAVEL = ravel_pytree(CELL)


def _loss(cell, estimator, damping=1.0, solver=None):
    solver = {} if solver is None else {"solver": solver}
    deq = ig.nn.DEQ(
        cell, estimator=estimator, damping=damping, z_shape=(N,), **solver, **TIGHT
    )
    return C @ deq(X)


def _grad(estimator, damping=1.0, solver=None):
    g = jax.jit(jax.grad(lambda p: _loss(UNRAVEL(p), estimator, damping, solver)))(
        PARAMS
    )
    return np.asarray(g)


ZBAR = jax.jit(lambda p: ig.nn.DEQ(UNRAVEL(p), z_shape=(N,), **TIGHT)(X))(PARAMS)


def _central(g):
    g = jax.jit(g)
    eye = np.eye(PARAMS.size)
    return np.array(
        [(g(PARAMS + FD_EPS * e) - g(PARAMS - FD_EPS * e)) / (2 * FD_EPS) for e in eye]
    )


def _damped_step(p, z, tau):
    return (1 - tau) * z + tau * UNRAVEL(p)(z, X)


def _closed_truncated(K, tau):
    Jz = jax.jacfwd(_damped_step, 1)(PARAMS, ZBAR, tau)
    Jp = jax.jacfwd(_damped_step, 0)(PARAMS, ZBAR, tau)
    total, term = jnp.zeros_like(Jp), Jp
    for _ in range(K):
        total, term = total + term, Jz @ term
    return np.asarray(C @ total)


def _closed_implicit():
    Jz = jax.jacfwd(_damped_step, 1)(PARAMS, ZBAR, 1.0)
    Jp = jax.jacfwd(_damped_step, 0)(PARAMS, ZBAR, 1.0)
    return np.asarray(C @ jnp.linalg.solve(jnp.eye(N) - Jz, Jp))


def _fd_truncated(K, tau):
    # Finite differences of p -> c·F_p^K(z̄): the K-step estimator, no Jacobian.
    def g(p):
        z = ZBAR
        for _ in range(K):
            z = _damped_step(p, z, tau)
        return C @ z

    return _central(g)


@functools.cache
def _fd_solution():
    return _central(lambda p: _loss(UNRAVEL(p), ig.OneStep()))


IMPLICIT = _closed_implicit()

# (estimator, damping, solver, closed form, finite differences, rtol)
CASES = {
    "onestep_jfb": (
        ig.OneStep(),
        1.0,
        None,
        lambda: _closed_truncated(1, 1.0),
        lambda: _fd_truncated(1, 1.0),
        1e-7,
    ),
    # The references are taken at z̄; the 5 replayed steps start from
    # z_{k-5}, ~1e-5 away from it after Anderson's fast convergence (the
    # L_J ||z_{k-i} - z̄|| term of Corollary 1), hence 1e-4.
    "phantom_K5_tau05": (
        ig.Truncated(5),
        0.5,
        None,
        lambda: _closed_truncated(5, 0.5),
        lambda: _fd_truncated(5, 0.5),
        1e-4,
    ),
    "implicit": (ig.Implicit(), 1.0, None, lambda: IMPLICIT, _fd_solution, 1e-7),
    "implicit_gmres": (
        ig.Implicit(
            linear_solver=lx.GMRES(rtol=1e-12, atol=1e-12), condition="fixed_point"
        ),
        1.0,
        None,
        lambda: IMPLICIT,
        _fd_solution,
        1e-7,
    ),
    # Unrolling differentiates every plain step: its error decays like rho^k.
    # With Anderson, k is small (error ~1e-2 measured); with plain iteration
    # to 1e-12 it matches the implicit derivative.
    "unroll_plain_iteration": (
        ig.Unroll(),
        1.0,
        ig.FixedPointIteration,
        lambda: IMPLICIT,
        _fd_solution,
        1e-8,
    ),
}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_gradients(name):
    estimator, tau, solver, closed, fd, rtol = CASES[name]
    grad = _grad(estimator, tau, solver)
    assert _rel(grad, closed()) < rtol
    assert _rel(grad, fd()) < max(rtol, 1e-7)


def test_onestep_bias_is_the_cells_contraction():
    # JFB differs from the true gradient, by at most the relative bias rho
    # of the cell at the fixed point (Corollary 1 at the fixed point).
    Jz = jax.jacfwd(_damped_step, 1)(PARAMS, ZBAR, 1.0)
    rho = float(jnp.linalg.norm(Jz, ord=2))
    bias = _rel(_grad(ig.OneStep()), IMPLICIT)
    assert 1e-3 < bias < rho / (1 - rho)


def test_batch_logging_and_training_step():
    xs = jnp.stack([X, -X, 2 * X])
    deq = ig.nn.DEQ(CELL, z_shape=(N,))

    def loss_and_stats(args):
        deq, xs = args
        z, sol = jax.vmap(lambda x: deq(x, return_solution=True))(xs)
        return jnp.sum(z**2), (sol.steps, sol.residual, sol.result)

    # One compiled program: gradients for the layer (its cell) and the inputs.
    grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(loss_and_stats, has_aux=True))
    (loss, (steps, residual, result)), (grads, grad_xs) = grad_fn((deq, xs))
    assert steps.shape == residual.shape == (3,)
    assert bool(jnp.all(steps > 0)) and bool(jnp.all(residual < 1e-3))
    assert bool(jnp.all(result == ig.RESULTS.successful))
    assert grads.f.W.shape == (N, N) and bool(jnp.all(jnp.isfinite(grads.f.W)))
    assert bool(jnp.any(grads.f.W != 0))
    # The inputs receive a gradient too (theta = (cell parameters, x)).
    assert grad_xs.shape == xs.shape and bool(jnp.all(jnp.any(grad_xs != 0, axis=1)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="damping"):
        ig.nn.DEQ(CELL, damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        ig.nn.DEQ(CELL, damping=1.5)
    with pytest.raises(TypeError, match="solver"):
        ig.nn.DEQ(CELL, solver=3)
    with pytest.raises(TypeError, match="estimator"):
        ig.nn.DEQ(CELL, estimator="onestep")
    with pytest.raises(ValueError, match="max_steps"):
        ig.nn.DEQ(CELL, max_steps=0)
    with pytest.raises(ValueError, match="shaped like z"):
        ig.nn.DEQ(CELL)(X)  # z defaults to x's shape (3,), the cell's is (4,)


def _documented_auto_K(rho, forward_steps, target, max_K):
    # Truncated("auto")'s documented rule: the smallest K with
    # rho^K / (1 - rho^K) <= target, i.e. ceil(log(t / (1 + t)) / log rho),
    # at most the forward steps taken when K fits the max_K stored states.
    rho = np.asarray(rho, np.float64)
    needed = np.maximum(np.ceil(np.log(target / (1 + target)) / np.log(rho)), 1)
    return np.where(needed > max_K, needed, np.minimum(needed, forward_steps))


@pytest.mark.slow  # the end-to-end example; the layer tests above stay
def test_digits_example_tiny(tmp_path):
    import json

    path = pathlib.Path(__file__).parents[1] / "examples" / "deq_digits.py"
    spec = importlib.util.spec_from_file_location("deq_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Two estimators keep this under ~20 s (OneStep, and Truncated("auto")
    # whose K the probe reports); `--quick` runs all five.
    rows = module.main(
        ["--tiny", "--out", str(tmp_path), "--estimators", "onestep", "auto"]
    )
    assert [row["estimator"] for row in rows] == ["onestep", "auto"]
    target, max_K = module.AUTO_TARGET, module.AUTO_MAX_K
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["epoch_seconds"] > 0 and row["forward_steps"] > 0
        # rho per epoch at the probe inputs: epoch 0 (initialisation) and the
        # one epoch of --tiny.
        history = row["epochs"]
        assert [h["epoch"] for h in history] == [0, 1]
        for h in history:
            rho = np.asarray(h["rho"])
            assert rho.shape == (module.PROBES,) and np.all(np.isfinite(rho))
            # A contracting cell: 0 < rho < 1, indeed rho <= ||s W||_2 <= gamma
            # since |tanh'| <= 1.
            assert np.all(rho > 0) and np.all(rho < 1)
            assert np.all(rho <= module.CONTRACTION * (1 + 1e-5))
            assert h["rho_median"] == pytest.approx(float(np.median(rho)))
            # At the fixed point (both at z_k) J_OS - J_ID = -J_z f J_ID: the
            # measured one-step disagreement is at most rho (GMRES accuracy).
            assert np.all(np.asarray(h["onestep_disagreement"]) <= rho + 1e-4)
            # Truncated("auto")'s K is the documented formula for the rho it
            # measured, exactly; its rho (30 power steps, corrected upwards)
            # is diagnose's (100 steps) to within 1%, so the formula on
            # diagnose's rho gives K up to the rounding of the ceiling.
            K, steps = np.asarray(h["auto_K"]), np.asarray(h["forward_steps"])
            assert np.all(K >= 1)
            np.testing.assert_array_equal(
                K, _documented_auto_K(h["auto_rho"], steps, target, max_K)
            )
            np.testing.assert_allclose(h["auto_rho"], rho, rtol=1e-2)
            assert np.all(
                np.abs(K - _documented_auto_K(rho, steps, target, max_K)) <= 1
            )
            np.testing.assert_array_equal(K, module.auto_K(h["auto_rho"], steps))

    # The recorded rho of the last epoch against a dense reference:
    # ||J_z f(z*, u)||_2 by SVD of the materialised Jacobian, at the fixed
    # points the probe found for the trained model's probe inputs.
    row = rows[0]
    model = row["model"]
    cell = model.cell.contractive()
    u = jax.vmap(model.inject)(jnp.asarray(row["probe_inputs"]))
    z, measured = module.probe(cell, u)
    recorded = np.asarray(row["epochs"][-1]["rho"])
    np.testing.assert_array_equal(measured["rho"], recorded)
    residual = jax.vmap(cell)(z, u) - z
    assert float(jnp.max(jnp.linalg.norm(residual, axis=1))) < 1e-3
    dense = np.array(
        [
            np.linalg.norm(np.asarray(jax.jacfwd(cell)(zi, ui), np.float64), 2)
            for zi, ui in zip(z, u)
        ]
    )
    np.testing.assert_allclose(recorded, dense, rtol=1e-6)

    assert (tmp_path / "deq_digits.png").exists()
    assert (tmp_path / "deq_digits.csv").read_text().startswith("estimator,")
    epochs_csv = (tmp_path / "deq_digits_epochs.csv").read_text().splitlines()
    assert epochs_csv[0].startswith("estimator,seed,epoch,loss,rho_median,")
    assert len(epochs_csv) == 1 + 2 * 2  # header, 2 estimators x epochs 0..1
    saved = json.loads((tmp_path / "deq_digits.json").read_text())
    assert [run["estimator"] for run in saved["runs"]] == ["onestep", "auto"]
    assert saved["runs"][0]["epochs"][-1]["rho"] == pytest.approx(recorded.tolist())
