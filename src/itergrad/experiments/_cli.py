"""The `itergrad` command: `itergrad reproduce` recomputes every numerical
result of the paper into CSV files, PNG figures and a Markdown report.

```
itergrad reproduce [--out DIR] [--quick] [--only NAME[,NAME]] [--force]
                   [--data PATH] [--seed N]
```

Each experiment writes `<name>.csv` (the measurements), `<name>.json` (its
settings) and `<name>.png`; `report.md` collects one section per experiment
whose CSV is in `--out`. A CSV already in `--out` and made with the same
size profile, seed and data is reused (figure and report section are redrawn
from it) unless `--force`. Every file is written atomically, so an
interrupted run resumes where it stopped; a long experiment also saves its
finished parts (`<name>.partial.csv`, e.g. Figure 3 after each problem size),
which a resumed run with the same settings reuses.
"""

import argparse
import datetime
import importlib
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ._report import (
    Context,
    atomic_write_text,
    read_csv,
    read_meta,
    write_csv,
    write_meta,
)

# name -> module, in report order.
EXPERIMENTS = {
    "fig2": "._fig2",
    "fig3": "._fig3",
    "fig4": "._fig4",
    "table2": "._table2",
    "bilevel": "._bilevel_run",
}


# Seconds each experiment took on the reference machine (2-core CPU, see
# docs/reproduce.md), per size profile: the weights of the overall progress
# bar, so that its "time left" accounts for Figure 3 costing far more than
# Figure 2. Only the ratios matter; the estimate scales with the speed
# measured during the run.
EXPECTED_SECONDS = {
    "tiny": {"fig2": 5, "fig3": 15, "fig4": 10, "table2": 10, "bilevel": 5},
    "quick": {"fig2": 36, "fig3": 67, "fig4": 36, "table2": 42, "bilevel": 9},
    "full": {"fig2": 49, "fig3": 310, "fig4": 248, "table2": 80, "bilevel": 14},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itergrad",
        description="itergrad: differentiate iterative algorithms in JAX.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser(
        "reproduce",
        help="recompute the paper's figures and tables",
        description="Recompute every numerical result of Bolte, Pauwels, Vaiter "
        "(NeurIPS 2023): " + ", ".join(EXPERIMENTS) + ".",
    )
    rep.add_argument("--out", type=Path, default=Path("results"),
                     help="output folder (default: results/)")
    rep.add_argument("--quick", action="store_true",
                     help="small sizes: a couple of minutes on a laptop")
    # Test-only size profile, smaller still than --quick.
    rep.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    rep.add_argument("--only", action="append", metavar="NAME",
                     help="run only these experiments (repeatable or comma "
                     f"separated; among {', '.join(EXPERIMENTS)})")
    rep.add_argument("--force", action="store_true",
                     help="recompute even when a matching CSV exists")
    rep.add_argument("--data", type=Path, default=None,
                     help="LibSVM file for the ridge experiment (e.g. cpusmall); "
                     "default: a synthetic design of the same shape")
    rep.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    return parser


