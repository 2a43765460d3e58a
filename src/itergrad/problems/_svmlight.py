"""A dependency-free reader for LibSVM / svmlight text data sets."""

import math
import os
from pathlib import Path

import numpy as np

# The largest dense `X` load_svmlight builds (bytes): a stray huge feature
# index would otherwise ask for tens of GiB and fail far from its cause.
_MAX_DENSE_BYTES = 2**34


def _malformed(path: Path, line_number: int, raw: str, why: str) -> ValueError:
    return ValueError(
        f"load_svmlight: {path.name}, line {line_number}: {why}\n  {raw.rstrip()}"
    )


def load_svmlight(
    path: str | os.PathLike,
    n_features: int | None = None,
    dtype: np.dtype | type = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a LibSVM / svmlight file into dense arrays `(X, y)`.

    Each non-empty line is `label index:value index:value ...` with 1-based,
    increasing feature indices; features not listed are zero. Text after `#`
    is a comment; `qid:...` tokens are ignored. Pure NumPy (no scikit-learn).

    **Arguments:**

    - `path`: the file.
    - `n_features`: the number of columns of `X` (default: the largest index
      in the file). Must be at least the largest index.
    - `dtype`: the dtype of `X` and `y` (default float64). With an integer
      dtype every value and label must be a whole number.

    **Returns:** `X` of shape `(N, n_features)` and `y` of shape `(N,)`.

    **Raises:** `FileNotFoundError` for a missing file; `ValueError` naming
    the line number for a malformed line (bad label, token without `:`,
    non-numeric or non-positive index, repeated or decreasing indices, a NaN
    or infinite value or label, bytes that are not UTF-8, a fractional value
    with an integer `dtype`), an index beyond `n_features`, or a dense `X`
    larger than 16 GiB (naming the line with the largest index).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_svmlight: no such file {str(path)!r}. The paper's data sets "
            "(e.g. cpusmall) come from the LibSVM data page; itergrad's synthetic "
            "generators (ridge_data, logistic_data) need no file."
        )
    integer = np.issubdtype(np.dtype(dtype), np.integer)
    labels: list[float] = []
    rows: list[tuple[list[int], list[float]]] = []
    largest, largest_line = 0, 0
    with path.open("rb") as file:
        for line_number, raw_bytes in enumerate(file, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _malformed(
                    path, line_number, raw_bytes.decode("utf-8", "replace"),
                    f"byte {raw_bytes[e.start]:#x} at column {e.start + 1} is not "
                    "UTF-8 text.",
                ) from None
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            label, *tokens = line.split()

            def fail(why: str) -> ValueError:
                return _malformed(path, line_number, raw, why)  # noqa: B023

            def check(number: float, what: str) -> float:
                if not math.isfinite(number):
                    raise fail(f"{what} is {number} (NaN and Inf are not data).")
                if integer and not number.is_integer():
                    raise fail(
                        f"{what} {number} is not a whole number, but dtype={dtype!r} "
                        "is an integer dtype (it would be truncated): use a "
                        "floating dtype."
                    )
                return number

            try:
                number = float(label)
            except ValueError:
                raise fail(f"the label {label!r} is not a number.") from None
            labels.append(check(number, "the label"))
            indices: list[int] = []
            values: list[float] = []
            for token in tokens:
                name, sep, value = token.partition(":")
                if not sep:
                    raise fail(f"expected 'index:value', got {token!r}.")
                if name == "qid":
                    continue
                try:
                    index = int(name)
                    number = float(value)
                except ValueError:
                    raise fail(
                        f"expected 'index:value' with numbers, got {token!r}."
                    ) from None
                if index < 1:
                    raise fail(f"feature indices are 1-based, got {index}.")
                if indices and index <= indices[-1]:
                    raise fail(
                        f"feature indices must increase strictly, got {index} after "
                        f"{indices[-1]}."
                    )
                indices.append(index)
                values.append(check(number, f"the value of feature {index}"))
            if indices and indices[-1] > largest:
                largest, largest_line = indices[-1], line_number
            rows.append((indices, values))
    if n_features is None:
        n_features = largest
    elif largest > n_features:
        raise ValueError(
            f"load_svmlight: {path.name}, line {largest_line}: feature index "
            f"{largest} but n_features={n_features}."
        )
    size = len(rows) * n_features * np.dtype(dtype).itemsize
    if size > _MAX_DENSE_BYTES:
        raise ValueError(
            f"load_svmlight: {path.name}, line {largest_line}: feature index "
            f"{largest} makes X {len(rows)} x {n_features} ({size / 2**30:.3g} GiB "
            "dense), beyond the 16 GiB load_svmlight builds. Check that index, "
            "or use a sparse reader for such data."
        )
    X = np.zeros((len(rows), n_features), dtype=dtype)
    for i, (indices, values) in enumerate(rows):
        if indices:
            X[i, np.asarray(indices) - 1] = values
    return X, np.asarray(labels, dtype=dtype)


def standardize(X: np.ndarray, axis: int = 0) -> np.ndarray:
    """Centre and scale to unit standard deviation along `axis` (columns by
    default): $(X - \\mathrm{mean}) / \\mathrm{std}$. Constant columns are
    only centred (divided by 1), never turned into NaN.
    """
    X = np.asarray(X)
    mean = X.mean(axis=axis, keepdims=True)
    std = X.std(axis=axis, keepdims=True)
    return (X - mean) / np.where(std > 0, std, 1.0)
