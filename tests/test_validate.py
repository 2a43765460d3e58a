"""The shared argument checks (`itergrad._validate`): what each accepts, what
it returns, and the exact message of each rejection."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from itergrad._validate import (
    in_closed_interval,
    in_open_interval,
    nonnegative_float,
    nonnegative_int,
    one_of,
    positive_float,
    positive_int,
)


def _raises(message):
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


def test_integers():
    assert positive_int(3, "k") == 3
    assert type(positive_int(np.int64(3), "k")) is int
    assert nonnegative_int(0, "p") == 0
    for bad in (0, -1, 1.0, True, "3", None, jnp.array(3)):
        with _raises(f"`k` must be a positive integer, got {bad!r}."):
            positive_int(bad, "k")
    for bad in (-1, 0.0, False):
        with _raises(f"`p` must be a non-negative integer, got {bad!r}."):
            nonnegative_int(bad, "p")


def test_numbers():
    assert positive_float(2, "x") == 2.0 and type(positive_float(2, "x")) is float
    assert nonnegative_float(np.float32(0.0), "rtol") == 0.0
    # Concrete 0-d arrays are checked and returned as they are.
    array = jnp.array(0.5)
    assert positive_float(array, "x") is array
    for bad in (0.0, -1.0, float("nan"), True, "1", jnp.ones(2), jnp.array(-1.0)):
        with _raises(f"`x` must be a positive number, got {bad!r}."):
            positive_float(bad, "x")
    with _raises("`rtol` must be a non-negative number, got -1e-10."):
        nonnegative_float(-1e-10, "rtol")


def test_traced_numbers_pass_unchecked():
    # Under jit a value is not known while tracing: it is returned as it is.
    checked = jax.jit(lambda s: positive_float(s, "stepsize") * 2)(-1.0)
    assert float(checked) == -2.0


def test_intervals():
    assert in_open_interval(0.5, "eta_min", 0, 1) == 0.5
    for bad in (0.0, 1.0, 2.0, float("nan")):
        with _raises(f"`eta_min` must lie in (0, 1), got {bad!r}."):
            in_open_interval(bad, "eta_min", 0, 1)
    assert in_closed_interval(0.0, "fraction", 0, 1) == 0.0
    assert in_closed_interval(1, "fraction", 0, 1) == 1.0
    with _raises("`fraction` must lie in [0, 1], got 1.5."):
        in_closed_interval(1.5, "fraction", 0, 1)


def test_one_of():
    assert one_of("reverse", "mode", ("reverse", "forward")) == "reverse"
    with _raises("`mode` must be one of 'reverse', 'forward'; got 'backward'."):
        one_of("backward", "mode", ("reverse", "forward"))
    with _raises(
        "`K` must be one of 'auto'; got Array(1, dtype=int64, weak_type=True)."
    ):
        one_of(jnp.array(1), "K", ["auto"])
