"""Shared machinery of the experiments: the run context, atomic file writes,
CSV round trips, compiled-function timing, log-log slopes and the plotting
style. Every figure module uses these rather than its own copy."""

import csv
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

PROFILES = ("tiny", "quick", "full")

# One colour and marker per estimator, the same in every figure.
STYLE: dict[str, dict[str, Any]] = {
    "None": dict(color="0.35", marker="s"),
    "Autodiff": dict(color="tab:blue", marker="o"),
    "Autodiff (forward)": dict(color="tab:cyan", marker="v"),
    "Autodiff (all states)": dict(color="tab:blue", marker="o", linestyle=":"),
    "Implicit": dict(color="tab:orange", marker="^"),
    "Implicit (matrix-free)": dict(color="tab:brown", marker="v", linestyle="--"),
    "One step": dict(color="tab:green", marker="D"),
    "Truncated": dict(color="tab:red", marker="P"),
    "Closed form": dict(color="black", marker=""),
    "Bound": dict(color="tab:purple", marker=""),
}


@dataclass
class Context:
    """What an experiment needs to know about its run.

    - `out`: the output folder.
    - `profile`: `"tiny"` (tests), `"quick"` (`--quick`) or `"full"` (the
      paper's sizes).
    - `seed`: the base PRNG seed.
    - `data`: a LibSVM file for the ridge experiment, or `None`.
    - `advance`: called once per unit of work (drives the progress bar).
    - `log`: prints a line above the progress bar.
    - `resume_rows`: rows of an interrupted earlier run with the same
      settings (empty otherwise); an experiment that checkpoints skips the
      work they cover.
    - `checkpoint`: saves the rows finished so far, so that an interrupted
      run loses at most the unit of work in progress.
    """

    out: Path
    profile: str = "quick"
    seed: int = 0
    data: Path | None = None
    advance: Callable[[], None] = lambda: None
    set_total: Callable[[int], None] = lambda total: None
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)
    resume_rows: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Callable[[list[dict[str, Any]]], None] = lambda rows: None

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        """The setting for the current profile."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.profile]


# ---------------------------------------------------------------------------
# Atomic IO


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and
    `os.replace`, so that a run killed half-way never leaves a truncated file
    (a CSV present on disk always means a finished experiment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _format(row.get(c, "")) for c in columns})
    atomic_write_text(path, buffer.getvalue())


def _format(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def _parse(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by `write_csv`, numbers parsed back."""
    with open(path, newline="", encoding="utf-8") as file:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(file)]


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True, default=float))


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------
# Timing and fits


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def time_samples(fn: Callable, *args: Any, repeats: int) -> tuple[np.ndarray, Any]:
    """`(seconds, output)`: the wall-clock seconds of each of `repeats` calls of
    `fn(*args)`, after one warm-up call that compiles (excluded)."""
    output = block(fn(*args))
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return np.asarray(times), output


def time_compiled(fn: Callable, *args: Any, repeats: int) -> tuple[float, float, Any]:
    """`(median, std, output)` of the wall-clock seconds of `fn(*args)` over
    `repeats` calls, after one warm-up call that compiles (excluded).

    The median, not the mean: on a shared machine one descheduled call can
    take 100x longer and would dominate a mean over a few repeats."""
    times, output = time_samples(fn, *args, repeats=repeats)
    return float(np.median(times)), float(times.std()), output


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of `log y` against `log x` (NaN with < 2 points)."""
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2 or np.ptp(np.log(x[keep])) == 0:
        return math.nan
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def floor_positive(values: Iterable[float], floor: float = 1e-17) -> np.ndarray:
    """Values clipped below at `floor`, so that exact zeros show on a log axis."""
    return np.maximum(np.asarray(list(values), float), floor)


def fmt(value: float, digits: int = 2) -> str:
    """A number for the report: scientific when small or large."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    value = float(value)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.{digits}e}"
    return f"{value:.{digits + 1}g}"


def verdict(held: bool | None) -> str:
    return {True: "**held**", False: "**did not hold**", None: "n/a"}[held]


def claims_table(rows: Sequence[tuple[str, str, str, bool | None]]) -> str:
    """A Markdown table: claim of the paper, paper's number, measured, verdict."""
    lines = [
        "| claim (paper) | paper | measured | verdict |",
        "|---|---|---|---|",
    ]
    for claim, paper, measured, held in rows:
        lines.append(f"| {claim} | {paper} | {measured} | {verdict(held)} |")
    return "\n".join(lines)


def tidy_log_axes(ax, xticks=None) -> None:
    """Readable log axes: no overlapping minor-tick labels; with `xticks`,
    label exactly those values (for short sweeps spanning less than a decade)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())
    if xticks is not None:
        ax.set_xticks(list(xticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.0, height: float = 3.8):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.08)
    return fig, axes
