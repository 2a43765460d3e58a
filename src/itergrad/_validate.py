"""Argument checks shared by every public entry point.

Each function checks one kind of argument while tracing, raises a `ValueError`
that names the argument and shows the offending value, and returns the value
normalised (integers as Python `int`, numbers as Python `float`). `name` is
shown between backticks: pass the argument's name (`"max_steps"`) or, for a
module's field, the constructor form (`"Neumann(k=...)"`).

Numbers may also be given as 0-d arrays. A concrete array is checked and
returned unchanged (so that a field can stay a differentiable array); a traced
one (inside `jit`, `vmap`, `grad`) cannot be checked before it has a value and
is returned unchanged too.
"""

import numbers
from collections.abc import Iterable
from typing import Any, TypeVar, overload

import jax
import jax.core
import numpy as np
from jaxtyping import Array

_T = TypeVar("_T")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `steps=True` is always a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """Check that `value` is an integer $\\ge 1$ (not a `bool`); return it as an
    `int`."""
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def step_bound(value: Any, name: str) -> int:
    """Check that `value` is a positive integer that fits JAX's default
    integer dtype (int64 with x64 enabled, int32 otherwise); return it as an
    `int`.

    For bounds on a loop counter (`max_steps`): the counter is an array of that
    dtype and is compared with the bound inside the loop, so a larger bound
    would only fail later, inside JAX, with an `OverflowError` naming no
    argument."""
    value = positive_int(value, name)
    dtype = jax.dtypes.canonicalize_dtype(np.int64)
    largest = int(np.iinfo(dtype).max)
    if value > largest:
        hint = (
            "" if dtype == np.int64
            else " or enable 64-bit integers (jax.config.update('jax_enable_x64', True))"
        )
        raise ValueError(
            f"`{name}` must be at most {largest} (the largest {dtype.name}, the dtype "
            f"of JAX's step counter), got {value!r}: lower it{hint}."
        )
    return value


def nonnegative_int(value: Any, name: str) -> int:
    """Check that `value` is an integer $\\ge 0$ (not a `bool`); return it as an
    `int`."""
    if not (_is_int(value) and value >= 0):
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return int(value)


def _number(value: Any, name: str, what: str) -> float | None:
    """`value` as a float to compare; `None` when it is traced."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray | jax.Array) and value.shape == ():
        if np.issubdtype(value.dtype, np.integer) or np.issubdtype(
            value.dtype, np.floating
        ):
            return float(value)
    raise ValueError(f"`{name}` must be {what}, got {value!r}.")


@overload
def positive_float(value: float, name: str) -> float: ...
@overload
def positive_float(value: Array, name: str) -> Array: ...
def positive_float(value: Any, name: str) -> Any:
    """Check that `value` is a real number $> 0$ (NaN fails); return it as a
    `float`, or unchanged when it is an array."""
    what = "a positive number"
    number = _number(value, name, what)
    if number is not None and not number > 0:
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")
    return number if _is_scalar(value) else value


@overload
def nonnegative_float(value: float, name: str) -> float: ...
@overload
def nonnegative_float(value: Array, name: str) -> Array: ...
def nonnegative_float(value: Any, name: str) -> Any:
    """Check that `value` is a real number $\\ge 0$ (NaN fails); return it as a
    `float`, or unchanged when it is an array."""
    what = "a non-negative number"
    number = _number(value, name, what)
    if number is not None and not number >= 0:
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")
    return number if _is_scalar(value) else value


@overload
def in_open_interval(value: float, name: str, low: float, high: float) -> float: ...
@overload
def in_open_interval(value: Array, name: str, low: float, high: float) -> Array: ...
def in_open_interval(value: Any, name: str, low: float, high: float) -> Any:
    """Check that `value` is a real number with $\\text{low} < \\text{value} <
    \\text{high}$; return it as a `float`, or unchanged when it is an array."""
    return _interval(value, name, low, high, closed=False)


@overload
def in_closed_interval(value: float, name: str, low: float, high: float) -> float: ...
@overload
def in_closed_interval(value: Array, name: str, low: float, high: float) -> Array: ...
def in_closed_interval(value: Any, name: str, low: float, high: float) -> Any:
    """Check that `value` is a real number with $\\text{low} \\le \\text{value} \\le
    \\text{high}$; return it as a `float`, or unchanged when it is an array."""
    return _interval(value, name, low, high, closed=True)


def _interval(value: Any, name: str, low: float, high: float, *, closed: bool) -> Any:
    kind, left, right = ("closed", "[", "]") if closed else ("open", "(", ")")
    number = _number(value, name, f"a number in the {kind} interval {left}{low}, {high}{right}")
    inside = number is None or (
        low <= number <= high if closed else low < number < high
    )
    if not inside:
        raise ValueError(f"`{name}` must lie in {left}{low}, {high}{right}, got {value!r}.")
    return number if _is_scalar(value) else value


def one_of(value: _T, name: str, choices: Iterable[Any]) -> _T:
    """Check that `value` is one of `choices` (compared with `==`); return it."""
    choices = tuple(choices)
    # `value in choices` would compare arrays elementwise: only plain values
    # (strings, numbers, None) can be members.
    if isinstance(value, np.ndarray | jax.Array) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {listed}; got {value!r}.")
    return value
