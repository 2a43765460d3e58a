"""The README's Python snippets run as written (a README that is true)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show runnable Python"
    namespaces = []
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
        namespaces.append(namespace)
    import jax.numpy as jnp

    # The first block computed a one-step vs implicit agreement on Newton.
    g_os, g_id = namespaces[0]["g_onestep"], namespaces[0]["g_implicit"]
    assert jnp.linalg.norm(g_os - g_id) / jnp.linalg.norm(g_id) < 1e-8
    # The matrix-free block: its gradient is the dense-Newton one, and the
    # forcing term kept the Hessian-vector products below n in total (about
    # 120 here; solving every system to 1e-10 takes about 550).
    import jax

    import itergrad as ig

    ns = namespaces[1]
    problem, weights = ns["problem"], ns["weights"]

    def dense_loss(w):
        x = ig.solve(ig.Newton(problem.objective), jnp.zeros(problem.n), w).value
        return 0.5 * jnp.sum(x**2)

    g_dense = jax.jit(jax.grad(dense_loss))(weights)
    assert jnp.linalg.norm(ns["grad_cg"] - g_dense) / jnp.linalg.norm(g_dense) < 1e-8
    assert int(ns["sol"].state.aux.krylov_steps) < problem.n
