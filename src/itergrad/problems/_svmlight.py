"""A dependency-free reader for LibSVM / svmlight text data sets."""

import os
from pathlib import Path

import numpy as np


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
    - `dtype`: the floating dtype of `X` and `y` (default float64).

    **Returns:** `X` of shape `(N, n_features)` and `y` of shape `(N,)`.

    **Raises:** `FileNotFoundError` for a missing file; `ValueError` naming
    the line number for a malformed line (bad label, token without `:`,
    non-numeric or non-positive index, repeated or decreasing indices) or an
    index beyond `n_features`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_svmlight: no such file {str(path)!r}. The paper's data sets "
            "(e.g. cpusmall) come from the LibSVM data page; itergrad's synthetic "
            "generators (ridge_data, logistic_data) need no file."
        )
    labels: list[float] = []
    rows: list[tuple[list[int], list[float]]] = []
    with path.open("r", encoding="utf-8") as file:
        for line_number, raw in enumerate(file, start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            label, *tokens = line.split()

            def fail(why: str) -> ValueError:
                return _malformed(path, line_number, raw, why)  # noqa: B023

            try:
                labels.append(float(label))
            except ValueError:
                raise fail(f"the label {label!r} is not a number.") from None
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
                values.append(number)
            rows.append((indices, values))
    largest = max((row[0][-1] for row in rows if row[0]), default=0)
    if n_features is None:
        n_features = largest
    elif largest > n_features:
        raise ValueError(
            f"load_svmlight: {path.name} has feature index {largest} but "
            f"n_features={n_features}."
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
