"""The documentation site: every public name is in the API reference, and the strict build
(warnings are errors, numpydoc fails on a missing docstring, notebooks executed) passes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kfac
import lowrank_nla

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _api_names(package: str) -> set[str]:
    text = (DOCS / "api.md").read_text()
    block = text.split(f".. currentmodule:: {package}\n", 1)[1].split("```", 1)[0]
    return set(re.findall(r"^   ([A-Za-z_][A-Za-z0-9_]*)$", block, flags=re.M))


@pytest.mark.parametrize("package", [lowrank_nla, kfac], ids=["lowrank_nla", "kfac"])
def test_api_reference_lists_every_public_name(package) -> None:
    assert _api_names(package.__name__) == set(package.__all__)


def test_notebooks_are_in_the_site() -> None:
    index = (DOCS / "index.md").read_text()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{nb.stem}" in index
    assert (DOCS / "notebooks").resolve() == (ROOT / "notebooks").resolve()


@pytest.mark.slow
def test_strict_documentation_build(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    html = tmp_path / "html"
    for page in ("index", "api", "benchmarks", "notebooks/03_brand_drift_and_control"):
        assert (html / f"{page}.html").exists(), page
    assert (html / "generated" / "lowrank_nla.brand_update.html").exists()
    executed = (html / "notebooks" / "01_ea_spectrum_decay.html").read_text()
    assert "all claims hold" in executed  # the notebook ran during the build
    print(f"documentation build: {time.perf_counter() - start:.0f} s")


def test_getting_started_examples_run() -> None:
    text = (DOCS / "getting_started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "getting_started.md", "exec"), {})
