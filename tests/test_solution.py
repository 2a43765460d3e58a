"""`RESULTS` values by name: `ig.result_name` and `Solution`'s repr."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import itergrad as ig

NAMES = (
    "successful",
    "max_steps_reached",
    "nonfinite",
    "linear_solve_failed",
    "linesearch_failed",
    "infeasible",
)


def _halving(x, theta):
    return 0.5 * x + theta


@pytest.mark.parametrize("name", NAMES)
def test_result_name_of_each_item(name):
    item = getattr(ig.RESULTS, name)
    assert ig.result_name(item) == name
    # The same value after a round trip through jit (a concrete output).
    assert ig.result_name(jax.jit(lambda r: r)(item)) == name


@pytest.mark.parametrize("name", NAMES)
def test_results_item_prints_its_name(name):
    # equinox prints an item as `RESULTS<message>`; every message starts with
    # the name, so the repr is never the bare `RESULTS<>`.
    text = repr(getattr(ig.RESULTS, name))
    assert text.endswith(f"RESULTS<{name}>") or f"RESULTS<{name}: " in text


def test_solution_repr_shows_the_name_not_the_message():
    converged = ig.iterate(_halving, jnp.zeros(2), jnp.ones(2))
    assert ig.result_name(converged.result) == "successful"
    assert "result=RESULTS.successful" in repr(converged)
    assert "RESULTS<" not in repr(converged)

    stopped = ig.iterate(_halving, jnp.zeros(2), jnp.ones(2), max_steps=2, throw=False)
    text = repr(stopped)
    assert "result=RESULTS.max_steps_reached" in text
    assert ig.RESULTS[stopped.result] not in text  # the long message
    assert str(stopped) == text
    # The other fields are printed as equinox prints them.
    assert "value=f64[2]" in text and "steps=" in text


def test_result_name_under_transformations():
    @jax.jit
    def inside(theta):
        sol = ig.iterate(_halving, jnp.zeros(2), theta, max_steps=5, throw=False)
        with pytest.raises(ValueError, match="traced"):
            ig.result_name(sol.result)
        # What works under jit: comparing with an item.
        return sol.result, sol.result == ig.RESULTS.successful

    result, ok = inside(jnp.ones(2))
    assert ig.result_name(result) == "max_steps_reached" and not bool(ok)

    def batch(scale):
        theta = scale * jnp.ones(2)
        return ig.iterate(
            _halving, jnp.zeros(2), theta, max_steps=30, throw=False
        ).result

    results = eqx.filter_vmap(batch)(jnp.array([0.0, 1e8]))
    assert ig.result_name(results) == "['successful' 'max_steps_reached']"


def test_result_name_argument_error():
    with pytest.raises(TypeError, match="RESULTS"):
        ig.result_name("successful")
