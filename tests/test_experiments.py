"""The `itergrad reproduce` command at a tiny size: files, columns, reuse,
`--force`, `--only` and the report's claims."""

import math
import os
import shutil
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

import itergrad as ig
from itergrad.experiments import _report
from itergrad.experiments._cli import EXPERIMENTS, _module, main

NAMES = list(EXPERIMENTS)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert main(["reproduce", "--tiny", "--out", str(out), "--seed", "1"]) == 0
    return out


def _mtimes(out):
    return {name: (out / f"{name}.csv").stat().st_mtime_ns for name in NAMES}


def test_every_output_exists_with_expected_columns(results):
    for name in NAMES:
        for suffix in ("csv", "png", "json"):
            assert (results / f"{name}.{suffix}").is_file(), (name, suffix)
        assert (results / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        rows = _report.read_csv(results / f"{name}.csv")
        assert rows, name
        assert list(rows[0]) == list(_module(name).COLUMNS), name
        for row in rows:
            for column, value in row.items():
                if isinstance(value, int | float):
                    assert math.isfinite(value), (name, column, value)
    assert not list(results.glob("*.tmp")), "temporary files left behind"


def test_report_states_the_claims(results):
    report = (results / "report.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert _module(name).TITLE in report
        assert f"![{name}]({name}.png)" in report
    for phrase in (
        "| claim (paper) | paper | measured | verdict |",
        "one-step and implicit gradients agree",  # Figure 3, per problem
        "QP", "Newton/logistic", "1e-12",
        "one-step overhead over the solve",
        "autodiff is markedly slower",
        "Cor. 3",
        "fixed time budget",  # Figure 4
        "K = κ",
        "memory slope",  # Table 2
        "hypergradient",
    ):
        assert phrase in report, phrase
    assert "**held**" in report


@pytest.mark.slow  # reruns reproduce: slow tier (CI time budget)
def test_second_run_reuses_then_force_and_only_recompute(results):
    before = _mtimes(results)
    assert main(["reproduce", "--tiny", "--out", str(results), "--seed", "1"]) == 0
    assert _mtimes(results) == before
    # --only with a comma list and --force: only that experiment is recomputed,
    # the report keeps every section.
    assert main(["reproduce", "--tiny", "--out", str(results), "--seed", "1",
                 "--only", "bilevel,", "--force"]) == 0
    after = _mtimes(results)
    assert after["bilevel"] != before["bilevel"]
    assert {k: v for k, v in after.items() if k != "bilevel"} == {
        k: v for k, v in before.items() if k != "bilevel"}
    report = (results / "report.md").read_text(encoding="utf-8")
    assert all(_module(name).TITLE in report for name in NAMES)


@pytest.mark.slow  # reruns reproduce twice: slow tier (CI time budget)
def test_settings_decide_reuse(results, tmp_path):
    # On a copy of the fixture's run (seed 1, every experiment): the same
    # settings reuse table2's CSV, another seed recomputes it, and a rerun with
    # that seed reuses the new one. The other experiments are left alone.
    out = tmp_path / "results"
    shutil.copytree(results, out)
    csv, meta = out / "table2.csv", out / "table2.json"
    others = {name: v for name, v in _mtimes(out).items() if name != "table2"}

    def run(seed):
        assert main(["reproduce", "--tiny", "--out", str(out), "--seed", str(seed),
                     "--only", "table2"]) == 0

    def stamp():
        # An mtime no write produces, so that any rewrite shows whatever the
        # file system's timestamp resolution.
        for path in (csv, meta):
            os.utime(path, ns=(0, 0))

    def rewritten():
        return csv.stat().st_mtime_ns != 0 or meta.stat().st_mtime_ns != 0

    stamp()
    run(1)
    assert not rewritten(), "identical settings recomputed instead of reusing"
    run(2)
    assert rewritten(), "a changed seed reused a CSV made with seed 1"
    assert _report.read_meta(meta)["seed"] == 2
    assert _report.read_csv(csv)
    stamp()
    run(2)
    assert not rewritten(), "identical settings (seed 2) recomputed instead of reusing"
    assert {name: v for name, v in _mtimes(out).items() if name != "table2"} == others


def test_unknown_experiment_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown experiment"):
        main(["reproduce", "--tiny", "--out", str(tmp_path), "--only", "fig9"])


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "x.csv"
    _report.write_csv(path, [{"a": 1, "b": 0.5}], ["a", "b"])
    _report.write_csv(path, [{"a": 2, "b": 1e-300}], ["a", "b"])
    assert _report.read_csv(path) == [{"a": 2, "b": 1e-300}]
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


def test_interrupted_fig3_resumes_from_its_finished_sizes(tmp_path, monkeypatch):
    # Figure 3 checkpoints after each problem size: a run that dies at the
    # logistic sizes keeps the QP rows, and the next run (same settings) reuses
    # them without recomputing any QP size.
    from itergrad.experiments import _fig3

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted here")

    def cheap_case(key, size):
        # The checkpointing is under test, not the solvers (their Figure 3
        # cases run in the tiny reproduction above): a solution x = 2 u whose
        # four "methods" compile in milliseconds.
        def solution(estimator, u, data):
            return SimpleNamespace(value=data * u, steps=jnp.asarray(1),
                                   result=ig.RESULTS.successful)

        return solution, jnp.ones(3), jnp.asarray(2.0), dict(n=3, m=0, p=0, N=0, params=3)

    monkeypatch.setattr(_fig3, "_qp_case", cheap_case)
    monkeypatch.setattr(_fig3, "_logistic_case", cheap_case)
    args = ["reproduce", "--tiny", "--out", str(tmp_path), "--only", "fig3"]
    with monkeypatch.context() as patch:
        patch.setattr(_fig3, "_logistic_case", interrupted)
        assert main(args) == 1
    partial = tmp_path / "fig3.partial.csv"
    assert not (tmp_path / "fig3.csv").exists()
    qp_rows = _report.read_csv(partial)
    assert {r["problem"] for r in qp_rows} == {"qp"}
    assert len(qp_rows) == len(_fig3.METHODS)

    with monkeypatch.context() as patch:
        patch.setattr(_fig3, "_qp_case", interrupted)  # a recomputed QP size would fail
        assert main(args) == 0
    rows = _report.read_csv(tmp_path / "fig3.csv")
    assert [r for r in rows if r["problem"] == "qp"] == qp_rows
    assert {r["problem"] for r in rows} == {"qp", "logistic"}
    assert not partial.exists() and not (tmp_path / "fig3.partial.json").exists()
