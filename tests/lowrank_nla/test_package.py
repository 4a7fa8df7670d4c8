"""Public surface, import hygiene, docstrings (run as doctests) and the demo command."""

from __future__ import annotations

import doctest
import importlib
import inspect
import subprocess
import sys

import pytest

import lowrank_nla as ln

MODULES = [
    "lowrank_nla._backend",
    "lowrank_nla._sketch",
    "lowrank_nla._svd",
    "lowrank_nla._eigh",
    "lowrank_nla._bounds",
    "lowrank_nla._dask",
    "lowrank_nla._kernels",
    "lowrank_nla._lowrank",
    "lowrank_nla._brand",
    "lowrank_nla._woodbury",
    "lowrank_nla._rank",
    "lowrank_nla.testing",
]


def test_import_does_not_import_torch_cupy_or_dask() -> None:
    code = (
        "import sys, lowrank_nla; "
        "bad = [m for m in ('torch', 'cupy', 'dask', 'distributed') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_surface_is_explicit_and_sorted() -> None:
    assert ln.__all__ == sorted(ln.__all__)
    public = {
        name
        for name, obj in vars(ln).items()
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
    }
    assert public == set(ln.__all__)


@pytest.mark.parametrize("name", ln.__all__)
def test_every_public_name_is_documented(name: str) -> None:
    doc = inspect.getdoc(getattr(ln, name))
    assert doc, f"{name} has no docstring"
    if inspect.isfunction(getattr(ln, name)):
        for section in ("Parameters", "Returns", "Notes", "Examples"):
            assert f"\n{section}\n" in doc, f"{name}: numpydoc section {section} missing"


@pytest.mark.parametrize("module", MODULES)
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_public_functions_have_examples_that_run() -> None:
    documented = [name for name in ln.__all__ if inspect.isfunction(getattr(ln, name))]
    finder = doctest.DocTestFinder()
    for name in documented:
        tests = finder.find(getattr(ln, name), name)
        assert tests, f"{name} has no docstring"
        assert tests[0].examples, f"{name} has no doctest example"


def test_demo_command_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lowrank_nla", "demo", "--n", "300", "--rank", "20"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.splitlines()

    def error_of(method: str) -> float:
        return float(next(line for line in lines if f" {method} " in line).split()[-1])

    optimal_psd = error_of("numpy.linalg.eigh (exact, full)")
    optimal_dense = error_of("numpy.linalg.svd (exact, full)")
    assert error_of("partial_eigh (exact top-k)") == pytest.approx(optimal_psd, rel=1e-3)
    for method in ("randomized_eigh", "srevd", "nystrom"):
        assert optimal_psd * (1 - 1e-3) <= error_of(method) < 3 * optimal_psd
    assert optimal_dense * (1 - 1e-3) <= error_of("randomized_svd") < 3 * optimal_dense


def test_demo_rejects_bad_rank() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lowrank_nla", "demo", "--n", "50", "--rank", "50"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "--rank must be in [1, n)" in out.stderr


def test_demo_rejects_a_negative_seed() -> None:
    # It ended in NumPy's traceback ("expected non-negative integer") after the banner.
    out = subprocess.run(
        [sys.executable, "-m", "lowrank_nla", "demo", "--n", "50", "--rank", "5", "--seed", "-1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "--seed must be a non-negative integer, got -1" in out.stderr
    assert "Traceback" not in out.stderr
