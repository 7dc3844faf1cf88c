"""`benchmarks/` as a package: every module imports under its package name (no import circles, nothing that
needs `sys.path` surgery), no module is named like a package a benchmark imports, and the shared
interleaving order is what GUIDE.md asks for."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections import Counter
from pathlib import Path

import pytest

import benchmarks
from benchmarks.timing import round_robin

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports_under_the_package(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py has no module docstring"
    assert "sys.path" not in Path(module.__file__).read_text(), f"benchmarks/{name}.py edits sys.path"


def test_no_module_is_named_like_a_top_level_package():
    # run as a script, a file here would shadow a package of that name (benchmarks/kernels.py hid the
    # `kernels` package that transformers imports); as a package it cannot, but keep the names apart anyway
    taken = set(sys.stdlib_module_names) | {m.name for m in pkgutil.iter_modules()}
    assert "kernels" in taken or importlib.util.find_spec("kernels") is None
    assert not set(MODULES) & taken, set(MODULES) & taken


def test_round_robin_runs_every_side_once_a_round_and_rotates_the_first():
    order = list(round_robin("abc", 4))
    assert [r for r, _ in order] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    rounds = ["".join(side for r, side in order if r == i) for i in range(4)]
    assert rounds == ["abc", "bca", "cab", "abc"]
    assert Counter(side for _, side in order) == {"a": 4, "b": 4, "c": 4}
    assert list(round_robin([], 3)) == []


@pytest.mark.parametrize("fixed, per_row, curve_bend, expected", [
    (3000, 900, 0, 5),        # the affine fit is right: its prediction and the next batch are measured
    (3000, 900, 300, 4),      # rows cost more past batch 2 than the fit says: the bracket moves down
    (3000, 900, -400, 8),     # rows cost less: it moves up
    (2500, 180, -80, 55),     # far off (gradient checkpointing: 30 predicted, 55 true): secant steps, not +1
    (9000, 900, 0, None),     # not even the smallest batch fits
])
def test_the_budget_batch_is_bracketed_by_measured_runs(fixed, per_row, curve_bend, expected):
    from benchmarks.train import budget_fit, verify_budget

    def peak_at(batch: int) -> float:
        runs.append(batch)
        return fixed + per_row * batch + curve_bend * max(batch - 2, 0)

    runs: list[int] = []
    measured = {1: peak_at(1), 2: peak_at(2)}
    assert budget_fit(dict(measured), 8192)["max_batch"] != expected or curve_bend == 0
    found = verify_budget(peak_at, 8192, measured, max_runs=6)
    assert found["fits"] == expected
    if expected is not None:
        assert measured[expected] <= 8192 < measured[expected + 1]       # both measured: this fits, the next not
        assert found["over"] == expected + 1
    else:
        assert found["over"] == 1
    assert len(runs) == len(set(runs)) and len(runs) <= 2 + 6             # no batch run twice, at most max_runs


def test_the_budget_search_stops_after_its_runs_with_what_it_measured():
    from benchmarks.train import verify_budget

    runs: list[int] = []
    found = verify_budget(lambda b: runs.append(b) or 100.0 * b, 10_000, {1: 100.0, 2: 200.0}, max_runs=1)
    assert runs == [100] and found == {"fits": 100, "over": None}
