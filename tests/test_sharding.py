"""`ig.sharded_vmap`: a batch of problems sharded over 4 host devices gives the
numbers of the unsharded `jax.vmap`, values, gradients and steps.

Several host devices need `XLA_FLAGS=--xla_force_host_platform_device_count`
before jax is imported, so the sharded runs happen in a subprocess; it prints
its comparisons as JSON and the assertions are made here.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import itergrad as ig

# 16 host devices for a mesh of 4: XLA's CPU thread pool has max(cores, host
# devices) threads, and with jaxlib 0.10.x a batched LAPACK call (the QP's and
# Newton's factorisations under vmap) waits on that pool for sub-tasks; when
# every thread of the pool waits so, nothing runs them (a deadlock, seen on 2
# cores with 2 and 4 host devices busy, and with 1 busy out of 2;
# docs/batches-and-devices.md).
# Single-threaded Eigen makes the sharded and unsharded programs agree bit
# for bit (with threads they differ in the last bits: a batch of 2 and one of
# 8 are split differently).
FLAGS = "--xla_force_host_platform_device_count=16 --xla_cpu_multi_thread_eigen=false"

WORKER = textwrap.dedent(
    """
    import json
    import os
    import warnings

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import jax.tree_util as jtu
    import jaxlib
    from jax.sharding import Mesh

    import itergrad as ig

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 16, jax.devices()
    mesh = Mesh(jax.devices()[:4], ("batch",))

    def rel(a, b):
        a, b = jtu.tree_leaves(a), jtu.tree_leaves(b)
        return max(
            float(jnp.max(jnp.abs(x - y), initial=0.0))
            / max(float(jnp.max(jnp.abs(y), initial=0.0)), 1e-300)
            for x, y in zip(a, b)
        )

    def compare(name, loss, batch, in_axes=0):
        # loss(*args) -> (scalar, (value, steps)) for one instance; the batch
        # loss is the sum, differentiated through the (sharded) vmap.
        def total(vmapped):
            def f(*args):
                out, aux = vmapped(loss, in_axes=in_axes)(*args)
                return jnp.sum(out), aux
            return eqx.filter_jit(eqx.filter_value_and_grad(f, has_aux=True))

        (_, (x_ref, k_ref)), g_ref = total(jax.vmap)(*batch)
        sharded = lambda f, in_axes: ig.sharded_vmap(f, mesh, in_axes=in_axes)
        (_, (x_sh, k_sh)), g_sh = total(sharded)(*batch)
        results[name] = {
            "value": rel(x_sh, x_ref),
            "grad": rel(g_sh, g_ref),
            "steps_equal": bool(jnp.all(k_sh == k_ref)),
            "steps": [int(k) for k in k_ref],
            "sharded_over": [str(d) for d in x_sh.sharding.device_set],
        }

    results = {}

    # 8 QPs (n = 20, 5 equalities, 10 inequalities), OneStep, gradient with
    # respect to every field of each QP.
    qps = jax.vmap(lambda k: ig.problems.random_qp(k, n=20, m=5, p=10))(
        jr.split(jr.key(0), 8)
    )

    def qp_loss(qp):
        sol = ig.solve(ig.InteriorPointQP(), None, qp, estimator=ig.OneStep())
        return 0.5 * jnp.sum(sol.value**2), (sol.value, sol.steps)

    compare("qp_onestep", qp_loss, (qps,))

    # 8 weighted logistic regressions, Newton with a line search, Implicit,
    # gradient with respect to the sample weights.
    problem = ig.problems.logistic_data(jr.key(1), n_samples=60, n_features=8)
    newton = ig.Newton(problem.objective, linesearch=ig.Backtracking())
    weights = jr.uniform(jr.key(2), (8, 60), minval=0.2, maxval=2.0)

    def logistic_loss(w):
        sol = ig.solve(newton, jnp.zeros(problem.n), w, estimator=ig.Implicit())
        return 0.5 * jnp.sum(sol.value**2), (sol.value, sol.steps)

    compare("logistic_implicit", logistic_loss, (weights,))

    # 6 problems on 4 devices (padded to 8) and an argument shared by the
    # batch (in_axes=None), whose gradient is summed over the devices.
    def scaled_loss(scale, w):
        sol = ig.solve(newton, jnp.zeros(problem.n), scale * w, estimator=ig.OneStep())
        return 0.5 * jnp.sum(sol.value**2), (sol.value, sol.steps)

    compare(
        "logistic_shared_padded", scaled_loss, (jnp.array(1.5), weights[:6]),
        in_axes=(None, 0),
    )
    # A mesh over half the host devices leaves XLA's CPU thread pool too few
    # threads to spare: with jaxlib 0.10.x, sharded_vmap warns; over a quarter
    # of them it never does.
    for name, devices in (("warns_half", jax.devices()[:8]), ("warns_quarter", jax.devices()[:4])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ig.sharded_vmap(lambda x: x, Mesh(devices, ("batch",)))
        results[name] = any("deadlock" in str(w.message) for w in caught)
    results["jaxlib"] = jaxlib.__version__
    results["cores"] = len(os.sched_getaffinity(0))
    print("RESULTS " + json.dumps(results))
    """
)


def _run_worker() -> dict:
    env = dict(os.environ, XLA_FLAGS=FLAGS, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", WORKER],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    return json.loads(line[len("RESULTS ") :])


@pytest.mark.slow  # a 16-device subprocess, ~60 s (CI time budget)
def test_sharded_batch_matches_unsharded():
    results = _run_worker()
    version = tuple(int(v) for v in results.pop("jaxlib").split(".")[:3])
    few_cores = results.pop("cores") <= 16
    assert results.pop("warns_half") == (
        few_cores and (0, 10, 0) <= version < (0, 11, 1)
    )
    assert not results.pop("warns_quarter")
    for name, r in results.items():
        assert len(r["sharded_over"]) == 4, (name, r)
        assert r["value"] <= 1e-12, (name, r)
        assert r["grad"] <= 1e-12, (name, r)
        assert r["steps_equal"], (name, r)
    # The QPs do not all take the same number of steps: each shard stops on
    # its own (8 7 8 ... steps), the sharded run still agrees step for step.
    assert len(set(results["qp_onestep"]["steps"])) > 1


def test_one_device_is_plain_vmap():
    # With the single device of the main test process the helper is vmap:
    # values, a closed-over array of an enclosing jit, the gradient of a
    # shared argument (in_axes=None, summed over the batch).
    def f(x, a):  # the fixed point of z = z / 2 + a x is 2 a x
        return ig.iterate(lambda z, t: 0.5 * z + t, jnp.zeros(2), a * x).value

    xs = jnp.arange(6.0).reshape(3, 2)
    out = ig.sharded_vmap(f, in_axes=(0, None))(xs, 2.0)
    assert jnp.allclose(out, 4.0 * xs)
    closed = jax.jit(lambda a, xs: ig.sharded_vmap(lambda x: f(x, a))(xs))(2.0, xs)
    assert jnp.allclose(closed, 4.0 * xs)

    def total(vmapped):
        return lambda a: vmapped(f, in_axes=(0, None))(xs, a).sum()

    g = jax.grad(total(ig.sharded_vmap))(2.0)
    assert jnp.allclose(g, jax.grad(total(jax.vmap))(2.0), rtol=1e-14)


@pytest.mark.parametrize(
    "kwargs, args, match",
    [
        ({"in_axes": 1}, (jnp.zeros((2, 3)),), "in_axes"),
        ({"in_axes": (0, 0)}, (jnp.zeros((2, 3)),), "2 entries"),
        ({}, (jnp.zeros((2, 3)), jnp.zeros((3, 3))), "batch size"),
        ({}, (jnp.zeros(()),), "scalar leaf"),
        ({"axis_name": "devices"}, (jnp.zeros((2, 3)),), "not an axis"),
    ],
)
def test_arguments_are_checked(kwargs, args, match):
    with pytest.raises(ValueError, match=match):
        ig.sharded_vmap(lambda *a: a[0], **kwargs)(*args)


def test_mesh_must_be_a_mesh():
    with pytest.raises(TypeError, match="Mesh"):
        ig.sharded_vmap(lambda x: x, mesh="batch")
