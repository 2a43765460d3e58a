"""MkDocs hook: serve the benchmark tables from benchmarks/ as site pages.

The tables are generated into `benchmarks/results/*.md` by the benchmark
scripts and live next to them; this hook adds those Markdown files (and the
figures they show) to the site under `benchmarks/`, as they are, so the site
never holds a stale copy.
"""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def on_files(files, config):
    sources = [ROOT / "benchmarks" / "README.md"]
    results = ROOT / "benchmarks" / "results"
    sources += sorted(results.glob("*.md")) + sorted(results.glob("*.png"))
    for path in sources:
        uri = path.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