def _selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(EXPERIMENTS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(
            f"itergrad reproduce: unknown experiment(s) {unknown}; choose among "
            f"{', '.join(EXPERIMENTS)}."
        )
    return [n for n in EXPERIMENTS if n in names]


def _module(name: str):
    return importlib.import_module(EXPERIMENTS[name], __package__)


def _settings(profile: str, seed: int, data: Path | None) -> dict:
    return {"profile": profile, "seed": seed,
            "data": None if data is None else str(Path(data).resolve())}


def _check_out(out: Path) -> None:
    """Create `--out` and check that files can be written in it, before any
    experiment runs: otherwise a file at that path or a read-only folder
    surfaces as a raw OSError only when the first result is written, after
    its computation."""
    if out.exists() and not out.is_dir():
        raise SystemExit(
            f"itergrad reproduce: --out {out}: is a file, not a folder; give a "
            "folder path (it is created if missing)."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A probe written and removed at once: permissions alone do not tell
        # (root ignores them; read-only file systems do not).
        fd, probe = tempfile.mkstemp(dir=out, prefix=".itergrad-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SystemExit(
            f"itergrad reproduce: --out {out}: cannot write there ({e.strerror or e}); "
            "give a writable folder."
        ) from None


def _check_data(data: Path) -> None:
    """Read `--data` once before any experiment runs, and refuse a file that
    the ridge experiment cannot use (no rows, no features, a single row or
    constant labels, which leave nothing to standardise), naming `--data`."""
    from ..problems import load_svmlight

    if not Path(data).is_file():
        raise SystemExit(f"itergrad reproduce: --data {data}: no such file.")
    try:
        X, y = load_svmlight(data)
    except ValueError as e:
        raise SystemExit(f"itergrad reproduce: --data {data}: {e}") from None
    problem = None
    if X.shape[0] < 2:
        problem = f"{X.shape[0]} sample(s); the ridge experiment needs at least 2"
    elif X.shape[1] == 0:
        problem = "labels only, no feature values"
    elif not y.std() > 0:
        problem = "every label is the same, so the targets cannot be standardised"
    if problem is not None:
        raise SystemExit(
            f"itergrad reproduce: --data {data}: {problem}. Give a LibSVM file "
            "'label index:value ...' with at least two samples (e.g. cpusmall)."
        )


def reproduce(args) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    out: Path = args.out
    # Every argument is checked before anything is computed or written.
    names = _selected(args.only)
    if args.data is not None:
        _check_data(args.data)
    _check_out(out)
    profile = "tiny" if args.tiny else ("quick" if args.quick else "full")
    settings = _settings(profile, args.seed, args.data)
    console = Console(stderr=True)
    failures = []
    start_all = time.perf_counter()

    def reusable(name):
        old_meta = read_meta(out / f"{name}.json")
        matching = all(old_meta.get(k) == v for k, v in settings.items())
        return (out / f"{name}.csv").exists() and matching and not args.force

    weights = EXPECTED_SECONDS[profile]
    pending = [name for name in names if not reusable(name)]
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
        console=console, transient=False,
    ) as progress:
        # The overall bar counts expected seconds (EXPECTED_SECONDS), so its
        # "left" is the remaining expected work at the speed seen so far.
        expected_total = sum(weights[n] for n in pending)
        overall = progress.add_task("all", total=expected_total)
        done_weight = 0.0
        for position, name in enumerate(names, 1):
            module = _module(name)
            csv_path, meta_path = out / f"{name}.csv", out / f"{name}.json"
            if reusable(name):
                progress.console.print(f"[dim]{name}: reusing {csv_path}[/dim]")
                continue
            if csv_path.exists() and not args.force:
                old_meta = read_meta(meta_path)
                progress.console.print(
                    f"{name}: {csv_path} was made with other settings "
                    f"({ {k: old_meta.get(k) for k in settings} }); recomputing."
                )
            task = progress.add_task(f"{name} ({position}/{len(names)})", total=None)
            partial_csv, partial_meta = out / f"{name}.partial.csv", out / f"{name}.partial.json"
            resume_rows = []
            if partial_csv.exists() and not args.force and read_meta(partial_meta) == settings:
                resume_rows = read_csv(partial_csv)
                progress.console.print(
                    f"[dim]{name}: resuming from {len(resume_rows)} finished rows in "
                    f"{partial_csv}[/dim]")

            def checkpoint(rows, module=module, partial_csv=partial_csv,
                           partial_meta=partial_meta):
                write_meta(partial_meta, settings)
                write_csv(partial_csv, rows, module.COLUMNS)

            units = {"total": None}

            def advance(task=task, name=name, units=units):
                progress.advance(task)
                if units["total"]:
                    progress.advance(overall, weights[name] / units["total"])

            def set_total(total, task=task, units=units):
                units["total"] = total
                progress.update(task, total=total)

            ctx = Context(
                out=out, profile=profile, seed=args.seed, data=args.data,
                advance=advance, set_total=set_total, log=progress.console.print,
                resume_rows=resume_rows, checkpoint=checkpoint,
            )
            started = time.perf_counter()
            try:
                rows, meta = module.run(ctx)
            except Exception:  # one failed experiment must not lose the others
                progress.console.print(f"[red]{name} failed:[/red]\n{traceback.format_exc()}")
                failures.append(name)
                rows = None
            done_weight += weights[name]
            progress.update(overall, completed=done_weight)
            if rows is None:
                continue
            meta = {**meta, **settings, "seconds": time.perf_counter() - started,
                    "notes": ctx.notes}
            # The JSON first, then the CSV: the CSV's presence marks completion.
            write_meta(meta_path, meta)
            write_csv(csv_path, rows, module.COLUMNS)
            for path in (partial_csv, partial_meta):
                path.unlink(missing_ok=True)
            progress.update(task, description=f"{name} ✓")
            if not console.is_terminal:
                # No live bar in a log file: one line per experiment instead.
                elapsed = time.perf_counter() - start_all
                left = elapsed * (expected_total - done_weight) / done_weight
                progress.console.print(
                    f"{name} done in {meta['seconds']:.0f} s; {elapsed / 60:.1f} min so far, "
                    f"about {left / 60:.1f} min left")
    _render(out, names, console)
    console.print(
        f"itergrad reproduce ({profile}): {len(names) - len(failures)}/{len(names)} "
        f"experiments in {time.perf_counter() - start_all:.1f} s; report: {out / 'report.md'}"
    )
    return 1 if failures else 0


def _render(out: Path, names: list[str], console) -> None:
    """Redraw the PNG of every selected experiment and rewrite `report.md`
    from every CSV present in `out` (including experiments not selected this
    time, so that `--only` never drops a section)."""
    import jax

    sections = []
    for name in EXPERIMENTS:
        csv_path = out / f"{name}.csv"
        if not csv_path.exists():
            continue
        module = _module(name)
        rows, meta = read_csv(csv_path), read_meta(out / f"{name}.json")
        png = out / f"{name}.png"
        if name in names or not png.exists():
            try:
                module.plot(rows, meta, png)
            except Exception:
                console.print(f"[red]{name}: plotting failed[/red]\n{traceback.format_exc()}")
        try:
            body = module.section(rows, meta)
        except Exception:
            body = f"(report section failed: {traceback.format_exc()})"
        notes = "".join(f"\n> Note: {note}\n" for note in meta.get("notes", []))
        sections.append(
            f"## {module.TITLE}\n\n![{name}]({name}.png)\n\nData: `{name}.csv` "
            f"(profile `{meta.get('profile')}`, seed {meta.get('seed')}, computed in "
            f"{meta.get('seconds', float('nan')):.1f} s).\n{notes}\n{body}\n"
        )
    header = f"""# itergrad reproduce — report

Bolte, Pauwels, Vaiter, *One-step differentiation of iterative algorithms*
(NeurIPS 2023), §4 and Appendix B, recomputed with itergrad. Each section
states the paper's claims next to the measured numbers and whether they held.

- generated: {datetime.datetime.now().isoformat(timespec='seconds')}
- machine: {platform.machine()} {platform.processor() or ''}, JAX {jax.__version__},
  backend `{jax.default_backend()}` ({jax.device_count()} device(s)), float64 enabled
- timings are wall-clock seconds of compiled functions (warm-up excluded); on a
  shared machine they are noisy, ratios more than absolute values.

"""
    atomic_write_text(out / "report.md", header + "\n".join(sections))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `itergrad` console script."""
    args = _parser().parse_args(argv)
    import jax

    # The paper's accuracy claims (1e-12 agreement) are float64 claims. The
    # flag is set here, for this process, never by importing the library.
    jax.config.update("jax_enable_x64", True)
    if args.command == "reproduce":
        return reproduce(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
