"""The kfac public surface: explicit, documented, doctested, light to import."""

from __future__ import annotations

import doctest
import importlib
import inspect
import subprocess
import sys

import pytest

import kfac


def test_public_surface_is_explicit_and_sorted() -> None:
    assert kfac.__all__ == sorted(kfac.__all__)
    public = {
        name
        for name, obj in vars(kfac).items()
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
    }
    assert public == set(kfac.__all__)
    assert {"Distributed", "Message"} <= public  # distributed execution
    assert kfac.inverse_names() == (
        "brand",
        "brand-correct",
        "brand-rsvd",
        "brand-rsvd-correct",
        "eigh",
        "rsvd",
        "srevd",
    )


@pytest.mark.parametrize("name", ["KFAC", "KFACPreconditioner", "FNGD", "SENGPreconditioner"])
def test_classes_are_documented_with_numpydoc(name: str) -> None:
    doc = inspect.getdoc(getattr(kfac, name))
    for section in ("Parameters", "Notes", "Examples"):
        assert f"\n{section}\n" in doc, f"{name}: numpydoc section {section} missing"


@pytest.mark.parametrize(
    "module",
    [
        "kfac.preconditioner",
        "kfac.optimizer",
        "kfac.distributed",
        "kfac.mbf",
        "kfac.kld_wrm",
        "kfac.fngd",
        "kfac.seng",
        "kfac._quadratic",
        "kfac.presets",
        "kfac._schedule",
    ],
)
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_import_does_not_pull_plotting_datasets_or_cupy() -> None:
    code = (
        "import sys, kfac; "
        "bad = [m for m in ('cupy', 'matplotlib', 'sklearn', 'curvlinops', "
        "'torchvision') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
