"""The README's Python snippets run as written (a README that is true)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show runnable Python"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    # The last block computed a one-step vs implicit agreement on Newton.
    g_os, g_id = namespace["g_onestep"], namespace["g_implicit"]
    import jax.numpy as jnp

    assert jnp.linalg.norm(g_os - g_id) / jnp.linalg.norm(g_id) < 1e-8
