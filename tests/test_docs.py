"""The documentation site's Python runs as written, and says what it shows.

Every ```python block of every page under docs/ runs (the blocks of a page in
sequence, in one namespace, as a reader would paste them), and each page's
results are checked against the claims of its prose: gradients against
closed forms or finite differences, estimators against each other, training
that trains. One test per page; the pages use small problems so that the
whole file stays within CI's time budget.
"""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

DOCS = Path(__file__).parents[1] / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _pages_with_python() -> list[str]:
    return sorted(
        str(p.relative_to(DOCS))
        for p in DOCS.rglob("*.md")
        if _BLOCK.search(p.read_text())
    )


def _run(page: str) -> dict:
    path = DOCS / page
    blocks = _BLOCK.findall(path.read_text())
    namespace: dict = {"__name__": "docs_" + re.sub(r"\W", "_", page)}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102
    return namespace


def _check_getting_started(ns):
    # Four estimators of the Jacobian of x = 0.5 tanh(x) + theta against the
    # closed form diag(1 / (1 - 0.5 (1 - tanh^2 x))).
    solutions = ns["solve_with_error_bars"](ns["theta"])
    x_bar = solutions["Implicit"].value
    exact = jnp.diag(1 / (1 - 0.5 * (1 - jnp.tanh(x_bar) ** 2)))
    J = ns["jacobians"]
    assert jnp.allclose(J["Unroll"], exact, rtol=1e-8, atol=1e-8)
    assert jnp.allclose(J["Implicit"], exact, rtol=1e-8, atol=1e-8)
    # 0.5^20 ~ 1e-6 relative truncation error.
    assert jnp.allclose(J["Truncated(20)"], exact, rtol=1e-5, atol=1e-5)
    # OneStep: J_theta F = I, biased (the prose says so).
    assert jnp.allclose(J["OneStep"], jnp.eye(3))
    # Newton: one-step and implicit agree (Corollary 3).
    assert float(ns["gap"]) < 1e-8
    # The error bars: OneStep's of order one, Implicit's at the solve's accuracy.
    bound = {k: float(v.stats["derivative_error_bound"]) for k, v in solutions.items()}
    assert 0.1 < bound["OneStep"] < 2
    assert bound["Implicit"] < 1e-6


def _check_custom_solvers(ns):
    import itergrad as ig

    sol = ns["sol"]
    assert sol.result == ig.RESULTS.successful
    # The integer counter lives in aux and counts the steps.
    assert int(sol.state.aux.count) == int(sol.steps)
    exact = ns["J_exact"]

    def error(J):
        return float(jnp.linalg.norm(J - exact) / jnp.linalg.norm(exact))

    assert error(ns["J_implicit"]) < 1e-8
    assert error(ns["J_cg"]) < 1e-8
    assert error(ns["J_onestep"]) > 0.05  # biased, as the prose says


def _check_bilevel(ns):
    errors = ns["errors"]
    assert errors["Newton + OneStep"] < 1e-8
    assert errors["GD + OneStep"] > 0.1
    assert errors["GD + Truncated(auto)"] < 1e-5
    # Hypergradient descent finds the grid's minimiser (grid step 0.007).
    assert abs(float(ns["theta_star"]) - float(ns["theta_grid"])) < 0.02
    losses = np.asarray(ns["history"].losses)
    assert losses[-1] < losses[0]


def _check_qp_layer(ns):
    assert float(ns["closed_form_error"]) < 1e-8
    assert float(ns["fd_error"]) < 1e-6
    assert float(ns["accuracy"]) >= 0.9
    assert float(ns["value"]) < ns["history"][0] / 5
    # Outputs are probability vectors.
    assert jnp.allclose(ns["X"].sum(axis=1), 1.0, atol=1e-8)
    assert float(ns["X"].min()) > -1e-9


def _check_deq(ns):
    assert float(ns["fd_error"]) < 1e-5
    assert float(ns["cosine"]) > 0.9
    losses = ns["losses"]
    assert losses[-1] < losses[0] / 5


def _check_lasso(ns):
    assert float(ns["relative_error"]) < 1e-8
    # Hypergradient descent does at least as well as the grid search.
    assert ns["loss_hd"] <= ns["grid_losses"][ns["best"]] * (1 + 1e-3)


CHECKS = {
    "getting-started.md": _check_getting_started,
    "custom-solvers.md": _check_custom_solvers,
    "tutorials/bilevel.md": _check_bilevel,
    "tutorials/qp-layer.md": _check_qp_layer,
    "tutorials/deq.md": _check_deq,
    "tutorials/lasso.md": _check_lasso,
}


def test_checked_pages_exist():
    pages = _pages_with_python()
    assert set(CHECKS) <= set(pages), (
        f"checks for pages without Python: {sorted(set(CHECKS) - set(pages))}"
    )


@pytest.mark.parametrize("page", _pages_with_python())
def test_page(page):
    namespace = _run(page)
    check = CHECKS.get(page)
    if check is not None:
        check(namespace)


def test_api_reference_covers_the_public_api():
    # Every public name has a `::: itergrad.NAME` entry in docs/api/.
    import itergrad as ig

    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    modules = {"nn", "problems", "prox", "solvers"}
    names = [f"itergrad.{n}" for n in ig.__all__ if n not in modules]
    names += [f"itergrad.problems.{n}" for n in ig.problems.__all__ if n != "QP"]
    names += [f"itergrad.nn.{n}" for n in ig.nn.__all__]
    names += ["itergrad.prox"]
    missing = [n for n in names if f"::: {n}\n" not in text]
    assert not missing, f"not in the API reference (docs/api/*.md): {missing}"
