import os

# Each pytest-xdist worker gets one core: XLA's intra-op thread pool stalls
# when two processes oversubscribe two cores. Set before jax is imported.
#
# Not used, measured 2026-12-03: `--xla_backend_optimization_level=0` cuts the
# suite's compile-bound time by ~20% but changes rounding (the QP
# `truncated_auto` x vmap matrix cell then measures rho = 0.012 instead of ~0
# and picks K = 3), so the tests would no longer check what users run;
# `--xla_llvm_disable_expensive_passes=true` alone saves nothing.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false"
)

import jax  # noqa: E402
import pytest  # noqa: E402

# The paper's accuracy claims are float64 claims; the library itself never
# flips this flag, the tests do.
jax.config.update("jax_enable_x64", True)


# tryfirst: pytest-xdist's worker hook turns the `xdist_group` marks into the
# `@group` node-id suffix that `--dist loadgroup` schedules by; it must see
# the marks added here. (pytest >= 9.2 broke that suffix: node ids no longer
# come from `_nodeid`, and every group was spread over both workers; hence
# the pin in pyproject.toml.)
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Tests that document an open library bug (`xfail(strict=True)`: they fail
    # until it is fixed, then must be un-marked) protect nothing while the bug
    # is open: they run in the slow tier (`pytest -m slow`), which keeps the
    # default run (CI, the README's command) under its time budget.
    for item in items:
        if any(mark.kwargs.get("strict") for mark in item.iter_markers("xfail")):
            item.add_marker(pytest.mark.slow)
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


# Modules whose tests share expensive module-scoped fixtures or compiled
# functions: with `--dist loadgroup` (pyproject.toml) each runs on one
# pytest-xdist worker, so the fixture is computed and the solver compiled
# once, not once per worker.
_GROUPED_MODULES = {
    "test_experiments",
    "test_gradient",
    "test_inexact_newton",
    "test_lbfgs",
    "test_maros_meszaros",
    "test_newton",
    "test_problems",
    "test_proximal",
    "test_qp",
    "test_sinkhorn",
    "test_error_bound",
}


def _xdist_group(item):
    module = item.module.__name__.rsplit(".", 1)[-1]
    params = getattr(getattr(item, "callspec", None), "params", {})
    if module == "test_matrix" and {"solver", "name", "dtype"} <= params.keys():
        # The matrix compiles one function per (solver, estimator, dtype) and
        # applies every transform to it (functools.cache): keep a family on
        # one worker.
        return f"matrix-{params['solver']}-{params['name']}-{params['dtype']}"
    if module in _GROUPED_MODULES:
        return module
    return None


# Every compiled XLA executable keeps its machine code in memory mappings of
# the process; one pytest worker compiles thousands of functions and hit the
# kernel's limit (vm.max_map_count, 65530 here): measured 63894 mappings at
# 57% of a single-process run of test_qp, test_newton, test_maros_meszaros
# and test_matrix, which then died in `backend_compile_and_load` (SIGSEGV or
# SIGABRT, a "crashed worker" under xdist). Dropping JAX's caches frees those
# executables (measured: 39k mappings -> 3.5k). It is done between modules
# (between the test matrix's families, which share nothing), never inside
# one: a module's compiled functions (module-scoped fixtures,
# test_maros_meszaros's one-trace check) must survive its own tests. The
# largest unit measured (test_qp) adds 37k mappings, so clearing above 20k
# keeps a worker under the limit. Linux only: elsewhere /proc/self/maps does
# not exist and nothing is cleared.
_MAPS_BUDGET = 20_000


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if _unit(item) != _unit(nextitem) and _memory_mappings() > _MAPS_BUDGET:
        jax.clear_caches()


def _unit(item):
    if item is None:
        return None
    return _xdist_group(item) or item.module.__name__
